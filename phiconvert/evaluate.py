"""`phiconvert eval ARTIFACT...`: task accuracy with lm-evaluation-harness, every artifact in its own runtime, side by
side with the source model.

lm-eval drives each model through a small backend (``SessionLM``) over the same session worker `chat` and `serve`
use: generative requests are greedy replies of the artifact's runtime with the task's stop strings; loglikelihood
requests (multiple choice) are scored from the target's exact prefill logits, the ones verification compares, all
of a task's requests in one pass. Bundled tasks (``phiconvert/evals``, built from the held-out text) run offline;
any task name lm-eval knows works where the Hub is reachable.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from phiconvert.errors import PhiconvertError
from phiconvert.session import Session
from phiconvert.workers import Progress, quiet

TASKS_DIR = Path(__file__).resolve().parent / "evals"
LOCAL_TASKS = ("pydoc_cloze", "pydoc_next_word")
SCORE_BATCH = 64  # loglikelihood requests per worker round trip (a progress step)


def task_configs(names: list[str]) -> list[str | dict[str, Any]]:
    """A bundled task's YAML as a config dict, its data file made absolute; any other name as lm-eval knows it."""
    import yaml

    configs: list[str | dict[str, Any]] = []
    for name in names:
        file = TASKS_DIR / f"{name}.yaml"
        if not file.is_file():
            configs.append(name)
            continue
        config = yaml.safe_load(file.read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / f) for split, f in files.items()}
        configs.append(config)
    return configs


def backend(session: Session, emit: Progress) -> Any:
    """An lm-eval LM over a session (lm_eval imported here: it is an optional dependency)."""
    from lm_eval.api.model import LM

    class SessionLM(LM):
        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            pairs = [tuple(request.args) for request in requests]
            scores: list[tuple[float, bool]] = []
            emit({"stage": f"{session.name} · score", "status": "start"})
            for start in range(0, len(pairs), SCORE_BATCH):
                scores += session.score(pairs[start : start + SCORE_BATCH])
                emit({"stage": f"{session.name} · score", "status": "progress", "done": len(scores),
                      "total": len(pairs), "unit": "requests"})  # fmt: skip
            return scores

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            raise PhiconvertError("perplexity tasks (loglikelihood_rolling, e.g. wikitext) are not supported yet")

        def generate_until(self, requests: list[Any]) -> list[str]:
            replies = []
            for request in requests:
                context, settings = request.args
                text, _ = session.reply(text=context, max_tokens=int(settings.get("max_gen_toks", 256)),
                                        temperature=0.0, stop=list(settings.get("until") or []))  # fmt: skip
                replies.append(text)
            return replies

    return SessionLM()


def scores(results: dict[str, Any]) -> dict[str, dict[str, tuple[float, float | None]]]:
    """task -> metric -> (score, stderr) from lm-eval's results (the "none" filter or the task's own filter)."""
    found: dict[str, dict[str, tuple[float, float | None]]] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, _ = key.split(",", 1)
            stderr = values.get(key.replace(",", "_stderr,", 1))
            found.setdefault(task, {})[metric] = (float(value), float(stderr) if isinstance(stderr, int | float)
                                                  else None)  # fmt: skip
    return found


