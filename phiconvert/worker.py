"""Child-process side of a run: `python -m phiconvert.worker JOB.json`.

Each target's work (and the torch reference) runs in its own process, possibly under another environment's
interpreter, so a native crash is an error of that target, memory goes back between targets, and conflicting
toolchains never share an interpreter. The parent reads JSON-line events from our original stdout; everything the
libraries print is sent to stderr, which the parent keeps as the run's log.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert.errors import PhiconvertError


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes.

    On Linux from /proc (VmHWM): getrusage's ru_maxrss starts a forked child at its parent's peak, so a worker
    started by a parent that holds torch would report the parent's memory as its own.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


Send = Callable[[dict[str, Any]], None]


def timed_stage(send: Send, name: str, fn: Callable, *args: Any) -> Any:
    """Run one stage, reporting its start, its duration and the peak RSS this process reached by its end."""
    send({"stage": name, "status": "start"})
    start = time.perf_counter()
    result = fn(*args)
    send({"stage": name, "status": "done", "seconds": time.perf_counter() - start, "peak_rss": peak_rss()})
    return result


def save_logits(path: Path, logits: list[np.ndarray]) -> None:
    np.savez(path, *[np.asarray(x, dtype=np.float32) for x in logits])


def load_logits(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def run_reference(job: dict[str, Any], send: Send) -> dict[str, Any]:
    """Tokenise the held-out text and compute the source's fp32 logits and greedy chat reply with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(0)
    source = job["source"]

    def load():
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        return tokenizer, model.eval()

    tokenizer, model = timed_stage(send, "load source", load)
    ids = tokenizer(Path(job["text_file"]).read_text(), add_special_tokens=False)["input_ids"]
    sequences = [ids[start : start + length] for start, length in job["windows"]]
    if any(len(s) < length for s, (_, length) in zip(sequences, job["windows"], strict=True)):
        raise PhiconvertError(f"held-out text too short for windows {job['windows']}: {len(ids)} tokens")

    def forward():
        with torch.no_grad():
            return [model(torch.tensor([s])).logits[0].float().numpy() for s in sequences]

    save_logits(Path(job["logits_out"]), timed_stage(send, "source logits", forward))

    def chat():
        prompt = tokenizer.apply_chat_template(job["messages"], add_generation_prompt=True, return_dict=True)
        generation = (
            GenerationConfig.from_pretrained(source) if Path(source, "generation_config.json").exists() else None
        )
        eos = generation.eos_token_id if generation is not None else tokenizer.eos_token_id
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt["input_ids"]]),
                max_new_tokens=job["max_new_tokens"],
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        new = out[0, len(prompt["input_ids"]) :].tolist()
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        stopped = bool(new) and new[-1] in eos_ids
        text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
        return {"text": text, "tokens": len(new), "stopped_at_eot": stopped}

    smoke = timed_stage(send, "source chat", chat)
    return {"sequences": sequences, "smoke": smoke}


def versions(packages: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Installed versions of the toolchain, as this worker's interpreter sees them."""
    from importlib import metadata

    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run_target(job: dict[str, Any], send: Send) -> dict[str, Any]:
    """Export, smoke-test and (unless told not to) compute the artifact's logits, in the target's runtime."""
    from dataclasses import asdict

    from phiconvert.targets import ExportJob, load

    target = load(job["target"])
    output, work = Path(job["output"]), Path(job["work"])
    export_job = ExportJob(
        source=Path(job["source"]),
        output=output,
        precision=job["precision"],
        options=job["options"],
        calibration=job["calibration"],
        work=work,
    )
    details = timed_stage(send, "export", target.export, export_job)
    smoke = timed_stage(send, "smoke test", target.smoke, output, job["messages"], job["max_new_tokens"])
    result: dict[str, Any] = {"details": details, "smoke": asdict(smoke), "versions": versions(target.packages)}
    if job.get("sequences"):
        logits = timed_stage(send, "artifact logits", target.logits, output, job["sequences"])
        save_logits(Path(job["logits_out"]), logits)
    return result


def run_bench(job: dict[str, Any], send: Send) -> dict[str, Any]:
    """Load time and memory, then the best time to the first token and to ``new_tokens`` tokens per prompt.

    Best of the repeats, not their median: timing noise only ever adds time, and generation speed is the
    difference of the two timings, which a median's noise can swallow when the runtime is fast.
    """
    import importlib

    from phiconvert import targets
    from phiconvert.targets import hf_common

    name, new_tokens = job["target"], job["new_tokens"]
    target = None if name == "source" else targets.load(name)
    for module in target.modules if target else ("torch", "transformers"):
        importlib.import_module(module)  # the toolchain's import cost and memory are not the artifact's load
    baseline = peak_rss()
    start = time.perf_counter()
    generate = timed_stage(send, "load", (target.runner if target else hf_common.runner), Path(job["artifact"]))
    load_seconds, load_rss = time.perf_counter() - start, peak_rss()

    def timed(ids: list[int], n: int) -> float:
        start = time.perf_counter()
        made = generate(ids, n)
        if made != n:
            raise PhiconvertError(f"{name} runner generated {made} tokens where {n} were asked")
        return time.perf_counter() - start

    rows = []
    for ids in job["prompts"]:

        def prompt(ids: list[int] = ids) -> dict[str, Any]:
            # warm-up: a new length's first call allocates and picks kernels (1.5-2.5x slower). Every length gets
            # all the repeats, slow runs too: a single 8 s prefill (mlx's CPU backend, 512 tokens) varied by more
            # than the 1 s its 31 decode steps took, and the difference of two timings came out negative
            timed(ids, 2)
            repeats = job["repeats"]
            first = min(timed(ids, 1) for _ in range(repeats))
            full = min(timed(ids, new_tokens) for _ in range(repeats))
            decode = (new_tokens - 1) / (full - first) if full > first else None
            return {"tokens": len(ids), "first_token_s": first, "prompt_tps": len(ids) / first,
                    "generate_s": full, "generation_tps": decode, "repeats": repeats}  # fmt: skip

        rows.append(timed_stage(send, f"prompt {len(ids)}", prompt))
    # a busy machine slows every runtime several-fold: the load average says how quiet this one was
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"load_s": load_seconds, "baseline_rss": baseline, "load_rss": load_rss, "peak_rss": peak_rss(),
            "new_tokens": new_tokens, "repeats": job["repeats"], "load_average": busy, "prompts": rows}  # fmt: skip


def main() -> None:
    stream = os.fdopen(os.dup(1), "w")

    def send(event: dict[str, Any]) -> None:
        stream.write(json.dumps(event) + "\n")
        stream.flush()

    os.dup2(2, 1)  # library chatter, native included, goes to the log, not into our event stream
    sys.stdout = sys.stderr
    job = json.loads(Path(sys.argv[1]).read_text())
    try:
        run = {"reference": run_reference, "target": run_target, "bench": run_bench}[job["kind"]]
        send({"result": run(job, send), "peak_rss": peak_rss()})
    except PhiconvertError as error:
        send({"error": str(error)})
        sys.exit(1)
    except Exception as error:  # any toolchain failure becomes one line for the user; the traceback goes to the log
        traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        send({"error": f"{type(error).__name__}: {message}"[:500]})
        sys.exit(1)


if __name__ == "__main__":
    main()
