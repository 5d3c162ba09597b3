"""Command line: `phiconvert [MODEL] --target T --precision P ...` mirrors `phiconvert.convert(...)` one to one.

Also `phiconvert doctor` (this machine, its default target, each toolchain's state) and `phiconvert setup NAME`
(make a managed toolchain environment). Every failure is one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from phiconvert import envs, hardware, preflight, source, targets
from phiconvert.bench import CLIENTS, NEW_TOKENS, PROMPT_LENGTHS, REPEATS, SERVE_REQUESTS, bench, serving
from phiconvert.errors import PhiconvertError
from phiconvert.pipeline import VERIFY_MODES, VerificationFailed, convert
from phiconvert.report import caveats
from phiconvert.report import table as side_by_side
from phiconvert.worker import versions
from phiconvert.workers import PACKAGE_ROOT

EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a service manager, `timeout`) as an interruption: the same unwinding as Ctrl-C, which stops
    the worker and removes the staging folder, where the default action would leave both behind."""


def terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises Terminated while a command runs; the handler before is put back after, so ``main`` called
    inside another program (a test, a host application) leaves its handler as it was. Only the main thread may set
    handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phiconvert",
        description="Convert a Hugging Face Phi model into a deployment format and verify it against the source. "
        "Other commands: `phiconvert chat ARTIFACT`, `phiconvert serve ARTIFACT`, `phiconvert publish ARTIFACT REPO`, "
        "`phiconvert bench ARTIFACT...`, `phiconvert doctor`, `phiconvert setup NAME`.",
        epilog=precisions_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help=f"Hub id, local folder, or bundled:NAME (default {source.DEFAULT_MODEL})")
    p.add_argument(
        "--target",
        default="openvino",
        help=f"output format: {', '.join(targets.names())} (default openvino); auto: the best one for this machine; "
        "all, or a list like openvino,gguf:q8_0: every pair, verified and benched side by side into one report",
    )
    p.add_argument("--precision", help="weight precision; default depends on the target (e.g. openvino: int4)")
    p.add_argument("--output", help="destination folder (default ./<model>-<target>-<precision>)")
    p.add_argument(
        "--calibration",
        help="calibration for data-aware quantization: a text or a text file (paragraphs are samples), c4, wikitext2, "
        "or hf:NAME[:CONFIG][:SPLIT][:COLUMN], a Hub dataset or a local dataset folder (default: a bundled text)",
    )
    add_target_options(p)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="full",
        help="full (default): compare logits on a short window, a longer one and, for longrope models, one past the "
        "original context; quick: without that last window; none: no comparison",
    )
    p.add_argument("--no-verify", dest="verify", action="store_const", const="none", help="same as --verify none")
    p.add_argument(
        "--plan",
        dest="plan_only",
        action="store_true",
        help="only the pre-flight: the memory each stage needs and the disk, against this machine; no work",
    )
    p.add_argument(
        "--bench",
        dest="benchmark",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="all or a list: bench the source and every verified artifact (default); --no-bench: fidelity only",
    )
    p.add_argument("--bench-prompt-lengths", type=lengths, default=PROMPT_LENGTHS,
                   help="that bench's prompt lengths in tokens, comma-separated (default %(default)s)")  # fmt: skip
    p.add_argument("--bench-new-tokens", type=int, default=NEW_TOKENS,
                   help="that bench's tokens generated per prompt (default %(default)s)")  # fmt: skip
    p.add_argument("--bench-repeats", type=int, default=REPEATS,
                   help="that bench's runs per measure; the fastest is kept (default %(default)s)")  # fmt: skip
    p.add_argument("--eval", dest="eval_tasks", type=lambda text: [t for t in text.split(",") if t],
                   help="all or a list: also score the source and every verified artifact on these lm-eval tasks, "
                   "comma-separated, as `phiconvert eval` does (bundled: pydoc_cloze, pydoc_next_word)")  # fmt: skip
    p.add_argument("--eval-limit", type=int, help="with --eval: at most this many items per task")
    p.add_argument("--json", action="store_true", help="print the run's report as JSON on stdout")
    return p


