"""The one small interface every target adapter implements, and the registry of targets.

A target module defines a module-level ``TARGET = Target(...)``. Its three functions run inside a worker
process (``phiconvert.worker``) with the target's own toolchain importable; the parent process imports only
this file and the target's metadata, never the toolchain, so a missing extra is a clean error.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert import progress
from phiconvert.errors import PhiconvertError

# Target name -> module under phiconvert.targets. Adding a target adds one line here and one module.
MODULES = {
    "openvino": "openvino",
    "ort-genai": "ort_genai",
    "mlx": "mlx",
    "gguf": "gguf",
    "gptq": "gptq",
    "awq": "awq",
    "bnb": "bnb",
    "torchao": "torchao",
    "executorch": "executorch",
}


@dataclass(frozen=True)
class Precision:
    """One precision a target makes: what it is, its size, and the fidelity bound it answers to."""

    note: str  # one line: what it is (shown in --help, doctor and errors)
    bits: float  # nominal bits per weight on disk, group scales included: size estimates and the report's theory
    bound: str  # the row of phiconvert.verify.BOUNDS its fidelity is checked against (its precision class)
    # not yet a dependable deployment format: left out of `--target all` unless asked for by name or class,
    # marked in --help and in the report's caveats
    experimental: bool = False
    # where its export takes tens of minutes or hours on a CPU: the weights per second it went through at its
    # default settings, measured on a 2-core CPU at real size, so the run says up front how long it will take
    cpu_export_speed: float | None = None
    # settings that change that speed, each with the speed measured with it: the run says the time of the settings
    # chosen, and at the default ones names those that are faster, at some fidelity cost (awq's --no-clip)
    cpu_speed_when: tuple[tuple[dict[str, Any], float], ...] = ()


@dataclass(frozen=True)
class Option:
    """An option beyond precision that a target declares: one flag of the CLI and one keyword of
    ``phiconvert.convert``. Targets that take the same option share one declaration (``GROUP_SIZE``, ...), each
    narrowing it to the precisions it applies to with ``only``."""

    name: str  # keyword; the flag is --name-with-dashes
    help: str
    type: type = str  # str, int or bool (bool: --flag / --no-flag, or --flag / --<off>)
    choices: tuple[Any, ...] = ()
    off: str | None = None  # bool: the flag that sets False, when not --no-<flag>
    precisions: tuple[str, ...] = ()  # the precisions it applies to; empty: all of the target's
    default: Any = None  # the value the target takes when the option is not given, where it is one fixed value

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def spelled(self, value: Any) -> list[str]:
        """The command-line words that set this option to ``value``."""
        if isinstance(value, bool):
            return [self.flag if value else f"--{self.off or 'no-' + self.flag[2:]}"]
        return [self.flag, str(value)]

    def only(self, *precisions: str) -> Option:
        return replace(self, precisions=precisions)

    def applies(self, precision: str) -> bool:
        return not self.precisions or precision in self.precisions


# Options more than one target takes.
GROUP_SIZE = Option("group_size", "quantization group size (target default when omitted)", int)
SYM = Option("sym", "symmetric quantization (--asym: asymmetric; target default when omitted)", bool, off="asym")
DEVICE = Option("device", "where calibration and quantization run (auto: CUDA, MPS, else CPU)",
                choices=("auto", "cpu", "cuda", "mps"))  # fmt: skip


@dataclass(frozen=True)
class Signature:
    """How a folder without phiconvert.json is recognised as this target's artifact (``phiconvert bench``)."""

    file: str | None = None  # a glob matching a file only this format writes
    quant_method: str | None = None  # config.json's quantization_config.quant_method (Hugging Face checkpoints)
    config_key: str | None = None  # a top-level config.json key only this format writes

    def matches(self, folder: Path, config: dict[str, Any]) -> bool:
        if self.file:
            return any(folder.glob(self.file))
        if self.quant_method:
            return (config.get("quantization_config") or {}).get("quant_method") == self.quant_method
        return bool(self.config_key) and self.config_key in config


