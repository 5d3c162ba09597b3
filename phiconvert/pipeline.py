"""convert(): one source model → verified artifacts: one pair (target, precision), or a list of them side by side.

One run engine for both: resolve and stage the source → pre-flight (memory and disk, before any work) → the
source's reference (float32 log-probabilities of the held-out windows, written to disk) → for each pair, export,
smoke test and comparison with the reference in the target's worker → the source's greedy chat reply, with the
artifacts' replies as drafts → reports. A single conversion renames its verified artifact into place; a list
(``--target all`` or ``a,b:precision``) continues past failures, benches every verified artifact and the source,
and writes the side-by-side report (``phiconvert.report`` renders it). Nothing is left at the destination unless
every stage passed, and everything is built in a temporary folder beside it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from phiconvert import __version__, archs, bench, evaluate, hardware, preflight, report, source, targets, verify
from phiconvert.calibration import samples as calibration_samples
from phiconvert.errors import PhiconvertError
from phiconvert.protocol import ReferenceJob, SourceChatJob, TargetJob
from phiconvert.worker import timed_stage
from phiconvert.workers import Progress, emit_with, quiet, run_worker, worker_python

MESSAGES = [{"role": "user", "content": "What is a list comprehension?"}]
MAX_NEW_TOKENS = 48
VERIFY_MODES = ("full", "quick", "none")


class VerificationFailed(PhiconvertError):
    """An artifact was made but broke its precision's bound: the error carries the whole report."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Pair:
    """One target/precision of a run, checked before any work (``skipped``: why it cannot run here)."""

    target: str
    precision: str
    adapter: targets.Target | None = None
    options: dict[str, Any] | None = None
    python: str | None = None
    skipped: str | None = None

    @property
    def label(self) -> str:
        return f"{self.target} {self.precision}"


