"""bench(): how fast an artifact loads and runs, and how much memory it takes, in its own runtime.

Each artifact (or the source model, in transformers fp32) is measured in a fresh worker process, under the same
interpreter its conversion would use, with the runtime's deployment defaults. Load time and peak RSS after the load
are measured, not computed from bits per weight; prompt processing is the time to the first new token of a prompt of
each length, generation the rate of the following tokens. Timings are the best of ``repeats`` runs after a warm-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phiconvert import source, targets
from phiconvert.errors import PhiconvertError
from phiconvert.protocol import BenchJob
from phiconvert.source import HELDOUT
from phiconvert.workers import Progress, emit_with, quiet, run_worker, worker_python

PROMPT_LENGTHS = (16, 128, 512)
NEW_TOKENS = 32
REPEATS = 3
SOURCE = "source"  # the target name under which the source model is benched (transformers, fp32)


def bench(
    artifacts: list[str],
    prompt_lengths: tuple[int, ...] | list[int] = PROMPT_LENGTHS,
    new_tokens: int = NEW_TOKENS,
    repeats: int = REPEATS,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Measure each artifact (a phiconvert output folder, or a source model: Hub id, folder, bundled:NAME)."""
    if not artifacts:
        raise PhiconvertError("give at least one artifact folder or model to bench")
    if new_tokens < 2 or repeats < 1 or not prompt_lengths or min(prompt_lengths) < 1:
        raise PhiconvertError("--new-tokens must be at least 2, --repeats at least 1, prompt lengths positive")
    work = Path(tempfile.mkdtemp(prefix="phiconvert-bench-"))
    try:
        results = []
        for item in artifacts:
            kind, path, info = identify(item)
            prompts = prompt_ids(path, info, prompt_lengths, new_tokens)
            results.append(measure(kind, path, info, prompts, new_tokens, repeats, work, progress))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def identify(item: str | Path) -> tuple[str, Path, dict[str, Any]]:
    """(target name or SOURCE, folder, what is known about it): from phiconvert.json, the files, or as a source."""
    path = Path(item).expanduser()
    if path.is_dir() and (path / "phiconvert.json").is_file():
        report = json.loads((path / "phiconvert.json").read_text())
        if report.get("kind") == "comparison":
            raise PhiconvertError(f"{path} is a --target all report folder; bench the artifact folders inside it")
        return report["target"], path.resolve(), {"precision": report["precision"], "source": report["source"]}
    found = targets.recognise(path) if path.is_dir() else None
    if found:
        return found, path.resolve(), {}
    src = source.resolve(str(item))  # a plain checkpoint, a Hub id or bundled:NAME: errors say what is wrong
    return SOURCE, src.path, {"precision": "fp32", "model": src.model}  # transformers loads it in float32


def prompt_ids(path: Path, info: dict[str, Any], lengths: Any, new_tokens: int) -> list[list[int]]:
    """Prompts of each length, cut from the held-out text (repeated as needed) with the model's own tokenizer."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    candidates = [path, Path(info.get("source", {}).get("path", ""))]
    folder = next((p for p in candidates if p.is_dir() and any(p.glob("tokenizer*"))), None)
    if folder is None:
        raise PhiconvertError(f"no tokenizer found for {path}: bench needs tokenizer files or its phiconvert.json")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the held-out text is longer than the model's context on purpose: no warning
    try:
        ids = AutoTokenizer.from_pretrained(folder)(HELDOUT.read_text(), add_special_tokens=False)["input_ids"]
    finally:
        logging.set_verbosity(verbosity)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    limit = config.get("max_position_embeddings")
    if limit and max(lengths) + new_tokens > limit:
        raise PhiconvertError(f"prompt of {max(lengths)} + {new_tokens} new tokens exceeds the model's {limit}")
    return [(ids * (length // len(ids) + 1))[:length] for length in lengths]


def measure(
    kind: str,
    path: Path,
    info: dict[str, Any],
    prompts: list[list[int]],
    new_tokens: int,
    repeats: int,
    work: Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Bench one folder in its own worker; returns load time and memory, and tokens/s per prompt length."""
    python = sys.executable if kind == SOURCE else worker_python(targets.load(kind))
    label = f"bench-{kind}"
    job = BenchJob(target=kind, artifact=str(path), prompts=prompts, new_tokens=new_tokens, repeats=repeats)
    run = run_worker(python, job, work, label, emit_with(progress, f"{kind} {info.get('precision', '')}".strip()))
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return {
        "artifact": str(path),
        "target": kind,
        "precision": info.get("precision"),
        "size_bytes": sum(p.stat().st_size for p in files if p.name != "phiconvert.json"),
        **run["result"],
    }