@dataclass(frozen=True)
class ExportJob:
    """What a target's ``export`` gets: the normalised staging copy of the source and where to write."""

    source: Path  # staging folder: canonical config.json (hub layout) + links to weights and tokenizer files
    output: Path  # empty folder to fill with the artifact
    precision: str
    options: dict[str, Any]  # only the options the target declared, with None for "target default"
    calibration: list[str]  # calibration samples (never empty; the built-in text when the user gave none)
    work: Path  # scratch folder for intermediates (removed after the run)
    calibration_given: bool = False  # the user chose the calibration text (--calibration)
    model_id: str = ""  # the source's Hub id or folder (a fixture's: the model it is shaped after), for per-model
    # known-good defaults a toolchain keeps (optimum-intel's int4 table)


@dataclass(frozen=True)
class Smoke:
    """Result of generating greedily from the chat-templated prompt in the artifact's own runtime."""

    text: str  # the new text only, decoded, without the end-of-turn token
    tokens: int  # number of new tokens generated (end-of-turn token included if it was produced)
    stopped_at_eot: bool  # True when generation ended on an end-of-turn / eos token
    ids: list[int]  # the new token ids (a draft the source's greedy reply is checked against in one pass)


@dataclass(frozen=True)
class Memory:
    """A target worker's peak RSS per stage, measured at real size (bench/realsize.py, Phi-4-mini's shape; the
    figures in docs/realsize.md) for the pre-flight check: a machine too small is told before the work starts."""

    export: tuple[float, float]  # a x the source's bf16 bytes + b GiB
    # the artifact loaded in its runtime (smoke test, logits; logits excluded): a x its nominal bytes + b GiB
    runtime: tuple[float, float]
    # copies of a whole window's float32 logits the runtime holds at once (0: its logits come in chunks)
    window_logits: int = 1
    # float32 copies of the largest tensor the export holds besides (a toolchain that works tensor by tensor)
    tensor_copies: float = 0
    # copies of the source's bf16 bytes the export writes to disk on the way, beside the artifact (pre-flight's disk)
    scratch: float = 1.0
    # the artifact's bytes on disk per nominal byte (its bits x the parameters), for pre-flight's disk: more where
    # the format stores some tensors wider than its nominal bits
    stored: float = 1.0


Generate = Callable[[list[int], int], int]


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: temperature 0 is greedy (argmax); else sampled from the softmax at that
    temperature, within the smallest set of tokens whose probability reaches top_p, from ``seed`` when given (the
    same seed then gives the same reply in the same runtime; runtimes differ in their random streams)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


GREEDY = Sampling()


@dataclass(frozen=True)
class Runtime:
    """An artifact loaded in its own runtime: the one small interface the smoke test, ``phiconvert bench`` and the
    coming chat and serve verbs share. Each target's ``open(artifact, exact)`` makes one; ``exact`` is the most
    exact mode the runtime offers (float32 where it has a choice: the smoke test, checked against the source),
    else its deployment defaults (what bench times and a user chats with)."""

    # the chat's prompt ids, rendered by the artifact's own chat template and tokenised as its runtime does
    prompt: Callable[[list[dict[str, str]]], list[int]]
    # stream(ids, n, to_the_end, sampling) -> new ids after exactly ``ids`` (no BOS added), from a fresh state, at
    # most n; with to_the_end exactly n whatever they are (end-of-turn ignored), else it may end after an
    # end-of-turn id. The consumer may stop early: the generator is then closed and the runtime stops too
    stream: Callable[[list[int], int, bool, Sampling], Iterator[int]]
    decode: Callable[[list[int], list[int]], str]  # decode(prompt, new) -> the new ids' text, special tokens skipped
    is_stop: Callable[[int], bool]  # the ids that end a turn (end-of-turn, eos)
    encode: Callable[[str], list[int]]  # a plain text's ids as the runtime tokenises it (BOS where the model adds it)
    context: int  # the most tokens, prompt and new together, one stream holds


def reply(runtime: Runtime, messages: list[dict[str, str]], max_new_tokens: int) -> Smoke:
    """A greedy chat reply, up to and including the first end-of-turn id, counted as it comes (a slow runtime's
    smoke test, mlx on a Linux CPU: 48 tokens of a 3.8 B model take 20 minutes)."""
    ids = runtime.prompt(messages)
    new: list[int] = []
    progress.advance(0, max_new_tokens, "tokens", "reply")
    stream = runtime.stream(ids, max_new_tokens, False, GREEDY)
    for token in stream:
        new.append(int(token))
        progress.advance(len(new), max_new_tokens, "tokens", "reply")
        if runtime.is_stop(new[-1]):
            break
    getattr(stream, "close", lambda: None)()  # stop the runtime's generation, not only our reading of it
    stopped = bool(new) and runtime.is_stop(new[-1])
    text = runtime.decode(ids, new[:-1] if stopped else new)
    return Smoke(text=text, tokens=len(new), stopped_at_eot=stopped, ids=new)