def evaluate(
    artifacts: list[str],
    tasks: list[str] | None = None,
    limit: int | None = None,
    baseline: str | None = None,
    num_fewshot: int | None = None,
    output: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the tasks on the baseline (the source) and each artifact; returns the table as data and writes
    eval.json and eval.html into ``output``."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's own bars: phiconvert shows its progress instead
    try:
        import lm_eval
        import lm_eval.evaluator
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PhiconvertError('phiconvert eval needs lm-eval: pip install "phiconvert[eval]"') from None
    # lm-eval records the git commit of the current folder by running `git describe`, which prints "fatal: not a
    # git repository" into the user's terminal outside one; phiconvert's results do not use it
    if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        lm_eval.evaluator.get_git_commit_hash = lambda: None
    if not artifacts:
        raise PhiconvertError("give at least one artifact folder to evaluate")
    if limit is not None and limit < 1:
        raise PhiconvertError(f"--limit must be positive, not {limit}")
    names = check_tasks(tasks)
    emit = progress or quiet
    baseline = baseline or recorded_source(artifacts[0])
    manager = TaskManager(verbosity="ERROR")
    rows = []
    for item in [baseline, *artifacts]:
        emit({"stage": f"eval {Path(item).name}", "status": "start"})
        started = time.perf_counter()
        with Session(item, exact=True) as session:
            results = lm_eval.simple_evaluate(model=backend(session, emit), tasks=task_configs(names), limit=limit,
                                              num_fewshot=num_fewshot, task_manager=manager, bootstrap_iters=1000,
                                              log_samples=False, verbosity="ERROR")  # fmt: skip
            rows.append({"model": str(item), "name": session.name, "target": session.target,
                         "scores": scores(results), "samples": results.get("n-samples", {})})  # fmt: skip
        emit({"stage": f"eval {Path(item).name}", "status": "done", "seconds": time.perf_counter() - started})
    table = compare(rows)
    report = {"kind": "eval", "tasks": names, "limit": limit, "num_fewshot": num_fewshot, "baseline": rows[0],
              "artifacts": rows[1:], "table": table}  # fmt: skip
    if output is not None:
        folder = Path(output)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval.json").write_text(json.dumps(report, indent=2))
        (folder / "eval.html").write_text(to_html(report))
    return report


def check_tasks(tasks: list[str] | None) -> list[str]:
    """The task names to run (the bundled ones when none are given), refusing one lm-eval does not know."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PhiconvertError('phiconvert eval needs lm-eval: pip install "phiconvert[eval]"') from None
    names = list(tasks or LOCAL_TASKS)
    if any(not (TASKS_DIR / f"{n}.yaml").is_file() for n in names):
        known = TaskManager(verbosity="ERROR").all_tasks
        unknown = [n for n in names if not (TASKS_DIR / f"{n}.yaml").is_file() and n not in known]
        if unknown:
            raise PhiconvertError(f"unknown task '{unknown[0]}'; bundled: {', '.join(LOCAL_TASKS)}, or an lm-eval task")
    return names


def recorded_source(artifact: str) -> str:
    """The source model an artifact's phiconvert.json names, when it is still where it was."""
    record = Path(artifact) / "phiconvert.json"
    if record.is_file():
        source = json.loads(record.read_text())["source"]
        if source["model"].startswith("bundled:") or Path(source["path"]).is_dir():
            return source["model"] if source["model"].startswith("bundled:") else source["path"]
    raise PhiconvertError(f"no source model known for {artifact}: give --baseline MODEL (a folder or bundled:NAME)")


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per task, metric and artifact: the baseline's score, the artifact's, the difference, and whether
    the difference is more than twice its standard error (the two scores' errors combined; then it is flagged:
    likely not noise)."""
    base, lines = rows[0], []
    for task, metrics in base["scores"].items():
        for metric, (reference, reference_se) in metrics.items():
            for row in rows[1:]:
                score, stderr = row["scores"].get(task, {}).get(metric, (math.nan, None))
                delta = score - reference
                spread = math.hypot(stderr or 0.0, reference_se or 0.0)
                flagged = spread > 0 and abs(delta) > 2 * spread
                lines.append({"task": task, "metric": metric, "samples": base["samples"].get(task, {}).get("effective"),
                              "baseline": reference, "baseline_stderr": reference_se, "model": row["name"],
                              "target": row["target"], "score": score, "stderr": stderr, "delta": delta,
                              "flagged": flagged})  # fmt: skip
    return lines


def to_html(report: dict[str, Any]) -> str:
    head = "<tr><th>task</th><th>metric</th><th>n</th><th>baseline</th><th>model</th><th>score</th><th>Δ</th></tr>"
    body = []
    for line in report["table"]:
        style = ' style="background:#fdd"' if line["flagged"] else ""
        model = f"{html.escape(line['model'])} ({line['target']})"
        cells = [html.escape(line["task"]), line["metric"], line["samples"] or "",
                 plus_minus(line["baseline"], line["baseline_stderr"]), model,
                 plus_minus(line["score"], line["stderr"]), f"{line['delta']:+.3f}"]  # fmt: skip
        body.append(f"<tr{style}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return ("<!doctype html><meta charset=utf-8><title>phiconvert eval</title><h1>phiconvert eval</h1>"
            f"<p>baseline: {html.escape(report['baseline']['model'])}; shaded: the difference is more than twice its "
            "standard error (both scores' errors combined).</p>"
            f"<table border=1 cellpadding=4>{head}{''.join(body)}</table>\n")  # fmt: skip


def plus_minus(score: float, stderr: float | None) -> str:
    return f"{score:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