def add_target_options(p: argparse.ArgumentParser) -> None:
    """One flag per option the targets declare, its help prefixed with the targets (and precisions) taking it."""
    for name, declared in targets.options().items():
        first = declared[0][1]
        if any(o.type is not first.type or o.off != first.off for _, o in declared):
            raise PhiconvertError(f"targets declare option '{name}' with different types")
        takers = [f"{t} {'/'.join(o.precisions)}" if o.precisions else t for t, o in declared]
        if len({o.help for _, o in declared}) == 1:
            text = f"{', '.join(takers)}: {first.help}"
        else:
            text = "; ".join(f"{taker}: {o.help}" for taker, (_, o) in zip(takers, declared, strict=True))
        choices = [c for _, o in declared for c in o.choices] if all(o.choices for _, o in declared) else []
        if first.type is bool and first.off:
            pair = p.add_mutually_exclusive_group()
            pair.add_argument(first.flag, dest=name, action="store_true", default=None, help=text)
            pair.add_argument(f"--{first.off}", dest=name, action="store_false", help=f"the opposite of {first.flag}")
        elif first.type is bool:
            p.add_argument(first.flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(first.flag, dest=name, type=first.type, choices=list(dict.fromkeys(choices)) or None,
                           help=text)  # fmt: skip


def precisions_help() -> str:
    """Each target's precisions, one line each (the default first): the epilog of --help."""
    lines = ["precisions (the first is the target's default):"]
    for name in targets.names():
        target = targets.load(name)
        lines.append(f"  {name}:")
        for precision, declared in target.listed():
            lines.append(f"    {precision:<8} {declared.note}" + (" (experimental)" if declared.experimental else ""))
    return "\n".join(lines)


def plan_table(plan: dict[str, Any]) -> Table:
    """What each pair of a run needs, estimated before any work (`--plan`)."""
    size = f"{plan['parameters'] / 1e9:.2f} B" if plan["parameters"] >= 1e9 else f"{plan['parameters'] / 1e6:.1f} M"
    title = (f"{plan['model']}: {size} parameters ({gib(plan['bf16_bytes'])} in bf16); "
             f"this machine: {gib(plan['memory_available'])} of memory available, {gib(plan['disk_free'])} of disk "
             f"free; the reference needs {gib(plan['reference'] or None)}")  # fmt: skip
    table = Table(title=title)
    for column in ("target", "export", "verification", "disk", "here"):
        table.add_column(column, justify="left" if column in ("target", "here") else "right")
    for pair in plan["pairs"]:
        memory = pair["memory"]
        table.add_row(f"{pair['target']} {pair['precision']}", gib(memory["export"]), gib(memory.get("verification")),
                      gib(pair["disk"]), pair["refusal"] or "fits")  # fmt: skip
    return table


class StageLines:
    """A bar while a stage runs (a count, its unit and an ETA once the worker reports progress; a pulse until
    then), then one permanent line with the stage's time and the worker's peak memory. Where the output is not a
    terminal (a log, CI), the bar is a plain line every ``LOG_EVERY`` seconds instead, also for a stage whose
    toolchain reports nothing (a line saying how long it has run), so a log is never silent for long."""

    LOG_EVERY = 30.0

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.tasks: dict[str, TaskID] = {}
        self.steps: dict[str, str] = {}
        self.logged: dict[str, float] = {}  # when a stage's last plain line was printed
        self.started: dict[str, float] = {}
        self.stopped = threading.Event()
        self.beat: threading.Thread | None = None

    def __enter__(self) -> StageLines:
        self.progress.__enter__()
        if not self.console.is_terminal:
            self.beat = threading.Thread(target=self._heartbeat, daemon=True)
            self.beat.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        if self.beat:
            self.beat.join()
        self.progress.__exit__(*exc)

    def _heartbeat(self) -> None:
        """A plain line for every stage that printed none for ``LOG_EVERY`` seconds."""
        while not self.stopped.wait(1.0):
            now = time.monotonic()
            for name, task in list(self.tasks.items()):
                if now - max(self.logged.get(name, 0.0), self.started.get(name, now)) >= self.LOG_EVERY:
                    self._log(name, task, now)

    def _log(self, name: str, task: TaskID, now: float) -> None:
        self.logged[name] = now
        shown = next((t for t in self.progress.tasks if t.id == task), None)
        if shown is not None:
            self.console.print(self._plain(shown), highlight=False, soft_wrap=True)

    def __call__(self, event: dict[str, Any]) -> None:
        name = f"{event['label']} · {event['stage']}" if event.get("label") else event["stage"]
        if event["status"] == "note":
            for running in list(self.tasks) if event.get("ended") else []:
                self.progress.remove_task(self.tasks.pop(running))
            self.console.print(event["message"], highlight=False, soft_wrap=True)
        elif event["status"] == "start":
            self.tasks[name] = self.progress.add_task(name, total=None, unit="")
            self.started[name] = time.monotonic()
        elif event["status"] == "progress" and name in self.tasks:
            task, what = self.tasks[name], event.get("what", "")
            if self.steps.get(name) != what:  # a toolchain's next step: its own bar, count and ETA (rich cannot
                self.steps[name] = what  # clear a task's total, and a step without one must not show the last's)
                self.progress.remove_task(task)
                task = self.tasks[name] = self.progress.add_task(name, total=event["total"], unit="")
            self.progress.update(
                task,
                completed=event["done"],
                total=event["total"],
                unit=event.get("unit", ""),
                description=f"{name} · {what}" if what else name,
            )
            now = time.monotonic()
            if not self.console.is_terminal and now - self.logged.get(name, 0.0) >= self.LOG_EVERY:
                self._log(name, task, now)
        elif event["status"] == "done" and name in self.tasks:
            self.progress.remove_task(self.tasks.pop(name))
            self.logged.pop(name, None)
            self.started.pop(name, None)
            peak = f"peak {gib(event['peak_rss'])}" if event.get("peak_rss") else ""
            self.console.print(
                f"[green]✓[/] {name:<16} {event['seconds']:7.1f} s  {peak}",
                highlight=False,
                soft_wrap=True,
                markup=True,
            )

    @staticmethod
    def _plain(task: Any) -> str:
        """A progress line for a log: what, how far, how long so far and how long still."""
        if task.total is None and not task.completed:
            return f"  {task.description}: running, {task.elapsed or 0:.0f} s so far"
        total = f"/{task.total:.0f}" if task.total else ""
        eta = f", about {task.time_remaining:.0f} s to go" if task.time_remaining is not None else ""
        done = f"{task.completed:.0f}{total} {task.fields['unit']}"
        return f"  {task.description}: {done} after {task.elapsed or 0:.0f} s{eta}"


def summary(report: dict[str, Any]) -> Table:
    fidelity = report.get("fidelity") or {}
    table = Table(title=f"{report['target']} {report['precision']} → {report.get('output', '')}")
    for column in ("size", "time", "peak RSS", "top-1", "KL", "KL p99.9", "RMS Δp", "PPL Δ", "greedy = source",
                   "ends its turn"):  # fmt: skip
        table.add_column(column, justify="right")
    peak = max((v for v in report["peak_rss"].values() if v), default=None)
    table.add_row(
        gib(report["size_bytes"]),
        f"{report['seconds']:.1f} s",
        gib(peak),
        f"{fidelity['top1']:.3f}" if fidelity else "-",
        f"{fidelity['kl']:.4f}" if fidelity else "-",
        f"{fidelity['kl_p999']:.4f}" if fidelity else "-",
        f"{fidelity['rms_dp']:.2f}%" if fidelity else "-",
        f"{fidelity['ppl_delta']:+.2f} ({fidelity['ppl_pct']:+.1f}%)" if fidelity else "-",
        {True: "yes", False: "no", None: "-"}[fidelity["greedy_match"]] if fidelity else "-",
        "yes" if report["smoke"]["stopped_at_eot"] else "no",
    )
    return table


def with_stage_lines(verb: Callable[..., Any], args: argparse.Namespace) -> tuple[Any, Console]:
    """Call ``verb`` with the parsed options it takes (all but --json where it takes any keyword), one line per
    stage on stderr."""
    import inspect

    console = Console(stderr=True)
    lines = StageLines(console)
    taken = inspect.signature(verb).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in taken.values())
    given = {k: v for k, v in vars(args).items() if k != "json" and (takes_any or k in taken)}
    with lines:
        result = verb(**given, progress=lines)
    return result, console


