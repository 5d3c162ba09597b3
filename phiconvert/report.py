"""`--target all` (or a list): every target/precision pair against one reference, then one side-by-side report.

Each pair is converted and verified in its own worker exactly as a single conversion is; a pair that fails (or
cannot run here) is recorded and the run goes on. Verified artifacts and the source model are then benched
(`phiconvert.bench`), and the output folder gets every verified artifact, report.json and report.html. Like a
single conversion, everything is built in a temporary folder beside the destination and renamed into place at the end.
"""

from __future__ import annotations

import html
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from phiconvert import __version__, bench, hardware, pipeline, source, targets
from phiconvert.errors import PhiconvertError
from phiconvert.verify import ALIASES

# Nominal bits per weight of each precision name: the "theory" that measured sizes and memory are set against.
NOMINAL_BITS = {"int4": 4, "int8": 8, "fp16": 16, "bf16": 16, "fp32": 32, "q5_k_m": 5, "q6_k": 6}
# the source's theory is its checkpoint's dtype (it is benched in float32, as the reference runs)
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def pairs(target: str, precision: str | None) -> list[tuple[str, str]]:
    """Target/precision pairs of ``all`` or ``a,b:precision,...``.

    ``all`` is every precision of every target; ``--precision`` narrows it to the precisions of that class (int4
    selects q4_k_m, 4bit, nf4, ...). In a list, a bare target takes ``--precision`` (or that class) or its default.
    """
    chosen: list[tuple[str, str]] = []
    for item in [part.strip() for part in target.split(",") if part.strip()]:
        name, _, given = item.partition(":")
        names = targets.names() if name == "all" else [name]
        for each in names:
            adapter = targets.load(each)
            if given:
                found = [given]
            elif precision:
                found = [p for p in adapter.precisions if precision in (p, ALIASES.get(p, p))]
                if not found and name != "all":
                    raise PhiconvertError(
                        f"target '{each}' has no {precision} precision: {', '.join(adapter.precisions)}"
                    )
            else:
                found = list(adapter.precisions) if name == "all" else [adapter.default_precision]
            chosen += [(each, p) for p in found if (each, p) not in chosen]
    if not chosen:
        raise PhiconvertError(f"--target {target} --precision {precision} selects nothing")
    return chosen


def compare(
    model: str | None,
    target: str,
    precision: str | None,
    output: str | Path | None,
    options: dict[str, Any],
    calibration: str | None,
    force: bool,
    verify: bool,
    emit: pipeline.Progress,
) -> dict[str, Any]:
    """Convert, verify and bench every pair of ``target``; returns the comparison (also report.json)."""
    chosen = pairs(target, precision)
    given = {name for name, value in options.items() if value is not None}
    declared = {name for t, _ in chosen for name in targets.load(t).options}
    if given - declared:
        flag = "--" + sorted(given - declared)[0].replace("_", "-")
        raise PhiconvertError(f"{flag} applies to none of the selected targets")
    plans: list[tuple[str, str, Any, str | None]] = []
    for name, prec in chosen:  # everything is checked before any work; `all` skips what cannot run here
        adapter = targets.load(name)
        try:
            mine = {k: v for k, v in options.items() if k in adapter.options}
            plans.append((name, prec, pipeline.plan(name, prec, mine), None))
        except PhiconvertError as error:
            if not target.startswith("all"):
                raise
            plans.append((name, prec, None, str(error)))
    src = source.resolve(model)
    samples = pipeline.calibration_samples(calibration)
    destination, temp = pipeline.temporary_beside(Path(output or f"{src.name}-compare"), force)
    started = time.perf_counter()
    try:
        staging = source.stage(src, temp / "staging")
        out = temp / "out"
        out.mkdir()
        prompts = bench.prompt_ids(staging, {}, bench.PROMPT_LENGTHS, bench.NEW_TOKENS)  # fails before any work
        reference = pipeline.run_reference(staging, temp, pipeline.emit_with(emit, "source")) if verify else None
        runs = [_convert(src, staging, reference, plan, samples, temp, out, emit) for plan in plans]
        bench_work = temp / "bench"
        bench_work.mkdir()
        baseline = {"target": "source", "precision": "fp32", "status": "passed"}
        for row in [baseline, *[r for r in runs if r["status"] == "passed"]]:
            folder = staging if row is baseline else out / row["artifact"]
            kind = bench.SOURCE if row is baseline else row["target"]
            try:
                measured = bench.measure(kind, folder, row, prompts, bench.NEW_TOKENS, bench.REPEATS, bench_work, emit)
                # where it will be once in place: the source's own folder, or the artifact's inside the report
                row["bench"] = {**measured, "artifact": str(src.path) if row is baseline else row["artifact"]}
            except PhiconvertError as error:
                row["bench_error"] = str(error)
                emit({"stage": "bench", "status": "note", "message": f"✗ bench {kind}: {error}"})
        comparison = {
            "phiconvert": __version__,
            "kind": "comparison",
            "source": {
                "model": src.model,
                "path": str(src.path),
                "parameters": source.parameter_count(staging),
                "dtype": src.config.get("torch_dtype") or src.config.get("dtype") or "float32",
            },
            "machine": dict(hardware.describe(hardware.probe())),
            "selection": {"target": target, "precision": precision},
            "bench": {
                "prompt_lengths": list(bench.PROMPT_LENGTHS),
                "new_tokens": bench.NEW_TOKENS,
                "repeats": bench.REPEATS,
            },  # fmt: skip
            "baseline": baseline,
            "runs": runs,
            "failed": [f"{r['target']} {r['precision']}" for r in runs if r["status"] == "failed"],
            "seconds": time.perf_counter() - started,
        }
        (out / "report.json").write_text(json.dumps(comparison, indent=2) + "\n")
        (out / "report.html").write_text(render_html(comparison))
        pipeline.move_into_place(out, destination)
        comparison["output"] = str(destination)
        return comparison
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _convert(
    src: source.Source,
    staging: Path,
    reference: dict[str, Any] | None,
    plan: tuple[str, str, Any, str | None],
    samples: list[str],
    temp: Path,
    out: Path,
    emit: pipeline.Progress,
) -> dict[str, Any]:
    """One pair: its row of the report, with the artifact moved into ``out`` only when it passed."""
    name, precision, planned, skipped = plan
    row: dict[str, Any] = {"target": name, "precision": precision}
    tagged = pipeline.emit_with(emit, f"{name} {precision}")
    if skipped:
        emit({"stage": "plan", "status": "note", "message": f"- {name} {precision}: skipped, {skipped}"})
        return {**row, "status": "skipped", "error": skipped}
    adapter, precision, options, python = planned
    started = time.perf_counter()
    try:
        report, artifact = pipeline.convert_one(
            src, staging, reference, adapter, precision, options, python, samples, temp, tagged
        )
        report["seconds"] = time.perf_counter() - started
        row["report"] = report
        (artifact / "phiconvert.json").write_text(json.dumps(report, indent=2) + "\n")
        pipeline.fail_unless_passed(report)
    except PhiconvertError as error:
        emit({"stage": "convert", "status": "note", "message": f"✗ {name} {precision}: {error}"})
        return {**row, "status": "failed", "error": str(error)}
    finally:
        shutil.rmtree(temp / f"work-{name}-{precision}", ignore_errors=True)
    artifact.rename(out / artifact.name)
    return {**row, "status": "passed", "artifact": artifact.name}


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
        prompts = measured.get("prompts", [])
        precision = (
            row["precision"] if row is not comparison["baseline"] else DTYPES.get(comparison["source"]["dtype"], "fp32")
        )
        nominal = NOMINAL_BITS.get(precision, NOMINAL_BITS.get(ALIASES.get(precision, ""), None))
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
            "prompt_tps": {p["tokens"]: p["prompt_tps"] for p in prompts},
            "generation_tps": {p["tokens"]: p["generation_tps"] for p in prompts},
            "top1": fidelity.get("worst_top1"),
            "kl": fidelity.get("worst_kl"),
            "ppl_pct": fidelity.get("ppl_pct"),
            "bound": fidelity.get("bound"),
        })  # fmt: skip
    return out


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


