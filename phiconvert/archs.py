"""What phiconvert knows about each Hugging Face decoder architecture, as data in one place.

A profile per architecture, in the manner of gguf-py's MODEL_ARCH tables: which GGUF architecture llama.cpp runs it
as (names, keys and tensor map then come from gguf-py's own constants), whether llama.cpp's graph wants the q/k
rows reordered, which rope scalings the converters carry over, and which targets' toolchains cannot take it (and
why: refused before any work starts). Adding an architecture is one entry here plus a fixture and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phiconvert.errors import PhiconvertError


@dataclass(frozen=True)
class Profile:
    architecture: str  # config.json's "architectures"[0]
    models: str  # the model families it covers, for help and errors
    gguf_arch: str  # gguf-py's MODEL_ARCH member llama.cpp runs it as
    # llama.cpp's LLAMA graph rotates adjacent pairs where transformers rotates halves: its converter reorders the
    # rows of q_proj and k_proj per head (convert_hf_to_gguf's LlamaModel.permute); NEOX-rope graphs take them as is
    permute_qk: bool = False
    rope_types: tuple[str, ...] = ("default",)  # rope_scaling types every converter carries over
    unsupported: dict[str, str] = field(default_factory=dict)  # target -> why its toolchain cannot take it
    fixtures: tuple[str, ...] = ()  # bundled checkpoints every supported target is verified on (tests, CI)


PROFILES = {
    p.architecture: p
    for p in (
        Profile(
            "Phi3ForCausalLM",
            "Phi-3/3.5-mini, Phi-4-mini, Phi-4",
            "PHI3",
            rope_types=("default", "longrope", "su"),
            fixtures=("tiny-phi3", "tiny-phi4mini"),
        ),
        Profile(
            "LlamaForCausalLM",
            "Llama-2/3.x, SmolLM, TinyLlama",
            "LLAMA",
            permute_qk=True,
            rope_types=("default", "llama3"),
            fixtures=("tiny-llama",),
        ),
        Profile("MistralForCausalLM", "Mistral-7B", "LLAMA", permute_qk=True),
        Profile("Qwen2ForCausalLM", "Qwen2, Qwen2.5", "QWEN2", fixtures=("tiny-qwen",)),
        Profile("Qwen3ForCausalLM", "Qwen3", "QWEN3"),
    )
}
# Architectures asked for and not yet profiled, with what stands in the way.
PLANNED = {
    "Gemma2ForCausalLM": "logit softcapping and scaled embeddings are not yet carried by every converter",
    "Gemma3ForCausalLM": "logit softcapping and scaled embeddings are not yet carried by every converter",
}


def architecture_of(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    return architectures[0] if architectures else f"model_type={config.get('model_type')}"


def profile(config: dict[str, Any], model: str = "the model") -> Profile:
    """The profile of a (hub-layout) config, or a one-line refusal naming what is supported."""
    name = architecture_of(config)
    if name not in PROFILES:
        why = f" ({PLANNED[name]})" if name in PLANNED else ""
        raise PhiconvertError(
            f"'{model}' is {name}{why}; supported: {', '.join(f'{p} ({v.models})' for p, v in PROFILES.items())}"
        )
    found = PROFILES[name]
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    if kind not in found.rope_types:
        raise PhiconvertError(
            f"'{model}' uses rope_scaling type '{kind}', which phiconvert does not carry over for {name} "
            f"(supported: {', '.join(found.rope_types)})"
        )
    return found


def check_target(config: dict[str, Any], target: str) -> None:
    """Refuse a target whose toolchain cannot take this architecture, before any work."""
    found = profile(config)
    if target in found.unsupported:
        raise PhiconvertError(f"--target {target} cannot convert {found.architecture}: {found.unsupported[target]}")


def support_table(targets: list[str]) -> str:
    """Which architecture works with which target, as a markdown table (README; a test keeps it in step)."""
    lines = [f"| architecture | models | {' | '.join(f'`{t}`' for t in targets)} | verified on |",
             "|---" * (len(targets) + 3) + "|"]  # fmt: skip
    for found in PROFILES.values():
        works = "yes" if found.fixtures else "untested"
        cells = ["no" if t in found.unsupported else works for t in targets]
        verified = ", ".join(f"`{f}`" for f in found.fixtures) or "no bundled fixture yet"
        lines.append(f"| `{found.architecture}` | {found.models} | {' | '.join(cells)} | {verified} |")
    for name, why in PLANNED.items():
        lines.append(f"| `{name}` | planned: {why} | {' | '.join('no' for _ in targets)} | |")
    return "\n".join(lines) + "\n"
