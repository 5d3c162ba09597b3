"""torchao checkpoints: 8da4w, the recipe of the PyTorch team's Phi-4-mini-instruct-8da4w (ExecuTorch / XNNPACK).

Linear layers (the LM head included): int8 dynamic per-token activations, int4 weights per group of 32, symmetric.
The input embedding: int8 weights per row. A tied LM head is quantized from the embedding's weights as a linear layer,
so the two differ (transformers re-ties the weights after a quantized load, which torchao's tensors cannot do).
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

from phiconvert import progress, weights
from phiconvert.errors import PhiconvertError
from phiconvert.targets import (
    GROUP_SIZE,
    SYM,
    ExportJob,
    Memory,
    Precision,
    Signature,
    Target,
    hf_common,
)

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32


def settings(options: dict[str, Any]) -> dict[str, Any]:
    group_size = options.get("group_size") or DEFAULT_GROUP_SIZE
    if group_size not in GROUP_SIZES:
        raise PhiconvertError(f"--group-size for torchao must be one of {', '.join(map(str, GROUP_SIZES))}")
    return {"group_size": group_size, "sym": True if options.get("sym") is None else bool(options["sym"])}


def check(precision: str, options: dict[str, Any]) -> None:
    settings(options)


def quantization_config(chosen: dict[str, Any]) -> Any:
    import torch
    from torchao.quantization import FqnToConfig, Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType
    from transformers import TorchAoConfig

    linear = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4,
        weight_granularity=PerGroup(chosen["group_size"]),
        weight_mapping_type=MappingType.SYMMETRIC if chosen["sym"] else MappingType.ASYMMETRIC,
    )
    embedding = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    return TorchAoConfig(
        # transformers applies a module's config to each of its parameters as it loads them: a projection's bias
        # (Qwen2's q/k/v) must be named first and left alone, or it is "quantized" as a 1-D weight and fails
        quant_type=FqnToConfig(
            {
                "model.embed_tokens": embedding,
                "lm_head": linear,
                r"re:model\.layers\.\d+\..*_proj\.bias": None,
                r"re:model\.layers\.\d+\..*_proj": linear,
            }  # fmt: skip
        ),
        include_input_output_embeddings=True,
        modules_to_not_convert=[],
    )


def config_for(name: str, configs: dict[str, Any]) -> Any:
    """The config an FqnToConfig mapping gives module ``name``'s weight, picked as transformers' loader picks it: the
    module's own name, else the first regex ("re:" keys) matching the weight's or the module's whole name."""
    if name in configs:
        return configs[name]
    for key, config in configs.items():
        if key.startswith("re:") and (re.fullmatch(key[3:], f"{name}.weight") or re.fullmatch(key[3:], name)):
            return config
    return None


def quantize(source: Path, chosen: dict[str, Any], slice_rows: int = weights.SLICE_ROWS) -> Any:
    """The source as transformers' torchao quantize-on-load makes it (float32, then torchao's ``quantize_`` with
    each module's config, the LM head untied from the embedding so each gets its own), built a module at a time
    from the safetensors and each weight quantized ``slice_rows`` output rows at a time.

    transformers quantizes a whole weight at once, and torchao's ``quantize_affine`` holds two float32 temporaries
    of it: Phi-4-mini's 200064 x 3072 embedding and head each took the export to 8 GiB. Both configs quantize rows
    independently (per row, or per group within a row), so slices give the same values (tested against
    transformers' own load)."""
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    settings = quantization_config(chosen)
    configs = settings.quant_type.fqn_to_config
    config = AutoConfig.from_pretrained(source)
    config.tie_word_embeddings = False
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    model.config.quantization_config = settings
    if (source / "generation_config.json").exists():  # the end-of-turn ids, which the config alone does not carry
        model.generation_config = GenerationConfig.from_pretrained(source)
    stored = weights.index(source)
    head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
    embedding = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
    modules = [(name, module) for name, module in model.named_modules() if list(module.parameters(recurse=False))]
    for name, module in progress.track(modules, unit="modules", what="quantizing"):
        for key, _ in list(module.named_parameters(recurse=False)):
            full = f"{name}.{key}"
            tensor = stored.get(full) or (stored.get(f"{embedding}.weight") if full == f"{head}.weight" else None)
            if tensor is None:
                raise PhiconvertError(f"the checkpoint has no tensor {full}")
            module_config = config_for(name, configs) if key == "weight" else None
            if module_config is None:
                setattr(module, key, torch.nn.Parameter(weights.read_torch(tensor), requires_grad=False))
            else:
                module.weight = torch.nn.Parameter(quantized_rows(module, tensor, module_config, slice_rows),
                                                   requires_grad=False)  # fmt: skip
    unloaded = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if unloaded:
        raise PhiconvertError(f"torchao export: the checkpoint does not fill {', '.join(unloaded[:3])}")
    return model


