"""Apple MLX target: mlx-lm's own convert / load / generate_step, so the artifact is what `mlx_lm.generate` runs.

mlx-lm reads the hub config layout only (the staging copy has it). Two behaviours of mlx-lm 0.31.3 shape this
module. Its longrope (SuScaledRoPE) always rotates with the LONG factor, where transformers uses the short factor
while the sequence fits in `original_max_position_embeddings`: `logits` applies transformers' rule per sequence
and `export` measures what the stock runtime changes on a short prompt. And layers whose input size is not a
multiple of the group size are silently left unquantized: `export` lists them and reports the real bits per weight.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert.errors import PhiconvertError
from phiconvert.targets import (
    GROUP_SIZE,
    ExportJob,
    Logits,
    Memory,
    Option,
    Precision,
    Runtime,
    Sampling,
    Signature,
    Target,
)

# precision -> (bits, dtype of the float weights); bits None = not quantized, dtype None = the source's dtype
PRECISIONS = {"4bit": (4, None), "8bit": (8, None), "fp16": (None, "float16"), "bf16": (None, "bfloat16")}
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
RECIPES = ("mixed_3_4", "mixed_4_6")  # mlx-lm's mixed-precision predicates (more bits for v_proj, down_proj, lm_head)
METHODS = ("rtn", "gptq")
# mlx_lm.gptq's defaults: 512-token calibration chunks; layers GPTQ does not handle (the embedding) get 6 bits
GPTQ_SEQUENCE_LENGTH = 512
GPTQ_MAX_SAMPLES = 128
GPTQ_FALLBACK_BITS = 6
OPTIONS = (
    GROUP_SIZE.only("4bit", "8bit"),
    Option("recipe", "mixed-precision recipe (more bits for v_proj, down_proj, lm_head)", choices=RECIPES,
           precisions=("4bit",)),
    Option("method", "round-to-nearest (default) or GPTQ calibrated on --calibration", choices=METHODS,
           precisions=("4bit",)),
)  # fmt: skip


def _settings(precision: str, options: dict[str, Any]) -> dict[str, Any]:
    """The quantization settings to use, refusing combinations mlx-lm would reject or silently ignore (the declared
    choices and precisions of each option are checked before any work)."""
    bits, dtype = PRECISIONS[precision]
    group_size, recipe, method = options.get("group_size"), options.get("recipe"), options.get("method")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise PhiconvertError(
            f"--group-size for mlx must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}"
        )
    if method == "gptq" and recipe is not None:
        raise PhiconvertError("--method gptq and --recipe cannot be combined (mlx-lm's GPTQ uses one bit width)")
    return {
        "bits": bits,
        "group_size": (group_size or DEFAULT_GROUP_SIZE) if bits else None,
        "recipe": recipe,
        "method": (method or "rtn") if bits else None,
        "dtype": dtype,
    }


def export(job: ExportJob) -> dict[str, Any]:
    """Convert with mlx-lm (round-to-nearest or GPTQ), then describe the artifact as mlx-lm loads it."""
    from mlx_lm.utils import load_model

    settings = _settings(job.precision, job.options)
    built = job.work / "mlx"  # mlx-lm refuses an existing folder, and job.output exists
    if settings["method"] == "gptq":
        settings["calibration"] = _convert_gptq(job.source, built, settings, job.calibration)
    else:
        from mlx_lm import convert

        convert(
            str(job.source),
            str(built),
            quantize=settings["bits"] is not None,
            q_bits=settings["bits"],
            q_group_size=settings["group_size"],
            dtype=settings["dtype"],
            quant_predicate=settings["recipe"],
        )
    for item in built.iterdir():
        shutil.move(str(item), str(job.output / item.name))
    _ensure_end_of_turn(job.output)
    # as `mlx_lm.generate` loads it, lazily: describing it reads shapes and types, not the weights; without its
    # tokenizer (a second load of 200k tokens, 1.5-2.5 s at real size): mlx-lm stops on the config's eos ids, which
    # its load_config takes from generation_config.json, written above
    model, config = load_model(job.output, lazy=True)
    eos = config.get("eos_token_id") or []
    details = {
        "settings": settings,
        "eos_token_ids": sorted([eos] if isinstance(eos, int) else eos),
        **_describe(model, config),
    }
    details["rope"] = _rope_report(config)
    details["caveats"] = _caveats(details)
    if settings["recipe"] == "mixed_3_4":
        details["bound"] = "mixed_3_4"  # 3.6 bits per weight: held to its own row of verify.BOUNDS, not int4's
    return details


def _convert_gptq(source: Path, built: Path, settings: dict[str, Any], calibration: list[str]) -> dict[str, Any]:
    """mlx-lm's GPTQ fed with our calibration tokens (its CLI would read or download its own text file)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import load, save

    model, tokenizer, config = load(str(source), lazy=True, return_config=True)
    group = settings["group_size"]
    layers = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    uneven = [path for path, m in layers if hasattr(m, "to_quantized") and m.weight.shape[-1] % group]
    if uneven:
        raise PhiconvertError(
            f"--method gptq needs input sizes that are multiples of --group-size {group}: {uneven[0]}"
        )
    ids = tokenizer.encode("\n\n".join(calibration), add_special_tokens=False)
    length = min(GPTQ_SEQUENCE_LENGTH, len(ids))
    samples = min(GPTQ_MAX_SAMPLES, len(ids) // length)
    data = mx.array(ids[: samples * length]).reshape(samples, length)
    _use_rope_factor(model, length)  # calibrate with the factor transformers would use at this length
    model, config["quantization"] = gptq_quantize(model, data, settings["bits"], group, GPTQ_FALLBACK_BITS, group)
    config["quantization_config"] = config["quantization"]  # as mlx_lm.convert writes it
    save(str(built), str(source), model, tokenizer, config)
    return {"samples": samples, "tokens_per_sample": length, "fallback_bits": GPTQ_FALLBACK_BITS}


def _ensure_end_of_turn(artifact: Path) -> None:
    """Make mlx-lm stop at the end-of-turn token: it stops on generation_config.json's eos ids (else config's)."""
    from transformers import AutoTokenizer

    from phiconvert import stops

    eos = stops.stop_ids(artifact, AutoTokenizer.from_pretrained(artifact))
    if eos != stops.generation_eos(artifact):
        path = artifact / "generation_config.json"
        generation = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**generation, "eos_token_id": eos}, indent=2) + "\n")