def run_convert(argv: list[str]) -> int:
    args = convert_parser().parse_args(argv)
    report, console = with_stage_lines(convert, args)
    if report.get("kind") == "plan":
        console.width = max(console.width, 150)
        console.print(plan_table(report))
        if args.json:
            print(json.dumps(report, indent=2))
        return 0
    if report.get("kind") == "comparison":
        console.width = max(console.width, 150)  # a dozen columns: do not squeeze them into a log's 80
        console.print(side_by_side(report))
        for name, caveat in caveats(report):
            console.print(f"[yellow]note:[/] {name}: {caveat}", highlight=False, soft_wrap=True)
        if args.json:
            print(json.dumps(report, indent=2))
        if report["failed"]:  # the report is written (and printed): one line says what failed, exit 1
            failed = ", ".join(report["failed"])
            print(f"error: {len(report['failed'])} of {len(report['runs'])} conversions failed ({failed}); "
                  f"report: {report['output']}/report.html", file=sys.stderr)  # fmt: skip
            return EXIT_ERROR
        return 0
    console.print(summary(report))
    console.print(f"reply: {report['smoke']['text']!r}", highlight=False, soft_wrap=True)
    for caveat in report["caveats"]:
        console.print(f"[yellow]note:[/] {caveat}", highlight=False, soft_wrap=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def bench_parser() -> argparse.ArgumentParser:
    from phiconvert.serve import ENGINES

    p = argparse.ArgumentParser(
        prog="phiconvert bench",
        description="Load time, load memory and tokens/s of artifacts (or a source model, in transformers fp32), "
        "each in its own runtime with its deployment defaults.",
    )
    p.add_argument("artifacts", nargs="+", help="phiconvert output folders, or models (Hub id, folder, bundled:NAME)")
    p.add_argument("--prompt-lengths", type=lengths, default=PROMPT_LENGTHS,
                   help="prompt lengths in tokens, comma-separated (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--new-tokens", type=int, default=NEW_TOKENS, help="tokens generated per prompt (default %(default)s)"
    )
    p.add_argument(
        "--repeats", type=int, default=REPEATS, help="runs per measure; the fastest is kept (default %(default)s)"
    )
    p.add_argument("--serve", action="store_true",
                   help="measure each artifact behind `phiconvert serve` instead: requests/s and time to first token "
                   "at --clients concurrent clients")  # fmt: skip
    p.add_argument("--clients", type=lengths, default=CLIENTS,
                   help="with --serve: concurrent clients, comma-separated (default %(default)s)")  # fmt: skip
    p.add_argument("--requests", type=int, default=SERVE_REQUESTS,
                   help="with --serve: requests per number of clients (default %(default)s)")  # fmt: skip
    p.add_argument("--engine", default="phiconvert", choices=ENGINES,
                   help="with --serve: the server `phiconvert serve --engine` runs (default %(default)s)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the measurements as JSON on stdout")
    return p


def lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, not '{text}'") from None


def run_bench(argv: list[str]) -> int:
    args = bench_parser().parse_args(argv)
    if args.serve:
        return run_bench_serve(args)
    if args.engine != "phiconvert":
        raise PhiconvertError("--engine applies to bench --serve")
    results, console = with_stage_lines(bench, args)
    console.width = max(console.width, 150)  # a column per prompt length: do not squeeze them into a log's 80
    table = Table(title="phiconvert bench")
    for column in ("artifact", "target", "size", "load s", "load RSS", "peak RSS"):
        table.add_column(column, justify="left" if column in ("artifact", "target") else "right")
    for n in args.prompt_lengths:
        table.add_column(f"prompt tok/s @{n}", justify="right")
        table.add_column(f"gen tok/s @{n}", justify="right")
    for r in results:
        speeds = []
        for p in r["prompts"]:
            if "skipped" in p:  # past the runtime's context
                speeds += ["-", "-"]
                continue
            speeds += [f"{p['prompt_tps']:.0f}", "-" if p["generation_tps"] is None else f"{p['generation_tps']:.1f}"]
        label = f"{r['target']} {r['precision'] or ''}"
        table.add_row(Path(r["artifact"]).name, label, gib(r["size_bytes"]), f"{r['load_s']:.2f}", gib(r["load_rss"]),
                      gib(r["peak_rss"]), *speeds)  # fmt: skip
    console.print(table)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def add_session_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="a phiconvert output folder, an artifact folder, or a model (folder, bundled:NAME)")
    p.add_argument("--exact", action="store_true",
                   help="the runtime's most exact mode, as verification's smoke test runs it (default: its "
                   "deployment defaults, as bench measures it)")  # fmt: skip


