"""What the parent and a worker process say to each other: one job file in, JSON-line events and one result out.

Typed here, in one place both sides import, so a field renamed on one side is an error on both; plain JSON on the
wire, so a worker under another environment's interpreter needs nothing but this module (standard library only).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, TypedDict


@dataclass(frozen=True)
class ReferenceJob:
    """Tokenise the held-out windows and write the source's float32 log-probabilities of each to ``out``."""

    kind: ClassVar[str] = "reference"
    source: str  # staging folder of the source
    text_file: str  # the held-out text
    windows: list[tuple[int, int]]  # (start, length) in tokens
    out: str  # folder for source-I.npy


@dataclass(frozen=True)
class TargetJob:
    """Export, smoke-test, then compare the artifact's logits with the reference's files, chunk by chunk."""

    kind: ClassVar[str] = "target"
    target: str
    precision: str
    options: dict[str, Any]  # the options the target declares, None for "target default"
    source: str  # staging folder of the source
    output: str  # empty folder for the artifact
    work: str  # scratch folder
    calibration: list[str]
    calibration_given: bool
    model_id: str  # what per-model defaults are looked up by (phiconvert.source.Source.model_id)
    messages: list[dict[str, str]]  # the smoke test's chat
    max_new_tokens: int
    sequences: list[list[int]] | None  # the reference's windows (None: no verification)
    source_logprobs: list[str] | None  # one file per window
    positions_out: str  # folder for positions-I.npz
    # what this worker runs: both, or one each for a target whose export runs apart (Target.export_apart)
    stages: tuple[str, ...] = ("export", "verify")


@dataclass(frozen=True)
class SourceChatJob:
    """The source's greedy chat reply, the artifacts' replies checked as drafts."""

    kind: ClassVar[str] = "source-chat"
    source: str
    messages: list[dict[str, str]]
    max_new_tokens: int
    drafts: list[list[int]]


@dataclass(frozen=True)
class BenchJob:
    """Load time, memory and tokens/s of an artifact (``target``), or of the source (``target`` "source")."""

    kind: ClassVar[str] = "bench"
    target: str
    artifact: str
    prompts: list[list[int]]
    new_tokens: int
    repeats: int


@dataclass(frozen=True)
class SessionJob:
    """Load an artifact (``target``; "source": the source model) and answer generation requests until stdin ends.

    Requests are JSON lines on the worker's stdin: ``{"messages": [...]}`` (a chat, rendered by the artifact's own
    template) or ``{"text": "..."}`` (a plain prompt), with ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and
    ``stop`` (strings); ``{"cancel": true}`` ends the generation under way; ``{"score": [[context, continuation],
    ...]}`` asks for each continuation's log-probability. Answers are events: ``ready`` once, then per request
    ``piece`` events and one ``end``, or one ``scores``, or one ``refused``.
    """

    kind: ClassVar[str] = "session"
    target: str
    artifact: str
    exact: bool  # the runtime's most exact mode (verification's smoke test), else its deployment defaults


Job = ReferenceJob | TargetJob | SourceChatJob | BenchJob | SessionJob
KINDS: dict[str, type[Job]] = {
    kind.kind: kind for kind in (ReferenceJob, TargetJob, SourceChatJob, BenchJob, SessionJob)
}


def write_job(job: Job, path: Path) -> None:
    path.write_text(json.dumps({"kind": job.kind, **asdict(job)}))


def read_job(path: Path) -> Job:
    data = json.loads(path.read_text())
    return KINDS[data.pop("kind")](**data)


class Event(TypedDict, total=False):
    """One line a worker sends while it works (``stage`` set), or its last line (``result`` or ``error``).

    status "start"; "progress" with done, total, unit and what (a toolchain's own step); "done" with seconds and
    peak_rss; "note" with message (and ``ended``: the stages still shown as running have stopped). The parent adds
    ``worker``, and ``label`` (the artifact it belongs to) in runs that make several.
    """

    stage: str
    status: str
    done: float
    total: float | None
    unit: str
    what: str
    seconds: float
    peak_rss: int
    message: str
    ended: bool
    label: str
    worker: str
    result: dict[str, Any]
    error: str
    ready: dict[str, Any]  # a session's runtime is loaded: its context, the worker's resident memory (rss)
    piece: str  # a session's next text (may be empty: a token whose text is not complete yet), with ``token``
    token: int
    end: dict[str, Any]  # a session's request is done: finish_reason, prompt_tokens, completion_tokens
    scores: list[list[Any]]  # a session's answer to ``{"score": [[context, continuation], ...]}``: (logprob, greedy)
    refused: str  # a session's request could not start (one line), with ``code`` where the API has one
    code: str