def _describe(model: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Real bits per weight, layers per bit width, the layers mlx-lm left in full precision, what it ignores."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import compute_bits_per_weight

    quantization = config.get("quantization")
    bits: dict[str, int] = {}
    full_precision = {}
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            bits[str(module.bits)] = bits.get(str(module.bits), 0) + 1
        elif quantization and isinstance(module, (nn.Linear, nn.Embedding)):
            width, group = module.weight.shape[-1], quantization["group_size"]
            full_precision[path] = f"input size {width} is not a multiple of the group size {group}"
    floats = {
        str(v.dtype).split(".")[-1] for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)
    }
    window = config.get("sliding_window")
    return {
        # mlx-lm's phi3 attends to the whole context; transformers masks beyond the window (Phi-3-mini-4k: 2047)
        "sliding_window_ignored": window if window and window < config["max_position_embeddings"] else None,
        "bits_per_weight": round(float(compute_bits_per_weight(model)), 3),
        "quantized_layers_by_bits": bits,
        "full_precision_layers": full_precision,
        "float_dtypes": sorted(floats),
        "quantization": quantization,
    }


def _caveats(details: dict[str, Any]) -> list[str]:
    """What the stock mlx-lm runtime computes differently from transformers, with the measured difference."""
    out = []
    if details["sliding_window_ignored"]:
        out.append(
            f"mlx-lm ignores the {details['sliding_window_ignored']}-token sliding window: "
            "beyond it every token attends to the whole context, unlike transformers"
        )
    return out


def _rope_report(config: dict[str, Any]) -> dict[str, Any] | None:
    """How longrope is handled: what the stock mlx-lm runtime does, and what verification applies."""
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) not in ("longrope", "su"):
        return None
    original = config.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    return {
        "original_max_position_embeddings": original,
        "mlx_lm_runtime": "long_factor at every length (SuScaledRoPE of mlx-lm 0.31.x)",
        "transformers": f"short_factor up to {original} tokens, long_factor beyond",
        "verification": "logits() applies transformers' choice per sequence, so fidelity measures the conversion; "
        "the stock runtime is measured against the source on the windows within the original context "
        "(fidelity.variants.stock)",
    }


def _use_rope_factor(model: Any, length: int) -> None:
    """Give every attention layer the longrope factor transformers picks for a sequence of ``length`` tokens.

    transformers uses short_factor while the sequence fits in original_max_position_embeddings and long_factor
    beyond; mlx-lm builds its SuScaledRoPE with long_factor only.
    """
    from mlx_lm.models.rope_utils import SuScaledRoPE

    args = model.args
    if not _longrope(args):
        return
    which = "short_factor" if length <= args.original_max_position_embeddings else "long_factor"
    for layer in model.layers:
        layer.self_attn.rope = SuScaledRoPE(
            layer.self_attn.rope.dim,
            base=args.rope_theta,
            max_position_embeddings=args.max_position_embeddings,
            original_max_position_embeddings=args.original_max_position_embeddings,
            short_factor=args.rope_scaling["short_factor"],
            long_factor=args.rope_scaling[which],
        )


