"""Before any work: will this machine hold every stage of the run? Refuse in one line if not.

Each stage's peak memory is estimated from the source's size (its weights in bf16 bytes, whatever their stored
dtype) with the coefficients each target declares (``targets.Memory``, measured at real size by
bench/realsize.py), plus the verification windows' logits; disk from the artifact's nominal size, the
intermediates and the reference's log-probability files. Being killed by the out-of-memory killer after twenty
minutes is the failure this replaces.
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiconvert import source, targets, verify
from phiconvert.errors import PhiconvertError

GiB = 2**30
# the streamed reference: the process, one decoder layer in float32 twice over (buffers and activations), and a
# chunk of 512 positions' logits in float32 three times over (logits, log-softmax, the slice being upcast)
REFERENCE_BASE = 0.9 * GiB
# a CPU evaluates about this many weight-tokens per second in float32 (2 cores, measured on Phi-4-mini's shape:
# 3.84 B weights x 4352 tokens in 307 s): used to say how long verification takes, not to refuse anything
WEIGHT_TOKENS_PER_SECOND = 5.4e10
# the plan says how long an export or a slow runtime's stages will take when it is more than this many seconds
SAY_AFTER = 300


@dataclass(frozen=True)
class Shape:
    """What the estimates need to know of the source, read from its config and safetensors headers."""

    parameters: int
    vocab: int
    hidden: int
    layer_weights: int  # the largest decoder layer's weights
    largest_tensor: int  # elements of the largest tensor (the embedding, on these models)

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.parameters


def shape_of(src: source.Source) -> Shape:
    from phiconvert import weights

    config = source.normalise_config(src.config)
    config = config.get("text_config") or config
    tensors = weights.index(src.path)
    layers: dict[str, int] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if "layers" in parts:
            key = ".".join(parts[: parts.index("layers") + 2])
            layers[key] = layers.get(key, 0) + tensor.size
    return Shape(
        parameters=sum(t.size for t in tensors.values()),
        vocab=config["vocab_size"],
        hidden=config["hidden_size"],
        layer_weights=max(layers.values(), default=0),
        largest_tensor=max((t.size for t in tensors.values()), default=0),
    )


def reference_bytes(shape: Shape) -> int:
    return int(REFERENCE_BASE + 2 * 4 * shape.layer_weights + 3 * 512 * shape.vocab * 4)


def artifact_bytes(adapter: targets.Target, precision: str, shape: Shape) -> int:
    """The artifact at its nominal size."""
    return int(shape.parameters * adapter.precisions[precision].bits / 8)


def stage_bytes(adapter: targets.Target, precision: str, shape: Shape, longest_window: int,
                options: dict[str, Any] | None = None) -> dict[str, int]:  # fmt: skip
    """Peak bytes of the export (scaled by the source) and of the artifact's runtime (scaled by the artifact, plus
    its verification logits), with the run's ``options`` (some change the work)."""
    memory = adapter.memory_for(options or {})
    export = memory.export[0] * shape.bf16_bytes + memory.export[1] * GiB
    export += memory.tensor_copies * shape.largest_tensor * 4
    runtime = memory.runtime[0] * artifact_bytes(adapter, precision, shape) + memory.runtime[1] * GiB
    logits = memory.window_logits * longest_window * shape.vocab * 4
    return {"export": int(export), "verification": int(runtime + logits)}


def disk_bytes(adapter: targets.Target, precision: str, shape: Shape, windows: list[tuple[int, int]],
               options: dict[str, Any] | None = None) -> int:  # fmt: skip
    """The artifact as the target stores it, the export's intermediate copies, the reference's log-probabilities."""
    memory = adapter.memory_for(options or {})
    logits = sum(length for _, length in windows) * shape.vocab * 4
    return int(memory.stored * artifact_bytes(adapter, precision, shape) + memory.scratch * shape.bf16_bytes) + logits


