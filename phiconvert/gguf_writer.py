"""Write a Hugging Face checkpoint of a profiled architecture (``phiconvert.archs``) as an F16/BF16 GGUF file.

Built on gguf-py's writer and its format definitions (architecture, tensor names, metadata keys); the profile names
the GGUF architecture and whether llama.cpp's graph wants the q/k rows reordered. Tensors are
streamed: every tensor's info goes into the header first, then each tensor is read from its safetensors file,
converted in chunks and written before the next one is read, so peak memory is about one tensor, not the model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from phiconvert import archs, progress, stops, weights
from phiconvert.errors import PhiconvertError
from phiconvert.source import normalise_config

# llama.cpp's byte-level BPE pre-tokenizers (llama-vocab.cpp): name -> (its split regex, whether whole-word tokens
# skip the merges). The source's pre-tokenizer is matched by behaviour: how it splits PROBE_TEXT, and its
# ignore_merges, not by the spelling of its regex. o200k: Phi-4-mini; cl100k: Phi-4 (as DBRX) and Llama-3.
CL100K = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "gpt-4o": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        False,
    ),
    "llama-bpe": (CL100K, True),
    "dbrx": (CL100K, False),
    "qwen2": (CL100K.replace(r"\p{N}{1,3}", r"\p{N}"), False),
    "gpt-2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", False),
}
# Text on which the pre-tokenizers above split differently: cased contractions, digit runs, letters of several
# scripts and marks, punctuation runs, slashes, and every kind of whitespace run.
PROBE_TEXT = (
    "I'M sure you'Re right, they'll say: 3 33 333 3333 1234567 -- ok!? ... a/b/c\n\n  x\t\ty \r\n"
    "Ünïcödé naïve café ÀÉÎÕÜ Ωmega ελληνικά русский 中文字符 日本語 한국어 عربي 🦙🦙 e\u0301 CamelCaseWord "
    "snake_case_word ALLCAPS 12ab34 $100.00 #hash @user\n   \n"
)

# Output dtype -> (GGUF type of the 2-D weights, general.file_type)
DTYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
# GGUF tensor type -> numpy dtype its elements are stored as (bf16 as its 16 raw bits)
STORAGE = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.BF16: np.uint16,
}
# safetensors and GGUF name these three alike
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
CHUNK = 1 << 24  # elements converted at a time (64 MiB of float32)


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: its name, type, and where its data comes from (a source tensor or an array)."""

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    source: weights.Tensor | None = None
    array: np.ndarray | None = None
    permute: int = 0  # heads whose q/k rows are reordered for llama.cpp's rope (0: written as they are)
    shift: float = 0.0  # added to every value (Gemma's norms: the profile's norm_shift)