def open_runtime(artifact: Path, exact: bool = True) -> Runtime:
    """mlx_lm.load (one mode: mlx-lm computes in the weights' own dtype) and generate_step: greedy, a new KV
    cache per stream, never stopping by itself; the prompt as `mlx_lm.generate` builds it, the stop ids mlx-lm's
    tokenizer wrapper holds."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step, generation_stream
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(artifact))
    stop = frozenset(int(t) for t in tokenizer.eos_token_ids)

    def prompt(messages: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def stream(ids: list[int], new_tokens: int, to_the_end: bool, sampling: Sampling) -> Iterator[int]:
        sampler = None  # mlx-lm's default: argmax
        if not sampling.greedy:
            sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p if sampling.top_p < 1 else 0.0)
            if sampling.seed is not None:
                mx.random.seed(sampling.seed)
        try:
            for token, _ in generate_step(mx.array(ids), model, max_tokens=new_tokens, sampler=sampler):
                yield int(token)
        finally:
            # generate_step computes one token ahead asynchronously: its work stays inside the stream that began it
            mx.synchronize(generation_stream)

    return Runtime(
        prompt=prompt,
        stream=stream,
        decode=lambda _, new: tokenizer.decode(new, skip_special_tokens=True),
        is_stop=stop.__contains__,
        encode=lambda text: list(tokenizer.encode(text)),
        context=json.loads((artifact / "config.json").read_text())["max_position_embeddings"],
    )


def logits(artifact: Path, sequences: list[list[int]]) -> Logits:
    """Prefill logits computed in float32 (weights upcast; quantized weights stay as stored), with the longrope
    factor transformers picks for each length; then, for the windows within the original context, the stock
    runtime's (long factor) as the variant "stock", which verification measures against the source too."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(artifact)
    model.set_dtype(mx.float32)
    for index, ids in enumerate(sequences):
        _use_rope_factor(model, len(ids))
        yield index, 0, np.array(model(mx.array([ids]))[0].astype(mx.float32))
    args = model.args
    if _longrope(args):
        _use_rope_factor(model, args.original_max_position_embeddings + 1)  # the long factor, as mlx-lm loads it
        for index, ids in enumerate(sequences):
            if len(ids) <= args.original_max_position_embeddings:
                yield ("stock", index), 0, np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _longrope(args: Any) -> bool:
    scaling = getattr(args, "rope_scaling", None)  # some architectures' ModelArgs have no rope scaling at all
    return bool(scaling) and scaling["type"] in ("longrope", "su")


TARGET = Target(
    name="mlx",
    extra="mlx",
    modules=("mlx", "mlx_lm"),
    packages=("mlx-lm", "mlx", "mlx-metal", "mlx-cpu", "transformers"),
    precisions={
        "4bit": Precision(
            "affine 4-bit, group size 64 (32/64/128); --recipe mixed_3_4|mixed_4_6; --method gptq",
            bits=4.5,
            bound="int4",
        ),
        "8bit": Precision("affine 8-bit, group size 64 (32/64/128)", bits=8.5, bound="int8"),
        "fp16": Precision("float16 weights, unquantized", bits=16, bound="fp16"),
        "bf16": Precision("bfloat16 weights, unquantized", bits=16, bound="bf16"),
    },
    signature=Signature(config_key="quantization"),
    runtime="mlx-lm (`mlx-lm[cpu]` on Linux, Metal on a Mac)",
    tutorial="mlx.md",
    library="mlx",
    default_precision="4bit",
    export=export,
    open=open_runtime,
    logits=logits,
    options=OPTIONS,
    # measured 2026-12-02, Phi-4-mini 4bit: export 3.93 GiB (one weight at a time); runtime estimated
    memory=Memory(export=(0.5, 0.35), runtime=(1.2, 1.0)),
    # measured 2026-12-02, Phi-4-mini 4bit on mlx-cpu (one thread): 16-token prompt in 408 s, 25.8 s per new token
    linux_cpu_speed=(1.5e8, 1.5e8),
    check=lambda precision, options: _settings(precision, options) and None,
    variants={
        "stock": "stock mlx-lm rotates with longrope's long factor below the original context too, where "
        "transformers uses the short one (verification applied transformers' rule)"
    },
)
