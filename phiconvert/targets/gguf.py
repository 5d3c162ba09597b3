"""llama.cpp GGUF: our own HF -> GGUF writer for F16/BF16, then llama.cpp's own quantizer, in-process.

The runtime is llama-cpp-python. Two llama.cpp behaviours shape this adapter:
- K-quants need rows divisible by 256; llama.cpp quietly falls back (to Q5_0/Q8_0 ...) for tensors that are not,
  so the report lists the real per-tensor types and the real bits per weight, read back from the file.
- With longrope, llama.cpp picks the long or short rope factors by its context size (padded up to a multiple of
  256), transformers by the sequence length. ``_open`` sizes each context so both pick the same factors.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert import progress
from phiconvert.errors import PhiconvertError
from phiconvert.targets import ExportJob, Logits, Memory, Precision, Runtime, Sampling, Signature, Target

# precision -> llama.cpp file type (llama_ftype) for llama_model_quantize; f16/bf16 are written directly
QUANTIZED = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
K_QUANTS = ("q6_k", "q5_k_m", "q4_k_m")
# bits per weight llama.cpp's types take on a Phi model, to follow the quantizer's output file as it grows
CONTEXT_PAD = 256  # llama.cpp rounds every context size up to a multiple of this
LOGITS_BATCH = 512  # positions decoded (and their logits returned) at a time


def export(job: ExportJob) -> dict[str, Any]:
    """Write the GGUF (quantizing an intermediate file in job.work) and report its real tensor types.

    The intermediate keeps a bf16 checkpoint's weights in BF16: a copy of their bytes, exact, where llama.cpp's
    own route (convert_hf_to_gguf.py's default F16, then llama-quantize) converts every weight first."""
    from phiconvert import weights
    from phiconvert.gguf_writer import write_gguf

    path = job.output / f"model-{job.precision.upper()}.gguf"
    if job.precision in QUANTIZED:
        tensors = weights.index(job.source).values()
        dtype = "bf16" if all(t.dtype == "BF16" for t in tensors) else "f16"
        intermediate = job.work / f"model-{dtype.upper()}.gguf"
        details = write_gguf(job.source, intermediate, dtype)
        expected = int(sum(t.size for t in tensors) * TARGET.precisions[job.precision].bits / 8)
        with progress.watch_file(path, expected, "llama.cpp quantize"):
            _quantize(intermediate, path, job.precision)
        intermediate.unlink()
        details["intermediate"] = intermediate.name
    else:
        details = write_gguf(job.source, path, job.precision)
    return {"file": path.name, **details, **tensor_report(path, job.precision)}  # file_type: the final file's


def _quantize(source: Path, destination: Path, precision: str) -> None:
    """llama.cpp's own quantizer (what llama-quantize runs), called in-process through llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[precision])
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params))
    if status != 0:
        raise PhiconvertError(f"llama.cpp failed to quantize to {precision} (status {status}; see the log)")


def tensor_report(path: Path, precision: str) -> dict[str, Any]:
    """Real per-tensor types and bits per weight, read back from the file (not what was asked for)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = reader.tensors
    matrices = [t for t in tensors if len(t.shape) > 1]
    full = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    report = {
        "file_type": gguf.LlamaFileType(reader.get_field(gguf.Keys.General.FILE_TYPE).contents()).name,
        "file_bytes": path.stat().st_size,
        "tensor_types": dict(Counter(t.tensor_type.name for t in tensors)),
        "bits_per_weight": _bits_per_weight(tensors),
        "bits_per_weight_matrices": _bits_per_weight(matrices),
        "matrices_full_precision": [t.name for t in matrices if t.tensor_type in full],
    }
    if precision in K_QUANTS:
        # llama.cpp falls back from K-quants (256-element blocks) for rows it cannot split into such blocks
        report["k_quant_fallbacks"] = {
            t.name: t.tensor_type.name
            for t in matrices
            if not t.tensor_type.name.endswith("_K") and t.tensor_type not in full
        }
    return report


def _bits_per_weight(tensors: list[Any]) -> float:
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def _gguf_file(artifact: Path) -> Path:
    files = sorted(artifact.glob("*.gguf"))
    if len(files) != 1:
        raise PhiconvertError(f"expected one .gguf file in {artifact}, found {len(files)}")
    return files[0]


def _open(path: Path, n_tokens: int, batch: int | None = None) -> Any:
    """A llama.cpp context for ``n_tokens`` tokens that applies the rope factors transformers would.

    transformers uses longrope's long factors iff the sequence is longer than the original context; llama.cpp iff
    its context (n_tokens rounded up to 256) is. When the rounding alone would cross the original context (only for
    original contexts that are not multiples of 256, like the tiny test models'), the original context length is
    overridden to the padded size for this context, so the short factors stay in use, as in transformers.
    """
    import gguf
    from llama_cpp import GGML_TYPE_F32, Llama

    n_ctx = max(n_tokens, 1)
    padded = math.ceil(n_ctx / CONTEXT_PAD) * CONTEXT_PAD
    reader = gguf.GGUFReader(path)
    key = gguf.Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=_architecture(reader))
    field = reader.get_field(key)
    overrides = None
    if field is not None and n_tokens <= int(field.contents()) < padded:
        overrides = {key: padded}
    # one thread per physical core (llama-cpp-python's default): ggml's threads spin-wait on each other, and one
    # more than the cores that are free turns a millisecond token into a second (measured on 2 busy cores)
    threads = max(1, (os.cpu_count() or 2) // 2)
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=batch or n_ctx,
        n_ubatch=batch or n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        flash_attn=False,
        kv_overrides=overrides,
        seed=0,
        verbose=False,
    )