def run_chat(argv: list[str]) -> int:
    from phiconvert.chat import chat
    from phiconvert.session import Session, check_sampling

    p = argparse.ArgumentParser(prog="phiconvert chat", description="Chat with an artifact in its own runtime. "
                                "Commands in the chat: /reset, /system TEXT, /exit.")  # fmt: skip
    add_session_options(p)
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per reply (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); else sampled")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    args = p.parse_args(argv)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed}  # fmt: skip
    check_sampling(**sampling)
    with Session(args.artifact, exact=args.exact) as session:
        chat(session, system=args.system, prompt=args.prompt, **sampling)
    return 0


def run_serve(argv: list[str]) -> int:
    from phiconvert.serve import ENGINES, MAX_TOKENS, serve

    p = argparse.ArgumentParser(prog="phiconvert serve", description="Serve an artifact behind an OpenAI-compatible "
                                "API: /v1/chat/completions, /v1/completions, /v1/models, /health.")  # fmt: skip
    add_session_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("PHICONVERT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: "
                   "$PHICONVERT_API_KEY; none)")  # fmt: skip
    p.add_argument("--model-name", help="the model id clients ask for (default: the artifact folder's name)")
    p.add_argument("--max-tokens-limit", type=int, default=MAX_TOKENS,
                   help="the largest max_tokens a request may ask for (default %(default)s)")  # fmt: skip
    p.add_argument("--engine", default="phiconvert", choices=ENGINES,
                   help="phiconvert (default): the artifact's own runtime; vllm: vLLM's server, for gptq/awq "
                   "artifacts and HF checkpoints on an NVIDIA GPU (`phiconvert setup vllm` first)")  # fmt: skip
    args = p.parse_args(argv)
    serve(args.artifact, host=args.host, port=args.port, api_key=args.api_key, model=args.model_name,
          max_tokens=args.max_tokens_limit, exact=args.exact, engine=args.engine,
          announce=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    return 0


def run_publish(argv: list[str]) -> int:
    from phiconvert.publish import publish

    p = argparse.ArgumentParser(prog="phiconvert publish", description="Upload an artifact to the Hugging Face Hub "
                                "with a model card carrying its measured numbers (token: HF_TOKEN or `hf auth "
                                "login`; endpoint: HF_ENDPOINT).")  # fmt: skip
    p.add_argument("artifact", help="a folder phiconvert converted (it has phiconvert.json)")
    p.add_argument("repo_id", help="OWNER/NAME of the model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--dry-run", action="store_true", help="write README.md (the card) and list what would go up")
    p.add_argument("--base-model", help="the Hub id of the source, when it was converted from a local folder")
    p.add_argument("--json", action="store_true", help="print what was uploaded as JSON on stdout")
    args = p.parse_args(argv)
    done = publish(args.artifact, args.repo_id, private=args.private, dry_run=args.dry_run,
                   base_model=args.base_model)  # fmt: skip
    if args.json:
        print(json.dumps(done, indent=2))
    elif args.dry_run:
        print(f"card written: {done['card']}\nwould upload {len(done['files'])} files ({gib(done['bytes'])}) to "
              f"{done['repo_id']}:\n  " + "\n  ".join(done["files"]))  # fmt: skip
    else:
        print(f"uploaded {len(done['files'])} files ({gib(done['bytes'])}) to {done['url']}")
    return 0


def run_bench_serve(args: argparse.Namespace) -> int:
    results, console = with_stage_lines(serving, args)
    console.width = max(console.width, 120)
    table = Table(title=f"phiconvert bench --serve ({args.new_tokens} new tokens per request, greedy, streamed)")
    for column in ("artifact", "target", "served RSS", "clients", "requests", "requests/s", "TTFT p50 s",
                   "TTFT max s", "tokens/s"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("artifact", "target") else "right")
    for r in results:
        rss = gib(r["rss"]) if r["rss"] is not None else "-"
        table.add_row(Path(r["artifact"]).name, r["target"], rss, str(r["clients"]), str(r["requests"]),
                      f"{r['requests_per_s']:.2f}", f"{r['ttft_p50_s']:.3f}", f"{r['ttft_max_s']:.3f}",
                      f"{r['tokens_per_s']:.1f}")  # fmt: skip
    console.print(table)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def run_eval(argv: list[str]) -> int:
    from phiconvert.evaluate import LOCAL_TASKS, evaluate, plus_minus

    p = argparse.ArgumentParser(prog="phiconvert eval", description="Task accuracy of artifacts with lm-eval, "
                                "each in its own runtime, next to the source model.")  # fmt: skip
    p.add_argument("artifacts", nargs="+", help="artifact folders (phiconvert output folders)")
    p.add_argument("--tasks", type=lambda text: [t for t in text.split(",") if t],
                   help=f"comma-separated lm-eval tasks (default: the bundled {', '.join(LOCAL_TASKS)})")  # fmt: skip
    p.add_argument("--limit", type=int, help="at most this many items per task")
    p.add_argument("--baseline", help="the model to compare with (default: the source in the first artifact's "
                   "phiconvert.json)")  # fmt: skip
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per item (default: the task's)")
    p.add_argument("--output", default="phiconvert-eval", help="folder of eval.json, eval.html (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    report, console = with_stage_lines(evaluate, args)
    console.width = max(console.width, 120)
    table = Table(title=f"phiconvert eval (baseline: {report['baseline']['name']}; * : |Δ| > 2 stderr)")
    for column in ("task", "metric", "n", "baseline", "model", "score", "Δ"):
        table.add_column(column, justify="left" if column in ("task", "metric", "model") else "right")
    for line in report["table"]:
        table.add_row(line["task"], line["metric"], str(line["samples"] or ""),
                      plus_minus(line["baseline"], line["baseline_stderr"]), f"{line['model']} ({line['target']})",
                      plus_minus(line["score"], line["stderr"]),
                      f"{line['delta']:+.3f}" + (" *" if line["flagged"] else ""))  # fmt: skip
    console.print(table)
    console.print(f"written: {args.output}/eval.json, {args.output}/eval.html", highlight=False)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def run_setup(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="phiconvert setup", description="Create a managed toolchain environment.")
    p.add_argument("name", choices=envs.names() or None)
    args = p.parse_args(argv)
    python = envs.setup(args.name, echo=lambda line: print(line, file=sys.stderr))
    print(python)
    return 0


def run_doctor(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="phiconvert doctor", description="This machine, its default target, and "
                                "whether each target's toolchain is ready.")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")
    args = p.parse_args(argv)
    machine = hardware.probe()
    choice = hardware.recommend(machine)
    rows = [toolchain_status(targets.load(name)) for name in targets.names()]
    if args.json:
        print(json.dumps({"machine": asdict(machine), "recommendation": asdict(choice), "targets": rows}, indent=2))
        return 0
    console = Console()
    table = Table(title="This machine", show_header=False)
    for label, value in [*hardware.describe(machine), ("Default target", f"{choice.target} {choice.precision}")]:
        table.add_row(label, value)
    console.print(table)
    console.print(f"--target auto: {choice.reason}", highlight=False, soft_wrap=True)
    table = Table(title=f"Targets (largest model: what {gib(rows[0]['memory'])} of memory holds, by measured peaks)")
    for column in ("target", "ready", "precisions", "largest model", "toolchain", "to make it ready"):
        table.add_column(column)
    for row in rows:
        versions = ", ".join(f"{k} {v}" for k, v in row["versions"].items())
        table.add_row(row["target"], "yes" if row["ready"] else "no", ", ".join(row["precisions"]),
                      f"{row['largest_model'] / 1e9:.1f} B", versions, row["fix"])  # fmt: skip
    console.print(table)
    return 0


def toolchain_status(target: targets.Target) -> dict[str, Any]:
    """Whether a target can run here (this environment, or its managed one), its versions, and what makes it ready."""
    missing = targets.missing_modules(target)
    managed = envs.python(target.environment) if target.environment and missing else None
    ready = not missing or managed is not None
    if managed:  # the versions that will really run: the managed environment's
        code = "import json, sys; from phiconvert.worker import versions; print(json.dumps(versions(sys.argv[1:])))"
        env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
        found = subprocess.run([str(managed), "-c", code, *target.packages], capture_output=True, text=True, env=env)
        found = json.loads(found.stdout) if found.returncode == 0 else {}
        found["environment"] = str(managed.parent.parent)
    else:
        found = versions(target.packages)
    fix = "" if ready else f"phiconvert setup {target.environment}" if target.environment else (
        f'pip install "phiconvert[{target.extra}]"')  # fmt: skip
    memory = machine_memory()
    return {"target": target.name, "ready": ready, "missing": missing, "precisions": list(target.precisions),
            "versions": {k: v for k, v in found.items() if v != "not installed"}, "fix": fix,
            "memory": memory, "largest_model": preflight.largest_model(target, memory)}  # fmt: skip


def machine_memory() -> int:
    """The memory a conversion may use on this machine: all of it but 1 GiB for the system and the parent."""
    import psutil

    return max(0, psutil.virtual_memory().total - 2**30)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {
        "setup": run_setup,
        "doctor": run_doctor,
        "bench": run_bench,
        "chat": run_chat,
        "serve": run_serve,
        "publish": run_publish,
        "eval": run_eval,
    }
    run = commands.get(argv[0]) if argv else None
    try:
        with sigterm_unwinds():
            code = run(argv[1:]) if run else run_convert(argv)
    except PhiconvertError as error:
        code, message = EXIT_ERROR, str(error)
        report = error.report if isinstance(error, VerificationFailed) else None
    except KeyboardInterrupt as stop:
        code = EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED
        message, report = f"{'terminated' if code == EXIT_TERMINATED else 'interrupted'}; nothing was written", None
    else:
        sys.exit(code)
    if report is not None:  # what was measured says why it failed: the table, and with --json the whole report
        console = Console(stderr=True)
        console.print(summary(report))
        for caveat in report["caveats"]:
            console.print(f"[yellow]note:[/] {caveat}", highlight=False, soft_wrap=True)
    print(f"error: {message}", file=sys.stderr)
    if "--json" in argv:
        print(json.dumps({"error": message, **({"report": report} if report else {})}, indent=2 if report else None))
    sys.exit(code)
