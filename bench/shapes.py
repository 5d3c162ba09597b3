"""Random-weight checkpoints with the exact shapes of real Phi models, written without instantiating a model.

Real-size conversions are judged by time and memory, and those depend on shapes alone: every tensor of
Phi-4-mini (3.84 B parameters, 7.15 GiB in bf16) or Phi-4 (14.7 B, 27.3 GiB) is streamed into safetensors shards
from a seeded generator, a few MiB at a time. The tokenizer is the bundled tiny-phi4mini's byte-level BPE grown
with synthetic merges to the real vocabulary size, so every id the model can emit is a real token of the tokenizer
(a model vocabulary larger than its tokenizer crashes some runtimes' detokenizers) and the chat template and
end-of-turn token are Phi-4-mini's.

    python bench/shapes.py phi4-mini OUT_FOLDER
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "phiconvert" / "fixtures" / "tiny-phi4mini"
SHARD_BYTES = 5 * 10**9  # the Hub's usual shard size

# The published configs' dimensions (microsoft/Phi-4-mini-instruct, microsoft/phi-4), and a tiny shape for CI.
SHAPES = {
    "phi4-mini": {
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
        "num_key_value_heads": 8, "vocab_size": 200064, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
        "sliding_window": 262144, "tie_word_embeddings": True, "longrope": True,
    },
    "phi4": {
        "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40, "num_attention_heads": 40,
        "num_key_value_heads": 10, "vocab_size": 100352, "max_position_embeddings": 16384,
        "original_max_position_embeddings": 16384, "rope_theta": 250000.0, "sliding_window": None,
        "tie_word_embeddings": False, "longrope": False,
    },
    "tiny": {  # Phi-4-mini's features at a size CI converts in seconds
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 8192, "max_position_embeddings": 1024,
        "original_max_position_embeddings": 128, "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
        "sliding_window": 262144, "tie_word_embeddings": True, "longrope": True,
    },
}  # fmt: skip


def config(shape: str) -> dict:
    """A hub-layout Phi3ForCausalLM config of ``shape`` (special token ids: the bundled tokenizer's)."""
    dims = dict(SHAPES[shape])
    longrope = dims.pop("longrope")
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    half = int(dims.get("partial_rotary_factor", 1.0) * head_dim) // 2
    scaling = None
    if longrope:  # factor ramps like the published ones: short near 1, long up to tens
        scaling = {
            "type": "longrope",
            "short_factor": [round(1.0 + 0.2 * i / (half - 1), 4) for i in range(half)],
            "long_factor": [round(1.0 + 30.0 * (i / (half - 1)) ** 2, 4) for i in range(half)],
        }
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", **dims, "rope_scaling": scaling,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": 3500, "eos_token_id": 3500, "pad_token_id": 3500, "use_cache": True,
    }  # fmt: skip


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Phi3ForCausalLM's tensors (fused qkv_proj and gate_up_proj; no lm_head when tied)."""
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim, inter = hidden // heads, cfg["intermediate_size"]
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv) * head_dim, hidden)
        out[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
        out[p + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, inter)
    out["model.norm.weight"] = (hidden,)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (cfg["vocab_size"], hidden)
    return out


def _write_shard(path: Path, tensors: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """One safetensors file, header first, then each tensor's bf16 bytes in 16 Mi-element pieces."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in tensors.values():
            remaining = int(np.prod(shape))
            # norms near 1 as trained models have them; weights small, so activations stay finite over 40 layers
            scale, mean = (np.float32(0.02), np.float32(1.0)) if len(shape) == 1 else (np.float32(0.02), 0)
            while remaining:
                n = min(remaining, 1 << 24)
                values = rng.standard_normal(n, dtype=np.float32) * scale + mean
                (values.view(np.uint32) >> 16).astype(np.uint16).tofile(f)
                remaining -= n


def grow_tokenizer(tokenizer: dict, vocab_size: int) -> dict[int, int]:
    """Grow the byte-level BPE (in place) with synthetic merges of pairs of existing tokens until ``vocab_size``
    ids, moving its added (special) tokens to the last ids, as real Phi tokenizers have them, with no hole between:
    some runtimes' tokenizers fail on a vocabulary with holes. Returns the special tokens' new ids by old id."""
    model, added = tokenizer["model"], tokenizer["added_tokens"]
    vocab, merges = model["vocab"], model["merges"]
    taken = set(vocab) | {t["content"] for t in added}
    next_id = max(vocab.values()) + 1
    base = sorted(vocab, key=vocab.get)[:1024]
    pairs = ((a, b) for a in base for b in base if a + b not in taken)
    while next_id < vocab_size - len(added):
        a, b = next(pairs)
        vocab[a + b] = next_id
        merges.append([a, b])
        next_id += 1
    moved = {}
    for token in sorted(added, key=lambda t: t["id"]):
        moved[token["id"]] = next_id
        token["id"] = next_id
        next_id += 1
    return moved


def write_checkpoint(shape: str, folder: Path) -> int:
    """Write ``shape``'s checkpoint (shards + index when over one shard) into ``folder``; returns its parameters."""
    cfg = config(shape)
    tensors = tensor_shapes(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, dims in tensors.items():
        nbytes = 2 * int(np.prod(dims))
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = dims
        size += nbytes
    rng = np.random.default_rng(0)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    for name, shard in zip(names, shards, strict=True):
        _write_shard(folder / name, shard, rng)
    if len(shards) > 1:
        index = {"metadata": {"total_size": 2 * sum(int(np.prod(s)) for s in tensors.values())},
                 "weight_map": {t: n for n, shard in zip(names, shards, strict=True) for t in shard}}  # fmt: skip
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_tokenizer(cfg, folder)
    return sum(int(np.prod(s)) for s in tensors.values())


def write_tokenizer(cfg: dict, folder: Path) -> None:
    """The tokenizer grown to the config's vocabulary, the generation config and config.json, with the special
    tokens' ids where the grown tokenizer has them."""
    tokenizer = json.loads((FIXTURE / "tokenizer.json").read_text())
    moved = grow_tokenizer(tokenizer, cfg["vocab_size"])
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    settings = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    settings["added_tokens_decoder"] = {str(moved[int(k)]): v for k, v in settings["added_tokens_decoder"].items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    generation = json.loads((FIXTURE / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = generation[key]
        generation[key] = [moved[v] for v in value] if isinstance(value, list) else moved[value]
        cfg[key] = moved[cfg[key]]
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(FIXTURE / "chat_template.jinja", folder / "chat_template.jinja")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SHAPES:
        sys.exit(f"usage: python bench/shapes.py {{{','.join(SHAPES)}}} OUT_FOLDER")
    print(f"{write_checkpoint(sys.argv[1], Path(sys.argv[2])):,} parameters")