def write_gguf(source: Path, path: Path, dtype: str = "f16") -> dict[str, Any]:
    """Convert the checkpoint in ``source`` to ``path``; returns what was written, for the report."""
    config = normalise_config(json.loads((source / "config.json").read_text()))  # either layout -> hub layout
    profile = archs.profile(config)
    arch = getattr(gguf.MODEL_ARCH, profile.gguf_arch)
    qtype, ftype = DTYPES[dtype]
    plan = _plan_tensors(config, weights.index(source), qtype, arch, profile)
    n_vocab = next(p.shape[0] for p in plan if p.name == "token_embd.weight")

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    details = _add_hparams(writer, config)
    details.update(_add_tokenizer(writer, source, n_vocab))
    for p in plan:
        nbytes = math.prod(p.shape) * np.dtype(STORAGE[p.qtype]).itemsize
        writer.add_tensor_info(p.name, p.shape, np.dtype(STORAGE[p.qtype]), nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in progress.track(plan, unit="tensors", what="write GGUF"):
        data = p.array if p.array is not None else _convert(p.source, p.qtype, p.shift)
        writer.write_tensor_data(_permute(data, p.permute) if p.permute else data)
    writer.close()
    return {"tensors": len(plan), "file_type": ftype.name, "architecture": gguf.MODEL_ARCH_NAMES[arch], **details}


def _plan_tensors(
    config: dict[str, Any],
    tensors: dict[str, weights.Tensor],
    qtype: gguf.GGMLQuantizationType,
    arch: gguf.MODEL_ARCH,
    profile: archs.Profile,
) -> list[Planned]:
    """GGUF names and types: 2-D weights in the output dtype, norms and rope factors in F32 (as llama.cpp expects)."""
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"]}
    heads["k_proj"] = config.get("num_key_value_heads") or heads["q_proj"]
    plan = [Planned(name, gguf.GGMLQuantizationType.F32, a.shape, array=a) for name, a in _rope_factors(config)]
    for hf_name, tensor in tensors.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PhiconvertError(f"unexpected tensor {hf_name!r} for GGUF architecture {gguf.MODEL_ARCH_NAMES[arch]}")
        kind = qtype if len(tensor.shape) > 1 else gguf.GGMLQuantizationType.F32
        projection = hf_name.rsplit(".", 2)[-2]
        permute = heads.get(projection, 0) if profile.permute_qk else 0
        shift = profile.norm_shift if hf_name.endswith("norm.weight") else 0.0
        plan.append(Planned(name, kind, tensor.shape, tensor, permute=permute, shift=shift))
    return plan


def _permute(data: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from transformers' rotate-half order to the adjacent pairs llama.cpp's rope rotates
    (row i of a head's first half and row i of its second half become rows 2i and 2i+1)."""
    shape = data.shape
    return data.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_factors(config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Rope factors llama.cpp reads as tensors: LongRoPE's two sets (it picks one by context length), and llama3's
    per-frequency divisors (transformers' own llama3 frequencies against the unscaled ones)."""
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind == "llama3":
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_factors(config))]
    if kind not in ("longrope", "su"):
        return []
    long_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
    short_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"
    return [
        (long_name, np.asarray(scaling["long_factor"], np.float32)),
        (short_name, np.asarray(scaling["short_factor"], np.float32)),
    ]


def _llama3_factors(config: dict[str, Any]) -> np.ndarray:
    """llama.cpp divides each rotary frequency by its factor: the unscaled frequencies over llama3's, both as
    transformers computes them."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = archs.head_dim(config)
    base = config.get("rope_theta", 10000.0)
    scaling = {k: v for k, v in config["rope_scaling"].items() if k != "type"}
    scaled = AutoConfig.for_model(
        config["model_type"],
        hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        head_dim=head_dim,
        max_position_embeddings=config["max_position_embeddings"],
        rope_parameters={**scaling, "rope_type": "llama3", "rope_theta": base},
    )
    scaled_freqs, _ = ROPE_INIT_FUNCTIONS["llama3"](scaled)
    plain_freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return (plain_freqs / scaled_freqs).numpy().astype(np.float32)


def _add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any]) -> dict[str, Any]:
    """Model hyperparameters in llama.cpp's keys for the writer's architecture; returns the rope settings for the
    report."""
    n_head = config["num_attention_heads"]
    head_dim = archs.head_dim(config)
    rope_dim = int(config.get("partial_rotary_factor", 1.0) * head_dim)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(rope_dim)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    if isinstance(config.get("sliding_window"), int) and config.get("use_sliding_window", True):
        writer.add_sliding_window(config["sliding_window"])
        if "sliding_attention" in config.get("layer_types", ()):  # which layers slide (Gemma), not a fixed pattern
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config["layer_types"]])
    if config.get("rope_local_base_freq"):  # the sliding layers' own rope base (Gemma-3)
        writer.add_rope_freq_base_swa(config["rope_local_base_freq"])
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):  # fmt: skip
        if config.get(key):
            add(config[key])
    _check_attention_scale(config, head_dim)
    details: dict[str, Any] = {"rope_dimension_count": rope_dim, "rope_scaling": None}
    scaling = config.get("rope_scaling")
    kind = scaling.get("type", scaling.get("rope_type")) if scaling else None
    if kind == "llama3":
        details["rope_scaling"] = {"type": "llama3", "factor": scaling["factor"], "as": "rope_freqs.weight"}
    elif kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
        details["rope_scaling"] = {"type": "linear", "factor": scaling["factor"]}
    elif kind:
        if kind not in ("longrope", "su"):
            raise PhiconvertError(
                f"rope_scaling type {kind!r} is not supported for GGUF (longrope, llama3 and linear are)"
            )
        original = config.get("original_max_position_embeddings") or scaling["original_max_position_embeddings"]
        attn_factor = _longrope_attention_factor(scaling, config["max_position_embeddings"], original)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(attn_factor)
        details["rope_scaling"] = {"type": "longrope", "original_context": original, "attn_factor": attn_factor}
    return details


def _check_attention_scale(config: dict[str, Any], head_dim: int) -> None:
    """llama.cpp's Gemma graphs take no attention-scale key: they scale by 1/sqrt(head_dim), or by
    1/sqrt(hidden/heads) for the 27B shapes it recognises by layer count. Refuse a ``query_pre_attn_scalar`` that is
    neither, rather than write a file whose attention is silently mis-scaled."""
    scalar = config.get("query_pre_attn_scalar")
    per_head = config["hidden_size"] // config["num_attention_heads"]
    if scalar is not None and scalar not in (head_dim, per_head):
        raise PhiconvertError(
            f"query_pre_attn_scalar {scalar} is neither head_dim ({head_dim}) nor hidden_size/heads ({per_head}): "
            "llama.cpp would scale this model's attention differently"
        )


def _longrope_attention_factor(scaling: dict[str, Any], max_positions: int, original: int) -> float:
    """The cos/sin scale transformers applies with longrope: explicit, or sqrt(1 + ln(s)/ln(original))."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _add_tokenizer(writer: gguf.GGUFWriter, source: Path, n_vocab: int) -> dict[str, Any]:
    """Vocabulary, merges, special ids, add_bos/add_eos and chat template, so llama.cpp tokenises like the source."""
    tokenizer_json = json.loads((source / "tokenizer.json").read_text()) if (source / "tokenizer.json").exists() else {}
    if (source / "tokenizer.model").exists():
        model, pre = "llama", "default"
        tokens, scores, types = _sentencepiece_vocab(source, tokenizer_json, n_vocab)
        writer.add_token_scores(scores)
    else:
        model, pre = "gpt2", _pre_tokenizer(tokenizer_json)
        tokens, types = _bpe_vocab(tokenizer_json, n_vocab)
    name = _model_name(source, tokenizer_json)
    writer.add_name(name)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    special = gguf.SpecialVocab(source, load_merges=model == "gpt2", n_vocab=n_vocab)
    add_bos, add_eos = _adds_special_tokens(tokenizer)
    special.add_special_token.update(bos=add_bos, eos=add_eos)
    special.add_to_gguf(writer, quiet=True)
    end_of_turn = stops.end_of_turn(tokenizer)
    if end_of_turn in tokens:
        writer.add_eot_token_id(tokens.index(end_of_turn))
    if special.chat_template is None:
        raise PhiconvertError(f"no chat template in {source} (tokenizer_config.json or chat_template.jinja)")
    return {
        "name": name,
        "tokenizer_model": model,
        "tokenizer_pre": pre,
        "add_bos_token": add_bos,
        "end_of_turn": end_of_turn,
        "vocab_size": n_vocab,
    }


def _model_name(source: Path, tokenizer_json: dict[str, Any]) -> str:
    """general.name: the source folder's name, adjusted because llama.cpp reads it to tokenise.

    GGUF has no per-token strip flags; llama.cpp instead makes every special token but <unk>, <s> and
    <|endoftext|> swallow the whitespace after it when general.name contains "phi3" or "phi-3" (the hub Phi-3
    tokenizers' rstrip=True tokens). The name must say so exactly when the source's added tokens do.
    """
    weights = next(source.glob("*.safetensors"))
    name = weights.resolve().parent.name if weights.is_symlink() else source.name
    rstrip = any(t.get("rstrip") for t in tokenizer_json.get("added_tokens", []))
    says_rstrip = re.search(r"phi-?3", name, re.IGNORECASE) is not None
    if rstrip and not says_rstrip:
        return f"{name} (phi3 tokenizer)"
    if says_rstrip and not rstrip:
        return re.sub(r"(phi)-?(3)", r"\1_\2", name, flags=re.IGNORECASE)  # "tiny-phi3" -> "tiny-phi_3"
    return name


def _sentencepiece_vocab(
    source: Path, tokenizer_json: dict[str, Any], n_vocab: int
) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types from tokenizer.model, then the added tokens, padded to the embedding size."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(kind)
    for token_id, text, kind in _added_tokens(tokenizer_json, n_vocab):
        if token_id < sp.vocab_size():
            continue  # already a piece of the model (<unk>, <s>, </s>), typed by sentencepiece
        _pad(tokens, token_id, scores, types)
        tokens.append(text)
        scores.append(0.0)
        types.append(kind)
    _pad(tokens, n_vocab, scores, types)
    return tokens, scores, [int(t) for t in types]


def _bpe_vocab(tokenizer_json: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    """Byte-level BPE vocabulary (token strings as tokenizer.json stores them) plus added tokens, padded."""
    by_id = {i: text for text, i in tokenizer_json["model"]["vocab"].items()}
    kinds = {i: gguf.TokenType.NORMAL for i in by_id}
    for token_id, text, kind in _added_tokens(tokenizer_json, n_vocab):
        by_id[token_id], kinds[token_id] = text, kind
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [int(kinds.get(i, gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    return tokens, types


def _added_tokens(tokenizer_json: dict[str, Any], n_vocab: int) -> Iterator[tuple[int, str, gguf.TokenType]]:
    """tokenizer.json's added tokens: special ones are control tokens, the rest user-defined."""
    for added in sorted(tokenizer_json.get("added_tokens", []), key=lambda a: a["id"]):
        if added["id"] >= n_vocab:
            raise PhiconvertError(f"added token {added['content']!r} has id {added['id']} >= vocab size {n_vocab}")
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        yield added["id"], added["content"], kind


def _pad(tokens: list[str], upto: int, scores: list[float], types: list[Any]) -> None:
    """Fill ids the tokenizer does not use (the embedding is often larger) with unused placeholder tokens."""
    while len(tokens) < upto:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)


def _pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the source's byte-level BPE pre-tokenizer: the one that splits PROBE_TEXT exactly as the
    source's pre-tokenizer does and agrees on ignore_merges (so a regex written differently still matches)."""
    import regex
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    text = tok.normalizer.normalize_str(PROBE_TEXT) if tok.normalizer else PROBE_TEXT
    spans = [span for _, span in tok.pre_tokenizer.pre_tokenize_str(text)] if tok.pre_tokenizer else [(0, len(text))]
    ignore_merges = bool(tokenizer_json.get("model", {}).get("ignore_merges"))
    for name, (pattern, ignores) in PRE_TOKENIZERS.items():
        if ignores == ignore_merges and spans == [m.span() for m in regex.finditer(pattern, text)]:
            return name
    raise PhiconvertError(
        f"the tokenizer's pre-tokenizer splits text like none of llama.cpp's ({', '.join(PRE_TOKENIZERS)}): "
        "a GGUF of it would tokenize differently from the source"
    )


def _adds_special_tokens(tok: Any) -> tuple[bool, bool]:
    """Whether the source tokenizer itself prepends BOS / appends EOS; llama.cpp must do exactly the same."""
    with_special = tok("a").input_ids
    plain = tok("a", add_special_tokens=False).input_ids
    add_bos = tok.bos_token_id is not None and with_special[:1] == [tok.bos_token_id] != plain[:1]
    add_eos = tok.eos_token_id is not None and with_special[-1:] == [tok.eos_token_id] != plain[-1:]
    return add_bos, add_eos


def _convert(tensor: weights.Tensor, qtype: gguf.GGMLQuantizationType, shift: float = 0.0) -> np.ndarray:
    """Read one source tensor in chunks and convert it into the GGUF storage dtype (plus ``shift``: 1-D F32 norms
    only, added after the upcast so that no precision is lost)."""
    out = np.empty(tensor.size, dtype=STORAGE[qtype])
    for start in range(0, tensor.size, CHUNK):
        raw = weights.read(tensor, start, min(CHUNK, tensor.size - start))
        out[start : start + raw.size] = _cast(raw, tensor.dtype, qtype)
    if shift:
        out += np.float32(shift)
    return out.reshape(tensor.shape)


def _cast(raw: np.ndarray, src: str, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Source elements -> GGUF elements, rounding to nearest even (torch: 3x faster than numpy's float16 cast)."""
    value = torch.from_numpy(raw).view(TORCH_DTYPES[src]).to(TORCH_DTYPES[qtype.name])
    return value.view(torch.int16).numpy().view(np.uint16) if value.dtype == torch.bfloat16 else value.numpy()
