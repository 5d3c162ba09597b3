"""convert(): one source model → one verified artifact, written beside its destination and renamed into place.

Stages: resolve and stage the source → torch reference (held-out logits, greedy chat reply) → export, smoke test
and artifact logits in the target's worker → compare against the precision's bound → phiconvert.json → rename.
Nothing is left at the destination unless every stage passed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phiconvert import __version__, envs, hardware, source, targets
from phiconvert.errors import PhiconvertError
from phiconvert.verify import bound_for, compare
from phiconvert.worker import load_logits, timed_stage

HELDOUT = source.FIXTURES / "heldout.txt"
CALIBRATION = source.FIXTURES / "calibration.txt"
MESSAGES = [{"role": "user", "content": "What is a list comprehension?"}]
MAX_NEW_TOKENS = 48
# (start, length) token windows of the held-out text: one short, one past tiny-phi4mini's original context (128),
# so longrope's short and long factors are both checked.
WINDOWS = ((0, 64), (64, 384))
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

Progress = Callable[[dict[str, Any]], None]


def convert(
    model: str | None = None,
    target: str = "openvino",  # or "auto": the hardware detector's choice for this machine
    precision: str | None = None,
    output: str | Path | None = None,
    group_size: int | None = None,
    sym: bool | None = None,
    calibration: str | None = None,
    ep: str | None = None,
    accuracy_level: int | None = None,
    int4_algo: str | None = None,
    int8_lm_head: bool | None = None,
    recipe: str | None = None,
    method: str | None = None,
    desc_act: bool | None = None,
    device: str | None = None,
    force: bool = False,
    verify: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Convert ``model`` for ``target`` at ``precision`` and prove it; returns the report (also phiconvert.json).

    ``target`` may also be ``all`` or a comma-separated list (``openvino,gguf:q8_0``): every pair then runs in its own
    worker against one shared reference, past failures, and ``output`` becomes a folder holding each verified
    artifact and the side-by-side report (see ``phiconvert.report``).
    """
    emit = progress or (lambda event: None)
    options = {"group_size": group_size, "sym": sym, "ep": ep, "accuracy_level": accuracy_level,
               "int4_algo": int4_algo, "int8_lm_head": int8_lm_head, "recipe": recipe, "method": method,
               "desc_act": desc_act, "device": device}  # fmt: skip
    if target == "all" or "," in target:
        from phiconvert import report

        return report.compare(model, target, precision, output, options, calibration, force, verify, emit)
    auto = None
    if target == "auto":
        recommendation = hardware.recommend(hardware.probe())
        target, precision = recommendation.target, precision or recommendation.precision
        auto = recommendation.reason
        emit({"stage": "auto", "status": "note", "message": f"--target auto: {auto}"})
    adapter, precision, chosen, python = plan(target, precision, options)
    src = source.resolve(model)
    samples = calibration_samples(calibration)
    destination, temp = temporary_beside(Path(output or f"{src.name}-{target}-{precision}"), force)
    started = time.perf_counter()
    try:
        staging = source.stage(src, temp / "staging")
        reference = run_reference(staging, temp, emit) if verify else None
        report, artifact = convert_one(src, staging, reference, adapter, precision, chosen, python, samples, temp, emit)
        report["seconds"] = time.perf_counter() - started
        report["auto"] = auto
        (artifact / "phiconvert.json").write_text(json.dumps(report, indent=2) + "\n")
        fail_unless_passed(report)
        move_into_place(artifact, destination)
        report["output"] = str(destination)
        return report
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def temporary_beside(output: Path, force: bool) -> tuple[Path, Path]:
    """(destination, a new temporary folder beside it): refuses an existing destination unless ``force``."""
    destination = output.expanduser().resolve()
    if destination.exists() and not force:
        raise PhiconvertError(f"output {destination} exists; pass --force to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    return destination, Path(tempfile.mkdtemp(prefix=f".{destination.name}.phiconvert-", dir=destination.parent))


def plan(target: str, precision: str | None, options: dict[str, Any]) -> tuple[targets.Target, str, dict, str]:
    """Check one target/precision/options choice before any work: (adapter, precision, its options, interpreter)."""
    adapter = targets.load(target)
    precision = precision or adapter.default_precision
    if precision not in adapter.precisions:
        raise PhiconvertError(
            f"target '{target}' cannot do precision '{precision}'; it supports: {', '.join(adapter.precisions)}"
        )
    chosen = _target_options(adapter, **options)
    if adapter.check:
        adapter.check(precision, chosen)
    return adapter, precision, chosen, worker_python(adapter)


def run_reference(staging: Path, temp: Path, emit: Progress) -> dict[str, Any]:
    """The source's fp32 logits on the held-out windows and its greedy chat reply, in a worker of this interpreter."""
    work = temp / "reference"
    work.mkdir()
    job = {"kind": "reference", "source": str(staging), "messages": MESSAGES, "max_new_tokens": MAX_NEW_TOKENS,
           "text_file": str(HELDOUT), "windows": WINDOWS, "logits_out": str(work / "source.npz")}  # fmt: skip
    return {**run_worker(sys.executable, job, work, "reference", emit), "logits": work / "source.npz"}


def convert_one(
    src: source.Source,
    staging: Path,
    reference: dict[str, Any] | None,
    adapter: targets.Target,
    precision: str,
    options: dict[str, Any],
    python: str,
    samples: list[str],
    temp: Path,
    emit: Progress,
) -> tuple[dict[str, Any], Path]:
    """Export, smoke-test and verify one artifact inside ``temp``; returns its report and its folder."""
    label = f"{adapter.name}-{precision}"
    artifact, work = temp / label, temp / f"work-{label}"
    artifact.mkdir()
    (work / "target").mkdir(parents=True)
    job = {
        "kind": "target",
        "source": str(staging),
        "messages": MESSAGES,
        "max_new_tokens": MAX_NEW_TOKENS,
        "target": adapter.name,
        "precision": precision,
        "options": options,
        "calibration": samples,
        "output": str(artifact),
        "work": str(work / "target"),
        "sequences": reference["result"]["sequences"] if reference else None,
        "logits_out": str(work / "artifact.npz"),
    }
    result = run_worker(python, job, work, adapter.name, emit)
    report = timed_stage(emit, "verify", _report, src, adapter, precision, options, artifact, reference, result, work)
    return report, artifact


def fail_unless_passed(report: dict[str, Any]) -> None:
    if report["fidelity"] and not report["fidelity"]["passed"]:
        reasons = "; ".join(report["fidelity"]["failures"])
        raise PhiconvertError(f"verification failed for {report['target']} {report['precision']}: {reasons}")


def emit_with(progress: Progress | None, label: str) -> Progress:
    """Progress events tagged with the artifact they belong to, for runs that make several."""
    return (lambda event: progress({**event, "label": label})) if progress else (lambda event: None)


def calibration_samples(calibration: str | None) -> list[str]:
    """Calibration strings: a text file's or a literal text's paragraphs; the bundled text when none is given."""
    if calibration is None:
        text = CALIBRATION.read_text()
    elif Path(calibration).expanduser().is_file():
        text = Path(calibration).expanduser().read_text()
    else:
        text = calibration
    samples = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not samples:
        raise PhiconvertError("calibration text is empty")
    return samples


def _target_options(adapter: targets.Target, **given: Any) -> dict[str, Any]:
    """The options the target declares, refusing ones it would silently ignore."""
    for name, value in given.items():
        if value is not None and name not in adapter.options:
            flag = "--" + name.replace("_", "-")
            raise PhiconvertError(f"{flag} does not apply to target '{adapter.name}'")
    return {name: given.get(name) for name in adapter.options}


def worker_python(adapter: targets.Target) -> str:
    """This interpreter when it has the toolchain, else the target's managed environment, else a clear error."""
    missing = targets.missing_modules(adapter)
    if not missing:
        return sys.executable
    if adapter.environment and envs.python(adapter.environment):
        return str(envs.python(adapter.environment))
    hint = f'pip install "phiconvert[{adapter.extra}]"'
    if adapter.environment:
        hint = f"phiconvert setup {adapter.environment}"
    raise PhiconvertError(f"target '{adapter.name}' needs: {hint} (missing: {', '.join(missing)})")


def run_worker(python: str, job: dict[str, Any], work: Path, label: str, emit: Progress) -> dict[str, Any]:
    """Run one worker process to completion, relaying its stage events; return its final result event."""
    job_file = work / f"{label}.job.json"
    log_file = work / f"{label}.log"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])}
    final: dict[str, Any] = {}
    stages: list[dict[str, Any]] = []
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [python, "-m", "phiconvert.worker", str(job_file)], stdout=subprocess.PIPE, stderr=log, text=True, env=env
        )
        try:
            for line in process.stdout:
                event = json.loads(line)
                if "stage" in event:
                    emit({**event, "worker": label})
                    if event["status"] == "done":
                        stages.append({k: event[k] for k in ("stage", "seconds", "peak_rss")})
                else:
                    final = event
            process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
    if "result" in final:
        return {**final, "stages": stages}
    kept = _keep_log(log_file, label)
    if "error" in final:
        raise PhiconvertError(f"{label}: {final['error']} (log: {kept})")
    code = process.returncode
    why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    raise PhiconvertError(f"{label}: worker crashed with {why} (log: {kept})")


