"""Progress from inside a worker: counts with a total, sent to the parent, which draws a bar with an ETA.

Our own loops call ``advance``/``track``. The toolchains report in their own ways, and each is tapped where it
already counts: tqdm bars (transformers, AutoRound, ...) and rich progress tasks (nncf) are forwarded by patching
their update methods in the worker; lines a toolchain prints (the ONNX Runtime GenAI builder's "Reading decoder
layer N") are matched by the target's patterns; a native quantizer that reports nothing is followed by the size of
the file it writes (``watch_file``). Events are rate-limited: a bar moves, the parent's pipe does not flood.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
INTERVAL = 0.25  # seconds between two progress events of a stage (the last one always goes)

_send: Callable[[dict[str, Any]], None] = lambda event: None  # noqa: E731 (set by the worker)
_stage = {"name": ""}
_last = {"time": 0.0}
_lock = threading.Lock()


def attach(send: Callable[[dict[str, Any]], None]) -> None:
    """Send progress events through ``send`` (the worker's event stream) and tap the toolchains' bars."""
    global _send
    _send = send
    _tap_tqdm()
    _tap_rich()


def stage(name: str) -> None:
    """The stage progress events belong to (the worker's timed stage)."""
    _stage["name"] = name


def advance(done: float, total: float | None, unit: str = "", what: str = "") -> bool:
    """Report ``done`` of ``total`` ``unit`` for the current stage (``what``: the step inside it, if any); whether
    it went (not within INTERVAL of the last one, unless it is the last of its count)."""
    now = time.monotonic()
    with _lock:
        if total and done < total and now - _last["time"] < INTERVAL:
            return False
        _last["time"] = now
    total = float(total) if total else None  # toolchains count in numpy integers too
    event = {"stage": _stage["name"], "status": "progress", "done": float(done), "total": total, "unit": unit}
    if what:
        event["what"] = what
    _send(event)
    return True


def track(items: Iterable[T], total: int | None = None, unit: str = "", what: str = "") -> Iterator[T]:
    """``items``, reporting each one done."""
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    advance(0, total, unit, what)
    for done, item in enumerate(items, 1):
        yield item
        advance(done, total, unit, what)


class watch_file:  # noqa: N801 (used as a context manager, like open)
    """While the block runs, report how much of ``expected`` bytes ``path`` holds (a writer that reports nothing)."""

    def __init__(self, path: Path, expected: int, what: str = "") -> None:
        self.path, self.expected, self.what = path, expected, what
        self.stop = threading.Event()

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            size = self.path.stat().st_size if self.path.exists() else 0
            advance(min(size, self.expected) / 2**20, self.expected / 2**20, "MiB", self.what)

    def __enter__(self) -> watch_file:
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class PrintedLines:
    """A text stream (the worker's stdout/stderr for Python code) that counts lines matching patterns as progress.

    ``steps``: regex -> what that step is; a regex's first group is the number done (counted from 0)."""

    def __init__(self, stream: Any, steps: dict[str, str], total: int | None, unit: str) -> None:
        self.stream, self.total, self.unit = stream, total, unit
        self.steps = {re.compile(pattern): what for pattern, what in steps.items()}

    def write(self, text: str) -> int:
        for pattern, what in self.steps.items():
            for found in pattern.finditer(text):
                advance(int(found.group(1)) + 1, self.total, self.unit, what)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _tap_tqdm() -> None:
    """Forward every tqdm bar's count (the innermost running bar wins, as it moves the most), except disabled ones,
    which never count: torch.fx's interpreter opens one per graph pass (ExecuTorch's lowering) and leaves it at 0.
    A bar is forwarded from when it is drawn, not only from its first update: AutoRound's AWQ opens "Quantizing
    model.layers.0" at 0 of 32 and takes minutes on that layer at real size (its description names the layer)."""
    try:
        from tqdm import std
    except ImportError:
        return
    update, refresh = std.tqdm.update, std.tqdm.refresh
    if getattr(update, "tapped", False):  # attached twice in one process: one event per change, not two
        return

    def forward(bar: Any) -> None:
        try:  # a tap must never break the toolchain it watches (disabled bars lack attributes)
            total, unit = getattr(bar, "total", None), getattr(bar, "unit", "it")
            if not total or getattr(bar, "disable", False):
                return
            shown = (bar.n, total, str(getattr(bar, "desc", "")).strip(": "))
            # update() refreshes too: one event per change; one held back by the rate limit goes with a later
            # refresh (tqdm's monitor redraws a bar that has not moved for 10 s)
            if getattr(bar, "_phiconvert_shown", None) != shown:
                if advance(shown[0], total, unit if unit != "it" else "steps", shown[2]):
                    bar._phiconvert_shown = shown
        except Exception:
            pass

    def forwarding(self: Any, n: float = 1) -> Any:
        result = update(self, n)
        forward(self)
        return result

    def redrawing(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = refresh(self, *args, **kwargs)
        forward(self)
        return result

    forwarding.tapped = True  # type: ignore[attr-defined]
    std.tqdm.update = forwarding
    std.tqdm.refresh = redrawing


def _tap_rich() -> None:
    """Forward rich progress tasks' counts (nncf's statistics collection and compression steps)."""
    try:
        from rich import progress as rich_progress
    except ImportError:
        return
    update = rich_progress.Progress.update
    if getattr(update, "tapped", False):
        return

    def forwarding(self: Any, task_id: Any, **kwargs: Any) -> None:
        update(self, task_id, **kwargs)
        try:  # a tap must never break the toolchain it watches
            task = self._tasks.get(task_id)
            if task is not None and task.total:
                what = re.sub(r"\[[^\]]*\]", "", str(task.description)).strip()
                advance(task.completed, task.total, "steps", what)
        except Exception:
            pass

    forwarding.tapped = True  # type: ignore[attr-defined]
    rich_progress.Progress.update = forwarding
    rich_progress.Progress.advance = lambda self, task_id, advance=1: forwarding(  # type: ignore[method-assign]
        self, task_id, advance=advance
    )


def redirect_prints(steps: dict[str, str], total: int | None, unit: str) -> Callable[[], None]:
    """Count lines Python code prints to stdout/stderr that match ``steps``' patterns (regex -> what the step is);
    returns the function that undoes it."""
    saved = sys.stdout, sys.stderr
    sys.stdout = PrintedLines(sys.stdout, steps, total, unit)
    sys.stderr = PrintedLines(sys.stderr, steps, total, unit)

    def undo() -> None:
        sys.stdout, sys.stderr = saved

    return undo
