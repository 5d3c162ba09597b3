"""The side-by-side report of a run of several pairs (``--target all``): terminal table and HTML page with plots.

Rendering only: ``phiconvert.pipeline`` runs the conversions and benches and hands over the comparison (what
report.json holds); this module turns it into rows, a rich table and a self-contained page.
"""

from __future__ import annotations

import html
import io
from typing import Any

from rich.table import Table

from phiconvert import targets

# The "theory" that measured sizes and memory are set against: an artifact's nominal bits per weight, as its target
# declares them; the source's, its checkpoint's dtype (it is benched in float32, as the reference runs)
DTYPE_BITS = {"bfloat16": 16, "float16": 16, "float32": 32}


def _mib(n: float | None) -> float | None:
    return None if n is None else n / 2**20


def rows(comparison: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per artifact (source first) with the numbers the table and the plots show."""
    parameters = comparison["source"]["parameters"]
    out = []
    for row in [comparison["baseline"], *comparison["runs"]]:
        report, measured = row.get("report") or {}, row.get("bench") or {}
        fidelity = report.get("fidelity") or {}
        if row is comparison["baseline"]:  # the source against itself: the origin of every fidelity axis
            fidelity = {"worst_top1": 1.0, "worst_kl": 0.0, "ppl_pct": 0.0}
            nominal = DTYPE_BITS.get(comparison["source"]["dtype"], 32)
        else:
            nominal = targets.load(row["target"]).precisions[row["precision"]].bits
        prompts = measured.get("prompts", [])
        size = measured.get("size_bytes", report.get("size_bytes"))
        out.append({
            "name": f"{row['target']} {row['precision']}",
            "status": row["status"],
            "error": row.get("error") or row.get("bench_error"),
            "theory_mib": _mib(parameters * nominal / 8) if nominal else None,
            "size_mib": _mib(size),
            "bits_per_weight": 8 * size / parameters if size else None,
            "load_s": measured.get("load_s"),
            "load_rss_mib": _mib(measured.get("load_rss")),
            "load_rss_added_mib": _mib(measured["load_rss"] - measured["baseline_rss"]) if measured else None,
            "prompt_tps": {p["tokens"]: p.get("prompt_tps") for p in prompts},  # None: past the runtime's context
            "generation_tps": {p["tokens"]: p.get("generation_tps") for p in prompts},
            "top1": fidelity.get("worst_top1"),
            "kl": fidelity.get("worst_kl"),
            "ppl_pct": fidelity.get("ppl_pct"),
            "bound": fidelity.get("bound"),
            "eval": {(task, metric): value[0] for task, metrics in (row.get("eval") or {}).items()
                     for metric, value in metrics.items()},
            "flagged": {(line["task"], line["metric"]) for line in (comparison.get("eval") or {}).get("table", [])
                        if line["flagged"] and line["model"] == row.get("artifact")},
        })  # fmt: skip
    return out


def eval_columns(comparison: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) of every lm-eval score the run has (--eval), in the baseline's order."""
    scores = comparison["baseline"].get("eval") or {}
    return [(task, metric) for task, metrics in scores.items() for metric in metrics]


def caveats(comparison: dict[str, Any]) -> list[tuple[str, str]]:
    """(artifact, caveat) for every verified artifact whose stock runtime differs from the source somewhere."""
    return [
        (f"{row['target']} {row['precision']}", caveat)
        for row in comparison["runs"]
        for caveat in (row.get("report") or {}).get("caveats", [])
    ]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _speed_length(comparison: dict[str, Any]) -> int:
    """The prompt length whose speeds the table shows: the middle one (every length is in the plots)."""
    lengths = comparison["bench"]["prompt_lengths"]
    return lengths[len(lengths) // 2]


def _headers(length: int, scores: list[tuple[str, str]]) -> tuple[str, ...]:
    return ("artifact", "status", "theory MiB", "size MiB", "bits/w", "load s", "load RSS MiB",
            f"prompt tok/s @{length}", f"gen tok/s @{length}", "top-1", "KL", "PPL Δ%",
            *(f"{task} {metric}" for task, metric in scores))  # fmt: skip


def _cells(r: dict[str, Any], length: int, scores: list[tuple[str, str]]) -> list[str]:
    """One artifact's row of the table, formatted: the same cells in the terminal and in the HTML page (a task
    score with * differs from the source's by more than twice its standard error)."""
    return [
        r["name"], r["status"], _fmt(r["theory_mib"], ".2f"), _fmt(r["size_mib"], ".2f"),
        _fmt(r["bits_per_weight"], ".2f"), _fmt(r["load_s"], ".2f"), _fmt(r["load_rss_mib"], ".0f"),
        _fmt(r["prompt_tps"].get(length), ".0f"), _fmt(r["generation_tps"].get(length), ".1f"),
        _fmt(r["top1"], ".3f"), _fmt(r["kl"], ".4f"), _fmt(r["ppl_pct"], "+.2f"),
        *(_fmt(r["eval"].get(key), ".3f") + (" *" if key in r["flagged"] else "") for key in scores),
    ]  # fmt: skip


def table(comparison: dict[str, Any]) -> Table:
    """The terminal table: one row per artifact, speed at the middle prompt length."""
    length, scores = _speed_length(comparison), eval_columns(comparison)
    result = Table(title=f"{comparison['source']['model']} → {comparison.get('output', '')}")
    for header in _headers(length, scores):
        result.add_column(header, justify="left" if header in ("artifact", "status") else "right")
    colour = {"passed": "[green]ok[/]", "failed": "[red]failed[/]", "skipped": "[yellow]skipped[/]"}
    for r in rows(comparison):
        name, status, *numbers = _cells(r, length, scores)
        result.add_row(name, colour[status], *numbers)
    return result


# (title, row key, x-axis label): one horizontal bar chart each; dict-valued keys are grouped by prompt length
PLOTS = (
    ("Size on disk vs theory", ("size_mib", "theory_mib"), "MiB"),
    ("Peak RSS after load (whole process) and what the load added", ("load_rss_mib", "load_rss_added_mib"), "MiB"),
    ("Prompt processing", "prompt_tps", "tokens/s, by prompt length"),
    ("Generation", "generation_tps", "tokens/s, by prompt length"),
    ("Top-1 agreement with the source (worst window)", "top1", "fraction"),
    ("KL divergence from the source (worst window)", "kl", "nats/token"),
    ("Perplexity change on held-out text", "ppl_pct", "%"),
)


def _plot(records: list[dict[str, Any]], key: str | tuple[str, ...], title: str, unit: str) -> str:
    """One SVG bar chart (matplotlib), artifacts top to bottom in report order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in records]
    series: dict[str, list[float]] = {}
    if isinstance(key, tuple):
        for k in key:
            series[k.replace("_mib", "").replace("_", " ")] = [r[k] or 0.0 for r in records]
    elif records and isinstance(records[0][key], dict):
        lengths = sorted({n for r in records for n in r[key]})
        for n in lengths:
            series[f"{n} tokens"] = [r[key].get(n) or 0.0 for r in records]
    else:
        series[key] = [r[key] or 0.0 for r in records]
    height = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(names) * max(1, len(series) * 0.6) + 1.2))
    for i, (label, values) in enumerate(series.items()):
        axis.barh([y + i * height for y in range(len(names))], values, height=height, label=label)
    axis.set_yticks([y + height * (len(series) - 1) / 2 for y in range(len(names))], names)
    axis.invert_yaxis()
    axis.set_title(title)
    axis.set_xlabel(unit)
    if len(series) > 1:
        axis.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def render_html(comparison: dict[str, Any]) -> str:
    """A self-contained page: the machine, the table, one plot per measure, and each failure's reason."""
    records, length, scores = rows(comparison), _speed_length(comparison), eval_columns(comparison)
    shown = [r for r in records if r["status"] == "passed"]
    e = html.escape
    machine = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in comparison["machine"].items())
    head = "".join(f"<th>{e(h)}</th>" for h in _headers(length, scores))
    body = ""
    for r in records:
        cells = _cells(r, length, scores)
        body += f"<tr class='{r['status']}'>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"
        if r["error"]:
            body += f"<tr class='why'><td colspan='{len(cells)}'>{e(r['error'])}</td></tr>"
    notes = "".join(f"<li><b>{e(name)}</b>: {e(caveat)}</li>" for name, caveat in caveats(comparison))
    notes = f"<p>Caveats: what a stock runtime does differently from the source</p><ul>{notes}</ul>" if notes else ""
    settings = comparison["bench"]
    measured = settings.get("ran", True)
    speed = ("prompt_tps", "generation_tps", ("load_rss_mib", "load_rss_added_mib"))
    plots = "".join(f"<figure>{_plot(shown, key, title, unit)}</figure>" for title, key, unit in PLOTS
                    if measured or key not in speed)  # fmt: skip
    timing = (f"best of {settings['repeats']} runs, {settings['new_tokens']} new tokens after prompts of "
              f"{', '.join(map(str, settings['prompt_lengths']))} tokens, each runtime with its deployment defaults; "
              "memory: measured peak RSS of the benchmark process after loading" if measured
              else "not measured (--no-bench)")  # fmt: skip
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>phiconvert report: {e(comparison["source"]["model"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }} table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }} td:first-child {{ text-align: left; }}
tr.failed td {{ color: #b00; }} tr.skipped td {{ color: #888; }} tr.why td {{ text-align: left; font-size: small; }}
figure {{ margin: 1em 0; }}
</style></head><body>
<h1>{e(comparison["source"]["model"])}: every format, side by side</h1>
<p>{comparison["source"]["parameters"]:,} parameters. Fidelity: worst held-out window against the source in fp32
(transformers); speed: {timing}. phiconvert {e(comparison["phiconvert"])},
{comparison["seconds"]:.0f} s in all.</p>
<table>{machine}</table>
<table><tr>{head}</tr>{body}</table>
{notes}
{plots}
</body></html>
"""
