"""Peak memory and time of phiconvert's GGUF writer on a checkpoint of Phi-4-mini's real size.

Builds a randomly initialised bf16 checkpoint with Phi-4-mini's dimensions (3.84 B parameters, about 7.2 GiB),
written tensor by tensor without instantiating the model, with the bundled tiny-phi4mini tokenizer. Then runs the
writer to F16 in a child process and reports its peak RSS (getrusage of the child), wall time and file size.

    python bench/gguf_memory.py [--workdir DIR] [--json gguf_memory.json] [--keep]

Needs about 15 GiB of free disk in the work folder (the checkpoint and the F16 file).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "phiconvert" / "fixtures" / "tiny-phi4mini"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# microsoft/Phi-4-mini-instruct's dimensions
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 3072, 8192, 32, 24, 8, 200064
HEAD_DIM = HIDDEN // HEADS
ROPE_HALF = int(0.75 * HEAD_DIM) // 2


def config() -> dict:
    """A hub-layout Phi-4-mini config (tied embeddings, partial rotary, longrope)."""
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "long_factor": [1.0] * ROPE_HALF, "short_factor": [1.0] * ROPE_HALF},
        "rms_norm_eps": 1e-5,
        "sliding_window": 262144,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 199999,
        "eos_token_id": 199999,
    }


def shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of Phi3ForCausalLM at Phi-4-mini's size (no lm_head: tied)."""
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (HIDDEN,)
        out[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        out[p + "self_attn.qkv_proj.weight"] = ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        out[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        out[p + "mlp.gate_up_proj.weight"] = (2 * INTERMEDIATE, HIDDEN)
        out[p + "mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
    return out


def write_checkpoint(folder: Path) -> int:
    """Stream random bf16 tensors into model.safetensors (header first, then data); returns the parameter count."""
    tensors = shapes()
    header, offset = {}, 0
    for name, shape in tensors.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in tensors.values():
            remaining = int(np.prod(shape))
            while remaining:
                n = min(remaining, 1 << 24)
                values = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
                (values.view(np.uint32) >> 16).astype(np.uint16).tofile(f)
                remaining -= n
    (folder / "config.json").write_text(json.dumps(config(), indent=2))
    for name in TOKENIZER_FILES:
        if (FIXTURE / name).exists():
            shutil.copy(FIXTURE / name, folder / name)
    return sum(int(np.prod(s)) for s in tensors.values())


def run_writer(source: Path, output: Path) -> tuple[float, int]:
    """Convert in a child process; returns (seconds, peak RSS bytes of the child)."""
    code = "import sys; from pathlib import Path; from phiconvert.gguf_writer import write_gguf; "
    code += "write_gguf(Path(sys.argv[1]), Path(sys.argv[2]), 'f16')"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(source), str(output)], check=True)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="parent folder of the temp work dir")
    parser.add_argument("--json", type=Path, default=Path("gguf_memory.json"), help="where to write the results")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and GGUF file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-", dir=args.workdir))
    free = shutil.disk_usage(work).free
    if free < 16 * 2**30:
        sys.exit(f"need about 16 GiB free in {work}, have {free / 2**30:.1f} GiB")
    try:
        source = work / "phi4mini-random"
        source.mkdir()
        start = time.perf_counter()
        params = write_checkpoint(source)
        build_s = time.perf_counter() - start
        checkpoint = (source / "model.safetensors").stat().st_size
        output = work / "model-f16.gguf"
        seconds, peak = run_writer(source, output)
        result = {
            "parameters": params,
            "checkpoint_bytes": checkpoint,
            "build_seconds": round(build_s, 1),
            "writer": "phiconvert.gguf_writer.write_gguf (f16)",
            "seconds": round(seconds, 1),
            "peak_rss_bytes": peak,
            "gguf_bytes": output.stat().st_size,
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    gib = 2**30
    print(f"{'parameters':<22}{params / 1e9:>10.2f} B")
    print(f"{'checkpoint (bf16)':<22}{checkpoint / gib:>10.2f} GiB")
    print(f"{'F16 GGUF':<22}{result['gguf_bytes'] / gib:>10.2f} GiB")
    print(f"{'writer wall time':<22}{seconds:>10.1f} s")
    print(f"{'writer peak RSS':<22}{peak / gib:>10.2f} GiB")
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