def convert(
    model: str | None = None,
    target: str = "openvino",  # or "auto": the hardware detector's choice; "all" or "a,b:precision": side by side
    precision: str | None = None,
    output: str | Path | None = None,
    calibration: str | None = None,
    force: bool = False,
    verify: str | bool = "full",  # full, quick (no window past the original context), none (True/False: full/none)
    plan_only: bool = False,  # only the pre-flight: what each stage needs, against this machine
    benchmark: bool = True,  # a comparison benches the source and every verified artifact (False: fidelity only)
    bench_prompt_lengths: tuple[int, ...] = bench.PROMPT_LENGTHS,  # what that bench measures, as `phiconvert bench`
    bench_new_tokens: int = bench.NEW_TOKENS,
    bench_repeats: int = bench.REPEATS,
    eval_tasks: list[str] | None = None,  # a comparison also scores every verified artifact and the source on these
    eval_limit: int | None = None,  # lm-eval tasks, at most this many items each (phiconvert.evaluate)
    progress: Progress | None = None,
    **options: Any,  # the targets' own options (group_size=64, ep="cuda", ...: see phiconvert.targets.options())
) -> dict[str, Any]:
    """Convert ``model`` for ``target`` at ``precision`` and prove it; returns the report (also phiconvert.json).

    With ``target`` ``all`` or a comma-separated list (``openvino,gguf:q8_0``), every pair runs in its own worker
    against one shared reference, past failures, and ``output`` becomes a folder holding each verified artifact
    and the side-by-side report (``report.json``, ``report.html``)."""
    emit = progress or quiet
    mode = {True: "full", False: "none"}.get(verify, verify)  # type: ignore[call-overload]
    if mode not in VERIFY_MODES:
        raise PhiconvertError(f"--verify must be one of {', '.join(VERIFY_MODES)}, not '{verify}'")
    unknown = sorted(set(options) - set(targets.options()))
    if unknown:
        raise PhiconvertError(f"no target has an option '{unknown[0]}'; they have: {', '.join(targets.options())}")
    several = target == "all" or "," in target
    auto = None
    if target == "auto":
        recommendation = hardware.recommend(hardware.probe())
        target, precision = recommendation.target, precision or recommendation.precision
        auto = recommendation.reason
        emit({"stage": "auto", "status": "note", "message": f"--target auto: {auto}"})
    if min(*bench_prompt_lengths, bench_new_tokens, bench_repeats) < 1:
        raise PhiconvertError("bench prompt lengths, new tokens and repeats must be at least 1")
    if eval_tasks is not None and not several:
        raise PhiconvertError("--eval applies to --target all or a list; score one artifact with `phiconvert eval`")
    if eval_tasks is not None:
        eval_tasks = evaluate.check_tasks(eval_tasks)  # before any work: an unknown task name costs nothing
    pairs = plan_all(target, precision, options) if several else [plan(target, precision, options)]
    src = source.resolve(model)
    samples = calibration_samples(calibration)
    config = source.normalise_config(src.config)
    pairs = [
        replace(p, skipped=p.skipped or archs.refusal(config, p.target) or model_refusal(p, config)) for p in pairs
    ]
    unfit = next((p.skipped for p in pairs if p.skipped), None)
    if unfit and not target.startswith("all"):
        raise PhiconvertError(unfit)
    windows, skipped_windows = verify_windows(config, mode)
    needs = preflight.check(src, [p for p in pairs if not p.skipped], windows, emit, output, MAX_NEW_TOKENS)
    if plan_only:
        return {"kind": "plan", "model": src.model, **needs}
    refused = {(e["target"], e["precision"]): e["refusal"] for e in needs["pairs"] if e["refusal"]}
    if refused and not target.startswith("all"):
        raise PhiconvertError(next(iter(refused.values())))
    pairs = [replace(p, skipped=refused.get((p.target, p.precision), p.skipped)) for p in pairs]
    default_name = f"{src.name}-compare" if several else f"{src.name}-{pairs[0].target}-{pairs[0].precision}"
    destination, temp = temporary_beside(Path(output or default_name), force)
    started = time.perf_counter()
    try:
        staging = source.stage(src, temp / "staging")
        benched = several and benchmark
        prompts = bench.prompt_ids(staging, {}, bench_prompt_lengths, bench_new_tokens) if benched else None
        reference = run_reference(staging, windows, temp, emit_with(emit, "source") if several else emit)
        runs = []
        for pair in pairs:
            tagged = emit_with(emit, pair.label) if several else emit
            calibrated = (samples, calibration)
            runs.append(convert_pair(src, staging, reference, pair, calibrated, skipped_windows, temp, tagged))
            if not several and runs[-1]["status"] == "failed" and "report" not in runs[-1]:
                raise PhiconvertError(runs[-1]["error"])
        if reference:
            source_chat(staging, runs, temp, emit_with(emit, "source") if several else emit)
        if several:
            evaluation = (eval_tasks, eval_limit) if eval_tasks is not None else None
            settings = {"prompt_lengths": list(bench_prompt_lengths), "new_tokens": bench_new_tokens,
                        "repeats": bench_repeats}  # fmt: skip
            return finish_comparison(src, staging, runs, prompts, settings, evaluation, target, precision, temp,
                                     destination, started, emit)  # fmt: skip
        run = runs[0]
        run["report"] |= {"seconds": time.perf_counter() - started, "auto": auto}
        (run["folder"] / "phiconvert.json").write_text(json.dumps(run["report"], indent=2) + "\n")
        if run["status"] == "failed":
            raise VerificationFailed(run["error"], run["report"])
        move_into_place(run["folder"], destination)
        return {**run["report"], "output": str(destination)}
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def verify_windows(config: dict[str, Any], mode: str) -> tuple[list[tuple[int, int]], list[str]]:
    """(start, length) windows of the held-out text this model is verified on, and what ``mode`` leaves out."""
    if mode == "none":
        return [], []
    windows, long_window = verify.windows(config)
    if long_window and mode == "full":
        return [*windows, long_window], []
    if long_window:
        skipped = (f"--verify quick: the {long_window[1]}-token window past the original context "
                   f"({long_window[1] - verify.LONG_MARGIN} tokens), where longrope switches to its long factors, "
                   "was not checked")  # fmt: skip
        return windows, [skipped]
    return windows, []


