"""`phiconvert chat ARTIFACT`: talk to any artifact in its own runtime, the reply streamed as it comes.

The conversation is kept as messages and rendered by the artifact's own chat template on every turn, so what the
model sees is what its runtime would see from any other application. Commands: /reset, /system TEXT, /exit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from phiconvert.errors import PhiconvertError
from phiconvert.session import Session

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /exit"


def ask(session: Session, messages: list[dict[str, str]], out: TextIO, **sampling: Any) -> str:
    """Stream one reply to ``out`` and return its text."""
    pieces = []
    for event in session.generate(messages=messages, **sampling):
        piece = event.get("piece", "")
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(pieces)


def chat(
    session: Session,
    system: str | None = None,
    prompt: str | None = None,
    read: Callable[[str], str] | None = None,
    out: TextIO = sys.stdout,
    **sampling: Any,
) -> None:
    """With ``prompt``: answer it once. Else turns from ``read`` until /exit or end of input."""
    start = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        ask(session, [*start, {"role": "user", "content": prompt}], out, **sampling)
        return
    messages = list(start)
    read = read or (input if sys.stdin.isatty() else lambda _: input())  # a prompt sign only for a person
    print(f"{session.name} ({session.target}, context {session.context} tokens). {HELP}", file=sys.stderr)
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(start)
            print("(conversation reset)", file=sys.stderr)
        elif line.startswith("/system"):
            text = line[len("/system") :].strip()
            start = [{"role": "system", "content": text}] if text else []
            messages = list(start)
            print("(system prompt set, conversation reset)" if text else "(system prompt cleared)", file=sys.stderr)
        elif line.startswith("/"):
            print(HELP, file=sys.stderr)
        elif line:
            try:
                answer = ask(session, [*messages, {"role": "user", "content": line}], out, **sampling)
            except PhiconvertError as error:  # the conversation outgrew the context: say so, keep the session
                print(f"error: {error}; /reset to start again", file=sys.stderr)
                continue
            messages += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
