"""AWQ checkpoints (Hugging Face / AutoAWQ "gemm" layout), quantized with AutoRound's AWQ: activation-aware
channel scaling and clipping searched on the calibration text, then round-to-nearest of the scaled weights.

AutoRound has mappings for Phi-3's fused layers (input_layernorm -> qkv_proj, qkv_proj -> o_proj,
post_attention_layernorm -> gate_up_proj, gate_up_proj -> down_proj), so the checkpoint keeps them fused, and for the
split projections of Llama and Qwen.
transformers loads AWQ through gptqmodel, like GPTQ, so this target shares the managed `gptq` environment.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from phiconvert.errors import PhiconvertError
from phiconvert.targets import (
    DEVICE,
    GROUP_SIZE,
    SYM,
    ExportJob,
    Memory,
    Option,
    Precision,
    Signature,
    Target,
    hf_common,
)

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
SEQUENCE_LENGTH = 512  # calibration chunk length (tokens)
MAX_SAMPLES = 128
# on by default, as AutoAWQ has it: on the four bundled models it lowered KL by 5-42% against scaling alone
CLIP = Option("clip", "search a clipping range per weight group after scaling (default; --no-clip: scaling only, "
              "about a third of the CPU time)", bool, default=True)  # fmt: skip
# Calibration tokens per linear layer in the clip search, whose cost is linear in them: AutoAWQ takes 512, which
# made the search 83% of a layer's time on a CPU; with 128 (and 64) the bundled models' KL was the same as with 512
CLIP_TOKENS = 128


def settings(options: dict[str, Any], inputs: tuple[int, ...] = ()) -> dict[str, Any]:
    """The user's settings over the defaults; a default group size that does not divide a layer's input size
    becomes the largest that does (a size the user chose is refused)."""
    group_size = options.get("group_size") or hf_common.fitting_group_size(inputs, DEFAULT_GROUP_SIZE, "awq")
    if options.get("group_size") and group_size not in GROUP_SIZES:
        raise PhiconvertError(f"--group-size for awq must be one of {', '.join(map(str, GROUP_SIZES))}")
    # AWQ's usual form is asymmetric (a zero point per group); --sym stores no zero points
    clip = CLIP.default if options.get("clip") is None else bool(options["clip"])
    return {"bits": 4, "group_size": group_size, "sym": bool(options.get("sym")), "clip": clip}


def check(precision: str, options: dict[str, Any]) -> None:
    settings(options)
    hf_common.check_device(options.get("device"))


def export(job: ExportJob) -> dict[str, Any]:
    device = hf_common.resolve_device(job.options.get("device"))  # first: it sets up MPS before torch starts
    from auto_round.algorithms.transforms.awq.config import AWQConfig
    from transformers import AutoTokenizer

    inputs = hf_common.layer_inputs(job.source)
    chosen = settings(job.options, inputs)
    tokenizer = AutoTokenizer.from_pretrained(job.source)
    chunks = hf_common.calibration_chunks(tokenizer, job.calibration, SEQUENCE_LENGTH, MAX_SAMPLES)
    with _Skipped() as skipped:
        config, layers = hf_common.autoround(job, tokenizer, chunks, "auto_awq", scheme="W4A16",
                                             alg_configs=AWQConfig(apply_clip=chosen["clip"],
                                                                     clip_n_sample_token=CLIP_TOKENS), bits=4,
                                             group_size=chosen["group_size"], sym=chosen["sym"],
                                             device_map=device)  # fmt: skip
    not_converted = config.get("modules_to_not_convert") or []
    return {
        "method": f"awq (AutoRound: scale{' + clip' if chosen['clip'] else ''} search, then round-to-nearest)",
        "settings": {k: config.get(k) for k in ("bits", "group_size", "zero_point", "version")}
        | {"clip": chosen["clip"], "clip_tokens": CLIP_TOKENS if chosen["clip"] else None, "device": device},
        "group_size_note": hf_common.group_size_note(chosen["group_size"], DEFAULT_GROUP_SIZE, job.options, inputs),
        "calibration": {"chunks": len(chunks), "tokens_per_chunk": len(chunks[0])},
        "kept_in_float16": ["model.embed_tokens", *not_converted, "norms"],
        # AutoRound folds a scale into the previous layer's outputs only where they match the next layer's inputs:
        # not into part of Phi-3's fused qkv_proj / gate_up_proj, nor a GQA v_proj (fewer outputs than o_proj has
        # inputs), so the layers those feed are clipped and rounded without AWQ scaling
        "awq_not_applied_after": skipped.layers,
        "caveats": [
            f"AWQ scaling not applied after {len(skipped.layers)} layers "
            f"({', '.join(sorted({name.rsplit('.', 1)[-1] for name in skipped.layers}))}): the layers they feed are "
            f"{'clipped and ' if chosen['clip'] else ''}rounded only"
        ]
        if skipped.layers
        else [],
        "bits_per_weight": round(hf_common.bits_per_weight(job.output, job.source, layers), 3),
    }


class _Skipped(logging.Handler):
    """Collects the layers through which AutoRound logs it could not apply AWQ scaling (it only warns)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.layers: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"Skipping AWQ for '([^']+)'", record.getMessage())
        if found:
            self.layers.append(found.group(1))

    def __enter__(self) -> _Skipped:
        logging.getLogger("autoround").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("autoround").removeHandler(self)


TARGET = Target(
    name="awq",
    extra="gptq",
    modules=("gptqmodel", "auto_round"),
    packages=("auto-round", "gptqmodel", "transformers", "torch"),
    precisions={
        "int4": Precision(
            "AWQ 4-bit, asymmetric, group 128 by default (--group-size 32/64/128, --sym)",
            bits=4.2,
            bound="int4",
            # Phi-4-mini's shape, 2 cores, 2026-12-06: 150 s per decoder layer with the clip search (two layers
            # timed), 1693 s for the whole export without it (1429 s in a second run, after the pread load)
            cpu_export_speed=7.8e5,
            cpu_speed_when=(({"clip": False}, 2.27e6),),
        ),
    },
    signature=Signature(quant_method="awq"),
    runtime="transformers + gptqmodel (managed environment)",
    tutorial="hf-gptq.md",
    library="transformers",
    default_precision="int4",
    export=export,
    open=hf_common.open_runtime,
    logits=hf_common.logits,
    # measured 2026-12-06, Phi-4-mini int4 --no-clip (bf16 7.15 GiB, nominal artifact 1.88 GiB): export 9.46 GiB at
    # the start (the source read without a memory map, whole, then freed block by block as AutoRound saves each),
    # smoke test 8.79 GiB, logits 8.83 GiB (gptqmodel's CPU kernel, as gptq's); 5.43 GiB for both on 2026-12-07
    # with the artifact read without a map (hf_common.load; a round-to-nearest checkpoint of the same format)
    memory=Memory(export=(1.0, 2.4), runtime=(2.0, 1.9), window_logits=0),
    options=(GROUP_SIZE, SYM, CLIP, DEVICE),
    check=check,
    environment="gptq",
    import_first=("gptqmodel",),  # 7.6 keeps llama_cpp's ImportError: see worker.import_toolchain
    # through the CLI on Phi-4-mini's shape (2026-12-07) the smoke test and logits after the export in its worker
    # read 6.79 GiB (AutoRound's memory held after it saves); in a fresh worker 5.44 / 5.47 GiB, the same fidelity
    export_apart=True,
)
