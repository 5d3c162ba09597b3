"""What the Hugging Face-format targets (gptq, awq, bnb, torchao) share: their artifact is a transformers checkpoint.

So the smoke test and the logits run in plain transformers (with the format's kernels underneath), the artifact
carries the source's tokenizer files, chat template and generation config, and the calibration text becomes
fixed-length token chunks. Toolchain imports stay inside functions (the parent process imports these modules too).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert import archs, stops, weights
from phiconvert.errors import PhiconvertError
from phiconvert.targets import Logits, Runtime, Sampling

LOGITS_CHUNK = 512  # positions whose logits are computed at a time
# files of a checkpoint folder that describe the weights; everything else (tokenizer, chat template, generation
# config) is copied into the artifact as it is
WEIGHT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def layer_inputs(folder: Path) -> tuple[int, ...]:
    """Input sizes of a decoder's linear layers: hidden (q/k/v, gate/up), attention output (o), intermediate (down)."""
    config = json.loads((folder / "config.json").read_text())
    return config["hidden_size"], config["num_attention_heads"] * archs.head_dim(config), config["intermediate_size"]


def fitting_group_size(inputs: tuple[int, ...], default: int, target: str) -> int:
    """``default``, or the largest smaller power of two down to 16 that divides every input size (SmolLM's 576: 64;
    GPTQ and AWQ checkpoints and their kernels take 16, though it is not offered as a choice)."""
    fitting = [g for g in (16, 32, 64, 128) if g <= default and all(n % g == 0 for n in inputs)]
    if not fitting:
        raise PhiconvertError(f"no {target} group size divides this model's layer input sizes "
                              f"{', '.join(map(str, sorted(set(inputs))))}")  # fmt: skip
    return max(fitting)