def quantized_rows(module: Any, tensor: weights.Tensor, config: Any, slice_rows: int) -> Any:
    """``tensor`` quantized for ``module`` (an embedding or a linear) by torchao's ``quantize_`` with ``config``,
    ``slice_rows`` rows at a time, the slices' data joined into one tensor of torchao's type."""
    import torch
    from torchao.quantization import quantize_

    pieces = []
    for part in weights.row_slices(tensor, slice_rows):
        if isinstance(module, torch.nn.Embedding):
            piece = torch.nn.Embedding(*part.shape, device="meta")
        else:
            piece = torch.nn.Linear(part.shape[1], part.shape[0], bias=False, device="meta")
        piece.weight = torch.nn.Parameter(part, requires_grad=False)
        quantize_(piece, config, lambda *_: True)
        pieces.append(piece.weight)
    first = pieces[0]
    if len(pieces) == 1:
        return first
    return type(first)(*(torch.cat([getattr(p, n) for p in pieces]) for n in first.tensor_data_names),
                       *(getattr(first, a) for a in first.tensor_attribute_names))  # fmt: skip


def save(model: Any, output: Path) -> None:
    """What ``model.save_pretrained(output)`` writes, one shard per decoder layer and per other module.

    transformers flattens torchao's tensors for safetensors all at once, and torchao's flattening clones each tensor
    it flattens: 4.6 GiB beside the 5.3 GiB quantized model on Phi-4-mini's shape. Flattened a shard at a time, the
    clones are one layer's. Every shard carries the whole model's metadata, as transformers' own shards do: its
    loader merges the files' metadata and rebuilds each tensor from the names listed there."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    output.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    shards: dict[str, list[str]] = {}
    for name in state:
        layer = re.match(r"(.*\.layers\.\d+)\.", name)
        shards.setdefault(layer.group(1) if layer else name.rsplit(".", 1)[0], []).append(name)
    metadata = {"format": "pt"}
    for names in shards.values():  # the metadata first (each shard's clones dropped at once): every file carries it
        metadata |= flatten_tensor_state_dict({name: state[name] for name in names})[1]
    metadata["tensor_names"] = json.dumps(list(state))
    weight_map, total = {}, 0
    for number, names in enumerate(shards.values(), 1):
        data = flatten_tensor_state_dict({name: state[name] for name in names})[0]
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(data, str(output / file), metadata=metadata)
        weight_map |= dict.fromkeys(data, file)
        total += sum(tensor.nbytes for tensor in data.values())
        del data
    index = {"metadata": {"total_parameters": model.num_parameters(), "total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(output)
    model.generation_config.save_pretrained(output)


def load(artifact: Path, rows: int = weights.SLICE_ROWS) -> Any:
    """The checkpoint as transformers loads it, its embedding and LM head applied ``rows`` rows of their weights at
    a time (a module that overrides its class's forward, as Gemma's scaled embedding does, is left whole).

    torchao's embedding and linear dequantize their whole weight to float32 on every call: Phi-4-mini's 200064-row
    embedding and head each made a 2.3 GiB float32 copy, with the dequantization's temporaries beside it, on every
    token. Both are quantized per row (or per group within a row), so a slice dequantizes to the same values.
    Through transformers' memory map: it rebuilds torchao's tensors with metadata it reads from the files only."""
    import torch

    model = hf_common.load(artifact, mapped=True)
    for module, by_rows in (
        (model.get_input_embeddings(), embedding_rows),
        (model.get_output_embeddings(), linear_rows),
    ):
        if type(module).forward in (torch.nn.Embedding.forward, torch.nn.Linear.forward):
            module.forward = partial(by_rows, module, rows)
    return model


def embedding_rows(module: Any, rows: int, ids: Any) -> Any:
    """``module(ids)``, dequantizing only the slices of ``rows`` rows that hold one of the ids."""
    import torch

    flat, weight = ids.reshape(-1), module.weight
    out = torch.empty(flat.numel(), weight.shape[1], dtype=weight.dtype)
    for start in range(0, weight.shape[0], rows):
        inside = (flat >= start) & (flat < start + rows)
        if inside.any():
            out[inside] = torch.nn.functional.embedding(flat[inside] - start, weight[start : start + rows])
    return out.reshape(*ids.shape, -1)


def linear_rows(module: Any, rows: int, hidden: Any) -> Any:
    """``module(hidden)``, ``rows`` output features (rows of the weight) at a time."""
    import torch

    weight, bias = module.weight, module.bias
    out = torch.empty(*hidden.shape[:-1], weight.shape[0], dtype=hidden.dtype)
    for start in range(0, weight.shape[0], rows):
        end = start + rows
        out[..., start:end] = torch.nn.functional.linear(
            hidden, weight[start:end], None if bias is None else bias[start:end]
        )
    return out


def export(job: ExportJob) -> dict[str, Any]:
    chosen = settings(job.options)
    model = quantize(job.source, chosen)
    save(model, job.output)
    hf_common.hub_layout_config(job.output)
    hf_common.copy_support_files(job.source, job.output)
    layers = hf_common.linear_names(job.source)
    return {
        "settings": {"linear": f"int8 dynamic activations, int4 weights per group {chosen['group_size']}, "
                     f"{'symmetric' if chosen['sym'] else 'asymmetric'}", "embedding": "int8 weights per row",
                     "lm_head": "as the linear layers (untied from the embedding)"},
        "quantized_layers": len(layers) + 2,
        "bits_per_weight": round(hf_common.bits_per_weight(job.output, job.source, layers), 3),
    }  # fmt: skip


TARGET = Target(
    name="torchao",
    extra="torchao",
    modules=("torchao",),
    packages=("torchao", "transformers", "torch"),
    precisions={
        "8da4w": Precision(
            "int8 dynamic activations + int4 weights per group of 32; int8 embeddings (ExecuTorch recipe)",
            bits=4.5,
            bound="int4",
        ),
    },
    signature=Signature(quant_method="torchao"),
    runtime="transformers + torchao",
    tutorial="hf-gptq.md",
    library="transformers",
    default_precision="8da4w",
    export=export,
    open=partial(hf_common.open_runtime, loader=load),
    logits=partial(hf_common.logits, loader=load),
    # measured on Phi-4-mini 8da4w in one `--verify quick` run of 2026-12-07 (nominal artifact 2.01 GiB, the
    # checkpoint 4.71 GiB: torchao keeps an int4 value in a byte): export 6.08 GiB (the quantized model, 0.58x the
    # source, a module's float32 slice and a shard's clones; 18.26 GiB on Phi-4's shape, outside a worker); smoke
    # test 6.28 GiB, logits 6.43 GiB (the mapped checkpoint as it is read, the embedding and head by rows, the
    # export's leftover in the same worker; 11.4-12.2 GiB when they were dequantized whole at every call)
    # the shards are the artifact, 2.34x its nominal bytes on Phi-4-mini's shape (an int4 value in a byte)
    memory=Memory(export=(0.65, 1.75), runtime=(2.35, 1.6), scratch=0, stored=2.35),
    # 2026-12-07, on huge pages: 448 prompt tokens in 33 s (Phi-4-mini) and 126 s (Phi-4); 48 new tokens in 166 s
    # and 796 s: Phi-4's 48-token smoke test takes 13 minutes
    linux_cpu_speed=(5.2e10, 9e8),
    # PyTorch's CPU allocator asks for huge pages for tensors of 2 MB and more: torchao dequantizes every weight at
    # every call into new float32 tensors, each page of which the kernel otherwise faults in and zeroes 4 KiB at a
    # time. Phi-4-mini (2026-12-07): export 54.6 -> 25.1 s; a fresh runtime 12.7-14.5 -> 3.2-4.0 s per token
    env={"THP_MEM_ALLOC_ENABLE": "1"},
    options=(GROUP_SIZE, SYM),
    check=check,
)
