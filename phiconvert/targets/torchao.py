"""torchao checkpoints: 8da4w, the recipe of the PyTorch team's Phi-4-mini-instruct-8da4w (ExecuTorch / XNNPACK).

Linear layers (the LM head included): int8 dynamic per-token activations, int4 weights per group of 32, symmetric.
The input embedding: int8 weights per row. The tied embedding is untied first so the two can differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phiconvert import weights
from phiconvert.errors import PhiconvertError
from phiconvert.targets import GROUP_SIZE, SYM, ExportJob, Memory, Precision, Signature, Target, hf_common

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


def untied_copy(source: Path, work: Path) -> Path:
    """The source with its LM head a copy of the embedding instead of the same tensor, so each gets its own
    quantization (transformers re-ties the weights after a quantized load, which torchao's tensors cannot do).

    Written without loading the model: links to the source's files, one more file holding the head (the
    embedding's bytes), and an index and config that say so."""
    from safetensors.torch import save_file

    config = json.loads((source / "config.json").read_text())
    if not config.get("tie_word_embeddings"):
        return source
    folder = work / "untied"
    folder.mkdir()
    tensors = weights.index(source)
    # transformers reads a single `model.safetensors` before any index: a one-file source is linked as a shard
    shard_name = {f: f"source-{f.name}" for f in {t.file for t in tensors.values()}}
    for item in source.iterdir():
        if item.name not in ("config.json", "model.safetensors.index.json") and item not in shard_name:
            (folder / item.name).symlink_to(item.resolve())
    for file, name in shard_name.items():
        (folder / name).symlink_to(file.resolve())
    embedding = next(t for name, t in tensors.items() if name.endswith("embed_tokens.weight"))
    save_file({"lm_head.weight": weights.read_stored(embedding)}, str(folder / "lm_head.safetensors"))
    weight_map = {name: shard_name[t.file] for name, t in tensors.items()} | {"lm_head.weight": "lm_head.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    return folder


def save(model: Any, output: Path) -> None:
    """What ``model.save_pretrained(output)`` writes, one shard per decoder layer and per other module.

    transformers flattens torchao's tensors for safetensors all at once, and torchao's flattening clones each tensor
    it flattens: 4.6 GiB beside the 5.3 GiB quantized model on Phi-4-mini's shape. Flattened a shard at a time, the
    clones are one layer's. Every shard carries the whole model's metadata, as transformers' own shards do: its
    loader merges the files' metadata and rebuilds each tensor from the names listed there."""
    import re

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


def export(job: ExportJob) -> dict[str, Any]:
    import torch

    chosen = settings(job.options)
    model = hf_common.load_source(
        untied_copy(job.source, job.work),
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=quantization_config(chosen),
    )
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
    open=hf_common.open_runtime,
    logits=hf_common.logits,
    # measured 2026-12-06, Phi-4-mini 8da4w (nominal artifact 2.01 GiB, the checkpoint 4.71 GiB): export 9.91 and
    # 10.04 GiB (the quantized model, the embedding's float32 copy, and torchao's clone of every tensor it saves),
    # smoke test 11.79 GiB in 337 s for 48 tokens, logits 11.80 GiB (the mapped checkpoint and its loaded copy)
    memory=Memory(export=(1.4, 0.0), runtime=(5.5, 0.8)),
    options=(GROUP_SIZE, SYM),
    check=check,
)