def model_refusal(pair: Pair, config: dict[str, Any]) -> str | None:
    """Why the pair's target cannot convert this model exactly with its options (its own ``refuse``), or None."""
    if pair.adapter is None or pair.adapter.refuse is None:
        return None
    why = pair.adapter.refuse(config, pair.options or {})
    return f"--target {pair.target}: {why}" if why else None


def plan(target: str, precision: str | None, options: dict[str, Any]) -> Pair:
    """Check one target/precision/options choice before any work."""
    adapter = targets.load(target)
    precision = precision or adapter.default_precision
    if precision not in adapter.precisions:
        raise PhiconvertError(
            f"target '{target}' cannot do precision '{precision}'; it supports: {', '.join(adapter.precisions)}"
        )
    chosen = targets.chosen_options(adapter, precision, options)
    if adapter.check:
        adapter.check(precision, chosen)
    return Pair(target, precision, adapter, chosen, worker_python(adapter))


def plan_all(target: str, precision: str | None, options: dict[str, Any]) -> list[Pair]:
    """Every pair of ``all`` or a list, checked before any work; ``all`` skips (with the reason) what cannot run."""
    chosen = select(target, precision)
    given = {name for name, value in options.items() if value is not None}
    declared = {o.name for t, p in chosen for o in targets.load(t).options if o.applies(p)}
    if given - declared:
        flag = "--" + sorted(given - declared)[0].replace("_", "-")
        raise PhiconvertError(f"{flag} applies to none of the selected targets and precisions")
    pairs = []
    for name, prec in chosen:
        mine = {o.name: options.get(o.name) for o in targets.load(name).options if o.applies(prec)}
        try:
            pairs.append(plan(name, prec, mine))
        except PhiconvertError as error:
            if not target.startswith("all"):
                raise
            pairs.append(Pair(name, prec, skipped=str(error)))
    return pairs


def select(target: str, precision: str | None) -> list[tuple[str, str]]:
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
                found = [p for p, declared in adapter.precisions.items() if precision in (p, declared.bound)]
                if not found and name != "all":
                    raise PhiconvertError(
                        f"target '{each}' has no {precision} precision: {', '.join(adapter.precisions)}"
                    )
            else:
                stable = [p for p, declared in adapter.precisions.items() if not declared.experimental]
                found = stable if name == "all" else [adapter.default_precision]
            chosen += [(each, p) for p in found if (each, p) not in chosen]
    if not chosen:
        raise PhiconvertError(f"--target {target} --precision {precision} selects nothing")
    return chosen


