"""GPTQ checkpoints (Hugging Face format: qweight / qzeros / scales / g_idx), quantized with phiconvert's GPTQ
(``phiconvert.gptq``: fused layers kept fused, one decoder layer in memory at a time), or with ``--method autoround``
by AutoRound's SignRound (the ``auto-round`` package: rounding and clipping tuned by signed gradient descent over
``--iters`` steps on the calibration text, a decoder block at a time) and written in the same GPTQ format.

Loading a GPTQ checkpoint needs gptqmodel, whose transformers (>= 5.14) conflicts with optimum-intel's (< 5.6):
the worker runs in the managed environment `phiconvert setup gptq` creates (phiconvert/envs/gptq.txt).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from phiconvert.errors import PhiconvertError
from phiconvert.gptq import DAMP, Settings, quantize_model, save
from phiconvert.reference import SourceModel
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

BITS = {"int4": 4, "int8": 8, "int3": 3, "int2": 2}
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
SEQUENCE_LENGTH = 512  # calibration chunk length (tokens)
MAX_SAMPLES = 128  # calibration chunks at most
METHODS = ("gptq", "autoround")
# AutoRound's defaults are sized for a GPU (200 iterations on 128 samples of 2048 tokens); on a CPU its "light"
# recipe's 50 iterations on GPTQ's 128 x 512 tokens keep most of the gain at a quarter of the time
AUTOROUND = {"iters": 50, "nsamples": MAX_SAMPLES, "seqlen": SEQUENCE_LENGTH}


def settings(precision: str, options: dict[str, Any], inputs: tuple[int, ...] = ()) -> Settings:
    """The user's settings over the defaults; with the layers' ``inputs`` sizes known, a default group size that
    does not divide one of them becomes the largest that divides them all (a size the user chose is refused)."""
    group_size = options.get("group_size") or hf_common.fitting_group_size(inputs, DEFAULT_GROUP_SIZE, "gptq")
    if options.get("group_size") and group_size not in GROUP_SIZES:
        raise PhiconvertError(f"--group-size for gptq must be one of {', '.join(map(str, GROUP_SIZES))}")
    sym = True if options.get("sym") is None else bool(options["sym"])
    return Settings(bits=BITS[precision], group_size=group_size, sym=sym, desc_act=bool(options.get("desc_act")))


def check(precision: str, options: dict[str, Any]) -> None:
    chosen = settings(precision, options)
    hf_common.check_device(options.get("device"))
    if options.get("method") == "autoround":
        if chosen.desc_act:
            raise PhiconvertError("--desc-act applies to --method gptq: AutoRound does not reorder columns")
        for name in AUTOROUND:
            if options.get(name) is not None and options[name] < 1:
                raise PhiconvertError(f"--{name} must be at least 1, not {options[name]}")
    else:
        given = next((name for name in AUTOROUND if options.get(name) is not None), None)
        if given:
            raise PhiconvertError(f"--{given} applies to --method autoround")


def export(job: ExportJob) -> dict[str, Any]:
    if job.options.get("method") == "autoround":
        return export_autoround(job)
    return export_gptq(job)


def export_gptq(job: ExportJob) -> dict[str, Any]:
    """Quantize the source with GPTQ on the calibration text and write the GPTQ checkpoint."""
    device = hf_common.resolve_device(job.options.get("device"))  # first: it sets up MPS before torch starts
    from transformers import AutoTokenizer

    inputs = hf_common.layer_inputs(job.source)
    chosen = settings(job.precision, job.options, inputs)
    tokenizer = AutoTokenizer.from_pretrained(job.source)
    # one decoder layer at a time, read from disk in float32: the model is never whole in memory
    source = SourceModel(job.source)
    chunks = hf_common.calibration_chunks(tokenizer, job.calibration, SEQUENCE_LENGTH, MAX_SAMPLES)
    packed, error = quantize_model(source.model, chunks, lambda name: chosen, device, source=source)
    save(job.source, job.output, packed, chosen)
    hf_common.copy_support_files(job.source, job.output)
    return {
        "method": "gptq (phiconvert.gptq)",
        "settings": {"bits": chosen.bits, "group_size": chosen.group_size, "sym": chosen.sym,
                     "desc_act": chosen.desc_act, "damp_percent": DAMP, "true_sequential": False,
                     "checkpoint_format": "gptq", "device": device},
        "group_size_note": hf_common.group_size_note(chosen.group_size, DEFAULT_GROUP_SIZE, job.options, inputs),
        "calibration": {"chunks": len(chunks), "tokens_per_chunk": len(chunks[0])},
        "quantized_layers": len(packed),
        "kept_in_float16": ["model.embed_tokens", "lm_head", "norms"],
        "bits_per_weight": round(hf_common.bits_per_weight(job.output, job.source, list(packed)), 3),
        # mean over layers of ||X (W - Q)^T||^2 / ||X W^T||^2 on the calibration inputs: what GPTQ minimises
        "relative_output_error": error,
    }  # fmt: skip


def export_autoround(job: ExportJob) -> dict[str, Any]:
    """Quantize the source with AutoRound's SignRound and write it as a GPTQ checkpoint (AutoRound's own export)."""
    device = hf_common.resolve_device(job.options.get("device"))  # first: it sets up MPS before torch starts
    from transformers import AutoTokenizer

    inputs = hf_common.layer_inputs(job.source)
    chosen = settings(job.precision, job.options, inputs)
    rounds = {name: job.options.get(name) or default for name, default in AUTOROUND.items()}
    tokenizer = AutoTokenizer.from_pretrained(job.source)
    chunks = hf_common.calibration_chunks(tokenizer, job.calibration, rounds["seqlen"], rounds["nsamples"])
    config, layers = hf_common.autoround(job, tokenizer, chunks, "auto_gptq", scheme=f"W{chosen.bits}A16",
                                         bits=chosen.bits, group_size=chosen.group_size, sym=chosen.sym,
                                         iters=rounds["iters"], device_map=device)  # fmt: skip
    return {
        "method": "autoround (SignRound, auto-round package), exported as GPTQ",
        "settings": {k: config.get(k) for k in ("bits", "group_size", "sym", "desc_act", "checkpoint_format")}
        | {"iters": rounds["iters"], "device": device},
        "group_size_note": hf_common.group_size_note(chosen.group_size, DEFAULT_GROUP_SIZE, job.options, inputs),
        "calibration": {"chunks": len(chunks), "tokens_per_chunk": len(chunks[0])},
        "kept_in_float16": ["model.embed_tokens", "lm_head", *(config.get("modules_to_not_convert") or []), "norms"],
        "bits_per_weight": round(hf_common.bits_per_weight(job.output, job.source, layers), 3),
    }


# measured on Phi-4-mini int4 (bf16 7.15 GiB, nominal artifact 1.88 GiB) through the CLI on 2026-12-07: export 5.01
# GiB (4.92 on 2026-12-04), one layer in memory at a time (linear in the size here, which overstates a larger
# model); smoke test 4.97 GiB, logits 5.54 GiB with both windows: the float32 embedding and the int4 weights, which
# gptqmodel's CPU kernel repacks on the first forward (7.5-7.97 GiB when the load mapped the file, whose pages stayed
# beside the repacked copies; 4.95 GiB in a fresh process on a round-to-nearest checkpoint of the same format)
MEMORY = Memory(export=(0.55, 1.2), runtime=(1.8, 2.3), window_logits=0)

TARGET = Target(
    name="gptq",
    extra="gptq",
    modules=("gptqmodel", "optimum"),
    packages=("gptqmodel", "auto-round", "optimum", "transformers", "torch"),
    precisions={
        "int4": Precision(
            "GPTQ 4-bit, symmetric, group 128 by default (--group-size 32/64/128, --asym, --desc-act)",
            bits=4.2,
            bound="int4",
            cpu_export_speed=2.3e6,  # Phi-4-mini's shape, 2 cores, 2026-12-04: 1686 s
            # --method autoround: ~300 s per block on the same shape (2026-12-06, three blocks timed), ~2.7 h
            cpu_speed_when=(({"method": "autoround"}, 4.0e5),),
        ),
        "int8": Precision("GPTQ 8-bit, symmetric, group 128 by default", bits=8.2, bound="int8"),
        "int3": Precision(
            "GPTQ 3-bit (32 values in 3 words), symmetric, group 128 by default",
            bits=3.2,
            bound="int3",
            experimental=True,
        ),
        "int2": Precision(
            "GPTQ 2-bit, symmetric, group 128 by default: most models lose much of their quality",
            bits=2.2,
            bound="int2",
            experimental=True,
        ),
    },
    signature=Signature(quant_method="gptq"),
    runtime="transformers + gptqmodel (managed environment)",
    tutorial="hf-gptq.md",
    library="transformers",
    default_precision="int4",
    export=export,
    open=hf_common.open_runtime,
    logits=hf_common.logits,
    memory=MEMORY,
    # --method autoround hands AutoRound the whole bf16 model (hf_common.autoround), which tunes it block by block
    # on 128 x 512 tokens: 10.65 GiB at the first block, measured 2026-12-06 on the same shape over its first three
    # blocks (then stopped: ~300 s per block, ~2.7 h for the model on 2 cores); the artifact and its runtime are gptq's
    memory_when=(({"method": "autoround"}, replace(MEMORY, export=(1.0, 3.6))),),
    options=(
        GROUP_SIZE,
        SYM,
        Option("desc_act", "quantize columns in order of decreasing activation (act-order)", bool),
        Option(
            "method",
            "gptq (default: phiconvert's GPTQ) or autoround (AutoRound's SignRound, GPTQ format)",
            choices=METHODS,
        ),  # fmt: skip
        Option("iters", f"AutoRound tuning steps per block (default {AUTOROUND['iters']})", int),
        Option("nsamples", f"AutoRound calibration samples (default {AUTOROUND['nsamples']})", int),
        Option("seqlen", f"AutoRound calibration sample length in tokens (default {AUTOROUND['seqlen']})", int),
        DEVICE,
    ),
    check=check,
    environment="gptq",
    import_first=("gptqmodel",),  # 7.6 keeps llama_cpp's ImportError: see worker.import_toolchain
)