def open_runtime(artifact: Path, exact: bool = True) -> Runtime:
    """llama-cpp-python over the GGUF, its chat template as create_chat_completion renders it, llama.cpp's own
    end-of-generation ids. Exact: a context per stream sized to it, float32 KV cache (llama.cpp then picks longrope's
    factors as transformers does for that length); else llama-cpp-python's defaults (f16 KV cache, its thread
    counts) with a 2048-token context or the model's if shorter, reset before each stream (generate() would
    otherwise reuse the KV cache of a matching prefix)."""
    import gguf
    import llama_cpp

    path = _gguf_file(artifact)
    probe = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(probe.model)
    template = probe.metadata.get("tokenizer.chat_template", "")
    shared = None
    if not exact:
        reader = gguf.GGUFReader(path)
        trained = reader.get_field(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=_architecture(reader)))
        n_ctx = min(2048, int(trained.contents())) if trained is not None else 2048
        shared = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)

    def prompt(messages: list[dict[str, str]]) -> list[int]:
        rendered, bos = _render(template, messages, probe)
        # a template that writes BOS itself (Llama-3's) must not get a second one from the tokenizer
        return probe.tokenize(rendered.encode(), add_bos=not (bos and rendered.startswith(bos)), special=True)

    def stream(ids: list[int], new_tokens: int, to_the_end: bool, sampling: Sampling) -> Iterator[int]:
        llm = shared or _open(path, len(ids) + new_tokens)
        llm.reset()
        picking = {"top_k": 1, "temp": 0.0}
        if not sampling.greedy:  # top_k 0 and min_p 0: only temperature and top_p shape the distribution
            picking = {"top_k": 0, "min_p": 0.0, "top_p": sampling.top_p, "temp": sampling.temperature}
            if sampling.seed is not None:
                llm.set_seed(sampling.seed)
        try:
            for count, token in enumerate(llm.generate(ids, **picking), start=1):  # never stops by itself
                yield int(token)
                if count == new_tokens:
                    break
        finally:
            if shared is None:
                llm.close()  # its mapping of the model file would count again beside the next context's

    def decode(ids: list[int], new: list[int]) -> str:
        return probe.detokenize(new, prev_tokens=ids).decode("utf-8", errors="ignore")

    return Runtime(
        prompt=prompt,
        stream=stream,
        decode=decode,
        is_stop=lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token)),
        # add_bos: llama.cpp adds BOS only where the GGUF's tokenizer says the model takes one
        encode=lambda text: probe.tokenize(text.encode(), add_bos=True, special=False),
        context=shared.n_ctx()
        if shared
        else int(probe.metadata[f"{probe.metadata['general.architecture']}.context_length"]),
    )