def temporary_beside(output: Path, force: bool) -> tuple[Path, Path]:
    """(destination, a new temporary folder beside it): refuses an existing destination unless ``force``."""
    destination = output.expanduser().resolve()
    if destination.exists() and not force:
        raise PhiconvertError(f"output {destination} exists; pass --force to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    return destination, Path(tempfile.mkdtemp(prefix=f".{destination.name}.phiconvert-", dir=destination.parent))


def run_reference(staging: Path, windows: list[tuple[int, int]], temp: Path, emit: Progress) -> dict[str, Any] | None:
    """The source's float32 log-probabilities of each window, on disk, computed in a worker of this interpreter."""
    if not windows:
        return None
    work = temp / "reference"
    work.mkdir()
    job = ReferenceJob(source=str(staging), text_file=str(source.HELDOUT), windows=windows, out=str(work))
    run = run_worker(sys.executable, job, work, "reference", emit)
    files = [str(work / f"source-{i}.npy") for i in range(len(windows))]
    return {**run, "windows": windows, "files": files}


def convert_pair(
    src: source.Source,
    staging: Path,
    reference: dict[str, Any] | None,
    pair: Pair,
    calibration: tuple[list[str], str | None],  # the samples, and --calibration as given (None: built-in)
    skipped_windows: list[str],
    temp: Path,
    emit: Progress,
) -> dict[str, Any]:
    """Export, smoke-test and verify one pair inside ``temp``: its row (status, report, artifact folder)."""
    row: dict[str, Any] = {"target": pair.target, "precision": pair.precision}
    samples, calibration_given = calibration[0], calibration[1] is not None
    if pair.skipped:
        emit({"stage": "plan", "status": "note", "message": f"- {pair.label}: skipped, {pair.skipped}"})
        return {**row, "status": "skipped", "error": pair.skipped}
    label = f"{pair.target}-{pair.precision}"
    artifact, work = temp / label, temp / f"work-{label}"
    artifact.mkdir()
    (work / "target").mkdir(parents=True)
    job = TargetJob(
        target=pair.target,
        precision=pair.precision,
        options=pair.options or {},
        source=str(staging),
        output=str(artifact),
        work=str(work / "target"),
        calibration=samples,
        calibration_given=calibration_given,
        model_id=src.model_id,
        messages=MESSAGES,
        max_new_tokens=MAX_NEW_TOKENS,
        sequences=reference["result"]["sequences"] if reference else None,
        source_logprobs=reference["files"] if reference else None,
        positions_out=str(work),
    )
    started = time.perf_counter()
    try:
        result = run_target_workers(pair, job, work, emit)
        built = timed_stage(emit, "verify", _report, src, pair, artifact, reference, result, work, skipped_windows)
    except PhiconvertError as error:
        # "ended": the worker's stage that failed sent no "done"; the display stops showing it as running
        emit({"stage": "convert", "status": "note", "message": f"✗ {pair.label}: {error}", "ended": True})
        shutil.rmtree(artifact, ignore_errors=True)
        return {**row, "status": "failed", "error": str(error)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    built["seconds"] = time.perf_counter() - started
    built["command"] = command_line(src.model, pair, calibration[1])
    fidelity = built["fidelity"]
    if fidelity and not fidelity["passed"]:
        error = f"verification failed for {pair.label}: {'; '.join(fidelity['failures'])}"
        emit({"stage": "convert", "status": "note", "message": f"✗ {error}"})
        return {**row, "status": "failed", "error": error, "report": built, "folder": artifact}
    return {**row, "status": "passed", "report": built, "folder": artifact}


def run_target_workers(pair: Pair, job: TargetJob, work: Path, emit: Progress) -> dict[str, Any]:
    """The pair's worker; for a target whose export keeps memory its runtime's stages would run beside
    (``Target.export_apart``), the export in one worker and the smoke test and comparison in a fresh one."""
    if not pair.adapter.export_apart:
        return run_worker(pair.python, job, work, pair.target, emit)
    exported = run_worker(pair.python, replace(job, stages=("export",)), work, pair.target, emit)
    verified = run_worker(pair.python, replace(job, stages=("verify",)), work, pair.target, emit)
    return {"result": {**exported["result"], **verified["result"]}, "stages": exported["stages"] + verified["stages"],
            "peak_rss": max(exported["peak_rss"], verified["peak_rss"])}  # fmt: skip


def command_line(model: str, pair: Pair, calibration: str | None) -> str:
    """The command that makes this artifact again (model cards, reports): the pair's target, precision, the
    options it was given and the calibration; verification settings aside, which do not change the artifact."""
    parts = ["phiconvert", model, "--target", pair.target, "--precision", pair.precision]
    for option in pair.adapter.options:
        value = (pair.options or {}).get(option.name)
        if value is not None:
            parts += option.spelled(value)
    return shlex.join(parts + (["--calibration", calibration] if calibration is not None else []))


def source_chat(staging: Path, runs: list[dict[str, Any]], temp: Path, emit: Progress) -> None:
    """The source's greedy chat reply, checked against every verified artifact's reply as a draft (the closest
    artifact first); each of their reports then says whether it replied exactly as the source."""
    passed = [r for r in runs if r["status"] == "passed"]
    if not passed:
        return
    passed.sort(key=lambda r: r["report"]["fidelity"]["kl"])
    work = temp / "source-chat"
    work.mkdir()
    drafts = [r["report"]["smoke"]["ids"] for r in passed]
    job = SourceChatJob(source=str(staging), messages=MESSAGES, max_new_tokens=MAX_NEW_TOKENS, drafts=drafts)
    run = run_worker(sys.executable, job, work, "source-chat", emit)
    reply = run["result"]
    for r in passed:
        r["report"]["stages"] += run["stages"]
        r["report"]["peak_rss"]["reference"] = max(r["report"]["peak_rss"]["reference"] or 0, run["peak_rss"])
        r["report"]["fidelity"]["source_reply"] = reply["text"]
        r["report"]["fidelity"]["greedy_match"] = r["report"]["smoke"]["text"].strip() == reply["text"].strip()


def _report(
    src: source.Source,
    pair: Pair,
    artifact: Path,
    reference: dict[str, Any] | None,
    target_run: dict[str, Any],
    work: Path,
    skipped_windows: list[str],
) -> dict[str, Any]:
    result = target_run["result"]
    details = dict(result["details"])
    caveats = details.pop("caveats", []) + skipped_windows
    declared = pair.adapter.precisions[pair.precision]
    if declared.experimental:
        caveats.insert(0, f"{pair.label} is experimental: {declared.note}; checked against its own looser bound "
                          f"({declared.bound})")  # fmt: skip
    fidelity = None
    if reference is not None:
        # a runtime whose context is fixed shorter than a window (an ExecuTorch program) leaves that window out
        found = [(w, work / f"positions-{i}.npz") for i, w in enumerate(reference["windows"])]
        for (start, length), path in found:
            if not path.exists():
                caveats.append(f"the {length}-token window at token {start} was not compared: it does not fit "
                               "the artifact's context")  # fmt: skip
        found = [(w, path) for w, path in found if path.exists()]
        if not found:
            raise PhiconvertError(f"{pair.label}: no verification window fits the artifact's context")
        windows = [w for w, _ in found]
        summary = verify.summarise(windows, [verify.Positions.load(path) for _, path in found])
        bound = verify.bound_for(details.get("bound", declared.bound))
        failures = summary.failures(bound)
        variants = {}
        for name, meaning in pair.adapter.variants.items():
            found = [(w, work / f"positions-{name}-{i}.npz") for i, w in enumerate(windows)]
            found = [(w, path) for w, path in found if path.exists()]
            if found:
                measured = verify.summarise([w for w, _ in found], [verify.Positions.load(p) for _, p in found])
                variants[name] = measured.to_dict()
                caveats.append(f"{meaning}: against the source on {measured.positions} positions, top-1 "
                               f"{measured.worst_top1:.3f}, KL {measured.worst_kl:.4f}")  # fmt: skip
        fidelity = {
            **summary.to_dict(),
            "bound": bound.__dict__,
            "passed": not failures,
            "failures": failures,
            "greedy_match": None,  # filled by the source's chat reply, once every pair has run
            "source_reply": None,
            "variants": variants,
        }
    files = [p for p in artifact.rglob("*") if p.is_file()]
    return {
        "phiconvert": __version__,
        "source": {"model": src.model, "path": str(src.path), "layout": src.layout,
                   "architecture": src.config.get("architectures", ["?"])[0]},
        "target": pair.target,
        "precision": pair.precision,
        "options": pair.options,
        "toolchain": result.get("versions", {}),
        "size_bytes": sum(p.stat().st_size for p in files),
        "files": sorted([str(p.relative_to(artifact)) for p in files] + ["phiconvert.json"]),
        "stages": (reference or {}).get("stages", []) + target_run["stages"],
        "peak_rss": {"target": target_run.get("peak_rss"), "reference": (reference or {}).get("peak_rss")},
        "smoke": {"messages": MESSAGES, **result["smoke"]},
        "fidelity": fidelity,
        # what the artifact's stock runtime does differently from the source, beyond the fidelity numbers
        "caveats": caveats,
        "details": details,
    }  # fmt: skip


def finish_comparison(
    src: source.Source,
    staging: Path,
    runs: list[dict[str, Any]],
    prompts: list[list[int]] | None,
    settings: dict[str, Any],  # the bench's prompt_lengths, new_tokens and repeats
    evaluation: tuple[list[str], int | None] | None,
    target: str,
    precision: str | None,
    temp: Path,
    destination: Path,
    started: float,
    emit: Progress,
) -> dict[str, Any]:
    """Bench the source and every verified artifact (unless ``prompts`` is None: not benchmarked), score them on
    lm-eval tasks (``evaluation``: task names and item limit), write report.json and report.html, move it all into
    place."""
    out = temp / "out"
    out.mkdir()
    for run in runs:
        if run["status"] == "passed":
            (run["folder"] / "phiconvert.json").write_text(json.dumps(run["report"], indent=2) + "\n")
            run["folder"].rename(out / run["folder"].name)
            run["artifact"] = run["folder"].name
        else:
            shutil.rmtree(run.pop("folder", temp / "none"), ignore_errors=True)
        run.pop("folder", None)
    bench_work = temp / "bench"
    bench_work.mkdir()
    baseline = {"target": "source", "precision": "fp32", "status": "passed"}
    for row in [baseline, *[r for r in runs if r["status"] == "passed"]] if prompts is not None else []:
        folder = staging if row is baseline else out / row["artifact"]
        kind = bench.SOURCE if row is baseline else row["target"]
        try:
            measured = bench.measure(kind, folder, row, prompts, settings["new_tokens"], settings["repeats"],
                                     bench_work, emit)  # fmt: skip
            # where it will be once in place: the source's own folder, or the artifact's inside the report
            row["bench"] = {**measured, "artifact": str(src.path) if row is baseline else row["artifact"]}
        except PhiconvertError as error:
            row["bench_error"] = str(error)
            emit({"stage": "bench", "status": "note", "message": f"✗ bench {kind}: {error}"})
    scored = None
    if evaluation is not None:
        scored = score_all(staging, baseline, [r for r in runs if r["status"] == "passed"], out, evaluation, emit)
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
        "bench": {**settings, "ran": prompts is not None},
        "baseline": baseline,
        "runs": runs,
        **({"eval": scored} if scored is not None else {}),
        "failed": [f"{r['target']} {r['precision']}" for r in runs if r["status"] == "failed"],
        "seconds": time.perf_counter() - started,
    }
    (out / "report.json").write_text(json.dumps(comparison, indent=2) + "\n")
    (out / "report.html").write_text(report.render_html(comparison))
    move_into_place(out, destination)
    return {**comparison, "output": str(destination)}


def score_all(
    staging: Path,
    baseline: dict[str, Any],
    passed: list[dict[str, Any]],
    out: Path,
    evaluation: tuple[list[str], int | None],
    emit: Progress,
) -> dict[str, Any]:
    """lm-eval scores of the source and every verified artifact: each row gets its ``eval``; the comparison the
    tasks, the limit and phiconvert eval's table (or the error that stopped it: the report is written anyway)."""
    tasks, limit = evaluation
    try:
        found = evaluate.evaluate([str(out / r["artifact"]) for r in passed], tasks, limit, baseline=str(staging),
                                  progress=emit)  # fmt: skip
    except PhiconvertError as error:
        emit({"stage": "eval", "status": "note", "message": f"✗ eval: {error}"})
        return {"tasks": tasks, "limit": limit, "error": str(error)}
    baseline["eval"] = found["baseline"]["scores"]
    for row, scores in zip(passed, found["artifacts"], strict=True):
        row["eval"] = scores["scores"]
    return {"tasks": tasks, "limit": limit, "table": found["table"]}


def move_into_place(artifact: Path, destination: Path) -> None:
    """Rename the verified artifact to its destination, replacing an old one only now (--force)."""
    if destination.exists():
        old = destination.with_name(f".{destination.name}.phiconvert-old")
        destination.rename(old)
        artifact.rename(destination)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        artifact.rename(destination)