def group_size_note(chosen: int, default: int, options: dict[str, Any], inputs: tuple[int, ...]) -> str | None:
    """What the report says when the default group size did not fit the model and a smaller one was taken."""
    if chosen == default or options.get("group_size"):
        return None
    sizes = ", ".join(map(str, sorted(set(inputs))))
    return f"the default {default} does not divide every layer's input size ({sizes}): {chosen} instead"


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, in the parent, before any work starts (the names allowed are
    the DEVICE option's choices, checked with every declared option)."""
    if device not in (None, "auto", "cpu"):
        resolve_device(device)


def resolve_device(device: str | None) -> str:
    """The torch device quantization runs on: auto = CUDA, else MPS (with CPU fallback for missing ops), else CPU."""
    device = device or "auto"
    if device == "mps" or (device == "auto" and sys.platform == "darwin"):
        # read when torch starts: operations MPS lacks (some linalg) then run on the CPU instead of failing
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise PhiconvertError("--device cuda: no CUDA device is available to this torch build")
    if device == "mps" and not torch.backends.mps.is_available():
        raise PhiconvertError("--device mps: MPS is not available (it needs Apple silicon and macOS)")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return device


def load_source(folder: Path, **settings: Any) -> Any:
    """``folder``'s model as transformers' ``from_pretrained`` loads it (``settings``: its keywords: dtype, device map,
    a quantization config to apply on load), its safetensors read with ``pread(2)`` rather than through a memory map.

    transformers maps every file of the checkpoint and keeps the maps until the whole model is loaded, so every page
    it has read counts in the process's resident memory on top of the converted copies it keeps: 8 of the 14 GiB
    torchao's export peaked at on Phi-4-mini's shape. safetensors' ``pread`` backend hands the loader the same lazy
    tensors, each read into memory the loader owns and frees; the file's pages stay in the kernel's page cache.
    The exports load the source this way, and the runtimes (``load``) their artifact."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    config, files = AutoConfig.from_pretrained(folder), weights.files(folder)
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", backend="pread")) for f in files]
        state = {name: handle.get_slice(name) for handle in handles for name in handle.keys()}
        # a state dict goes to the model's class: AutoModel deep-copies its keywords, which lazy tensors refuse
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        model = model_class.from_pretrained(None, config=config, state_dict=state, **settings)
    # named by its folder, as from_pretrained(folder) names it: AutoRound looks up on the Hub a name that is not one
    model.name_or_path = model.config.name_or_path = str(folder)
    if (folder / "generation_config.json").exists():  # the end-of-turn ids, which the config alone does not carry
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def copy_support_files(source: Path, output: Path) -> None:
    """Copy tokenizer files, chat template and generation config, so the artifact loads and chats on its own."""
    for item in sorted(source.iterdir()):
        if item.is_file() and not any(item.match(pattern) for pattern in WEIGHT_FILES):
            if not (output / item.name).exists():
                shutil.copyfile(item, output / item.name)  # follows the staging folder's links


def hub_layout_config(output: Path) -> None:
    """Rewrite a config.json saved by transformers 5 in the hub layout (top-level rope keys, `rope_scaling` with
    "type"), the layout of the published Phi checkpoints: transformers 4 and other runtimes silently ignore
    `rope_parameters` and would rotate with the wrong partial factor or without longrope."""
    from phiconvert.source import normalise_config

    path = output / "config.json"
    path.write_text(json.dumps(normalise_config(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")


def autoround(
    job: Any, tokenizer: Any, chunks: list[list[int]], fmt: str, **settings: Any
) -> tuple[dict[str, Any], list[str]]:
    """Quantize ``job.source`` with AutoRound (``settings``: its keywords) and write the checkpoint in ``fmt``
    (auto_gptq, auto_awq) into ``job.output`` in the hub layout; returns its quantization_config and the names of
    the linear layers it quantized (those it kept unconverted left out)."""
    import torch
    from auto_round import AutoRound

    # token tensors, not strings: AutoRound silently drops text samples shorter than its sequence length
    dataset = [torch.tensor([ids]) for ids in chunks]
    # the model read without a memory map (load_source), not the folder: AutoRound frees each block once it is
    # quantized and saved, which returns memory only for pages the process owns
    model = load_source(job.source, dtype="auto")
    rounder = AutoRound(model, tokenizer=tokenizer, dataset=dataset, nsamples=len(chunks),
                        seqlen=len(chunks[0]), enable_torch_compile=False, **settings)  # fmt: skip
    built = job.work / fmt
    rounder.quantize_and_save(str(built), format=fmt)
    folder = next(p.parent for p in sorted(built.rglob("config.json")))  # AutoRound writes into a subfolder
    for item in folder.iterdir():
        shutil.move(str(item), job.output / item.name)
    hub_layout_config(job.output)
    copy_support_files(job.source, job.output)
    config = json.loads((job.output / "config.json").read_text())["quantization_config"]
    expected = fmt.removeprefix("auto_")
    if config.get("quant_method") != expected:
        raise PhiconvertError(f"AutoRound wrote a '{config.get('quant_method')}' checkpoint, not {expected.upper()}")
    not_converted = config.get("modules_to_not_convert") or []
    return config, [n for n in linear_names(job.source) if not any(n.startswith(m) for m in not_converted)]


def calibration_chunks(tokenizer: Any, texts: list[str], length: int, count: int) -> list[list[int]]:
    """Up to ``count`` token sequences of ``length`` tokens cut from the joined calibration text.

    Joining first means short paragraphs are not dropped (AutoRound drops samples shorter than its sequence length);
    a text shorter than one chunk gives a single shorter chunk.
    """
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:count]
    return chunks or [ids]


def load(artifact: Path, mapped: bool = False) -> Any:
    """The artifact as transformers loads it (the format's own kernels underneath), computing in float32 on the
    CPU: the most exact mode these runtimes offer, and the same on every machine.

    Read without a memory map (``load_source``) unless ``mapped``: bitsandbytes and gptqmodel repack every weight
    for their CPU kernels on its first forward, and the mapped pages of the stored weights stayed resident beside
    the repacked copies. The allocator hands blocks above 1 MiB back to the system as they are freed: the repacking's
    temporaries (tens of MB per layer) otherwise stay in glibc's heap. On Phi-4-mini's shape (nf4, 2026-12-07) the
    first forward peaked at 8.25 GiB mapped, 6.49 read, 4.84 read with the allocator set. ``mapped`` is for torchao's
    checkpoint, whose tensors transformers rebuilds with metadata it reads from the files only."""
    # gptqmodel (GPTQ and AWQ kernels) starts one CPU worker on 2 cores by default
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from transformers import AutoModelForCausalLM

    return_freed_blocks()
    if mapped:
        return AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32, device_map="cpu").eval()
    return load_source(artifact, dtype=torch.float32, device_map="cpu").eval()


def return_freed_blocks(threshold: int = 1 << 20) -> None:
    """Hand the heap's free memory back to the system (an earlier stage's, in the same worker), and serve
    allocations above ``threshold`` bytes with their own mappings (glibc's ``M_MMAP_THRESHOLD``, which also stops
    glibc from raising it as it otherwise does after each large free), so freed ones go back as they are freed."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):  # glibc's (musl has no malloc_trim)
        libc.malloc_trim(0)
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def open_runtime(artifact: Path, exact: bool = True, loader: Any = None) -> Runtime:
    """transformers' float32 CPU load, in both modes (the exact one is the only one these formats have here).
    ``loader`` replaces ``load`` for a format that changes the loaded model (torchao's rows); the default is looked
    up at each call, so a patched ``load`` is the one used."""
    from transformers import AutoTokenizer

    return model_runtime((loader or load)(artifact), AutoTokenizer.from_pretrained(artifact), artifact)


def model_runtime(model: Any, tokenizer: Any, artifact: Path) -> Runtime:
    """A loaded transformers model as a Runtime: greedy decoding one token at a time over the model's KV cache
    (pure argmax: no logits processor of generate() interferes)."""
    import torch

    def stream(ids: list[int], new_tokens: int, to_the_end: bool, sampling: Sampling) -> Iterator[int]:
        past, step = None, torch.tensor([ids], device=model.device)
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        with torch.no_grad():
            for _ in range(new_tokens):
                out = model(input_ids=step, past_key_values=past, use_cache=True, logits_to_keep=1)
                past, token = out.past_key_values, pick(out.logits[0, -1].float().cpu(), sampling, generator)
                yield token
                step = torch.tensor([[token]], device=model.device)

    return tokenizer_runtime(tokenizer, artifact, stream, model.config.get_text_config().max_position_embeddings)


def tokenizer_runtime(tokenizer: Any, artifact: Path, stream: Any, context: int, stop_ids: Any = ()) -> Runtime:
    """A Runtime whose tokens come from ``stream`` and whose text side is a transformers tokenizer: the artifact's
    chat template, decoding, and its stop ids (with ``stop_ids``, those a runtime's own metadata adds)."""

    def prompt(messages: list[dict[str, str]]) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])

    stop = frozenset(stops.stop_ids(artifact, tokenizer)) | frozenset(int(i) for i in stop_ids)
    return Runtime(
        prompt=prompt,
        stream=stream,
        decode=lambda _, new: tokenizer.decode(new, skip_special_tokens=True),
        is_stop=stop.__contains__,
        encode=lambda text: list(tokenizer(text)["input_ids"]),
        context=context,
    )


