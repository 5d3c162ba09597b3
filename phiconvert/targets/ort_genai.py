"""ONNX Runtime GenAI: the model builder writes model.onnx + genai_config.json; onnxruntime-genai runs them.

The builder runs in-process (`parse_extra_options` + `create_model`, what its CLI does, without a second Python
start). Given a float checkpoint, it builds the whole graph in float32 and then quantizes it (its RTN and k-quant):
three times the bf16 weights in memory, which killed a Phi-4-mini conversion at 23 GiB. So int4 and int8 go the
builder's other way: phiconvert quantizes the decoder layers itself, one layer in memory at a time (GPTQ on the
calibration text for int4, with llama.cpp's and the builder's mixed int8 layers; round-to-nearest for int8), writes
the quantized checkpoint in the builder's Olive layout (MatMulNBits' own bytes, which the builder only reshapes),
and the builder assembles the graph around them. The builder's own quantizers stay available
(``--int4-algo rtn|k_quant|k_quant_mixed``) for models that fit.

Two builder traps are refused before it runs: it takes any Linear layer with vocab_size outputs for the LM head,
and ONNX Runtime's CPU attention kernel needs half the rotary dimension to be a multiple of 8.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from phiconvert import archs, progress
from phiconvert.errors import PhiconvertError
from phiconvert.source import parameter_count
from phiconvert.targets import (
    GROUP_SIZE,
    SYM,
    ExportJob,
    Logits,
    Memory,
    Option,
    Precision,
    Runtime,
    Sampling,
    Signature,
    Target,
)

# Precisions the builder makes per execution provider. There is no CPU fp16: the builder's CPU fp16 graph
# (MultiHeadAttention with repeat_kv, GroupQueryAttention being fp32-only there) fails at the first decode step.
PROVIDER_PRECISIONS = {
    "cpu": ("int4", "int8", "fp32"),
    "cuda": ("int4", "int8", "fp16", "fp32"),
    "dml": ("int4", "fp16"),
}
# The onnxruntime-genai distribution that carries each GPU execution provider.
PROVIDER_PACKAGES = {"cuda": "onnxruntime-genai-cuda", "dml": "onnxruntime-genai-directml"}
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# phiconvert's GPTQ (fed to the builder as a GPTQ checkpoint: memory-bounded), or the builder's own quantizers
INT4_ALGOS = ("gptq_mixed", "gptq", "rtn", "k_quant", "k_quant_mixed")
PREQUANTIZED = ("gptq_mixed", "gptq")

# Defaults measured on the bundled trained fixtures (docs/tutorials/onnx-runtime-genai.md): the 8-bit LM head (and
# with it Phi-4-mini's tied embeddings) matters most, then the mixed int4/int8 layers, then blocks of 32.
DEFAULTS = {
    "ep": "cpu",
    "group_size": 32,
    "sym": False,
    "accuracy_level": None,  # the builder's: 4 on CPU (int8 activations, its fast path; 1, fp32, measured no better)
    "int4_algo": "gptq_mixed",
    "int8_lm_head": True,
}
SEQUENCE_LENGTH, MAX_SAMPLES = 512, 128  # GPTQ calibration chunks
QUANTIZED = ("int4", "int8")
OPTIONS = (
    Option("ep", "execution provider the model is built for (default cpu)", choices=tuple(PROVIDER_PRECISIONS)),
    GROUP_SIZE.only(*QUANTIZED),
    SYM.only(*QUANTIZED),
    Option("accuracy_level", "compute type of quantized MatMuls (4 int8 activations, 1 fp32, 0 provider's)", int,
           choices=ACCURACY_LEVELS, precisions=QUANTIZED),
    Option("int4_algo", "int4 quantizer. gptq_mixed (default): phiconvert's GPTQ on --calibration, one layer in "
           "memory at a time, sensitive layers at 8 bits; rtn, k_quant, k_quant_mixed: the builder's own, which "
           "builds the whole model in float32 first", choices=INT4_ALGOS, precisions=("int4",)),
    Option("int8_lm_head", "keep the LM head (and tied embeddings) at 8 bits in int4 (default on)", bool,
           precisions=("int4",)),
)  # fmt: skip


def settings_for(precision: str, options: dict[str, Any]) -> dict[str, Any]:
    """The real settings of this export (the user's options over our defaults, for those that apply to
    ``precision``), refusing values the builder cannot make (the declared choices are checked before any work)."""
    applicable = [option.name for option in OPTIONS if option.applies(precision)]
    settings = {name: DEFAULTS[name] if options.get(name) is None else options[name] for name in applicable}
    if "accuracy_level" in settings and settings["accuracy_level"] is None:
        settings["accuracy_level"] = 4 if settings["ep"] == "cpu" else 0  # 0: the GPU provider's choice
    if settings.get("group_size", BLOCK_SIZES[0]) not in BLOCK_SIZES:
        raise PhiconvertError(f"ort-genai --group-size {settings['group_size']} is not one of: "
                              f"{', '.join(map(str, BLOCK_SIZES))}")  # fmt: skip
    if precision not in PROVIDER_PRECISIONS[settings["ep"]]:
        gpu = "; fp16 is for --ep cuda or dml" if precision == "fp16" else ""
        raise PhiconvertError(
            f"ort-genai {precision} is not built for --ep {settings['ep']} "
            f"(it builds {', '.join(PROVIDER_PRECISIONS[settings['ep']])}){gpu}"
        )
    if precision == "int4" and settings["int4_algo"].startswith("k_quant") and settings["sym"]:
        raise PhiconvertError("k-quant is asymmetric (a zero point per block); for symmetric int4 add --int4-algo rtn")
    return settings


def builder_options(settings: dict[str, Any]) -> list[str]:
    """The builder's KEY=VALUE extra options for ``settings`` (a prequantized checkpoint carries its own bits)."""
    if "group_size" not in settings:
        return []
    options = [
        f"block_size={settings['group_size']}",
        f"is_symmetric={settings['sym']}",
        f"accuracy_level={settings['accuracy_level']}",
    ]
    if settings.get("int4_algo", "").startswith(("rtn", "k_quant")):  # the builder's own quantizers
        options.append(f"algo_config={settings['int4_algo'].removesuffix('_mixed')}")
        mixed = ["mixed_layers:int8"] if settings["int4_algo"] == "k_quant_mixed" else []
        mixed += ["last_matmul:int8"] if settings["int8_lm_head"] else []
        if mixed:
            options.append("matmul_mixed_precision=" + ",".join(mixed))
    return options


