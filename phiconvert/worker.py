"""Child-process side of a run: `python -m phiconvert.worker JOB.json`.

Each target's work (and the torch reference) runs in its own process, possibly under another environment's
interpreter, so a native crash is an error of that target, memory goes back between targets, and conflicting
toolchains never share an interpreter. The parent reads JSON-line events from our original stdout; everything the
libraries print is sent to stderr, which the parent keeps as the run's log. This module imports only numpy and
phiconvert's small modules, so a worker in another environment needs nothing else of phiconvert's dependencies.

Jobs (``phiconvert.protocol``, written by ``phiconvert.pipeline`` and ``phiconvert.bench``): the reference's
log-probabilities, a target's export + smoke test + comparison, the source's chat reply, a benchmark.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from phiconvert import progress, stops
from phiconvert.errors import PhiconvertError
from phiconvert.protocol import BenchJob, Event, ReferenceJob, SessionJob, SourceChatJob, TargetJob, read_job


def peak_rss(field: str = "VmHWM") -> int:
    """Peak resident set size of this process since the current stage began (or since it started), in bytes
    (``field`` "VmRSS": the resident size now).

    On Linux from /proc (VmHWM): getrusage's ru_maxrss starts a forked child at its parent's peak, so a worker
    started by a parent that holds torch would report the parent's memory as its own.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak() -> None:
    """Start measuring the peak RSS afresh (Linux: ``5`` in /proc/self/clear_refs resets VmHWM to the current RSS),
    so each stage's peak is its own, not the highest of the stages before it in the same process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


Send = Callable[[Event], None]
_highest = {"rss": 0}  # the highest stage peak of this process: its peak over the whole job


def timed_stage(send: Send, name: str, fn: Callable, *args: Any) -> Any:
    """Run one stage, reporting its start, its progress, its duration and the peak RSS this process reached in it."""
    send({"stage": name, "status": "start"})
    progress.stage(name)
    # what the stage before left in reference cycles (a transformers model is one) is freed now, not whenever the
    # collector next runs: bnb's export left 5.5 GiB resident into the smoke test, 2.4 GiB after this
    gc.collect()
    reset_peak()
    start = time.perf_counter()
    result = fn(*args)
    peak = peak_rss()
    _highest["rss"] = max(_highest["rss"], peak)
    send({"stage": name, "status": "done", "seconds": time.perf_counter() - start, "peak_rss": peak})
    return result


def run_reference(job: ReferenceJob, send: Send) -> dict[str, Any]:
    """Tokenise the held-out windows and write the source's float32 log-probabilities of each (one file each)."""
    import torch
    from transformers import AutoTokenizer

    from phiconvert.reference import SourceModel, write_logprobs

    torch.manual_seed(0)
    source = Path(job.source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(Path(job.text_file).read_text(), add_special_tokens=False)["input_ids"]
    sequences = [ids[start : start + length] for start, length in job.windows]
    if any(len(s) < length for s, (_, length) in zip(sequences, job.windows, strict=True)):
        needed = max(start + length for start, length in job.windows)
        raise PhiconvertError(f"the held-out text has {len(ids)} tokens of this tokenizer; the windows need {needed}")
    model = timed_stage(send, "load source", SourceModel, source)
    for i, sequence in enumerate(sequences):

        def window(i: int = i, sequence: list[int] = sequence) -> None:
            out = Path(job.out) / f"source-{i}.npy"
            write_logprobs(model, sequence, out, lambda done, total: progress.advance(done, total, "steps"))

        timed_stage(send, f"source logits {len(sequence)}", window)
    return {"sequences": sequences}


def run_source_chat(job: SourceChatJob, send: Send) -> dict[str, Any]:
    """The source's greedy chat reply (exact, whatever the drafts): text, tokens, whether it ended the turn."""
    from transformers import AutoTokenizer

    from phiconvert.reference import SourceModel, greedy_reply

    source = Path(job.source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    prompt = tokenizer.apply_chat_template(job.messages, add_generation_prompt=True, return_dict=True)
    stop = set(stops.stop_ids(source, tokenizer))
    model = timed_stage(send, "load source", SourceModel, source)

    def chat() -> list[int]:
        tick = lambda done, total: progress.advance(done, total, "tokens")  # noqa: E731
        return greedy_reply(model, prompt["input_ids"], job.max_new_tokens, stop, job.drafts, tick)

    new = timed_stage(send, "source chat", chat)
    stopped = bool(new) and new[-1] in stop
    text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
    return {"text": text, "tokens": len(new), "stopped_at_eot": stopped, "ids": new}


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


def compare_artifact(target: Any, output: Path, job: TargetJob) -> None:
    """The artifact's logits of every window against the source's log-probabilities on disk, a chunk of positions
    at a time; writes each window's per-position numbers (``positions-I.npz``, ``positions-VARIANT-I.npz`` for a
    stock-runtime variant) for the parent to summarise."""
    from phiconvert.verify import Positions, compare_file

    sequences = job.sequences or []
    total = sum(len(s) for s in sequences)
    numbers: dict[str, list[Positions]] = {}
    done = 0
    progress.advance(0, total, "tokens")
    for index, start, chunk in target.logits(output, sequences):
        window = index if isinstance(index, int) else index[1]
        key = str(index) if isinstance(index, int) else f"{index[0]}-{window}"
        source_file = Path((job.source_logprobs or [])[window])
        numbers.setdefault(key, []).append(compare_file(source_file, start, chunk, sequences[window]))
        if isinstance(index, int):
            done += len(chunk)
            progress.advance(done, total, "tokens")
    for key, parts in numbers.items():
        Positions.join(parts).save(Path(job.positions_out) / f"positions-{key}.npz")


def run_target(job: TargetJob, send: Send) -> dict[str, Any]:
    """Export, smoke-test and (unless told not to) compare the artifact's logits, in the target's runtime (those of
    ``job.stages``: the export, the verification or both)."""
    from dataclasses import asdict

    from phiconvert.targets import ExportJob, load

    target = load(job.target)
    output, work = Path(job.output), Path(job.work)
    export_job = ExportJob(
        source=Path(job.source),
        output=output,
        precision=job.precision,
        options=job.options,
        calibration=job.calibration,
        work=work,
        calibration_given=job.calibration_given,
        model_id=job.model_id,
    )
    result: dict[str, Any] = {"versions": versions(target.packages)}
    if "export" in job.stages:
        result["details"] = timed_stage(send, "export", target.export, export_job)
    if "verify" not in job.stages:
        return result
    smoke = timed_stage(send, "smoke test", target.smoke, output, job.messages, job.max_new_tokens)
    result["smoke"] = asdict(smoke)
    if job.sequences:
        timed_stage(send, "artifact logits", compare_artifact, target, output, job)
    return result


def run_bench(job: BenchJob, send: Send) -> dict[str, Any]:
    """Load time and memory, then the best time to the first token and to ``new_tokens`` tokens per prompt.

    Best of the repeats, not their median: timing noise only ever adds time, and generation speed is the
    difference of the two timings, which a median's noise can swallow when the runtime is fast.
    """
    import importlib

    from phiconvert import targets
    from phiconvert.targets import hf_common

    name, new_tokens = job.target, job.new_tokens
    target = None if name == "source" else targets.load(name)
    for module in target.modules if target else ("torch", "transformers"):
        importlib.import_module(module)  # the toolchain's import cost and memory are not the artifact's load
    baseline = peak_rss()
    start = time.perf_counter()
    runtime = timed_stage(send, "load", target.open if target else hf_common.open_runtime, Path(job.artifact), False)
    generate = targets.generator(runtime)  # deployment defaults: what a user chats with
    load_seconds, load_rss = time.perf_counter() - start, peak_rss()

    def timed(ids: list[int], n: int) -> float:
        start = time.perf_counter()
        made = generate(ids, n)
        if made != n:
            raise PhiconvertError(f"{name} runner generated {made} tokens where {n} were asked")
        return time.perf_counter() - start

    rows: list[dict[str, Any]] = []
    for ids in job.prompts:
        if len(ids) + new_tokens > runtime.context:  # a runtime whose context is fixed at export (ExecuTorch)
            rows.append({"tokens": len(ids), "skipped": f"past the runtime's {runtime.context}-token context"})
            continue

        def prompt(ids: list[int] = ids) -> dict[str, Any]:
            # warm-up: a new length's first call allocates and picks kernels (1.5-2.5x slower). Every length gets
            # all the repeats, slow runs too: a single 8 s prefill (mlx's CPU backend, 512 tokens) varied by more
            # than the 1 s its 31 decode steps took, and the difference of two timings came out negative
            timed(ids, 2)
            repeats = job.repeats
            first = min(timed(ids, 1) for _ in range(repeats))
            full = min(timed(ids, new_tokens) for _ in range(repeats))
            for _ in range(EXTRA_ROUNDS):  # a busy machine slowed every one-token run: measure both again
                if full > first:
                    break
                first, full = min(first, timed(ids, 1)), min(full, timed(ids, new_tokens))
            decode = (new_tokens - 1) / (full - first) if full > first else None
            return {"tokens": len(ids), "first_token_s": first, "prompt_tps": len(ids) / first,
                    "generate_s": full, "generation_tps": decode, "repeats": repeats}  # fmt: skip

        rows.append(timed_stage(send, f"prompt {len(ids)}", prompt))
    # a busy machine slows every runtime several-fold: the load average says how quiet this one was
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"load_s": load_seconds, "baseline_rss": baseline, "load_rss": load_rss,
            "peak_rss": max(_highest["rss"], peak_rss()),
            "new_tokens": new_tokens, "repeats": job.repeats, "load_average": busy, "prompts": rows}  # fmt: skip


# more rounds of a prompt's timings when generating new_tokens measured no slower than one token (a tiny model's
# decode takes milliseconds, which one descheduled run swamps; seen in CI as a missing generation speed)
EXTRA_ROUNDS = 5


def run_session(job: SessionJob, send: Send) -> dict[str, Any]:
    """Hold the artifact in its runtime and answer requests from stdin one at a time."""
    import queue
    import threading

    from phiconvert import targets
    from phiconvert.targets import hf_common

    target = None if job.target == "source" else targets.load(job.target)
    opener = target.open if target else hf_common.open_runtime
    runtime = timed_stage(send, "load", opener, Path(job.artifact), job.exact)
    logits = target.logits if target else hf_common.logits
    send({"ready": {"context": runtime.context, "rss": peak_rss("VmRSS")}})
    requests: queue.Queue = queue.Queue()

    def read() -> None:  # a reader thread, so a cancel can arrive while a generation runs
        for line in sys.stdin:
            if line.strip():
                requests.put(json.loads(line))
        requests.put(None)

    threading.Thread(target=read, daemon=True).start()
    while (request := requests.get()) is not None:
        if request.get("cancel"):
            continue  # arrived after its generation had ended
        try:
            if "score" in request:
                send({"scores": score(runtime, logits, Path(job.artifact), request["score"])})
            else:
                answer(runtime, request, requests, send)
        except PromptTooLong as error:
            send({"refused": str(error), "code": "context_length_exceeded"})
        except Exception as error:  # a chat the template rejects, ...: one line, and the runtime stays loaded
            traceback.print_exc()
            send({"refused": f"{type(error).__name__}: {str(error).strip()}"[:500]})
    return {}


def answer(runtime: Any, request: dict[str, Any], requests: Any, send: Send) -> None:
    """One request: prompt ids, then text pieces as tokens come; a piece is held back while it may be the start
    of a stop string or ends inside a character, and the text ends before a stop string or a stop id."""
    from phiconvert.targets import Sampling

    ids = runtime.prompt(request["messages"]) if "messages" in request else runtime.encode(request["text"])
    if len(ids) >= runtime.context:
        raise PromptTooLong(f"the prompt is {len(ids)} tokens; this model's context is {runtime.context}")
    budget = min(int(request.get("max_tokens", 256)), runtime.context - len(ids))
    sampling = Sampling(float(request.get("temperature", 0.0)), float(request.get("top_p", 1.0)), request.get("seed"))
    strings = [s for s in request.get("stop") or [] if s]
    new: list[int] = []
    made, shown, reason, text = 0, 0, "length", ""
    stream = runtime.stream(ids, budget, False, sampling)
    for token in stream:
        if cancelled(requests):
            reason = "cancelled"
            break
        made += 1
        if runtime.is_stop(token):
            reason = "stop"
            break
        new.append(int(token))
        text = runtime.decode(ids, new)
        cut = min((i for i in (text.find(s, max(0, shown - len(s))) for s in strings) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            break
        ready = held_back(text, strings)
        send({"piece": text[shown:ready], "token": int(token)})
        shown = max(shown, ready)
    getattr(stream, "close", lambda: None)()
    if reason != "cancelled" and len(text) > shown:
        send({"piece": text[shown:], "token": -1})
    send({"end": {"finish_reason": reason, "prompt_tokens": len(ids), "completion_tokens": made}})


def score(runtime: Any, logits: Any, artifact: Path, pairs: list[list[str]]) -> list[list[Any]]:
    """(log-probability, greedy) of each continuation after its context, from the target's own prefill logits
    (verification's exact mode; the model is loaded once for all the pairs, beside the runtime): what lm-eval's
    loglikelihood requests need. Tokenised as lm-eval does: the continuation's ids are those the whole text has
    past the context's; a sequence longer than the context keeps its end."""
    import numpy as np

    sequences, spans = [], []
    for context, continuation in pairs:
        whole, start = runtime.encode(context + continuation), len(runtime.encode(context))
        if start >= len(whole):  # the continuation merged into the context's last token: score that token
            start = len(whole) - 1
        cut = max(0, len(whole) - runtime.context)
        sequences.append(whole[cut:])
        spans.append(max(1, start - cut))
    found: dict[int, list[np.ndarray]] = {}
    for index, _, chunk in logits(artifact, sequences):
        if isinstance(index, int):  # a stock-runtime variant (a tuple index) is verification's business
            found.setdefault(index, []).append(chunk)
    results = []
    for index, (ids, start) in enumerate(zip(sequences, spans, strict=True)):
        rows = np.concatenate(found[index])[start - 1 : len(ids) - 1].astype(np.float64)
        rows -= rows.max(axis=-1, keepdims=True)
        logprobs = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
        wanted = np.asarray(ids[start:])
        total = float(logprobs[np.arange(len(wanted)), wanted].sum())
        results.append([total, bool((logprobs.argmax(axis=-1) == wanted).all())])
    return results


class PromptTooLong(PhiconvertError):
    pass


def held_back(text: str, strings: list[str]) -> int:
    """How much of ``text`` may be shown: not a trailing incomplete character, nor a tail that may begin a stop
    string."""
    end = len(text.rstrip("\ufffd"))
    for s in strings:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:n]):
                end -= n
                break
    return end


def cancelled(requests: Any) -> bool:
    """Whether a cancel is waiting (requests come one at a time: nothing else can be queued during one)."""
    import queue

    try:
        return bool(requests.get_nowait().get("cancel"))
    except queue.Empty:
        return False


RUNS: dict[type, Callable[[Any, Send], dict[str, Any]]] = {
    ReferenceJob: run_reference,
    SourceChatJob: run_source_chat,
    TargetJob: run_target,
    BenchJob: run_bench,
    SessionJob: run_session,
}


def import_toolchain(job: Any) -> None:
    """Import the target's ``import_first`` modules before any model is loaded, from this long-lived frame.

    A module that keeps an exception it caught while importing keeps its traceback's frames, and through them every
    frame the import ran under. gptqmodel 7.6 keeps llama_cpp's ImportError, and transformers imports it inside the
    first ``from_pretrained``: that call's frame, and the model it loaded, were never freed. The smoke test's model
    stayed beside the comparison's (15.2 GiB instead of 7.6 for a GPTQ Phi-4-mini, measured 2026-12-04). Only the
    modules that need it: importing a whole toolchain first costs a bench or serve worker seconds (openvino: 4 s)."""
    from phiconvert import targets

    name = getattr(job, "target", "source")
    for module in targets.load(name).import_first if name != "source" else ():
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the target's own code reports what is missing, in its words


def main() -> None:
    stream = os.fdopen(os.dup(1), "w")
    lock = threading.Lock()  # progress comes from other threads too (file watchers, tqdm's monitor): whole lines

    def send(event: Event) -> None:
        line = json.dumps(event) + "\n"
        with lock:
            stream.write(line)
            stream.flush()

    os.dup2(2, 1)  # library chatter, native included, goes to the log, not into our event stream
    sys.stdout = sys.stderr
    progress.attach(send)
    job = read_job(Path(sys.argv[1]))
    try:
        import_toolchain(job)
        result = RUNS[type(job)](job, send)
        send({"result": result, "peak_rss": max(_highest["rss"], peak_rss())})
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
