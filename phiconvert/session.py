"""An artifact held in its own runtime by a worker process, answering one generation request at a time: what
`phiconvert chat` and `phiconvert serve` talk to.

The runtime lives in a worker (``SessionJob``) for the reasons every target's work does: a target whose toolchain
conflicts with this environment (gptq, awq) runs under its managed interpreter, and a native crash ends the
session with one clear error instead of taking the server down with it. Requests and answers are JSON lines.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from phiconvert import targets
from phiconvert.bench import SOURCE, identify
from phiconvert.errors import PhiconvertError
from phiconvert.protocol import Event, SessionJob, write_job
from phiconvert.workers import Progress, keep_log, quiet, worker_env, worker_python

MAX_TEMPERATURE = 2.0  # the OpenAI API's range


class BadSetting(PhiconvertError):
    """A generation setting out of range (``param``: its name, as the OpenAI API calls it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def check_sampling(max_tokens: Any, temperature: Any, top_p: Any, seed: Any) -> None:
    """Refuse generation settings no runtime can take, in one line naming the setting."""

    def number(value: Any, kind: type | tuple[type, ...] = (int, float)) -> bool:
        return isinstance(value, kind) and not isinstance(value, bool)

    if not number(max_tokens, int) or max_tokens < 1:
        raise BadSetting("max_tokens", f"max_tokens must be a positive integer, not {max_tokens!r}")
    if not number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        limit = f"{MAX_TEMPERATURE:g}"
        raise BadSetting("temperature", f"temperature must be a number from 0 to {limit}, not {temperature!r}")
    if not number(top_p) or not 0 < top_p <= 1:
        raise BadSetting("top_p", f"top_p must be a number above 0 and at most 1, not {top_p!r}")
    if seed is not None and (not number(seed, int) or seed < 0):
        raise BadSetting("seed", f"seed must be a non-negative integer, not {seed!r}")


class PromptRefused(PhiconvertError):
    """The runtime would not start on this prompt (over its context: code "context_length_exceeded"; a chat its
    template rejects); the session goes on."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class Session:
    """``Session(artifact)`` starts the worker and waits until the runtime is loaded (``exact``: in the runtime's
    most exact mode, as verification's smoke test runs it; else with its deployment defaults). ``generate(...)``
    streams one reply's events (``piece`` ..., then ``end``); ``close()`` ends the worker. Requests from several
    threads are taken one at a time, in turn."""

    def __init__(self, item: str | Path, exact: bool = False, progress: Progress | None = None) -> None:
        self.target, self.path, self.info = identify(item)
        python = sys.executable if self.target == SOURCE else worker_python(targets.load(self.target))
        self.work = Path(tempfile.mkdtemp(prefix="phiconvert-session-"))
        job_file, self.log = self.work / "session.job.json", self.work / "session.log"
        write_job(SessionJob(target=self.target, artifact=str(self.path), exact=exact), job_file)
        with self.log.open("w") as log:
            command = [python, "-m", "phiconvert.worker", str(job_file)]
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            text=True, env=worker_env(self.target))  # fmt: skip
        self.lock = threading.Lock()  # generate() holds it: a second caller waits for the first reply to end
        try:
            ready = self._next(progress or quiet)
            while "ready" not in ready:
                ready = self._next(progress or quiet)
        except BaseException:
            self.close()
            raise
        self.context: int = ready["ready"]["context"]
        self.loaded_rss: int = ready["ready"]["rss"]  # the worker's resident memory once the model was loaded

    @property
    def rss(self) -> int:
        """The worker's resident memory now: runtimes that map their weights (OpenVINO, llama.cpp) read them in
        only as they are used, so after a reply it is more than at loading. Read from /proc (Linux); elsewhere, the
        memory at loading."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return self.loaded_rss
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(found.group(1)) * 1024 if found else self.loaded_rss

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def generate(
        self,
        messages: list[dict[str, str]] | None = None,
        text: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Iterator[Event]:
        """One reply to a chat (``messages``) or a plain prompt (``text``): ``piece`` events, then one ``end``.
        Closing the iterator early (a client gone) cancels the generation; the session stays usable."""
        request = {"messages": messages} if messages is not None else {"text": text}
        request.update(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop or [])
        with self.lock:
            self._send(request)
            ended = False
            try:
                while True:
                    event = self._next(quiet)
                    if "refused" in event:
                        ended = True
                        raise PromptRefused(event["refused"], event.get("code"))
                    if "piece" in event or "end" in event:
                        ended = "end" in event
                        yield event
                        if ended:
                            return
            finally:
                if not ended and self.process.poll() is None:
                    self._send({"cancel": True})
                    while "end" not in self._next(quiet):
                        pass

    def score(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Each continuation's log-probability after its context, and whether greedy decoding would produce it."""
        with self.lock:
            self._send({"score": [list(pair) for pair in pairs]})
            event = self._next(quiet)
            while "scores" not in event and "refused" not in event:
                event = self._next(quiet)
        if "refused" in event:
            raise PromptRefused(event["refused"], event.get("code"))
        return [(float(total), bool(greedy)) for total, greedy in event["scores"]]

    def reply(self, **request: Any) -> tuple[str, dict[str, Any]]:
        """The whole reply's text and its end event."""
        pieces, end = [], {}
        for event in self.generate(**request):
            pieces.append(event.get("piece", ""))
            end = event.get("end", end)
        return "".join(pieces), end

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()  # the worker's request loop ends at end of input
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, request: dict[str, Any]) -> None:
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except OSError:
            self._failed({})

    def _next(self, progress: Progress) -> Event:
        """The worker's next event; its error, or its end, as one clear error."""
        while line := self.process.stdout.readline():
            event = json.loads(line)
            if "stage" in event:
                progress({**event, "worker": "session"})
            elif "error" in event:
                self._failed(event)
            else:
                return event
        self._failed({})

    def _failed(self, event: Event) -> None:
        self.process.wait()
        kept = keep_log(self.log, f"session-{self.target}")
        if "error" in event:
            raise PhiconvertError(f"{self.target} runtime: {event['error']} (log: {kept})")
        raise PhiconvertError(f"{self.target} runtime ended unexpectedly, exit code {self.process.returncode} "
                              f"(log: {kept})")  # fmt: skip
