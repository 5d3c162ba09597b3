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
    # Gemma's RMSNorm multiplies by (1 + w) where llama.cpp's graph multiplies by w: its converter writes w + 1
    norm_shift: float = 0.0
    unsupported: dict[str, str] = field(default_factory=dict)  # target -> why its toolchain cannot take it
    fixtures: tuple[str, ...] = ()  # bundled checkpoints every supported target is verified on (tests, CI)


OV_GEMMA = "optimum-intel 2.2 exports Gemma only with transformers <= 5.0 (its GemmaOpenVINOConfig's limit)"
ET_GEMMA = ("phiconvert maps only llama-layout decoders onto ExecuTorch's llama_transformer; Gemma's (1 + w) norms, "
            "softcaps and sliding layers are not mapped")  # fmt: skip

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
        Profile(
            "Qwen3ForCausalLM",
            "Qwen3",
            "QWEN3",
            unsupported={"executorch": "phiconvert does not map Qwen3's q/k norms onto ExecuTorch's llama_transformer"},
        ),
        Profile(
            "Gemma2ForCausalLM",
            "Gemma-2",
            "GEMMA2",
            norm_shift=1.0,
            unsupported={
                "openvino": OV_GEMMA,
                "executorch": ET_GEMMA,
                "mlx": "mlx-lm 0.31's gemma2 ignores the sliding window: past it, every other layer attends to "
                "tokens the model never sees",
            },
        ),
        Profile(
            "Gemma3ForCausalLM",
            "Gemma-3 (text)",
            "GEMMA3",
            rope_types=("default", "linear"),
            norm_shift=1.0,
            unsupported={
                "openvino": OV_GEMMA,
                "executorch": ET_GEMMA,
                "ort-genai": "onnxruntime-genai 0.18's builder reads rope_parameters['rope_type'], which "
                "transformers 5 nests per layer type for Gemma-3",
            },
        ),
    )
}


# Fused linears (Phi-3's) -> the linears they hold, in the order of their output rows (``fused_rows``)
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def head_dim(config: dict[str, Any]) -> int:
    """A (hub-layout) config's attention head size: its own key where it has one (Gemma, Qwen3), else hidden / heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def fused_rows(config: dict[str, Any], fused: str) -> list[int]:
    """The output rows of each linear a fused one holds (``FUSED[fused]``): q, k, v by head counts; gate, up."""
    if fused == "mlp.gate_up_proj":
        return [config["intermediate_size"]] * 2
    size, kv_heads = head_dim(config), config.get("num_key_value_heads") or config["num_attention_heads"]
    return [config["num_attention_heads"] * size, kv_heads * size, kv_heads * size]


def architecture_of(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    return architectures[0] if architectures else f"model_type={config.get('model_type')}"


def profile(config: dict[str, Any], model: str = "the model") -> Profile:
    """The profile of a (hub-layout) config, or a one-line refusal naming what is supported."""
    name = architecture_of(config)
    if name not in PROFILES:
        raise PhiconvertError(
            f"'{model}' is {name}; supported: {', '.join(f'{p} ({v.models})' for p, v in PROFILES.items())}"
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


def refusal(config: dict[str, Any], target: str) -> str | None:
    """Why ``target``'s toolchain cannot take this architecture (None: it can), said before any work."""
    found = profile(config)
    if target in found.unsupported:
        return f"--target {target} cannot convert {found.architecture}: {found.unsupported[target]}"
    return None


def support_table(targets: list[str]) -> str:
    """Which architecture works with which target, as a markdown table (README; a test keeps it in step)."""
    lines = [f"| architecture | models | {' | '.join(f'`{t}`' for t in targets)} | verified on |",
             "|---" * (len(targets) + 3) + "|"]  # fmt: skip
    for found in PROFILES.values():
        cells = ["no" if t in found.unsupported else "yes" if _verified(found, t) else "untested" for t in targets]
        verified = ", ".join(f"`{f}`" for f in found.fixtures) or "no bundled fixture yet"
        lines.append(f"| `{found.architecture}` | {found.models} | {' | '.join(cells)} | {verified} |")
    return "\n".join(lines) + "\n"


def _verified(found: Profile, target: str) -> bool:
    """Whether a bundled fixture of the profile is one the target converts (its ``refuse`` may turn down a fixture
    for a setting the whole architecture does not share: tiny-llama's llama3 rope scaling on executorch)."""
    import json
    from pathlib import Path

    from phiconvert import targets

    refuse = targets.load(target).refuse
    fixtures = Path(__file__).parent / "fixtures"
    configs = [json.loads((fixtures / name / "config.json").read_text()) for name in found.fixtures]
    return any(refuse is None or refuse(config, {}) is None for config in configs)