def _headers(length: int) -> tuple[str, ...]:
    return ("artifact", "status", "theory MiB", "size MiB", "bits/w", "load s", "load RSS MiB",
            f"prompt tok/s @{length}", f"gen tok/s @{length}", "top-1", "KL", "PPL Δ%")  # fmt: skip


def _cells(r: dict[str, Any], length: int) -> list[str]:
    """One artifact's row of the table, formatted: the same cells in the terminal and in the HTML page."""
    return [
        r["name"], r["status"], _fmt(r["theory_mib"], ".2f"), _fmt(r["size_mib"], ".2f"),
        _fmt(r["bits_per_weight"], ".2f"), _fmt(r["load_s"], ".2f"), _fmt(r["load_rss_mib"], ".0f"),
        _fmt(r["prompt_tps"].get(length), ".0f"), _fmt(r["generation_tps"].get(length), ".1f"),
        _fmt(r["top1"], ".3f"), _fmt(r["kl"], ".4f"), _fmt(r["ppl_pct"], "+.2f"),
    ]  # fmt: skip


def table(comparison: dict[str, Any]) -> Table:
    """The terminal table: one row per artifact, speed at the middle prompt length."""
    length = _speed_length(comparison)
    result = Table(title=f"{comparison['source']['model']} → {comparison.get('output', '')}")
    for header in _headers(length):
        result.add_column(header, justify="left" if header in ("artifact", "status") else "right")
    colour = {"passed": "[green]ok[/]", "failed": "[red]failed[/]", "skipped": "[yellow]skipped[/]"}
    for r in rows(comparison):
        name, status, *numbers = _cells(r, length)
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
    records, length = rows(comparison), _speed_length(comparison)
    shown = [r for r in records if r["status"] == "passed"]
    e = html.escape
    machine = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in comparison["machine"].items())
    head = "".join(f"<th>{e(h)}</th>" for h in _headers(length))
    body = ""
    for r in records:
        cells = _cells(r, length)
        body += f"<tr class='{r['status']}'>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"
        if r["error"]:
            body += f"<tr class='why'><td colspan='{len(cells)}'>{e(r['error'])}</td></tr>"
    notes = "".join(f"<li><b>{e(name)}</b>: {e(caveat)}</li>" for name, caveat in caveats(comparison))
    notes = f"<p>Caveats: what a stock runtime does differently from the source</p><ul>{notes}</ul>" if notes else ""
    plots = "".join(f"<figure>{_plot(shown, key, title, unit)}</figure>" for title, key, unit in PLOTS)
    settings = comparison["bench"]
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
(transformers); speed: best of {settings["repeats"]} runs, {settings["new_tokens"]} new tokens after prompts of
{", ".join(map(str, settings["prompt_lengths"]))} tokens, each runtime with its deployment defaults; memory: measured
peak RSS of the benchmark process after loading. phiconvert {e(comparison["phiconvert"])},
{comparison["seconds"]:.0f} s in all.</p>
<table>{machine}</table>
<table><tr>{head}</tr>{body}</table>
{notes}
{plots}
</body></html>
"""