def _render(template: str, messages: list[dict[str, str]], llm: Any) -> tuple[str, str]:
    """The chat prompt as llama-cpp-python renders it from the GGUF's template, and the BOS text."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos = llm.detokenize([llm.token_bos()], special=True).decode(errors="ignore") if llm.token_bos() >= 0 else ""
    eos = llm.detokenize([llm.token_eos()], special=True).decode(errors="ignore")
    return Jinja2ChatFormatter(template=template, bos_token=bos, eos_token=eos)(messages=messages).prompt, bos


def _architecture(reader: Any) -> str:
    """general.architecture of an open GGUF file (the prefix of its model keys)."""
    import gguf

    return reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()


def logits(artifact: Path, sequences: list[list[int]]) -> Logits:
    """Logits of each sequence (f32 KV cache, no BOS added), one context per sequence sized to it, so llama.cpp
    picks the rope factors transformers picks for the whole sequence; decoded a batch of positions at a time
    through llama.cpp's own batch API, so neither its output buffer nor ours ever holds a whole long window."""
    import llama_cpp

    path = _gguf_file(artifact)
    for index, ids in enumerate(sequences):
        llm = _open(path, len(ids), batch=LOGITS_BATCH)
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
        batch = llama_cpp.llama_batch_init(LOGITS_BATCH, 0, 1)
        try:
            for start in range(0, len(ids), LOGITS_BATCH):
                chunk = ids[start : start + LOGITS_BATCH]
                for i, token in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                    batch.seq_id[i][0], batch.logits[i] = 0, True
                batch.n_tokens = len(chunk)
                if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                    raise PhiconvertError(f"llama.cpp failed to evaluate positions {start}.. of {len(ids)}")
                out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(len(chunk), vocab))
                yield index, start, out.copy()
        finally:
            llama_cpp.llama_batch_free(batch)
            llm.close()


TARGET = Target(
    name="gguf",
    extra="gguf",
    modules=("gguf", "llama_cpp"),
    packages=("gguf", "llama-cpp-python"),
    precisions={
        "q4_k_m": Precision(
            "4-bit K-quants, some tensors and the output/tied embedding in Q6_K: llama.cpp's usual default",
            bits=4.9,
            bound="int4",
        ),
        "q5_k_m": Precision("5-bit K-quants with the same Q6_K exceptions", bits=5.7, bound="int4"),
        "q6_k": Precision("6-bit K-quants (6.56 bits/weight): close to F16", bits=6.6, bound="int8"),
        "q8_0": Precision("8-bit blocks of 32 (8.5 bits/weight): nearly lossless", bits=8.5, bound="int8"),
        "q4_0": Precision("legacy 4-bit blocks of 32 (4.5 bits/weight): the least accurate", bits=4.5, bound="int4"),
        "f16": Precision("16-bit float, no quantization", bits=16, bound="fp16"),
        "bf16": Precision("bfloat16: the exact weights of a bf16 checkpoint", bits=16, bound="bf16"),
    },
    signature=Signature(file="*.gguf"),
    runtime="llama-cpp-python",
    tutorial="llama-cpp.md",
    library="gguf",
    default_precision="q4_k_m",
    export=export,
    open=open_runtime,
    logits=logits,
    # measured 2026-12-02, q4_k_m: export 4.60 GiB on Phi-4-mini, 3.82 GiB on Phi-4, both two float32 copies of the
    # embedding (tensor by tensor: the BF16 intermediate, then llama.cpp's quantizer); verification 5.93 / 15.62 GiB
    # (the model mapped and repacked for the CPU, a batch's logits)
    # q4_k_m's file was 1.06x its nominal 4.9 bits on Phi-4-mini's shape (bench/realsize.py, 2026-12-07)
    memory=Memory(export=(0.0, 0.2), runtime=(1.7, 2.5), window_logits=0, tensor_copies=2.0, stored=1.07),
)