def generator(runtime: Runtime) -> Generate:
    """What bench times: exactly ``new_tokens`` greedy tokens after ``ids``; returns how many came."""
    return lambda ids, new_tokens: sum(1 for _ in runtime.stream(ids, new_tokens, True, GREEDY))


def streamed(run: Callable[[Callable[[int], bool]], None]) -> Iterator[int]:
    """A token iterator over a runtime that calls back with each token instead of yielding it: ``run(push)`` is
    run in a thread, ``push(token)`` returns False once the consumer has stopped (the runtime then stops too)."""
    import queue
    import threading

    tokens: queue.Queue = queue.Queue()
    done, stopped, failure = object(), threading.Event(), []

    def push(token: int) -> bool:
        tokens.put(int(token))
        return not stopped.is_set()

    def work() -> None:
        try:
            run(push)
        except BaseException as error:  # re-raised in the consumer's thread
            failure.append(error)
        finally:
            tokens.put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (token := tokens.get()) is not done:
            yield token
    finally:
        stopped.set()
        thread.join()
    if failure:
        raise failure[0]


# (window index, first position, logits of the following positions (n, vocab) float32): a window's logits in one
# piece or in chunks, in window order
Logits = Iterator[tuple[int, int, np.ndarray]]


@dataclass(frozen=True)
class Target:
    name: str
    extra: str  # pip extra: pip install "phiconvert[<extra>]"
    modules: tuple[str, ...]  # import names that must be importable for the target to run
    packages: tuple[str, ...]  # distributions whose versions go into phiconvert.json
    precisions: dict[str, Precision]
    default_precision: str
    # export(job) -> details for the report (real bits per weight, layers kept in full precision, ...)
    export: Callable[[ExportJob], dict[str, Any]]
    # open(artifact, exact) -> the artifact loaded in its own runtime (see Runtime)
    open: Callable[[Path, bool], Runtime]
    # logits(artifact, sequences) -> the logits of every position of each sequence of token ids, each sequence
    # from a fresh state and in one forward pass (as the source computes it; longrope picks its factors by length)
    logits: Callable[[Path, list[list[int]]], Logits]
    # how its artifact is recognised without phiconvert.json
    signature: Signature
    runtime: str  # the runtime that loads, generates and proves the artifact (README, docs)
    tutorial: str  # its tutorial under docs/tutorials
    library: str  # the Hub's library_name for its artifacts (the model card's metadata)
    # options beyond precision that this target accepts (keywords of phiconvert.convert, flags of the CLI)
    options: tuple[Option, ...] = ()
    # check(precision, options): refuse a combination the target cannot do, before any work starts
    check: Callable[[str, dict[str, Any]], None] | None = None
    # refuse(config, options) -> why this model (its hub-layout config) cannot be converted exactly with these
    # options, beyond its architecture's profile (a rope scaling the toolchain lacks, ...), or None
    refuse: Callable[[dict[str, Any], dict[str, Any]], str | None] | None = None
    # peak memory per stage, for the pre-flight check; a target not yet measured at real size assumes the source's
    # bf16 bytes once plus 1 GiB (docs/realsize.md has what each measured)
    memory: Memory = Memory(export=(1.0, 1.0), runtime=(1.0, 1.0))
    # where an option changes the work (gptq --method autoround): (those option values, the Memory measured with
    # them); the first whose values the run's options all have replaces ``memory``
    memory_when: tuple[tuple[dict[str, Any], Memory], ...] = ()
    # where the runtime is far slower on a Linux CPU than the others (mlx's backend meant for other hardware,
    # torchao's dequantization at every call): its (prompt, generation) speed in weights x tokens per second,
    # measured on a 2-core CPU, so the run says up front how long the smoke test and verification will take
    linux_cpu_speed: tuple[float, float] | None = None
    # variant name -> what it is: logits() may also yield ((variant, window), start, logits) for a way the stock
    # runtime computes differently from what verification applies; each is measured against the source and
    # reported as a caveat with its numbers
    variants: dict[str, str] = field(default_factory=dict)
    # name of a phiconvert-managed environment (`phiconvert setup NAME`) whose interpreter runs the worker
    # when this environment lacks the toolchain (its pins conflict with the main environment's)
    environment: str | None = None
    # its export runs in a worker of its own and the smoke test and comparison in a fresh one: its toolchain keeps
    # memory after the export that the runtime's stages would otherwise run beside
    export_apart: bool = False
    # modules the worker imports from its own long-lived frame before any job loads a model: one that keeps an
    # exception caught while importing keeps that traceback's frames, and the model of the call that first imported it
    import_first: tuple[str, ...] = ()
    # environment variables its worker starts with (one already set in phiconvert's environment wins): settings a
    # toolchain reads once, when its process starts
    env: dict[str, str] = field(default_factory=dict)

    def listed(self) -> list[tuple[str, Precision]]:
        """Its precisions in the order help and tables show them: the default first."""
        first = self.default_precision
        return [(first, self.precisions[first]), *((p, d) for p, d in self.precisions.items() if p != first)]

    def memory_for(self, options: dict[str, Any]) -> Memory:
        """The declared peak memory for a run with these options."""
        matching = (m for values, m in self.memory_when if all(options.get(k) == v for k, v in values.items()))
        return next(matching, self.memory)

    def smoke(self, artifact: Path, messages: list[dict[str, str]], max_new_tokens: int) -> Smoke:
        """The greedy chat reply in the runtime's exact mode: verification's smoke test."""
        return reply(self.open(artifact, True), messages, max_new_tokens)