def pick(logits: Any, sampling: Sampling, generator: Any) -> int:
    """The next token from one position's logits: argmax, or a top-p sample at the temperature."""
    import torch

    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < sampling.top_p  # the smallest head reaching top_p (the first always)
    chosen = torch.multinomial(ordered[keep] / ordered[keep].sum(), 1, generator=generator)
    return int(order[keep][chosen])


def logits(artifact: Path, sequences: list[list[int]], loader: Any = None) -> Logits:
    return logits_with((loader or load)(artifact), sequences)


def logits_with(model: Any, sequences: list[list[int]]) -> Logits:
    """One prefill per sequence, exactly the given ids (no BOS); the LM head is applied a chunk of positions at a
    time, so a long window's logits are never whole in memory."""
    import torch

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    with torch.no_grad():
        for index, ids in enumerate(sequences):
            tensor = torch.tensor([ids], device=model.device)
            hidden = decoder(input_ids=tensor, attention_mask=torch.ones_like(tensor)).last_hidden_state[0]
            for start in range(0, len(ids), LOGITS_CHUNK):
                yield index, start, head(hidden[start : start + LOGITS_CHUNK]).float().cpu().numpy()


def bits_per_weight(artifact: Path, source: Path, prefixes: list[str]) -> float:
    """Stored bits per source weight of the quantized layers: every tensor the artifact keeps for those layers
    (packed weights, scales, zeros, indices), over the number of weights they replace."""
    from safetensors import safe_open

    def tensors(folder: Path):
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_slice(name)

    wanted, originals = tuple(f"{p}." for p in prefixes), {f"{p}.weight" for p in prefixes}
    stored = sum(_nbytes(s) for name, s in tensors(artifact) if name.startswith(wanted))
    weights = sum(int(np.prod(s.get_shape())) for name, s in tensors(source) if name in originals)
    return 8.0 * stored / weights if weights else float("nan")


def _nbytes(tensor_slice: Any) -> int:
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1}
    return int(np.prod(tensor_slice.get_shape())) * sizes.get(tensor_slice.get_dtype(), 1)


def linear_names(source: Path) -> list[str]:
    """Names of the decoder blocks' linear layers (the ones every HF-format quantizer converts), from the weights."""
    from safetensors import safe_open

    names = []
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                    names.append(name[: -len(".weight")])
    return sorted(names)