def check_runtime(ep: str) -> None:
    """Every artifact is proven in its own runtime, so a GPU build needs that GPU's onnxruntime-genai here."""
    import onnxruntime_genai as og

    available = {"cpu": True, "cuda": og.is_cuda_available(), "dml": og.is_dml_available()}
    if not available[ep]:
        raise PhiconvertError(
            f"this onnxruntime-genai has no {ep.upper()} execution provider: install {PROVIDER_PACKAGES[ep]} "
            "in its place (on a machine with that GPU), or use --ep cpu"
        )


def check_model(config: dict[str, Any], ep: str) -> None:
    """Refuse the shapes the builder would silently export wrong, or ONNX Runtime would fail on obscurely."""
    vocab, head_dim = config["vocab_size"], archs.head_dim(config)
    linears = {
        "qkv_proj": sum(archs.fused_rows(config, "self_attn.qkv_proj")),
        "o_proj/down_proj": config["hidden_size"],
        "gate_up_proj": sum(archs.fused_rows(config, "mlp.gate_up_proj")),
    }
    for name, out_features in linears.items():
        if out_features == vocab:
            raise PhiconvertError(
                f"{name} has vocab_size ({vocab}) outputs: the ONNX Runtime GenAI model builder would take it "
                "for the LM head and export wrong logits"
            )
    rotary_dim = int(head_dim * config.get("partial_rotary_factor", 1.0))
    if ep == "cpu" and (rotary_dim // 2) % 8:
        raise PhiconvertError(
            f"ONNX Runtime's CPU attention needs half the rotary dimension to be a multiple of 8; this model's "
            f"rotary dimension is {rotary_dim} (head_dim {head_dim} x partial_rotary_factor)"
        )


def export(job: ExportJob) -> dict[str, Any]:
    settings = settings_for(job.precision, job.options)
    ep = settings["ep"]
    check_runtime(ep)
    config = json.loads((job.source / "config.json").read_text())
    check_model(config, ep)

    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    prequantized = None
    if job.precision == "int8" or settings.get("int4_algo") in PREQUANTIZED:
        prequantized = prequantize(job, settings, config)
    source = str(prequantized["folder"] if prequantized else job.source)
    output, cache = str(job.output), str(job.work / "builder-cache")
    options = builder_options(settings)
    if prequantized and prequantized["lm_head_bits"] is None:  # the builder quantizes the head: plain RTN, its bits
        bits = "int8" if settings.get("int8_lm_head", True) or job.precision == "int8" else "int4"
        options += ["algo_config=rtn", f"matmul_mixed_precision=last_matmul:{bits}"]
    extra = parse_extra_options(None, source, output, job.precision, ep, cache, options)
    steps = {r"Unpacking and repacking layer (\d+)": "builder: repack", r"Reading layer (\d+)": "builder: build"}
    undo = progress.redirect_prints(steps, config["num_hidden_layers"], "layers")
    try:
        create_model(None, source, output, job.precision, ep, cache, **extra)
    finally:
        undo()
    if prequantized and prequantized["lm_head_bits"] and config.get("tie_word_embeddings"):
        fix_tied_embedding_of_prequantized_head(job.output)
    # CPU only: the GPU providers' 8-bit GatherBlockQuantized is not proven here
    tied = (
        job.precision == "int8" and ep == "cpu" and config.get("tie_word_embeddings") and tie_int8_embedding(job.output)
    )
    return {
        "settings": settings,
        "builder_options": options,
        # the builder's own route to the same layout (mixed int8 layers, 8-bit head), for benchmarks against it
        "anchor_builder_options": builder_options({**settings, "int4_algo": "k_quant_mixed"})
        if job.precision == "int4" and prequantized
        else builder_options(settings),
        "embedding": "read from the int8 LM head (tied, as the source; phiconvert re-ties it)" if tied else None,
        "prequantized": {k: v for k, v in prequantized.items() if k != "folder"} if prequantized else None,
        "calibration": (prequantized or {}).get("calibration") or ("not used" if options else None),
        "eos_token_id": ensure_end_of_turn(job.output),
        **weight_report(job.output, job.source),
    }


def mixed_layers(count: int) -> list[int]:
    """The decoder layers whose attention and down projections get 8 bits in a mixed int4 model: llama.cpp's
    rule for its _M quants, which the builder's k_quant_mixed applies too."""
    return [i for i in range(count) if i < count / 8 or i >= 7 * count / 8 or (i - round(count / 8)) % 3 == 2]


def prequantize(job: ExportJob, settings: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The source's decoder layers quantized by phiconvert, one layer in memory at a time, as a checkpoint in the
    builder's Olive layout in job.work: int4 by GPTQ on the calibration text (``gptq_mixed``: the mixed layers'
    attention and down projections at 8 bits), int8 by round-to-nearest. Same blocks and zero points as the
    builder's."""
    from transformers import AutoTokenizer

    from phiconvert import gptq
    from phiconvert.reference import SourceModel
    from phiconvert.targets import hf_common

    bits = 4 if job.precision == "int4" else 8
    chosen = gptq.Settings(bits=bits, group_size=settings["group_size"], sym=settings["sym"], desc_act=False)
    eight = gptq.Settings(bits=8, group_size=settings["group_size"], sym=settings["sym"], desc_act=False)
    promoted = set(mixed_layers(config["num_hidden_layers"])) if settings.get("int4_algo") == "gptq_mixed" else set()
    # llama.cpp promotes the value projection; where q/k/v are separate (Llama, Qwen) the builder fuses them when their
    # bits agree, and a model with fused and unfused layers fails to load (onnxruntime-genai 0.18): all three go
    sensitive = ("qkv_proj", "q_proj", "k_proj", "v_proj", "down_proj")

    def settings_of(name: str) -> gptq.Settings:
        layer = int(name.split(".")[2])
        return eight if layer in promoted and name.endswith(sensitive) else chosen

    rtn = bits == 8
    chunks: list[list[int]] = []
    if not rtn:
        tokenizer = AutoTokenizer.from_pretrained(job.source)
        chunks = hf_common.calibration_chunks(tokenizer, job.calibration, SEQUENCE_LENGTH, MAX_SAMPLES)
    source = SourceModel(job.source)
    packed, error = gptq.quantize_model(source.model, chunks, settings_of, "cpu", rtn=rtn, source=source)
    # the LM head too (8 bits unless told otherwise), so no float matrix is left for the builder to quantize: its
    # own pass copies the whole model twice more, and with k-quant it took 24 GiB on Phi-4-mini's head
    head = eight if settings.get("int8_lm_head", True) else chosen
    tied = source.head is source.embedding
    if source.head.shape[0] % (32 // head.bits):  # GPTQ packs zero points of 32 // bits outputs per word
        head = None  # the builder quantizes it (round-to-nearest): a vocabulary this odd is a small model's
    else:
        packed["lm_head"] = gptq.quantize_rows(source.head, head)
    folder = job.work / "prequantized"
    folder.mkdir()
    overrides = {name: settings_of(name) for name in packed if name != "lm_head" and settings_of(name) != chosen}
    overrides |= {"lm_head": head} if head and head != chosen else {}
    # an int4 graph reads a tied embedding from the quantized head (GatherBlockQuantized): no float copy needed
    leave_out = (f"{source.embedding.name}",) if tied and head and bits == 4 else ()
    layers, olive_overrides = {}, {}
    for name in progress.track(list(packed), unit="linears", what="Olive layout"):  # GPTQ's packing dropped as it goes
        its = overrides.get(name, chosen)
        linears = split_fused(name, olive_layer(packed.pop(name), its.bits), config)
        layers[name] = {f"{linear}.{kind}": t for linear, parts in linears.items() for kind, t in parts.items()}
        if name in overrides:
            olive_overrides |= dict.fromkeys(linears, {"bits": its.bits, "group_size": its.group_size})
    olive_config = {"quant_method": "olive", "bits": chosen.bits, "group_size": chosen.group_size,
                    "overrides": olive_overrides}  # fmt: skip
    progress.advance(0, None, what="writing the checkpoint")
    gptq.write_checkpoint(job.source, folder, layers, olive_config, leave_out)
    hf_common.copy_support_files(job.source, folder)
    return {
        "folder": folder,
        "method": "round-to-nearest" if rtn else "GPTQ",
        "layers_at_8_bits": sorted(overrides) if bits == 4 else "all",
        "lm_head_bits": head.bits if head else None,
        "relative_output_error": error,
        "calibration": None if rtn else {"chunks": len(chunks), "tokens_per_chunk": len(chunks[0])},
    }


def olive_layer(packed: Any, bits: int, rows: int = 16384) -> dict[str, Any]:
    """One layer of phiconvert's GPTQ packing in the builder's Olive layout: ONNX Runtime's MatMulNBits bytes
    with each output row's blocks side by side (qweight (out, in * bits / 8) uint8, scales (out, groups), zero
    points (out, groups * bits / 8 rounded up) uint8; the first value in the low bits), which the builder only
    reshapes. Its GPTQ loader instead unpacks every value to int64, dequantizes and requantizes: 9.8 GB at once
    for Phi-4-mini's 8-bit LM head (200064 x 3072), the peak of the whole export. A slice of ``rows`` outputs at a
    time, so the head is never unpacked whole here either."""
    import torch

    from phiconvert import gptq

    maxq, outputs, parts = 2**bits - 1, packed.scales.shape[1], {"qweight": [], "scales": [], "qzeros": []}
    for start in range(0, outputs, rows):
        end = min(start + rows, outputs)
        ints = gptq.unpack_rows(packed.qweight[:, start:end], bits)  # (in, n)
        stored = gptq.unpack_rows(packed.qzeros[:, start * bits // 32 : end * bits // 32].T, bits)  # (n, groups)
        parts["qweight"].append(_pack_bytes(ints.T, bits))
        parts["qzeros"].append(_pack_bytes((stored + 1) & maxq, bits))  # GPTQ v1 stores zero - 1
        parts["scales"].append(packed.scales[:, start:end].T)
    return {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}


def split_fused(name: str, tensors: dict[str, Any], config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The linears a fused one (Phi-3's qkv_proj, gate_up_proj) holds, each with its rows of ``tensors``; any other
    layer as it is. The builder (onnxruntime-genai 0.18) splits a fused linear's Olive zero points at a packed row
    count (q_size // 2 at 4 bits, where Olive's rows are not packed), and ONNX Runtime then refuses the graph; given
    the parts, it fuses q, k and v itself, as it does from a GPTQ checkpoint."""
    fused = next((linear for linear in archs.FUSED if name.endswith(f".{linear}")), None)
    if fused is None:
        return {name: tensors}
    base, rows = name.removesuffix(fused), archs.fused_rows(config, fused)
    pieces = {kind: tensor.split(rows) for kind, tensor in tensors.items()}
    return {base + part: {kind: pieces[kind][i].contiguous() for kind in tensors}
            for i, part in enumerate(archs.FUSED[fused])}  # fmt: skip


def _pack_bytes(values: Any, bits: int) -> Any:
    """(..., m) unsigned ``bits``-bit integers to (..., ceil(m * bits / 8)) uint8, the first value in the lowest
    bits: MatMulNBits' packing of weights and zero points (a row's last byte padded with zeros)."""
    import torch

    per = 8 // bits
    padded = torch.nn.functional.pad(values, (0, -values.shape[-1] % per))
    grouped = padded.reshape(*values.shape[:-1], -1, per)
    return (grouped << torch.arange(0, 8, bits, dtype=torch.int64)).sum(-1).to(torch.uint8)


def ensure_end_of_turn(artifact: Path) -> list[int]:
    """Make genai_config.json stop generation at every stop id of the model (its end-of-turn token included) even
    when the source's configs name only eos."""
    from transformers import AutoTokenizer

    from phiconvert import stops

    config_file = artifact / "genai_config.json"
    config = json.loads(config_file.read_text())
    eos = config["model"]["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    wanted = stops.stop_ids(artifact, AutoTokenizer.from_pretrained(artifact))
    if set(wanted) - set(eos):
        eos = eos + [i for i in wanted if i not in eos]
        config["model"]["eos_token_id"] = eos
        config_file.write_text(json.dumps(config, indent=4) + "\n")
    return eos


def tie_int8_embedding(artifact: Path) -> bool:
    """Read the embedding from the int8 LM head's blocks, as the builder's int4 graphs do with their 8-bit head.

    The builder's int8 graph unties a tied model: it quantizes embedding lookups only in 4 bits, so it keeps a
    float32 copy of the matrix beside the int8 LM head (2.3 GiB on Phi-4-mini, 40% of the file). The int8 head's
    blocks, reshaped to (vocab, hidden), are what GatherBlockQuantized reads. The data file is rewritten without
    the copy, one tensor at a time; verification then proves the graph in ONNX Runtime.
    """
    import onnx
    from onnx import helper

    model_file = artifact / "model.onnx"
    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.name == "/model/embed_tokens/Gather"), None)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output), None)
    if gather is None or head is None or gather.input[0] not in initializers:
        return False
    attributes = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    vocab, hidden = attributes["N"], attributes["K"]
    embedding = initializers[gather.input[0]]
    if attributes["bits"] != 8 or hidden % attributes["block_size"] or list(embedding.dims) != [vocab, hidden]:
        return False
    shape = helper.make_tensor("/model/embed_tokens/tied_shape", onnx.TensorProto.INT64, [2], [vocab, hidden])
    reshape = helper.make_node(
        "Reshape", [head.input[1], shape.name], ["/model/embed_tokens/Reshape/output_0"], "/model/embed_tokens/Reshape"
    )
    position = list(graph.node).index(gather)
    block_params = _as_matrices(graph, list(head.input[2:4]), vocab, position)
    lookup = helper.make_node(
        "GatherBlockQuantized",
        [reshape.output[0], gather.input[1], *block_params],  # data, indices, scales[, zero points]
        list(gather.output),
        "/model/embed_tokens/GatherBlockQuantized",
        domain="com.microsoft",
        bits=8,
        block_size=attributes["block_size"],
        gather_axis=0,
        quantize_axis=1,
    )
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    graph.node.insert(position, lookup)
    graph.node.insert(position, reshape)
    graph.initializer.remove(embedding)
    graph.initializer.append(shape)
    _rewrite_external_data(model, artifact)
    onnx.save(model, str(model_file))
    return True


def _as_matrices(graph: Any, names: list[str], rows: int, position: int) -> list[str]:
    """``names`` of block scales / zero points, each reshaped to (rows, blocks) where its initializer is flat: the
    layout MatMulNBits keeps for a prequantized matrix, which GatherBlockQuantized (2-D only) refuses."""
    import onnx
    from onnx import helper

    initializers = {t.name: t for t in graph.initializer}
    out = []
    for name in names:
        if name not in initializers or len(initializers[name].dims) != 1:
            out.append(name)
            continue
        shape = helper.make_tensor(f"{name}/matrix_shape", onnx.TensorProto.INT64, [2], [rows, -1])
        reshape = helper.make_node("Reshape", [name, shape.name], [f"{name}/matrix"], f"/{name}/Reshape")
        graph.initializer.append(shape)
        graph.node.insert(position, reshape)
        out.append(reshape.output[0])
    return out


def fix_tied_embedding_of_prequantized_head(artifact: Path) -> bool:
    """The builder reads a tied embedding from a prequantized LM head's blocks with GatherBlockQuantized, but passes
    the head's flat block scales and zero points, which ONNX Runtime refuses to load ("scales must have the same
    rank as data", onnxruntime-genai 0.18): reshape them to (vocabulary, blocks) in the graph."""
    import onnx

    model_file = artifact / "model.onnx"
    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    gather = next((n for n in graph.node if n.name == "/model/embed_tokens/GatherBlockQuantized"), None)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output), None)
    if gather is None or head is None:
        return False
    vocab = next(a.i for a in head.attribute if a.name == "N")
    params = _as_matrices(graph, list(gather.input[2:]), vocab, list(graph.node).index(gather))
    if params == list(gather.input[2:]):
        return False
    del gather.input[2:]
    gather.input.extend(params)
    onnx.save(model, str(model_file))
    return True


def _rewrite_external_data(model: Any, artifact: Path) -> None:
    """Copy the tensors the graph still uses into a new data file, one at a time, and point the graph at it."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = [t for t in model.graph.initializer if uses_external_data(t)]
    locations = {ExternalDataInfo(t).location for t in tensors}
    if len(locations) != 1:
        raise PhiconvertError(f"the builder wrote {len(locations)} external data files; expected one")
    location = locations.pop()
    old, new = artifact / location, artifact / f"{location}.tied"
    with old.open("rb") as read, new.open("wb") as write:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            if info.length is None:
                raise PhiconvertError(f"the builder wrote no length for tensor {tensor.name}")
            read.seek(info.offset or 0)
            place = {"location": location, "offset": str(write.tell()), "length": str(info.length)}
            write.write(read.read(info.length))
            del tensor.external_data[:]
            for key, value in place.items():
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    new.replace(old)


def weight_report(artifact: Path, source: Path) -> dict[str, Any]:
    """Bits of every weight matrix as the graph stores it, and on-disk bits per source weight."""
    import onnx

    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    initializers = {t.name: t for t in graph.initializer}
    bits: dict[str, str] = {}
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            bits[node.name] = f"int{attributes.get('bits', 4)}"
        elif node.op_type in ("MatMul", "Gather"):
            weight = initializers.get(node.input[0 if node.op_type == "Gather" else 1])
            if weight is not None:
                bits[node.name] = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type).name
    counts: dict[str, int] = {}
    for kind in bits.values():
        counts[kind] = counts.get(kind, 0) + 1
    weights = parameter_count(source)
    size = sum(p.stat().st_size for p in artifact.glob("model.onnx*"))
    body = "int4" if "int4" in counts else max(counts, key=counts.get)
    return {
        "weights_by_type": counts,
        "weight_type": body,
        "other_weights": {name: kind for name, kind in sorted(bits.items()) if kind != body},
        "bits_per_weight": round(8 * size / weights, 3),
    }


def open_runtime(artifact: Path, exact: bool = True) -> Runtime:
    """og.Model as the artifact configures it (one mode: its precision is the artifact's); a new Generator per
    stream is a fresh KV cache."""
    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    tokenizer = og.Tokenizer(model)
    stop = frozenset(int(t) for t in tokenizer.eos_token_ids)

    def prompt(messages: list[dict[str, str]]) -> list[int]:
        return [
            int(t)
            for t in tokenizer.encode(tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True))
        ]

    def stream(ids: list[int], new_tokens: int, to_the_end: bool, sampling: Sampling) -> Iterator[int]:
        params = og.GeneratorParams(model)
        # og stops by itself at genai_config's eos ids; min_length = max_length masks them until the last token
        length = len(ids) + new_tokens
        search: dict[str, Any] = {"do_sample": False, "max_length": length}
        if to_the_end:
            search["min_length"] = length
        if not sampling.greedy:  # top_k 0: og's default of 50 would cut what top_p keeps
            search.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if sampling.seed is not None:
                search["random_seed"] = sampling.seed
        params.set_search_options(**search)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))  # the prefill
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def decode(_: list[int], new: list[int]) -> str:
        # a stream keeps a character whose bytes span two tokens
        text, pieces = "", tokenizer.create_stream()
        for token in new:
            text += pieces.decode(token)
        return text

    return Runtime(
        prompt=prompt,
        stream=stream,
        decode=decode,
        is_stop=stop.__contains__,
        encode=lambda text: [int(t) for t in tokenizer.encode(text)],
        context=json.loads((artifact / "genai_config.json").read_text())["model"]["context_length"],
    )


def logits(artifact: Path, sequences: list[list[int]]) -> Logits:
    """Prefill logits of each sequence, fed as given (appended ids get no BOS), in the artifact's own precision."""
    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    for index, ids in enumerate(sequences):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids))
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        yield index, 0, np.asarray(generator.get_output("logits"), dtype=np.float32)[0]
        del generator


