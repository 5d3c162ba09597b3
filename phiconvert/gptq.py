"""GPTQ, written out in plain torch: quantize a model's linear layers one decoder layer at a time, and pack them
in the GPTQ checkpoint layout (qweight / qzeros / scales / g_idx) that transformers + gptqmodel and vLLM read (the
ort-genai target repacks it into the ONNX Runtime GenAI model builder's Olive layout).

Written here rather than borrowed: AutoRound writes GPTQ-format files but runs SignRound and cannot order columns
by activation (``desc_act``), and gptqmodel splits Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` when saving,
which transformers then cannot load. Quantizing the fused layers as they are keeps the source's tensor names.

A model bigger than memory is quantized from a ``reference.SourceModel``: each decoder layer is read from disk in
float32, quantized, run on the calibration activations to feed the next one, and dropped, so the peak is one
layer and the calibration activations whatever the model's size. Round-to-nearest needs no activations at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert import __version__, progress
from phiconvert.errors import PhiconvertError

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


def quantize_model(
    model: Any,
    chunks: list[list[int]],
    settings_for: Callable[[str], Settings],
    device: str,
    rtn: bool = False,
    source: Any = None,
) -> tuple[dict[str, Packed], float | None]:
    """Quantize every linear layer of the decoder blocks, block by block on ``device``, each with
    ``settings_for(its name)`` (``model.layers.3.mlp.down_proj``).

    Each block sees the outputs of the already-quantized blocks before it (so later blocks correct earlier
    errors), and its weights are replaced by their dequantized values. ``model`` is an in-memory model, or, with
    ``source`` (a ``reference.SourceModel``), its skeleton: each block is then read from disk before its turn and
    dropped after. Round-to-nearest (``rtn``) runs no calibration at all. Returns the packed layers and the mean
    relative output error (None for round-to-nearest).
    """
    import torch

    layers = model.get_decoder().layers
    if source is not None:
        source.streaming = False  # this loop loads each layer, and must not have it reloaded after editing it
    inputs, kwargs = ([], []) if rtn else _block_inputs(model, chunks, source)
    packed: dict[str, Packed] = {}
    errors = []
    for index, block in enumerate(progress.track(layers, unit="layers", what="GPTQ" if not rtn else "round")):
        dtype = next(block.parameters()).dtype
        if source is not None:
            source.load_unit(block)
        block.to(device=device, dtype=torch.float32)
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        hessians = {} if rtn else _hessians(block, linears, inputs, kwargs, device)
        for name, linear in linears.items():
            full = f"model.layers.{index}.{name}"
            chosen = settings_for(full)
            weight = linear.weight.data.float()
            q, ints, scales, zeros, g_idx = quantize_weight(weight, hessians.get(name), chosen, rtn)
            if not rtn:
                hessian, delta = hessians[name], weight - q
                errors.append(float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum()))
            linear.weight.data = q
            packed[full] = pack(ints.cpu(), scales.cpu(), zeros.cpu(), g_idx.cpu(), chosen)
        del hessians
        if not rtn:
            inputs = _run_block(block, inputs, kwargs, device)
        if source is not None:
            source.release_unit(block)
        else:
            block.to(device="cpu", dtype=dtype)
    return packed, (float(np.mean(errors)) if errors else None)


class _Captured(Exception):
    """Raised by the hook on the first decoder block: everything needed to run the blocks has been recorded."""


def _block_inputs(model: Any, chunks: list[list[int]], source: Any = None):
    """Hidden states and keyword arguments (rotary embeddings, mask) entering the first decoder block."""
    import torch

    inputs, kwargs = [], []
    layers = model.get_decoder().layers

    def hook(module, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache", "hidden_states")})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            for ids in chunks:
                try:
                    (model.get_decoder() if source is not None else model)(torch.tensor([ids]), use_cache=False)
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
    """Pack unsigned ``bits``-bit integers of dim 0 into int32 words as one little-endian bit stream: value i at
    bit ``bits * i``. For 2, 4 and 8 bits that is whole values per word, the first in the lowest bits; a 3-bit
    value may straddle two words (32 values in 3 words: GPTQ's 10-1-10-1-10 layout)."""
    import torch

    count = values.shape[0]
    if count * bits % 32:
        raise PhiconvertError(f"{count} {bits}-bit values do not fill whole 32-bit words")
    v = values.to(torch.int64)
    start = torch.arange(count, dtype=torch.int64) * bits
    word, shift = start // 32, (start % 32).reshape(-1, *[1] * (v.dim() - 1))
    words = torch.zeros(count * bits // 32, *v.shape[1:], dtype=torch.int64)
    words.index_add_(0, word, (v << shift) & 0xFFFFFFFF)  # bits never overlap: adding is or-ing
    spill = (start % 32) + bits > 32
    if spill.any():  # the high bits of a value that crosses into the next word
        words.index_add_(0, word[spill] + 1, v[spill] >> (32 - shift[spill]))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: Any, bits: int) -> Any:
    """The inverse of ``_pack_rows`` for 2, 4 and 8 bits (whole values per word): (count * bits / 32, ...) int32
    words to (count, ...) int64 values."""
    import torch

    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64).reshape(1, per, *[1] * (words.dim() - 1))
    values = (words.to(torch.int64).unsqueeze(1) >> shifts) & (2**bits - 1)
    return values.reshape(words.shape[0] * per, *words.shape[1:])


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


