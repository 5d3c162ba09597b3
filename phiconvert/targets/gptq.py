"""GPTQ checkpoints (Hugging Face format: qweight / qzeros / scales / g_idx), quantized here with the GPTQ algorithm.

The quantizer is written out in this module (plain torch) rather than borrowed: AutoRound writes GPTQ-format files
but runs SignRound and cannot order columns by activation (``desc_act``), and gptqmodel splits Phi-3's fused
``qkv_proj`` / ``gate_up_proj`` when saving, which transformers then cannot load. Quantizing the fused layers as
they are keeps the checkpoint's tensor names those of the source model.

Loading a GPTQ checkpoint needs gptqmodel, whose transformers (>= 5.14) conflicts with optimum-intel's (< 5.6):
the worker runs in the managed environment `phiconvert setup gptq` creates (phiconvert/envs/gptq.txt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert import __version__
from phiconvert.errors import PhiconvertError
from phiconvert.targets import ExportJob, Target, hf_common

BITS = {"int4": 4, "int8": 8}
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
SEQUENCE_LENGTH = 512  # calibration chunk length (tokens)
MAX_SAMPLES = 128  # calibration chunks at most
DAMP = 0.01  # Hessian dampening, as a fraction of its mean diagonal
BLOCK = 128  # columns updated together (lazy batch updates); a multiple of every group size


@dataclass(frozen=True)
class Settings:
    bits: int
    group_size: int
    sym: bool
    desc_act: bool


@dataclass(frozen=True)
class Packed:
    """One linear layer in the GPTQ (v1) checkpoint layout."""

    qweight: Any  # int32 (in * bits / 32, out): input rows packed into 32-bit words, low bits first
    qzeros: Any  # int32 (groups, out * bits / 32): zero point minus one, packed along the output dim
    scales: Any  # float16 (groups, out)
    g_idx: Any  # int32 (in,): the group of each input column (a permutation of groups with desc_act)


def settings(precision: str, options: dict[str, Any]) -> Settings:
    group_size = options.get("group_size") or DEFAULT_GROUP_SIZE
    if group_size not in GROUP_SIZES:
        raise PhiconvertError(f"--group-size for gptq must be one of {', '.join(map(str, GROUP_SIZES))}")
    sym = True if options.get("sym") is None else bool(options["sym"])
    return Settings(bits=BITS[precision], group_size=group_size, sym=sym, desc_act=bool(options.get("desc_act")))


def check(precision: str, options: dict[str, Any]) -> None:
    settings(precision, options)
    hf_common.check_device(options.get("device"))


def export(job: ExportJob) -> dict[str, Any]:
    """Quantize the source with GPTQ on the calibration text and write the GPTQ checkpoint."""
    device = hf_common.resolve_device(job.options.get("device"))  # first: it sets up MPS before torch starts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chosen = settings(job.precision, job.options)
    tokenizer = AutoTokenizer.from_pretrained(job.source)
    # the source's dtype in memory (half of float32); each block is quantized in float32 on the device
    model = AutoModelForCausalLM.from_pretrained(job.source, dtype="auto").eval()
    chunks = hf_common.calibration_chunks(tokenizer, job.calibration, SEQUENCE_LENGTH, MAX_SAMPLES)
    packed, error = quantize_model(model, chunks, chosen, device)
    save(job.source, job.output, packed, chosen)
    hf_common.copy_support_files(job.source, job.output)
    return {
        "settings": {"bits": chosen.bits, "group_size": chosen.group_size, "sym": chosen.sym,
                     "desc_act": chosen.desc_act, "damp_percent": DAMP, "true_sequential": False,
                     "checkpoint_format": "gptq", "device": device},
        "calibration": {"chunks": len(chunks), "tokens_per_chunk": len(chunks[0])},
        "quantized_layers": len(packed),
        "kept_in_float16": ["model.embed_tokens", "lm_head", "norms"],
        "bits_per_weight": round(hf_common.bits_per_weight(job.output, job.source, list(packed)), 3),
        # mean over layers of ||X (W - Q)^T||^2 / ||X W^T||^2 on the calibration inputs: what GPTQ minimises
        "relative_output_error": error,
    }  # fmt: skip


def quantize_model(model: Any, chunks: list[list[int]], chosen: Settings, device: str, rtn: bool = False):
    """Quantize every linear layer of the decoder blocks, block by block on ``device``.

    Each block sees the outputs of the already-quantized blocks before it (so later blocks correct earlier
    errors), and its weights are replaced by their dequantized values in ``model``: afterwards a float32 ``model``
    computes exactly what the checkpoint will. Returns the packed layers and the mean relative output error.
    """
    import torch

    inputs, kwargs = _block_inputs(model, chunks)
    packed: dict[str, Packed] = {}
    errors = []
    for index, block in enumerate(model.model.layers):
        dtype = next(block.parameters()).dtype
        block.to(device=device, dtype=torch.float32)
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        hessians = _hessians(block, linears, inputs, kwargs, device)
        for name, linear in linears.items():
            hessian = hessians[name]
            weight = linear.weight.data.float()
            q, ints, scales, zeros, g_idx = quantize_weight(weight, hessian, chosen, rtn)
            delta = weight - q
            errors.append(float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum()))
            linear.weight.data = q
            packed[f"model.layers.{index}.{name}"] = pack(ints.cpu(), scales.cpu(), zeros.cpu(), g_idx.cpu(), chosen)
        del hessians
        inputs = _run_block(block, inputs, kwargs, device)
        block.to(device="cpu", dtype=dtype)
    return packed, float(np.mean(errors))


class _Captured(Exception):
    """Raised by the hook on the first decoder block: everything needed to run the blocks has been recorded."""


def _block_inputs(model: Any, chunks: list[list[int]]):
    """Hidden states and keyword arguments (rotary embeddings, mask) entering the first decoder block."""
    import torch

    inputs, kwargs = [], []

    def hook(module, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache", "hidden_states")})
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in chunks:
                try:
                    model(torch.tensor([ids]), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return inputs, kwargs


def _to(value: Any, device: str) -> Any:
    """A block's input on ``device``, floating point ones in float32 (blocks are quantized in float32)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32 if value.is_floating_point() else value.dtype)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _run_block(block: Any, inputs: list, kwargs: list[dict], device: str) -> list:
    import torch

    outputs = []
    with torch.no_grad():
        for x, kw in zip(inputs, kwargs, strict=True):
            out = block(_to(x, device), **{k: _to(v, device) for k, v in kw.items()})
            outputs.append((out[0] if isinstance(out, tuple) else out).to("cpu"))
    return outputs


