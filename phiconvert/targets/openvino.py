"""OpenVINO IR with NNCF weight compression, for Intel CPUs, GPUs and NPUs (optimum-intel, openvino-genai).

Export goes through optimum-intel's Python API, never `main_export(..., ov_config=OVConfig(quantization_config))`,
which silently writes an unquantized model. int4 is AWQ as optimum-intel's own presets for Phi-3.5/Phi-4-mini do
it: data-free (scales from the weights' column magnitudes), minutes and a few GiB on a 3.8 B model; with
``--calibration``, data-aware AWQ + scale estimation on that text, which runs the model in float32 over the samples
(on Phi-4-mini: 19 GiB, over 8 minutes on 2 cores, so only when asked for).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert.errors import PhiconvertError
from phiconvert.source import parameter_count
from phiconvert.targets import (
    GROUP_SIZE,
    SYM,
    ExportJob,
    Logits,
    Memory,
    Precision,
    Runtime,
    Sampling,
    Signature,
    Target,
    streamed,
)

TASK = "text-generation-with-past"
# This CPU plugin defaults to bf16 inference and dynamic quantization; verification wants the IR's own numbers.
EXACT = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")
MAX_CALIBRATION_SAMPLES = 128


# optimum-intel's int4 settings for a model its table does not list (its _DEFAULT_4BIT_WQ_CONFIG)
GENERIC_INT4 = {"group_size": 128, "sym": False, "ratio": 1.0}


def int4_defaults(model_id: str) -> dict[str, Any]:
    """Group size, symmetry and int4 ratio for int4: OpenVINO's known-good settings for this model where
    optimum-intel's per-model table has them (Phi-3/3.5/4-mini: asym, group 64), else its generic default; and the
    dataset its recipe calibrates on, if any (data-aware compression runs only on --calibration text here)."""
    from optimum.intel.openvino.configuration import get_default_quantization_config

    known = (get_default_quantization_config(model_id, weight_format="int4") if model_id else None) or {}
    chosen = {key: known.get(key, value) for key, value in GENERIC_INT4.items()}
    return {**chosen, "recipe": model_id if known else "generic", "recipe_dataset": known.get("dataset")}


def export(job: ExportJob) -> dict[str, Any]:
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig, OVModelForCausalLM, OVWeightQuantizationConfig

    group_size, sym = job.options["group_size"], job.options["sym"]
    settings: dict[str, Any] = {"weight_format": job.precision}
    ir = job.work / "ir"
    # fp16 is the export's own weight format; int4/int8 start from the checkpoint's dtype and are compressed next.
    dtype = "fp16" if job.precision == "fp16" else "auto"
    main_export(str(job.source), output=ir, task=TASK, ov_config=OVConfig(dtype=dtype), convert_tokenizer=True)
    missing = [name for name in TOKENIZER_FILES if not (ir / name).exists()]
    if missing:
        raise PhiconvertError(f"openvino-tokenizers could not convert this tokenizer ({', '.join(missing)} missing)")

    caveats = []
    if job.precision == "fp16":
        shutil.copytree(ir, job.output, dirs_exist_ok=True)
        return {"settings": settings, **weight_summary(job.output, parameter_count(job.source))}

    if job.precision == "int4":
        defaults = int4_defaults(job.model_id)
        group_size = group_size or defaults["group_size"]
        sym = defaults["sym"] if sym is None else sym
        samples = job.calibration[:MAX_CALIBRATION_SAMPLES] if job.calibration_given else None
        quantization = OVWeightQuantizationConfig(
            bits=4,
            sym=sym,
            group_size=group_size,
            ratio=defaults["ratio"],
            quant_method="awq",
            scale_estimation=bool(samples),
            dataset=samples,
            tokenizer=str(job.source) if samples else None,
            num_samples=len(samples) if samples else None,
        )
        awq = "data-aware" if samples else "data-free"
        settings |= {"group_size": group_size, "sym": sym, "ratio": defaults["ratio"], "awq": awq,
                     "scale_estimation": bool(samples), "calibration_samples": len(samples or []),
                     "defaults_from": defaults["recipe"]}  # fmt: skip
        if defaults["recipe_dataset"] and not samples:
            caveats.append(f"OpenVINO's recipe for {defaults['recipe']} compresses data-aware on "
                           f"{defaults['recipe_dataset']}; this run was data-free: --calibration TEXT makes it "
                           "data-aware")  # fmt: skip
    else:  # int8: per-channel, data-free
        sym = bool(sym)
        quantization = OVWeightQuantizationConfig(bits=8, sym=sym)
        settings |= {"group_size": -1, "sym": sym}

    model = OVModelForCausalLM.from_pretrained(ir, compile=False, quantization_config=quantization)
    model.save_pretrained(job.output)
    for item in ir.iterdir():  # tokenizer IRs, HF tokenizer files, chat template, generation config
        if not (job.output / item.name).exists():
            shutil.copy2(item, job.output / item.name)
    return {"settings": settings, **weight_summary(job.output, parameter_count(job.source)), "caveats": caveats}


def weight_summary(artifact: Path, parameters: int) -> dict[str, Any]:
    """What compression really did: integer weight constants by type, and bits per source parameter."""
    import openvino as ov

    integer: dict[str, int] = {}
    for op in ov.Core().read_model(artifact / "openvino_model.xml").get_ops():
        kind = op.get_element_type().get_type_name() if op.get_type_name() == "Constant" else ""
        if kind in ("u4", "i4", "u8", "i8") and len(op.shape) >= 2:
            integer[kind] = integer.get(kind, 0) + 1
    bits = 8 * (artifact / "openvino_model.bin").stat().st_size / parameters
    return {"integer_constants": integer, "bits_per_weight": round(bits, 3)}


def open_runtime(artifact: Path, exact: bool = True) -> Runtime:
    """openvino-genai's LLMPipeline with the artifact's tokenizer IRs and chat template: exact, with float32
    inference and KV cache and no dynamic activation quantization; else the CPU default (paged attention, the whole
    prompt in one step) minus its prefix cache, which is on by default and would skip the prefill of a prompt seen
    before (bench would time nothing)."""
    import openvino as ov
    import openvino_genai as ov_genai

    if exact:
        pipe = ov_genai.LLMPipeline(str(artifact), "CPU", **EXACT)
    else:
        scheduler = ov_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = False
        scheduler.max_num_batched_tokens = 2**64 - 1  # as LLMPipeline's own default scheduler: no prompt splitting
        pipe = ov_genai.LLMPipeline(str(artifact), "CPU", scheduler_config=scheduler)
    tokenizer = pipe.get_tokenizer()
    defaults = pipe.get_generation_config()  # from the artifact: its end-of-turn ids must be there
    stop = frozenset(defaults.stop_token_ids) | {defaults.eos_token_id}

    def prompt(messages: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]]

    def stream(ids: list[int], new_tokens: int, to_the_end: bool, sampling: Sampling) -> Iterator[int]:
        config = pipe.get_generation_config()
        config.do_sample, config.apply_chat_template = not sampling.greedy, False
        config.max_new_tokens = new_tokens
        if not sampling.greedy:
            config.temperature, config.top_p, config.top_k = sampling.temperature, sampling.top_p, 0
            if sampling.seed is not None:
                config.rng_seed = sampling.seed
        if to_the_end:
            config.min_new_tokens, config.ignore_eos = new_tokens, True  # also ignores the stop token ids

        class Push(ov_genai.StreamerBase):
            def __init__(self, push: Any) -> None:
                super().__init__()
                self.push = push

            def write(self, token: Any) -> Any:
                going = all(self.push(t) for t in (token if isinstance(token, list) else [token]))
                return ov_genai.StreamingStatus.RUNNING if going else ov_genai.StreamingStatus.STOP

            def end(self) -> None:
                pass

        def run(push: Any) -> None:
            pipe.generate(ov.Tensor(np.array([ids], dtype=np.int64)), config, Push(push))

        return streamed(run)

    return Runtime(
        prompt=prompt,
        stream=stream,
        decode=lambda _, new: tokenizer.decode(new, skip_special_tokens=True),
        is_stop=stop.__contains__,
        encode=lambda text: [int(t) for t in tokenizer.encode(text).input_ids.data[0]],
        context=json.loads((artifact / "config.json").read_text())["max_position_embeddings"],
    )


def logits(artifact: Path, sequences: list[list[int]]) -> Logits:
    import torch
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(artifact, ov_config=EXACT)
    for index, ids in enumerate(sequences):  # no past: each call starts from a reset state
        tensor = torch.tensor([ids])
        with torch.no_grad():
            yield index, 0, model(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits[0].float().numpy()


TARGET = Target(
    name="openvino",
    extra="openvino",
    modules=("openvino", "optimum.intel", "nncf", "openvino_genai", "openvino_tokenizers"),
    packages=("openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "nncf", "transformers", "torch"),
    precisions={
        "int4": Precision(
            "AWQ, data-free (data-aware + scale estimation with --calibration); optimum-intel's settings for the "
            "model where it has them (Phi-3/3.5/4-mini: asym, group 64), else asym, group 128",
            bits=4.5,
            bound="int4",
        ),
        "int8": Precision("per-channel asymmetric, data-free", bits=8.0, bound="int8"),
        "fp16": Precision("fp16 weights, no quantization", bits=16, bound="fp16"),
    },
    signature=Signature(file="openvino_model.xml"),
    runtime="openvino-genai, optimum-intel",
    tutorial="openvino.md",
    library="openvino",
    default_precision="int4",
    export=export,
    open=open_runtime,
    logits=logits,
    options=(GROUP_SIZE.only("int4"), SYM.only("int4", "int8")),
    # measured 2026-12-02, Phi-4-mini int4: export 11.67 GiB (optimum-intel's export holds the torch model and the
    # IR it converts), smoke test 5.69 GiB, logits of a 384-token window 7.03 GiB
    # int4's IR was 1.07x its nominal 4.5 bits on Phi-4-mini's shape (bench/realsize.py, 2026-12-07)
    memory=Memory(export=(1.55, 0.6), runtime=(1.5, 3.7), stored=1.07),
)
