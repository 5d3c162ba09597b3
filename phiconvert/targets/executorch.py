"""ExecuTorch target: a `.pte` program for phones (the iOS and Android LLM demo apps), exported by ExecuTorch's own
LLM export (``executorch.examples.models.llama.export_llama``) and proved in ExecuTorch's Python runtime.

The export path is ExecuTorch's: its llama_transformer (which carries partial rotary and longrope) with a KV cache
and SDPA-with-KV-cache, torchao's 8da4w (int8 dynamic activations, int4 weights per group of 32) for the linears,
int8 per-row embeddings, lowered to the XNNPACK delegate. What this module writes by hand is only what that path
leaves to a per-model script: the Hugging Face weights under llama_transformer's names (``TENSORS``, with the fused
Phi-3 projections split and a tied LM head untied) and its ``params.json`` (``PARAMS``).

Two things ExecuTorch fixes at export, so this module decides them up front. The rope table is static: with a
context past ``original_max_position_embeddings`` every position rotates with longrope's long factor, where
transformers uses the short one below it, so a longrope model's context stops at its original context (exact there)
and a longer one is refused. And the KV cache is sized once: a verification window longer than the context is not
compared, which the report says. executorch 1.5.1 is built against torch 2.13 and torchao 0.18,
the main environment's, so it runs there (a release built against another torch would need a managed environment).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert import archs, progress, stops
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
    hf_common,
)

PTE = "model.pte"
# precision -> (ExecuTorch's qmode for the linears, its embedding_quantize "bits,group" (group 0: per row)). Not
# offered: qmode "int8" (weight-only), whose XNNPACK export keeps the linears in float32 in the program (tiny-phi4mini:
# 13.7 MiB against fp32's 16.2), so it is not the int8 file it says it is
PRECISIONS = {"8da4w": ("8da4w", "8,0"), "fp32": (None, None)}
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 32  # the 8da4w recipe of ExecuTorch's Llama and Phi-4-mini exports
DEFAULT_CONTEXT = 4096  # KV cache length when the model's own context is longer (and not longrope)
PREFILL = 128  # ExecuTorch's max_seq_length: one forward call takes at most one token fewer
LOGITS_ROWS = 64  # positions per yielded chunk of logits
ROPE_TYPES = ("default", "longrope", "su")  # what llama_transformer's Hugging Face rope path computes exactly
# runtime metadata methods the export bakes into the program (the demo apps' runners read them)
METADATA = ("get_bos_id", "get_eos_ids", "get_max_context_len", "get_max_seq_len", "get_vocab_size")
# LLMEdgeManager's steps, in the order export_llama calls them -> what the progress bar says while each runs (the
# export reports no progress of its own; the quantization is counted from the weights it has replaced)
STEPS = {
    "source_transform": "quantizing weights (torchao)",
    "export": "torch.export",
    "run_canonical_optimizations": "canonical graph passes",
    "to_edge_transform_and_lower": "edge dialect and XNNPACK lowering",
    "to_executorch": "ExecuTorch program",
    "save_to_pte": "writing the .pte",
}

# Hugging Face tensor (after "model.layers.N." for a layer's) -> llama_transformer's name
TENSORS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
# config.json key -> llama_transformer's ModelArgs field (params.json)
PARAMS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
    "intermediate_size": "hidden_dim",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "partial_rotary_factor": "partial_rotary_factor",
    "original_max_position_embeddings": "original_max_position_embeddings",
    "max_position_embeddings": "max_position_embeddings",
}
# rope_scaling key -> ModelArgs field (longrope)
ROPE_PARAMS = {
    "short_factor": "rope_scaling_short_factor",
    "long_factor": "rope_scaling_long_factor",
    "attention_factor": "rope_scaling_attention_factor",
}


def _settings(precision: str, options: dict[str, Any]) -> dict[str, Any]:
    group_size = options.get("group_size")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise PhiconvertError(f"--group-size for executorch must be one of {', '.join(map(str, GROUP_SIZES))}")
    context = options.get("max_context")
    if context is not None and context < 16:
        raise PhiconvertError(f"--max-context must be at least 16 tokens, not {context}")
    qmode, embedding = PRECISIONS[precision]
    return {"qmode": qmode, "embedding_quantize": embedding, "context": context,
            "group_size": (group_size or DEFAULT_GROUP_SIZE) if qmode == "8da4w" else None}  # fmt: skip


def context_for(config: dict[str, Any], asked: int | None) -> int:
    """The KV cache length: the user's, else the model's context capped at ``DEFAULT_CONTEXT``, at its sliding
    window (llama_transformer is given none) and, for longrope, at its original context (the static rope table then
    holds the short factors transformers uses there)."""
    why = refuse(config, {"max_context": asked})
    if why:
        raise PhiconvertError(f"--target executorch: {why}")
    limits = [config.get("max_position_embeddings") or DEFAULT_CONTEXT, DEFAULT_CONTEXT, _window(config) or math.inf]
    if _rope_kind(config) in ("longrope", "su"):
        limits.append(_original(config))
    return asked or int(min(limits))


def refuse(config: dict[str, Any], options: dict[str, Any]) -> str | None:
    """What ExecuTorch's llama_transformer would compute differently from transformers for this model, or None."""
    kind, asked, window = _rope_kind(config), options.get("max_context"), _window(config)
    if kind not in ROPE_TYPES:
        return (f"ExecuTorch's llama_transformer has no '{kind}' rope scaling in its Hugging Face rope path (it "
                f"computes {', '.join(ROPE_TYPES)})")  # fmt: skip
    if kind in ("longrope", "su") and asked and asked > _original(config):
        original = _original(config)
        return (f"--max-context {asked} is past this model's original context ({original}): ExecuTorch's rope "
                f"table is fixed at export, and past {original} tokens it would rotate every position with "
                f"longrope's long factor, where the model uses the short one up to {original} tokens")  # fmt: skip
    if window and asked and asked > window:
        return (f"--max-context {asked} is past this model's {window}-token sliding window, which phiconvert does not "
                f"give ExecuTorch's llama_transformer: past it every token would attend to tokens the model never "
                f"sees")  # fmt: skip
    return None


