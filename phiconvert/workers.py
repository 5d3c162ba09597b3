"""Parent side of the worker processes: start one, relay its events, return its result or one clear error.

Every target's work, the torch reference and every benchmark run in their own process (`phiconvert.worker`),
possibly under a managed environment's interpreter: a native crash is an error of that job, memory goes back to
the system between jobs, and conflicting toolchains never share an interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phiconvert import envs, targets
from phiconvert.errors import PhiconvertError
from phiconvert.protocol import Event, Job, write_job

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

# What a run reports as it goes (phiconvert.protocol.Event): the CLI draws it, the Python API passes it on
Progress = Callable[[Event], None]


def quiet(event: Event) -> None:
    """A progress callback that shows nothing."""


def emit_with(progress: Progress | None, label: str) -> Progress:
    """Progress events tagged with the artifact they belong to, for runs that make several."""
    return (lambda event: progress({**event, "label": label})) if progress else quiet  # type: ignore[typeddict-item]


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


def worker_env(target: str | None = None) -> dict[str, str]:
    """The environment of a worker process: this one, with phiconvert importable (a managed environment's
    interpreter does not have it installed), over the variables the worker's target declares (``Target.env``)."""
    declared = targets.load(target).env if target in targets.names() else {}
    path = os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])
    return {**declared, **os.environ, "PYTHONPATH": path}


def run_worker(python: str, job: Job, work: Path, label: str, emit: Progress) -> dict[str, Any]:
    """Run one worker process to completion, relaying its events; return its final result event with the stages
    it timed. A failed worker's log is kept: its path is in the error."""
    job_file = work / f"{label}.job.json"
    log_file = work / f"{label}.log"
    write_job(job, job_file)
    final: dict[str, Any] = {}
    stages: list[dict[str, Any]] = []
    with log_file.open("w") as log:
        process = subprocess.Popen(
            [python, "-m", "phiconvert.worker", str(job_file)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=worker_env(getattr(job, "target", None)),
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
    kept = keep_log(log_file, label)
    if "error" in final:
        raise PhiconvertError(f"{label}: {final['error']} (log: {kept})")
    code = process.returncode
    why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    if code == -signal.SIGKILL:
        why += ", likely the out-of-memory killer"
    raise PhiconvertError(f"{label}: worker crashed with {why} (log: {kept})")


def keep_log(log_file: Path, label: str) -> Path:
    """Copy a failed worker's log out of the temporary folder, which is about to be removed."""
    logs = envs.cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    kept = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}.log"
    shutil.copyfile(log_file, kept)
    return kept