CLIENTS = (1, 4, 16)  # concurrent clients of `bench --serve`
SERVE_REQUESTS = 16  # requests per number of clients (at least one per client)
SERVE_SECONDS = 300.0  # per number of clients: no request starts after this
QUESTION = [{"role": "user", "content": "What is a list comprehension?"}]


def serving(
    artifacts: list[str],
    clients: tuple[int, ...] | list[int] = CLIENTS,
    requests: int = SERVE_REQUESTS,
    new_tokens: int = NEW_TOKENS,
    engine: str = "phiconvert",
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """`phiconvert serve` each artifact on a loopback port, then ``requests`` streamed chat requests of
    ``new_tokens`` tokens from 1, 4 and 16 concurrent clients: requests per second, time to the first token
    (what a client waits, its turn in the queue included), tokens per second over all clients. ``engine``: the
    server `phiconvert serve --engine` runs (vllm: no RSS, its memory is the GPU's)."""
    if not artifacts or not clients or min(clients) < 1 or requests < 1 or new_tokens < 1:
        raise PhiconvertError("bench --serve needs artifacts, positive --clients, --requests and --new-tokens")
    emit = progress or quiet
    results = []
    for item in artifacts:
        with served(item, new_tokens, engine) as (base, health):
            for count in clients:
                name = f"serve {health['target']} · {count} client{'s' if count > 1 else ''}"
                emit({"stage": name, "status": "start"})
                row = asyncio.run(load(base, health["model"], count, max(requests, count), new_tokens))
                emit({"stage": name, "status": "done", "seconds": row["seconds"]})
                results.append({"artifact": item, "target": health["target"], "rss": health["rss_bytes"], **row})
    return results


@contextlib.contextmanager
def served(item: str, new_tokens: int, engine: str = "phiconvert") -> Iterator[tuple[str, dict[str, Any]]]:
    """`phiconvert serve ITEM` on a free loopback port until /health answers; ended when done."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "phiconvert", "serve", str(item), "--host", "127.0.0.1", "--port", str(port),
               "--engine", engine]  # fmt: skip
    command += ["--max-tokens-limit", str(new_tokens)] if engine == "phiconvert" else []
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        health = None
        while health is None:
            if process.poll() is not None:
                lines = process.stderr.read().strip().splitlines() or ["the server ended"]
                raise PhiconvertError(f"bench --serve {item}: {lines[-1].removeprefix('error: ')}")
            try:
                response = httpx.get(base + "/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.3)
                continue
            if engine == "phiconvert":
                health = response.json()
            elif response.status_code == 200:  # vLLM's /health says nothing more: ask its model list
                model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
                health = {"target": f"{identify(item)[0]} (vllm)", "model": model, "rss_bytes": None}
        yield base, health
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)


async def load(base: str, model: str, clients: int, requests: int, new_tokens: int) -> dict[str, Any]:
    """``requests`` streamed greedy chat requests, ``clients`` at a time."""
    import httpx

    waits: list[float] = []
    tokens = [0]
    deadline = time.perf_counter() + SERVE_SECONDS
    queue = list(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() < deadline:
            queue.pop()
            body = {"model": model, "messages": QUESTION, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            sent, first = time.perf_counter(), None
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise PhiconvertError(f"bench --serve: HTTP {response.status_code} from {base}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                        first = time.perf_counter() - sent
                    tokens[0] += (chunk.get("usage") or {}).get("completion_tokens", 0)
            waits.append(first if first is not None else time.perf_counter() - sent)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=SERVE_SECONDS) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - start
    waits.sort()
    return {"clients": clients, "requests": len(waits), "seconds": seconds, "requests_per_s": len(waits) / seconds,
            "ttft_p50_s": waits[len(waits) // 2], "ttft_max_s": waits[-1], "tokens_per_s": tokens[0] / seconds,
            "new_tokens": new_tokens}  # fmt: skip