def _window(config: dict[str, Any]) -> int | None:
    """The sliding window transformers applies (Qwen2 declares one it switches off)."""
    return config.get("sliding_window") if config.get("use_sliding_window", True) else None


def _original(config: dict[str, Any]) -> int:
    scaling = config.get("rope_scaling") or {}
    return config.get("original_max_position_embeddings") or scaling["original_max_position_embeddings"]


def export(job: ExportJob) -> dict[str, Any]:
    """Weights and params in llama_transformer's layout, then ExecuTorch's export_llama to an XNNPACK `.pte`."""
    settings = _settings(job.precision, job.options)
    config = json.loads((job.source / "config.json").read_text())
    context = context_for(config, settings["context"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job.source)
    eos = stops.stop_ids(job.source, tokenizer)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos[0]
    # ExecuTorch's Llama2Model takes a checkpoint whose path contains "int8" or "8da4w" for a pre-quantized one:
    # ours (the whole model, 7 GiB for Phi-4-mini) goes beside job.work, which is named after the precision, on the
    # output's disk that the pre-flight checked; where the output's own name has such a mark, in TMPDIR
    beside = None if _marked(str(job.work.parent)) else job.work.parent
    with tempfile.TemporaryDirectory(prefix="phiconvert-checkpoint-", dir=beside) as scratch:
        if _marked(scratch):
            raise PhiconvertError(f"the temporary folder {scratch} contains 'int8' or '8da4w', which ExecuTorch's "
                                  "export reads as a pre-quantized checkpoint: set TMPDIR elsewhere")  # fmt: skip
        checkpoint, params, weights = _checkpoint(job.source, config, Path(scratch))
        progress.advance(0, None, what="loading the checkpoint (ExecuTorch's export_llama)")
        with _named_steps():
            _export_llama(checkpoint, params, job.output, settings, context, {"get_bos_id": bos, "get_eos_ids": eos})
    hf_common.copy_support_files(job.source, job.output)
    (job.output / "config.json").write_text((job.source / "config.json").read_text())
    size = (job.output / PTE).stat().st_size
    return {
        "settings": {**{k: v for k, v in settings.items() if k != "context"}, "max_context": context,
                     "max_seq_length": min(PREFILL, context), "backend": "xnnpack", "kv_cache": True,
                     "sdpa_with_kv_cache": True, "dtype": "fp32", "untied_embeddings": _tied(config)},
        "bits_per_weight": round(8 * size / weights, 3),  # the whole program over the weights it holds
        "metadata": {"bos_id": bos, "eos_ids": eos},
        "caveats": _caveats(config, context),
    }  # fmt: skip


def _tied(config: dict[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings"))


def _caveats(config: dict[str, Any], context: int) -> list[str]:
    if _rope_kind(config) not in ("longrope", "su"):
        return []
    return [f"the context is {context} tokens, at most the model's original context: ExecuTorch's static rope table "
            "holds longrope's short factors, exact there, and cannot switch to the long ones past it"]  # fmt: skip


def _rope_kind(config: dict[str, Any]) -> str:
    scaling = config.get("rope_scaling") or {}
    return scaling.get("type") or scaling.get("rope_type") or "default"


def _marked(path: str) -> bool:
    return any(mark in path for mark in ("int8", "8da4w"))


def _checkpoint(source: Path, config: dict[str, Any], work: Path) -> tuple[Path, Path, int]:
    """The source as ExecuTorch's export reads it: a torch checkpoint and a params.json; and how many weights."""
    import torch

    state = llama_state(source, config)
    checkpoint, path = work / "executorch-checkpoint.pth", work / "executorch-params.json"
    torch.save(state, checkpoint)
    path.write_text(json.dumps(llama_params(config, state)))
    return checkpoint, path, sum(t.numel() for t in state.values())


def llama_state(source: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The source's weights under llama_transformer's names (one tensor at a time, from the memory-mapped
    safetensors), with a tied LM head untied: ExecuTorch quantizes the head and the embedding apart."""
    from safetensors import safe_open

    files = sorted(source.glob("*.safetensors"))
    names = [(f, name) for f in files for name in safe_open(str(f), framework="pt").keys()]
    state: dict[str, Any] = {}
    for file, name in progress.track(names, unit="tensors", what="renaming to ExecuTorch's llama_transformer"):
        with safe_open(str(file), framework="pt") as handle:
            for key, tensor in _renamed(name, handle.get_tensor(name), config):
                state[key] = tensor.contiguous()
    if "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    return state


def llama_params(config: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """llama_transformer's ModelArgs for the config (params.json), rotating as transformers does (use_hf_rope)."""
    params = {field: config[key] for key, field in PARAMS.items() if config.get(key) is not None}
    scaling = config.get("rope_scaling") or {}
    params |= {field: scaling[key] for key, field in ROPE_PARAMS.items() if scaling.get(key) is not None}
    if "original_max_position_embeddings" not in params and scaling.get("original_max_position_embeddings"):
        params["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return params | {"use_hf_rope": True, "attention_qkv_bias": "layers.0.attention.wq.bias" in state}


def _renamed(name: str, tensor: Any, config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """llama_transformer's (name, tensor) pairs for one Hugging Face tensor (two or three for a fused one)."""
    layer = re.match(r"model\.layers\.(\d+)\.(.+)", name)
    prefix, rest = (f"layers.{layer[1]}.", layer[2]) if layer else ("", name)
    linear, _, kind = rest.rpartition(".")
    if linear in archs.FUSED:  # Phi-3's fused linears: llama_transformer has the parts
        pieces = tensor.split(archs.fused_rows(config, linear))
        for part, piece in zip(archs.FUSED[linear], pieces, strict=True):
            yield prefix + TENSORS[f"{part}.{kind}"], piece
    elif rest in TENSORS:
        yield prefix + TENSORS[rest], tensor
    else:
        raise PhiconvertError(f"--target executorch: no llama_transformer name for the tensor {name}")


@contextmanager
def _named_steps() -> Iterator[None]:
    """While export_llama runs, each LLMEdgeManager step in ``STEPS`` is a named step of the progress bar, and the
    quantization counts the weights it has replaced."""
    from executorch.extension.llm.export.builder import LLMEdgeManager

    saved = {name: getattr(LLMEdgeManager, name) for name in STEPS}

    def named(name: str, method: Any) -> Any:
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            progress.advance(0, None, what=STEPS[name])
            if name != "source_transform":
                return method(self, *args, **kwargs)
            with _counting_quantized(self.model):
                return method(self, *args, **kwargs)

        return step

    for name, method in saved.items():
        setattr(LLMEdgeManager, name, named(name, method))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(LLMEdgeManager, name, method)


@contextmanager
def _counting_quantized(model: Any) -> Iterator[None]:
    """Every second, how many of the model's linear and embedding weights torchao has replaced by its quantized
    tensors (``quantize_`` swaps them one module at a time, and says nothing)."""
    import threading

    import torch

    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(1.0):
            done = sum(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in weighted)
            if done:
                progress.advance(done, len(weighted), "weights", STEPS["source_transform"])

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _export_llama(checkpoint: Path, params: Path, output: Path, settings: dict[str, Any], context: int,
                  metadata: dict[str, Any]) -> None:  # fmt: skip
    """ExecuTorch's own LLM export, configured as its XNNPACK recipes are (KV cache, SDPA with KV cache)."""
    from executorch.examples.models.llama.export_llama_lib import export_llama
    from executorch.extension.llm.export.config.llm_config import DtypeOverride, LlmConfig, ModelType

    config = LlmConfig()
    config.base.model_class = ModelType("llama3")  # llama_transformer; the architecture is in params.json
    config.base.checkpoint = str(checkpoint)
    config.base.params = str(params)
    config.base.metadata = json.dumps(metadata)
    config.model.use_kv_cache = True
    config.model.use_sdpa_with_kv_cache = True
    config.model.dtype_override = DtypeOverride("fp32")
    config.export.max_context_length = context
    config.export.max_seq_length = min(PREFILL, context)
    config.export.output_dir = str(output)
    config.export.output_name = str(output / PTE)
    config.quantization.qmode = settings["qmode"]
    config.quantization.group_size = settings["group_size"]
    config.quantization.embedding_quantize = settings["embedding_quantize"]
    config.backend.xnnpack.enabled = True
    export_llama(config)
    if not (output / PTE).is_file():
        raise PhiconvertError(f"ExecuTorch's export_llama finished without writing {PTE}")


def _program(artifact: Path) -> tuple[Any, dict[str, Any]]:
    """The program's forward method and its metadata, in ExecuTorch's Python runtime with the LLM custom ops and
    quantized kernels registered (the demo apps' runners link the same)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 (llama::custom_sdpa, update_cache)
    from executorch.kernels import quantized  # noqa: F401 (quantized_decomposed::embedding_byte)
    from executorch.runtime import Runtime as ExecuTorchRuntime

    program = ExecuTorchRuntime.get().load_program(artifact / PTE)
    meta = {name: list(program.load_method(name).execute([])) for name in METADATA}
    return program.load_method("forward"), meta


def _step(forward: Any, ids: list[int], start: int) -> Any:
    """The logits after ``ids`` fed at positions start.. (the cache before ``start`` is kept)."""
    import torch

    return forward.execute([torch.tensor([ids], dtype=torch.long), torch.tensor([start], dtype=torch.long)])[0]


def open_runtime(artifact: Path, exact: bool = True) -> Runtime:
    """The `.pte` in ExecuTorch's runtime (one mode: float32 activations, as on a phone): the prompt prefilled in
    chunks the program takes (max_seq_len - 1), then one token per call, as the demo apps' runner does; the chat
    template and stop ids from the tokenizer files beside it."""
    import torch
    from transformers import AutoTokenizer

    forward, meta = _program(artifact)
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    # export_llama bounds the token dimension at max_seq_len - 1 (its builder's Dim("token_dim")): a call of
    # max_seq_len tokens is refused by the program
    context, chunk = int(meta["get_max_context_len"][0]), int(meta["get_max_seq_len"][0]) - 1

    def stream(ids: list[int], new_tokens: int, to_the_end: bool, sampling: Sampling) -> Iterator[int]:
        if len(ids) + new_tokens > context:
            raise PhiconvertError(f"{len(ids)} + {new_tokens} tokens do not fit the .pte's {context}-token context")
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        for start in range(0, len(ids), chunk):
            logits = _step(forward, ids[start : start + chunk], start)
        position = len(ids)
        for _ in range(new_tokens):
            token = hf_common.pick(logits.reshape(-1).float(), sampling, generator)
            yield token
            logits, position = _step(forward, [token], position), position + 1

    return hf_common.tokenizer_runtime(tokenizer, artifact, stream, context, stop_ids=meta["get_eos_ids"])


def logits(artifact: Path, sequences: list[list[int]]) -> Logits:
    """Every position's logits as the runtime decodes: one token per call over the KV cache, from position 0 (a
    fresh state: positions past it are masked). A sequence longer than the context yields nothing: its first
    tokens alone would be compared with a source that rotated the whole sequence as a longer one (longrope)."""
    forward, meta = _program(artifact)
    context = int(meta["get_max_context_len"][0])
    for index, ids in enumerate(sequences):
        if len(ids) > context:
            continue
        rows: list[np.ndarray] = []
        first = 0
        for position, token in enumerate(ids):
            rows.append(_step(forward, [token], position).reshape(-1).float().numpy())
            if len(rows) == LOGITS_ROWS:
                yield index, first, np.stack(rows)
                first, rows = position + 1, []
        if rows:
            yield index, first, np.stack(rows)


TARGET = Target(
    name="executorch",
    extra="executorch",
    modules=("executorch",),
    packages=("executorch", "torch", "torchao", "transformers"),
    precisions={
        "8da4w": Precision(
            "int8 dynamic activations, int4 weights per group of 32 (--group-size), int8 per-row embeddings, XNNPACK",
            bits=5.5,
            bound="int4",
            cpu_export_speed=2.9e6,  # Phi-4-mini's shape, 2 cores, 2026-12-03: 1338 s (export_llama)
        ),
        "fp32": Precision(
            "float32 weights, XNNPACK: the conversion's exactness check, not a phone format",
            bits=32,
            bound="fp32",
            experimental=True,
        ),
    },  # fmt: skip
    signature=Signature(file="*.pte"),
    runtime="ExecuTorch's Python runtime (XNNPACK delegate, LLM custom ops)",
    tutorial="mobile-executorch.md",
    library="executorch",
    default_precision="8da4w",
    export=export,
    open=open_runtime,
    logits=logits,
    options=(
        GROUP_SIZE.only("8da4w"),
        Option(
            "max_context",
            "KV cache length of the .pte (default: the model's, at most 4096; longrope: at most its original context)",
            int,
        ),
    ),  # fmt: skip
    check=lambda precision, options: _settings(precision, options) and None,
    refuse=refuse,
    # Phi-4-mini's shape: export 20.52 GiB on 2026-12-03, 22.12-22.42 GiB on 2026-12-06 (3.14x the bf16 bytes, at
    # the end of torchao's quantization; the lowering 17.5-21 GiB); runtime 4.71 GiB for a 2.59 GiB .pte in a fresh
    # worker (the mapped program and XNNPACK's packed copy of its weights)
    memory=Memory(export=(3.0, 1.2), runtime=(1.5, 1.1), window_logits=0),
    # export_llama's memory is still held after it returns (the smoke test after it read 21.12 GiB where the .pte
    # alone loads at 4.46: docs/realsize.md), so the .pte is loaded and compared in a fresh worker
    export_apart=True,
)