TARGET = Target(
    name="ort-genai",
    extra="ort-genai",
    modules=("onnxruntime_genai", "onnx_ir", "onnx"),
    packages=("onnxruntime-genai", "onnxruntime", "onnx-ir", "onnx"),
    precisions={
        "int4": Precision(
            "4-bit GPTQ layer by layer, asymmetric, blocks of 32; LM head and the k-quant-mixed layers at 8 bits",
            bits=4.6,
            bound="int4",
            cpu_export_speed=3.4e6,  # Phi-4-mini's shape, 2 cores, 2026-12-07: 1140 s (GPTQ, then the builder)
        ),
        "int8": Precision("8-bit weights, blocks of 32", bits=8.5, bound="int8"),
        "fp16": Precision("float16 weights and activations, for --ep cuda or dml", bits=16, bound="fp16"),
        "fp32": Precision("float32, exact", bits=32, bound="fp32"),
    },
    signature=Signature(file="genai_config.json"),
    runtime="onnxruntime-genai",
    tutorial="onnx-runtime-genai.md",
    library="onnxruntime-genai",
    default_precision="int4",
    export=export,
    open=open_runtime,
    logits=logits,
    options=OPTIONS,
    check=lambda precision, options: settings_for(precision, options) and None,
    # int4 export measured 2026-12-07 with the builder given the Olive layout: Phi-4-mini's shape 7.97 GiB (7.15 GiB
    # bf16), Phi-4's 22.53 GiB (27.3 GiB bf16; prequantized by round-to-nearest, the builder's step the same): the
    # builder holds the quantized graph and a protobuf copy of it. Smoke test and logits 6.76 GiB (Phi-4-mini)
    memory=Memory(export=(0.72, 2.9), runtime=(2.0, 2.7)),
)
