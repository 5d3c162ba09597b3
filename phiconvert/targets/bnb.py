"""bitsandbytes checkpoints: 4-bit NF4 / FP4 (blockwise, 64 weights per absmax) or 8-bit LLM.int8(), the layout
`from_pretrained` reloads with no quantization_config argument.

bitsandbytes quantizes while transformers loads the model, so the artifact is whatever `save_pretrained` writes from
that in-memory model. Serialization of quantized states has broken before, so export reloads the saved folder and
checks that it generates exactly what the in-memory model generated.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from phiconvert.errors import PhiconvertError
from phiconvert.targets import ExportJob, Memory, Precision, Signature, Target, hf_common, reply

# a fixed prompt for the reload check (the smoke test's prompt is the pipeline's business)
PROBE = [{"role": "user", "content": "How do I reverse a list in Python?"}]
PROBE_TOKENS = 32


def check(precision: str, options: dict[str, Any]) -> None:
    if sys.platform == "darwin":
        raise PhiconvertError("bitsandbytes does not run on macOS; use --target torchao, mlx or gguf there")


def quantization_config(precision: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # float32 compute: the verification compares against the fp32 source, and the config keeps it for every load
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=precision,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=False,
    )


def export(job: ExportJob) -> dict[str, Any]:
    from transformers import AutoTokenizer

    config = quantization_config(job.precision)
    hf_common.return_freed_blocks()  # quantizing, repacking and reloading leave tens of MB per layer in the heap
    # the unquantized tensors (embeddings, norms, LM head) keep the source's dtype
    model = hf_common.load_source(job.source, quantization_config=config, device_map="cpu").eval()
    model.save_pretrained(job.output)
    hf_common.hub_layout_config(job.output)
    hf_common.copy_support_files(job.source, job.output)

    tokenizer = AutoTokenizer.from_pretrained(job.output)
    before = reply(hf_common.model_runtime(model, tokenizer, job.output), PROBE, PROBE_TOKENS).ids
    del model  # one quantized model in memory at a time
    gc.collect()
    # read without a map, as the runtime reads it (hf_common.load): the same model as from_pretrained(folder)
    reloaded = hf_common.load_source(job.output, device_map="cpu").eval()
    after = reply(hf_common.model_runtime(reloaded, tokenizer, job.output), PROBE, PROBE_TOKENS).ids
    if before != after:
        raise PhiconvertError(
            f"the saved bitsandbytes {job.precision} checkpoint generates differently after reloading: "
            f"{before} in memory, {after} reloaded"
        )
    layers = hf_common.linear_names(job.source)
    saved = config.to_dict()
    return {
        "settings": {k: v for k, v in saved.items() if k.startswith(("bnb_4bit", "load_in", "llm_int8_threshold"))},
        "blocksize": 64 if job.precision != "int8" else None,
        "quantized_layers": len(layers),
        "kept_in_source_dtype": ["model.embed_tokens", "lm_head", "norms"],
        "bits_per_weight": round(hf_common.bits_per_weight(job.output, job.source, layers), 3),
        "reload_check": {"reloaded_generates_same": True, "prompt": PROBE[0]["content"], "tokens": len(before)},
        "caveats": _caveats(job.precision),
    }


def _caveats(precision: str) -> list[str]:
    """What the runtime does differently on this CPU from what the config says. bitsandbytes 0.50 repacks 4-bit
    weights on their first forward for a kernel that casts the activations to bfloat16 when the CPU has AVX512-BF16,
    whatever compute dtype the config asks: the fidelity measured here is that path's."""
    from bitsandbytes.functional import has_avx512bf16

    if precision == "int8" or not has_avx512bf16():
        return []
    return [
        "this CPU has AVX512-BF16: bitsandbytes computes the 4-bit matmuls with bfloat16 activations here, not the "
        "config's float32 (measured on the bundled Phi-4-mini fixture, 2026-12-04: KL 0.00067 vs 0.00066 with float32)"
    ]


TARGET = Target(
    name="bnb",
    extra="bnb",
    modules=("bitsandbytes",),
    packages=("bitsandbytes", "transformers", "torch"),
    precisions={
        "nf4": Precision(
            "4-bit NormalFloat, blocks of 64, float32 compute (bfloat16 on AVX512-BF16 CPUs)", bits=4.5, bound="int4"
        ),
        "fp4": Precision(
            "4-bit float, blocks of 64, float32 compute (bfloat16 on AVX512-BF16 CPUs)", bits=4.5, bound="int4"
        ),
        "int8": Precision("LLM.int8(): per-row int8 with outlier columns in 16-bit", bits=8.0, bound="int8"),
    },
    signature=Signature(quant_method="bitsandbytes"),
    runtime="transformers + bitsandbytes",
    tutorial="hf-gptq.md",
    library="transformers",
    default_precision="nf4",
    export=export,
    open=hf_common.open_runtime,
    logits=hf_common.logits,
    # measured on Phi-4-mini nf4 (nominal artifact 2.01 GiB) on 2026-12-07, the allocator handing freed blocks back
    # (hf_common.return_freed_blocks) and the artifact read without a map: export 4.13 GiB (5.52-6.69 before), smoke
    # test 5.07 GiB, logits 5.37 GiB (8.12-9.13 before): the float32 embedding (2.29 GiB) and the 4-bit weights,
    # which bitsandbytes repacks for its AVX512-BF16 kernel on the first forward. Phi-4 (27.3 GiB bf16, nominal 7.68
    # GiB) the same day: export 12.20 GiB (16.39 before), smoke test 12.77 GiB, logits 12.72 GiB
    # save_pretrained writes the artifact only: 1.41x its nominal bytes on Phi-4-mini's shape (3.05 GB, the embedding
    # in bf16), 1.18x on Phi-4's (9.73 GB). In one bench job that evening (on huge pages) the smoke test read 5.67
    # GiB, the logits 5.35: the runtime's 2.75 GiB became 3.0
    memory=Memory(export=(0.42, 1.3), runtime=(1.35, 3.0), scratch=0, stored=1.45),
    # huge pages for PyTorch's tensors of 2 MB and more (as torchao): Phi-4-mini nf4 through the CLI, two alternating
    # pairs on 2026-12-07: export 125 / 114 -> 103 / 103 s, smoke test 25.6 / 25.8 -> 22.1 / 19.8 s, logits 26.5 /
    # 28.3 -> 23.9 / 23.1 s, the same peaks and fidelity numbers
    env={"THP_MEM_ALLOC_ENABLE": "1"},
    check=check,
)