def _keep_log(log_file: Path, label: str) -> Path:
    """Copy a failed worker's log out of the temporary folder, which is about to be removed."""
    logs = envs.cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    kept = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}.log"
    shutil.copyfile(log_file, kept)
    return kept


def _report(
    src: source.Source,
    adapter: targets.Target,
    precision: str,
    options: dict[str, Any],
    artifact: Path,
    reference: dict[str, Any] | None,
    target_run: dict[str, Any],
    work: Path,
) -> dict[str, Any]:
    result = target_run["result"]
    fidelity = None
    if reference is not None:
        sequences = reference["result"]["sequences"]
        numbers = compare(load_logits(reference["logits"]), load_logits(work / "artifact.npz"), sequences)
        bound = bound_for(result["details"].get("bound", precision))
        failures = numbers.failures(bound)
        source_text = reference["result"]["smoke"]["text"]
        fidelity = {
            **numbers.to_dict(),
            "bound": bound.__dict__,
            "passed": not failures,
            "failures": failures,
            "greedy_match": result["smoke"]["text"].strip() == source_text.strip(),
            "source_reply": source_text,
            "windows": [list(w) for w in WINDOWS],
        }
    files = [p for p in artifact.rglob("*") if p.is_file()]
    details = dict(result["details"])
    return {
        "phiconvert": __version__,
        "source": {"model": src.model, "path": str(src.path), "layout": src.layout,
                   "architecture": src.config.get("architectures", ["?"])[0]},
        "target": adapter.name,
        "precision": precision,
        "options": options,
        "toolchain": result.get("versions", {}),
        "size_bytes": sum(p.stat().st_size for p in files),
        "files": sorted([str(p.relative_to(artifact)) for p in files] + ["phiconvert.json"]),
        "stages": (reference or {}).get("stages", []) + target_run["stages"],
        "peak_rss": {"target": target_run.get("peak_rss"), "reference": (reference or {}).get("peak_rss")},
        "smoke": {"messages": MESSAGES, **result["smoke"]},
        "fidelity": fidelity,
        # what the artifact's stock runtime does differently from the source, beyond the fidelity numbers
        "caveats": details.pop("caveats", []),
        "details": details,
    }  # fmt: skip


def move_into_place(artifact: Path, destination: Path) -> None:
    """Rename the verified artifact to its destination, replacing an old one only now (--force)."""
    if destination.exists():
        old = destination.with_name(f".{destination.name}.phiconvert-old")
        destination.rename(old)
        artifact.rename(destination)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        artifact.rename(destination)