def _hessians(block: Any, linears: dict[str, Any], inputs: list, kwargs: list[dict], device: str) -> dict[str, Any]:
    """X^T X of each linear layer's inputs over all calibration tokens (the GPTQ Hessian, up to a factor)."""
    import torch

    hessians = {n: torch.zeros(m.in_features, m.in_features, device=device) for n, m in linears.items()}

    def accumulate(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[name].addmm_(x.T, x)

        return hook

    handles = [m.register_forward_pre_hook(accumulate(n)) for n, m in linears.items()]
    try:
        _run_block(block, inputs, kwargs, device)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def group_params(x: Any, chosen: Settings):
    """Scale and integer zero point per output channel of a group of input rows ``x`` (..., group, out):
    min/max over the group, scales rounded to float16 as the checkpoint stores them."""
    import torch

    maxq = 2**chosen.bits - 1
    low = torch.clamp(x.min(dim=-2).values, max=0)
    high = torch.clamp(x.max(dim=-2).values, min=0)
    if chosen.sym:
        high = torch.maximum(-low, high)
        low = -high
    flat = (high - low) == 0
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scale = ((high - low) / maxq).half().float()  # what the checkpoint stores, so dequantized == loaded
    zero = torch.full_like(scale, (maxq + 1) // 2) if chosen.sym else torch.round(-low / scale).clamp(0, maxq)
    return scale, zero


def quantize_weight(weight: Any, hessian: Any, chosen: Settings, rtn: bool = False):
    """GPTQ: quantize columns one at a time, pushing each column's error onto the not-yet-quantized columns
    through the inverse Hessian (Cholesky form); with ``desc_act`` in decreasing order of activation energy.

    Returns (dequantized weight, integer weight, scales (groups, out), zeros (groups, out), g_idx), all in the
    original column order. ``rtn`` skips the error feedback: plain round-to-nearest with the same groups.
    """
    import torch

    maxq = 2**chosen.bits - 1
    out_features, in_features = weight.shape
    group = chosen.group_size
    if in_features % group:
        raise PhiconvertError(f"--group-size {group} does not divide a layer's input size {in_features}")
    w = weight.clone()
    perm = torch.arange(in_features, device=w.device)
    hinv = None
    if not rtn:
        h = hessian.clone()
        dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
        h[dead, dead] = 1
        w[:, dead] = 0
        if chosen.desc_act:
            perm = torch.argsort(torch.diag(h), descending=True)
            w, h = w[:, perm], h[perm][:, perm]
        h += DAMP * torch.mean(torch.diag(h)) * torch.eye(in_features, device=w.device)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    # rows of the transposed weight are the input columns, in quantization order: each one contiguous in memory
    wt = w.T.contiguous()
    rows = torch.arange(in_features, device=w.device) // group
    if hinv is None:
        scales, zeros = group_params(wt.reshape(-1, group, out_features), chosen)
        ints = torch.clamp(torch.round(wt / scales[rows]) + zeros[rows], 0, maxq)
        q = scales[rows] * (ints - zeros[rows])
    else:
        q, ints = torch.zeros_like(wt), torch.zeros_like(wt)
        scales = torch.zeros(in_features // group, out_features, device=w.device)
        zeros = torch.zeros_like(scales)
        for start in range(0, in_features, BLOCK):
            end = min(start + BLOCK, in_features)
            block = wt[start:end].clone()
            errors = torch.zeros_like(block)
            for i in range(end - start):
                row = start + i
                if row % group == 0:
                    scales[row // group], zeros[row // group] = group_params(block[i : i + group], chosen)
                scale, zero = scales[row // group], zeros[row // group]
                ints[row] = torch.clamp(torch.round(block[i] / scale) + zero, 0, maxq)
                q[row] = scale * (ints[row] - zero)
                errors[i] = (block[i] - q[row]) / hinv[row, row]
                block[i:] -= hinv[row, row:end, None] * errors[i]
            wt[end:] -= hinv[start:end, end:].T @ errors

    inverse = torch.argsort(perm)
    g_idx = (inverse // group).to(torch.int32)  # column c sits at position inverse[c] of the quantization order
    return q[inverse].T, ints[inverse].T, scales, zeros, g_idx


def _pack_rows(values: Any, bits: int) -> Any:
    """Pack unsigned ``bits``-bit integers of dim 0 into int32 words, the first value in the lowest bits."""
    import torch

    per_word = 32 // bits
    rows = values.to(torch.int64).reshape(values.shape[0] // per_word, per_word, *values.shape[1:])
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).reshape(1, per_word, *[1] * (values.dim() - 1))
    words = (rows << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(ints: Any, scales: Any, zeros: Any, g_idx: Any, chosen: Settings) -> Packed:
    import torch

    maxq = 2**chosen.bits - 1
    # v1 ("gptq") checkpoints store zero - 1 (wrapping at the bit width), the layout every GPTQ loader reads
    stored_zeros = (zeros.to(torch.int64) - 1) & maxq
    return Packed(
        qweight=_pack_rows(ints.T.contiguous(), chosen.bits),
        qzeros=_pack_rows(stored_zeros.T.contiguous(), chosen.bits).T.contiguous(),
        scales=scales.half().contiguous(),
        g_idx=g_idx.contiguous(),
    )


def save(source: Path, output: Path, packed: dict[str, Packed], chosen: Settings) -> None:
    """Write model.safetensors (packed layers; every other tensor of the source in float16) and config.json."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                layer = name.rsplit(".", 1)[0]
                if layer in packed and name.endswith(".weight"):
                    for part in ("qweight", "qzeros", "scales", "g_idx"):
                        tensors[f"{layer}.{part}"] = getattr(packed[layer], part)
                else:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor.half() if tensor.is_floating_point() else tensor
    missing = set(packed) - {name.rsplit(".", 1)[0] for name in tensors}
    if missing:
        raise PhiconvertError(f"quantized layers not found in the source weights: {', '.join(sorted(missing))}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(output / "model.safetensors"), {"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": chosen.bits,
        "group_size": chosen.group_size,
        "desc_act": chosen.desc_act,
        "sym": chosen.sym,
        "damp_percent": DAMP,
        "true_sequential": False,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": [f"phiconvert:{__version__}"]},
    }
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


TARGET = Target(
    name="gptq",
    extra="gptq",
    modules=("gptqmodel", "optimum"),
    packages=("gptqmodel", "optimum", "transformers", "torch"),
    precisions=("int4", "int8"),
    default_precision="int4",
    export=export,
    smoke=hf_common.smoke,
    logits=hf_common.logits,
    runner=hf_common.runner,
    options=("group_size", "sym", "desc_act", "device"),
    check=check,
    environment="gptq",
    notes={
        "int4": "GPTQ 4-bit, symmetric, group 128 by default (--group-size 32/64/128, --asym, --desc-act)",
        "int8": "GPTQ 8-bit, symmetric, group 128 by default",
    },
)