def available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def estimate(adapter: targets.Target, precision: str, shape: Shape, windows: list[tuple[int, int]],
             memory: int, disk: int, options: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Peak memory of each stage and the disk one pair needs, and why this machine cannot run it (or None)."""
    longest = max((length for _, length in windows), default=0)
    needs = stage_bytes(adapter, precision, shape, longest, options)
    if not windows:
        needs.pop("verification")
    disk_needed = disk_bytes(adapter, precision, shape, windows, options)
    out = {"target": adapter.name, "precision": precision, "memory": needs, "disk": disk_needed, "refusal": None}
    for stage, need in needs.items():
        if need > memory:
            hint = "; try --verify quick" if stage == "verification" and longest > 1024 else ""
            out["refusal"] = (f"{adapter.name} {precision} needs ~{need / GiB:.1f} GiB of memory for its {stage}, "
                              f"this machine has {memory / GiB:.1f} GiB available{hint}")  # fmt: skip
            return out
    if out["disk"] > disk:
        out["refusal"] = (f"{adapter.name} {precision} needs ~{out['disk'] / GiB:.1f} GiB of free disk, there are "
                          f"{disk / GiB:.1f} GiB")  # fmt: skip
    return out


def check(src: source.Source, pairs: list[Any], windows: list[tuple[int, int]], emit: Any,
          output: str | Path | None, smoke_tokens: int) -> dict[str, Any]:  # fmt: skip
    """Everything the run will need, against this machine, before any work: the reference's memory (raised when
    it does not fit), then each pair's stages and disk (``pairs``: the pair's estimate and ``refusal``, the
    reason it cannot run here). Says up front how long verification and slow runtimes will take."""
    shape = shape_of(src)
    memory = available_memory()
    folder = Path(output or ".").expanduser().resolve()
    while not folder.exists():
        folder = folder.parent
    disk = shutil.disk_usage(folder).free
    reference = reference_bytes(shape) if windows else 0
    if reference > memory:
        raise PhiconvertError(
            f"the source's reference needs ~{reference / GiB:.1f} GiB of memory, this machine has "
            f"{memory / GiB:.1f} GiB available; try --verify none"
        )
    tokens = sum(length for _, length in windows)
    if tokens * shape.parameters > 60 * WEIGHT_TOKENS_PER_SECOND:
        minutes = math.ceil(tokens * shape.parameters / WEIGHT_TOKENS_PER_SECOND / 60)
        emit({"stage": "plan", "status": "note", "message": (
            f"verification runs {tokens} tokens ({', '.join(str(n) for _, n in windows)}) through the source and "
            f"each artifact: ~{minutes} min for the source alone on a 2-core CPU"
            + ("; --verify quick skips the long window" if len(windows) > len(verify.WINDOWS) else ""))})  # fmt: skip
    estimates, notes = [], []
    for pair in pairs:
        estimates.append(estimate(pair.adapter, pair.precision, shape, windows, memory, disk, pair.options))
        notes.append(export_time_note(pair, shape))
        notes.append(runtime_time_note(pair.adapter, shape, tokens, smoke_tokens))
    for note in dict.fromkeys(note for note in notes if note):  # once each: a target's precisions share some
        emit({"stage": "plan", "status": "note", "message": note})
    return {"parameters": shape.parameters, "bf16_bytes": shape.bf16_bytes, "memory_available": memory,
            "disk_free": disk, "reference": reference, "windows": windows, "pairs": estimates}  # fmt: skip


def runtime_time_note(adapter: Any, shape: Shape, tokens: int, smoke_tokens: int) -> str | None:
    """How long the smoke test and verification take on this CPU, from the runtime's declared speed, when it is far
    slower than the others (``linux_cpu_speed``) and that is more than a few minutes."""
    slow = adapter.linux_cpu_speed
    if not slow or sys.platform != "linux":
        return None
    seconds = shape.parameters * (tokens / slow[0] + smoke_tokens / slow[1])
    if seconds <= SAY_AFTER:
        return None
    return (
        f"{adapter.name} generates ~{slow[1] / shape.parameters:.2f} tokens/s for this model on a 2-core CPU "
        "(measured on Linux): "
        + (f"its smoke test and verification take {took(seconds)}; --verify none leaves the comparison out"
           if tokens else f"its smoke test takes {took(seconds)}")
    )  # fmt: skip


def export_time_note(pair: Any, shape: Shape) -> str | None:
    """How long an export will take on a CPU, from its precision's measured speed, when that is more than a few
    minutes: at its default settings, or at the settings it declares a speed for (awq's --no-clip, gptq's --method
    autoround; other options change the work), not on a GPU. At the default settings the faster ones are named with
    their time."""
    precision, options = pair.adapter.precisions[pair.precision], pair.options or {}
    speed, faster = precision.cpu_export_speed, []
    for when, when_speed in precision.cpu_speed_when:
        if all(options.get(name) == value for name, value in when.items()):
            speed, options = when_speed, {k: v for k, v in options.items() if k not in when}
            break
    else:  # the default settings: the faster ones are named with their time
        faster = [(when, s) for when, s in precision.cpu_speed_when if speed and s > speed]
    declared = {option.name: option for option in pair.adapter.options}
    chosen = {name for name, value in options.items() if value not in (None, False, declared[name].default)}
    if not speed or chosen - {"device"} or options.get("device") in ("cuda", "mps"):
        return None
    seconds = shape.parameters / speed
    if seconds <= SAY_AFTER:
        return None
    gpu = " (or a GPU: --device)" if "device" in declared else ""
    quicker = ""
    for when, faster_speed in faster:
        words = [word for name, value in when.items() for word in declared[name].spelled(value)]
        quicker += f"; {' '.join(words)} takes {took(shape.parameters / faster_speed)} at some fidelity cost"
    return (
        f"{pair.adapter.name} {pair.precision}'s export takes {took(seconds)} for this model on a 2-core CPU "
        f"(measured on Phi-4-mini's shape); more cores{gpu} shorten it{quicker}"
    )


def took(seconds: float) -> str:
    return f"~{seconds / 3600:.1f} h" if seconds > 5400 else f"~{math.ceil(seconds / 60)} min"


def largest_model(adapter: targets.Target, memory: int) -> int:
    """The most parameters this target converts and verifies at its default precision (with a 4k window of a 200k
    vocabulary, embedded in 5120 dimensions) in ``memory`` bytes, by its declared coefficients: what `phiconvert
    doctor` shows. Each stage's need is linear in the parameters, so two points of ``stage_bytes`` solve it."""

    def needs(parameters: int) -> dict[str, int]:
        shape = Shape(parameters, vocab=200064, hidden=5120, layer_weights=0, largest_tensor=200064 * 5120)
        return stage_bytes(adapter, adapter.default_precision, shape, 4352)

    base, per_billion = needs(0), needs(10**9)
    fits = [(memory - base[stage]) * 10**9 / (per_billion[stage] - base[stage])
            if per_billion[stage] > base[stage] else math.inf for stage in base]  # fmt: skip
    return max(0, int(min(fits)))