def quantize_rows(tensor: Any, chosen: Settings) -> Packed:
    """Round-to-nearest of a large matrix on disk (an LM head: vocabulary x hidden), a slice of output rows at a
    time: each output row's groups are its own, so the slices pack side by side. Never the whole matrix in float32."""
    import torch

    from phiconvert import weights

    parts = []
    slices = weights.row_slices(tensor)
    for weight in progress.track(slices, weights.slice_count(tensor), unit="row slices", what="round-to-nearest"):
        _, ints, scales, zeros, g_idx = quantize_weight(weight, None, chosen, rtn=True)
        parts.append(pack(ints, scales, zeros, g_idx, chosen))
    return Packed(
        qweight=torch.cat([p.qweight for p in parts], dim=1),
        qzeros=torch.cat([p.qzeros for p in parts], dim=1),
        scales=torch.cat([p.scales for p in parts], dim=1),
        g_idx=parts[0].g_idx,
    )


PARTS = ("qweight", "qzeros", "scales", "g_idx")


def save(source: Path, output: Path, packed: dict[str, Packed], chosen: Settings) -> None:
    """Write a GPTQ (v1) checkpoint of ``packed``, every layer quantized with ``chosen``."""
    config = {
        "quant_method": "gptq",
        "bits": chosen.bits,
        "group_size": chosen.group_size,
        "desc_act": chosen.desc_act,
        "sym": chosen.sym,
        "damp_percent": DAMP,
        "true_sequential": False,
        "checkpoint_format": "gptq",
        "lm_head": "lm_head" in packed,
        "meta": {"quantizer": [f"phiconvert:{__version__}"]},
    }
    layers = {layer: {f"{layer}.{part}": getattr(p, part) for part in PARTS} for layer, p in packed.items()}
    write_checkpoint(source, output, layers, config)


def write_checkpoint(source: Path, output: Path, layers: dict[str, dict[str, Any]], quantization_config: dict,
                     leave_out: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Write model.safetensors (in place of each quantized layer of the source, the tensors ``layers`` names for
    it; every other tensor of the source in float16, but ``leave_out``) and config.json with
    ``quantization_config``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                layer = name.rsplit(".", 1)[0]
                seen.add(layer)
                if name in leave_out:
                    continue
                if layer in layers and name.endswith(".weight"):
                    tensors |= layers[layer]
                else:
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor.half() if tensor.is_floating_point() else tensor
    for layer in set(layers) - seen:  # a tied model's quantized LM head
        if layer != "lm_head":
            raise PhiconvertError(f"quantized layer {layer} is not in the source weights")
        tensors |= layers[layer]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(output / "model.safetensors"), {"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    config["quantization_config"] = quantization_config
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