def names() -> list[str]:
    return list(MODULES)


def recognise(folder: Path) -> str | None:
    """The target whose artifact ``folder`` holds, by the files and config keys the targets declare (files first:
    an OpenVINO or ORT GenAI folder also carries a Hugging Face config.json)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    declared = sorted(((name, load(name).signature) for name in names()), key=lambda item: item[1].file is None)
    return next((name for name, signature in declared if signature.matches(folder, config)), None)


def markdown_table() -> str:
    """Every target: precisions (default first), the runtime that proves it, options, tutorial, as a markdown
    table (README; a test keeps it in step with the declarations)."""
    lines = ["| target | precisions (default first) | runtime that proves it | options | tutorial |", "|---" * 5 + "|"]
    for name in names():
        target = load(name)
        shown = [p + (" (experimental)" if d.experimental else "") for p, d in target.listed()]
        flags = ", ".join(f"`{o.flag}`" for o in target.options) or "—"
        link = f"[{target.tutorial}](docs/tutorials/{target.tutorial})"
        lines.append(f"| `{name}` | {', '.join(shown)} | {target.runtime} | {flags} | {link} |")
    return "\n".join(lines) + "\n"


def options() -> dict[str, list[tuple[str, Option]]]:
    """Every option any target declares, with each target's declaration: what the CLI makes its flags of."""
    found: dict[str, list[tuple[str, Option]]] = {}
    for name in names():
        for option in load(name).options:
            found.setdefault(option.name, []).append((name, option))
    return found


def chosen_options(target: Target, precision: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options ``target`` declares, with None for "target default", refusing a given one it would ignore."""
    declared = {option.name: option for option in target.options}
    for name, value in given.items():
        if value is None:
            continue
        if name not in declared:
            raise PhiconvertError(f"--{name.replace('_', '-')} does not apply to target '{target.name}'")
        option = declared[name]
        if not option.applies(precision):
            raise PhiconvertError(f"{option.flag} applies to {target.name} {'/'.join(option.precisions)}, "
                                  f"not to {precision}")  # fmt: skip
        if option.choices and value not in option.choices:
            raise PhiconvertError(f"{option.flag} for {target.name} must be one of "
                                  f"{', '.join(map(str, option.choices))}, not '{value}'")  # fmt: skip
    return {name: given.get(name) for name in declared}


def load(name: str) -> Target:
    """Import a target's adapter module (cheap: adapters import their toolchain lazily, inside functions)."""
    if name not in MODULES:
        raise PhiconvertError(f"unknown target '{name}'; choose one of: {', '.join(MODULES)}")
    module = importlib.import_module(f"phiconvert.targets.{MODULES[name]}")
    return module.TARGET


def missing_modules(target: Target) -> list[str]:
    """Toolchain modules that are not importable in this environment."""
    return [m for m in target.modules if importlib.util.find_spec(m.split(".")[0]) is None]
