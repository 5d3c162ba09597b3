"""Build the tiny, trained test fixtures shipped in phiconvert/fixtures/: two Phi-family models, a Llama-3 and a
Qwen2.

Real checkpoints are gigabytes, and random tiny models give perplexity close to the vocab size, so a
quantization delta on them means nothing.  This script instead trains small models (shaped like
Phi-3-mini-4k-instruct, Phi-4-mini-instruct, Llama-3.1-8B-Instruct and Qwen2.5-0.5B-Instruct) for a few minutes on
Python's own reference text (`pydoc_data.topics`), with real tokenizers trained on the same text, and checks the
rules the converters rely on.  Everything is seeded, but the trained weights are not bit-reproducible across torch
builds (tokenizers, configs and the measured numbers are): `NAME...` rebuilds only the fixtures named.

Run: python scripts/build_fixtures.py [NAME...]   (about 3 minutes per fixture on 2 idle CPU cores, 1.5 GB)
The numbers of every build go into fixtures/build.json, from which fixtures/README.md is written.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "phiconvert" / "fixtures"
SEED = 20240501
THREADS = 2

# Whole topics kept out of training.  These six "simple statement" topics share no paragraph with any other
# topic (the compound-statement topics, for example, repeat "with"/"try" verbatim), so the text is truly unseen.
HELDOUT_TOPICS = ("assert", "del", "global", "nonlocal", "raise", "return")

# After the held-out topics, heldout.txt carries these standard-library modules' docstrings (Python's own text,
# PSF licence, like the topics; not in any fixture's training text): enough tokens for a verification window past
# the original context of real longrope models (4096 tokens on Phi-3.5-mini and Phi-4-mini). The fixtures' windows
# end long before it.
LONG_HELDOUT_MODULES = ("statistics", "textwrap", "difflib", "heapq", "random", "json")

HIDDEN = 256
HEADS = 4
INTERMEDIATE = 768
LAYERS = 3
SEQ_LEN = 256
SP_VOCAB = 3500  # sentencepiece pieces, including <unk>, <s>, </s> and the 256 byte-fallback pieces
BPE_VOCAB = 3500  # byte-level BPE tokens before the special tokens
CHAT_FRACTION = 0.3  # share of each batch drawn from chat-formatted samples
MAX_ANSWER_CHARS = 150  # short answers teach the model to close its turn quickly
PROMPT = "What is a list comprehension?"

PHI3_SPECIALS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)
PHI4_SPECIALS = (
    "<|endoftext|>",
    "<|system|>",
    "<|end|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|/tool|>",
    "<|tool_call|>",
    "<|/tool_call|>",
    "<|tool_response|>",
)

# Chat templates exactly as microsoft/Phi-3-mini-4k-instruct and microsoft/Phi-4-mini-instruct ship them.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# The GPT-4o (o200k) pre-tokenization regex, which Phi-4-mini's tokenizer.json uses in a Split pre-tokenizer.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Llama-3-Instruct's template (BOS first, a header per turn, <|eot_id|> after each) and Qwen2's ChatML.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3's pre-tokenizer regex (cl100k's, digits in threes) and Qwen2's (the same with single digits).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# Llama-3.1's rope scaling, with the original context shrunk to the fixture's size so that it is live on short
# inputs: wavelengths over 128 positions are stretched 8x, under 32 kept, smoothed between.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}  # fmt: skip

# LongRoPE factors for the Phi-4-mini fixture: one per rotary frequency pair (rotary dim 48 -> 24).  Short
# factors stay near 1, long factors rise to 8, so a backend that applies the wrong set is easy to spot.
ROTARY_PAIRS = int(HIDDEN // HEADS * 0.75) // 2
SHORT_FACTOR = [round(1.0 + 0.2 * i / (ROTARY_PAIRS - 1), 4) for i in range(ROTARY_PAIRS)]
LONG_FACTOR = [round(1.0 + 7.0 * (i / (ROTARY_PAIRS - 1)) ** 1.5, 4) for i in range(ROTARY_PAIRS)]


@dataclass
class Spec:
    """What differs between the fixtures."""

    name: str
    kv_heads: int
    tied: bool
    steps: int
    lr: float
    specials: tuple[str, ...] = PHI4_SPECIALS
    end: str = "<|end|>"  # the end-of-turn token a reply stops at
    separator: str = "<|endoftext|>"  # between plain-text training documents
    rendered: str = "<|user|>hi<|end|><|assistant|>"  # the template's rendering of one "hi" with generation prompt


PHI3 = Spec(name="tiny-phi3", kv_heads=4, tied=False, steps=120, lr=3e-3, specials=PHI3_SPECIALS,
            rendered="<|user|>\nhi<|end|>\n<|assistant|>\n")  # fmt: skip
PHI4 = Spec(name="tiny-phi4mini", kv_heads=2, tied=True, steps=120, lr=3e-3)
LLAMA = Spec(name="tiny-llama", kv_heads=2, tied=False, steps=120, lr=3e-3, specials=LLAMA3_SPECIALS, end="<|eot_id|>",
             separator="<|end_of_text|>",
             rendered="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")  # fmt: skip
QWEN = Spec(name="tiny-qwen", kv_heads=2, tied=True, steps=120, lr=3e-3, specials=QWEN2_SPECIALS, end="<|im_end|>",
            rendered="<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
SPECS = (PHI3, PHI4, LLAMA, QWEN)


@dataclass
class Corpus:
    """Training documents, held-out text, calibration text and question/answer pairs."""

    train_docs: list[str]
    heldout: str
    calibration: str
    qa: list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------------- corpus


def paragraphs(text: str) -> list[str]:
    """Split pydoc text into blank-line separated paragraphs (pydoc wraps lines at ~70 columns)."""
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def is_heading(par: str) -> bool:
    """A pydoc heading is one line underlined with *, = or -."""
    lines = par.splitlines()
    return len(lines) == 2 and re.fullmatch(r"([*=\-^~])\1+", lines[1].strip()) is not None


def is_prose(par: str) -> bool:
    """Plain English paragraph: not indented code or grammar, not a heading, not a list of references."""
    return (
        not par[0].isspace()
        and not is_heading(par)
        and "::=" not in par
        and not par.startswith(("*", "+", "-", "|", "Changed in", "Added in", "New in", "See also", "Deprecated"))
        and not par[0].isdigit()
        and len(par) >= 40
        and sum(c.isalpha() for c in par) > 0.6 * len(par)
    )


def unwrap(par: str) -> str:
    """Join pydoc's hard-wrapped lines into one line."""
    return " ".join(line.strip() for line in par.splitlines())


def first_sentences(par: str) -> str | None:
    """First one or two sentences of a prose paragraph, or None if even the first one is too long."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", unwrap(par))
    answer = sentences[0]
    if not answer.endswith((".", "!", "?")) or not 20 <= len(answer) <= MAX_ANSWER_CHARS:
        return None
    second = sentences[1] if len(sentences) > 1 else ""
    if second.endswith((".", "!", "?")) and len(answer) + 1 + len(second) <= MAX_ANSWER_CHARS:
        answer += " " + second
    return answer


def subject_of(heading: str) -> str:
    """Turn a heading such as 'List displays' into a question subject ('list displays')."""
    if len(heading) > 1 and heading[0].isupper() and heading[1].islower():
        heading = heading[0].lower() + heading[1:]
    return heading.rstrip(".:")


def build_corpus() -> Corpus:
    """Split pydoc topics into train / held-out, deduplicate paragraphs, derive QA pairs and calibration text."""
    import pydoc_data.topics

    topics = dict(sorted(pydoc_data.topics.topics.items()))
    heldout_docs = [topics[name].strip() for name in HELDOUT_TOPICS]
    heldout_pars = {p.strip() for doc in heldout_docs for p in paragraphs(doc)}

    # Many topics repeat each other verbatim (e.g. "compound" contains "if", "while", "try", ...): keep the first
    # copy of every paragraph so the training text has no duplicates.
    seen: set[str] = set(heldout_pars)
    train_docs: list[str] = []
    qa: list[tuple[str, str]] = []
    prose_by_topic: list[list[str]] = []
    for name, text in topics.items():
        if name in HELDOUT_TOPICS:
            continue
        kept: list[str] = []
        prose: list[str] = []
        heading = ""
        for par in paragraphs(text):
            key = par.strip()
            if key in seen:
                continue
            seen.add(key)
            kept.append(par)
            if is_heading(par):
                heading = par.splitlines()[0].strip()
            elif is_prose(par):
                prose.append(unwrap(par))
                answer = first_sentences(par)
                if heading and answer:
                    qa.append((subject_of(heading), answer))
        if kept:
            train_docs.append("\n\n".join(kept))
            prose_by_topic.append(prose)

    train_text = "\n\n".join(train_docs)
    for par in heldout_pars:
        assert len(par) < 40 or par not in train_text, f"held-out paragraph leaked into training: {par[:60]!r}"

    # Calibration: blocks of consecutive prose paragraphs (1.2-2 KB each, so every block is longer than a
    # 256-token calibration window) from topics spread over the training split.
    rng = random.Random(SEED)
    order = list(range(len(prose_by_topic)))
    rng.shuffle(order)
    blocks: list[str] = []
    for index in order:
        block = ""
        for par in prose_by_topic[index]:
            if len(block) + len(par) > 2000:
                break
            block = f"{block}\n{par}" if block else par
        if len(block) >= 1200:
            blocks.append(block)
        if sum(len(b) for b in blocks) >= 15000:
            break

    return Corpus(
        train_docs=train_docs,
        heldout="\n\n".join(heldout_docs) + "\n",
        calibration="\n\n".join(blocks) + "\n",
        qa=qa,
    )


def chat_messages(qa: list[tuple[str, str]], rng: random.Random) -> list[list[dict[str, str]]]:
    """One user/assistant conversation per QA pair, with a randomly worded question."""
    questions = ("What is {}?", "Explain {}.", "Tell me about {}.", "Describe {}.", "What are {}?")
    return [
        [
            {"role": "user", "content": rng.choice(questions).format(subject)},
            {"role": "assistant", "content": answer},
        ]
        for subject, answer in qa
    ]


# ------------------------------------------------------------------------------------------------- tokenizers


def tokenizer_texts(corpus: Corpus) -> list[str]:
    """Training documents plus the chat questions and answers (so "What", "?" etc. get their own tokens)."""
    return corpus.train_docs + [f"What is {subject}? Explain {subject}.\n{answer}" for subject, answer in corpus.qa]


def train_sentencepiece(docs: list[str], workdir: Path) -> Path:
    """Train a Llama-style SentencePiece BPE model (byte fallback, <unk>=0, <s>=1, </s>=2) like Phi-3's.

    The model is written through `model_writer` rather than `model_prefix`, which would record the temporary
    path inside tokenizer.model and make every rebuild differ.
    """
    lines = [line for doc in docs for line in doc.splitlines() if line.strip()]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=SP_VOCAB,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=THREADS,
        minloglevel=2,
    )
    path = workdir / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    return path


def sentencepiece_to_tokenizer(sp_model: Path) -> Tokenizer:
    """Express the SentencePiece model as a `tokenizers` BPE, laid out like Phi-3's hub tokenizer.json."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # SentencePiece BPE ranks pieces by merge order, so every split of a piece into two known pieces is a merge,
    # ranked by the merged piece's id.
    merges: list[tuple[str, str]] = []
    for piece, piece_id in sorted(vocab.items(), key=lambda item: item[1]):
        if sp.is_byte(piece_id) or sp.is_control(piece_id) or sp.is_unknown(piece_id):
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in range(3)])
    return tok


def train_bytelevel_bpe(docs: list[str], pattern: str = O200K_PATTERN, ignore_merges: bool = False) -> Tokenizer:
    """Train a byte-level BPE with a regex split then ByteLevel (Phi-4-mini's, Llama-3's and Qwen2's style);
    ``ignore_merges``: a word that is a whole token is not split by the merges (Llama-3's tokenizer.json)."""
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    if ignore_merges:  # training gives a fresh model: carry the flag over
        model = json.loads(tok.to_str())["model"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tok.model = models.BPE(vocab=model["vocab"], merges=merges, ignore_merges=True)
    return tok


def wrap_tokenizer(
    tok: Tokenizer, specials: tuple[str, ...], template: str, add_bos: bool = False, **kwargs: object
) -> PreTrainedTokenizerFast:
    """Append the special tokens after the trained vocab and wrap as a transformers tokenizer."""
    base = tok.get_vocab_size()
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False) for s in specials]
    )
    for offset, token in enumerate(specials):
        assert tok.token_to_id(token) == base + offset, token
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, add_bos_token=add_bos, add_eos_token=False, **kwargs)
    hf.chat_template = template
    return hf


def phi3_tokenizer(sp_model: Path) -> PreTrainedTokenizerFast:
    """Phi-3-style tokenizer: SentencePiece vocab + Phi-3's eleven added tokens."""
    return wrap_tokenizer(
        sentencepiece_to_tokenizer(sp_model),
        PHI3_SPECIALS,
        PHI3_TEMPLATE,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def phi4_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    """Phi-4-mini-style tokenizer: byte-level BPE + Phi-4-mini's ten special tokens."""
    return wrap_tokenizer(
        train_bytelevel_bpe(docs),
        PHI4_SPECIALS,
        PHI4_TEMPLATE,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def llama_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    """Llama-3-style tokenizer: byte-level BPE (Llama-3 regex, ignore_merges), its header/turn tokens, and BOS
    prepended by the tokenizer itself (a TemplateProcessing post-processor, as Llama-3's tokenizer.json has)."""
    from tokenizers import processors

    bpe = train_bytelevel_bpe(docs, LLAMA3_PATTERN, ignore_merges=True)
    bos_id = bpe.get_vocab_size()
    bpe.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )  # fmt: skip
    return wrap_tokenizer(
        bpe,
        LLAMA3_SPECIALS,
        LLAMA3_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
        add_bos=True,
    )


def qwen_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    """Qwen2-style tokenizer: NFC, byte-level BPE with single-digit splits, ChatML tokens, no BOS."""
    bpe = train_bytelevel_bpe(docs, QWEN2_PATTERN)
    bpe.normalizer = normalizers.NFC()
    return wrap_tokenizer(
        bpe,
        QWEN2_SPECIALS,
        QWEN2_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def tokenizer_for(spec: Spec, corpus: Corpus, sp_model: Path) -> PreTrainedTokenizerFast:
    texts = tokenizer_texts(corpus)
    makers = {"tiny-phi3": lambda: phi3_tokenizer(sp_model), "tiny-phi4mini": lambda: phi4_tokenizer(texts),
              "tiny-llama": lambda: llama_tokenizer(texts), "tiny-qwen": lambda: qwen_tokenizer(texts)}  # fmt: skip
    return makers[spec.name]()


# ------------------------------------------------------------------------------------------------------ model


def shapes(spec: Spec, tok: PreTrainedTokenizerFast) -> dict[str, object]:
    """What every fixture's config shares: the sizes, and vocab_size exactly len(tokenizer)."""
    return dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=spec.kv_heads,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=spec.tied,
    )


def make_config(spec: Spec, tok: PreTrainedTokenizerFast) -> transformers.PretrainedConfig:
    """Transformers-5 config for one fixture."""
    if spec.name in (LLAMA.name, QWEN.name):
        return other_config(spec, tok)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    common = dict(shapes(spec, tok), pad_token_id=eot, eos_token_id=eot)
    if spec is PHI3:
        return Phi3Config(
            **common,
            bos_token_id=1,
            max_position_embeddings=2048,
            original_max_position_embeddings=2048,
            sliding_window=2047,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    return Phi3Config(
        **common,
        bos_token_id=eot,
        max_position_embeddings=1024,
        original_max_position_embeddings=128,
        sliding_window=262144,
        partial_rotary_factor=0.75,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": SHORT_FACTOR,
            "long_factor": LONG_FACTOR,
        },
    )


def other_config(spec: Spec, tok: PreTrainedTokenizerFast) -> transformers.PretrainedConfig:
    """tiny-llama (GQA, untied, llama3 rope scaling, theta 500000) and tiny-qwen (GQA, tied, qkv bias)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in spec.specials}
    common = dict(shapes(spec, tok), max_position_embeddings=1024)
    if spec is LLAMA:
        return AutoConfig.for_model(
            "llama", **common, bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
            rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}, attention_bias=False, mlp_bias=False,
        )  # fmt: skip
    return AutoConfig.for_model(
        "qwen2", **common, bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
        layer_types=["full_attention"] * LAYERS,
    )  # fmt: skip


def hub_config(spec: Spec, config: transformers.PretrainedConfig) -> dict[str, object]:
    """config.json in the layout of the hub repos (transformers 4: top-level rope keys, rope_scaling.type)."""
    if spec.name in (LLAMA.name, QWEN.name):
        from phiconvert.source import normalise_config

        hub = normalise_config(config.to_dict())
        hub.pop("dtype", None)
        hub.update(architectures=[type(config).__name__.replace("Config", "ForCausalLM")], torch_dtype="bfloat16",
                   transformers_version="4.45.0")  # fmt: skip
        if spec is LLAMA:  # the hub's Llama-3.1 config says rope_type, as transformers 4.43+ writes it
            hub["rope_scaling"] = dict(LLAMA3_ROPE)
        return dict(sorted(hub.items()))
    hub: dict[str, object] = {
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "embd_pdrop": 0.0,
        "eos_token_id": config.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": "phi3",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": spec.kv_heads,
        "original_max_position_embeddings": config.original_max_position_embeddings,
        "pad_token_id": config.pad_token_id,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": config.sliding_window,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }
    if spec is PHI4:
        hub.update(
            {
                "full_attn_mod": 1,
                "interpolate_factor": 1,
                "lm_head_bias": False,
                "mlp_bias": False,
                "partial_rotary_factor": 0.75,
                "rope_scaling": {"long_factor": LONG_FACTOR, "short_factor": SHORT_FACTOR, "type": "longrope"},
                "transformers_version": "4.45.0",
            }
        )
    return dict(sorted(hub.items()))


def check_rules(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    """Rules the converters depend on (see shared/BACKENDS.md, "Fixtures")."""
    cfg = model.config
    assert cfg.vocab_size == len(tok), (cfg.vocab_size, len(tok))
    assert cfg.hidden_size >= 256 and cfg.hidden_size // cfg.num_attention_heads >= 64
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert module.out_features != cfg.vocab_size, f"{name} would be mistaken for the LM head"


def token_streams(
    spec: Spec, tok: PreTrainedTokenizerFast, corpus: Corpus, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-text stream (documents separated by the separator token) and chat stream (10 shuffled passes of QA)."""
    eot = tok.convert_tokens_to_ids(spec.separator)
    plain: list[int] = []
    for doc in corpus.train_docs:
        plain += tok.encode(doc, add_special_tokens=False) + [eot]
    chat: list[int] = []
    for _ in range(10):
        convs = chat_messages(corpus.qa, rng)
        rng.shuffle(convs)
        for conv in convs:
            text = tok.apply_chat_template(conv, tokenize=False)
            chat += tok.encode(text, add_special_tokens=False)
    return torch.tensor(plain), torch.tensor(chat)


def sample_batch(plain: torch.Tensor, chat: torch.Tensor, rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Random crops: about 70 % of the rows from plain text, 30 % from chat samples."""
    n_chat = round(rows * CHAT_FRACTION)
    out = []
    for stream, n in ((plain, rows - n_chat), (chat, n_chat)):
        starts = torch.randint(0, len(stream) - length, (n,), generator=gen)
        out += [stream[s : s + length] for s in starts.tolist()]
    return torch.stack(out)


def train(model: torch.nn.Module, spec: Spec, plain: torch.Tensor, chat: torch.Tensor) -> float:
    """AdamW in fp32 with warmup + cosine decay; returns the mean loss of the last 20 steps.

    For the Phi-4-mini fixture every other step uses 128-token rows (transformers applies the short LongRoPE factor
    up to original_max_position_embeddings=128) and the rest 256-token rows (long factor), so both are trained.
    """
    gen = torch.Generator().manual_seed(SEED)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    warmup = 20
    losses: list[float] = []
    model.train()
    start = time.time()
    for step in range(spec.steps):
        lr_scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * step / spec.steps))
        for group in opt.param_groups:
            group["lr"] = spec.lr * lr_scale
        short = spec is PHI4 and step % 2 == 0
        batch = sample_batch(plain, chat, 32 if short else 16, SEQ_LEN // 2 if short else SEQ_LEN, gen)
        logits = model(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == spec.steps - 1:
            print(f"  {spec.name} step {step:4d} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


# ----------------------------------------------------------------------------------------- saving and checks


def save_fixture(spec: Spec, model: torch.nn.Module, tok: PreTrainedTokenizerFast, sp_model: Path | None) -> Path:
    """Write the checkpoint folder: bf16 weights, both config layouts, generation config, tokenizer files.

    The folder is written beside the old one and swapped in at the end, so tests that are reading the old fixture
    meanwhile see a complete folder nearly all the time.
    """
    final = OUT / spec.name
    folder = OUT / f".{spec.name}.building"
    shutil.rmtree(folder, ignore_errors=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in spec.specials}
    if spec is LLAMA:
        eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
        model.generation_config = GenerationConfig(bos_token_id=ids["<|begin_of_text|>"], eos_token_id=eos)
    elif spec is QWEN:
        eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"])
    elif spec is PHI3:
        eos = [ids["<|endoftext|>"], ids["<|assistant|>"], ids["<|end|>"]]
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=eos, pad_token_id=ids["<|endoftext|>"])
    else:
        eos = [ids["<|end|>"], ids["<|endoftext|>"]]
        eot = ids["<|endoftext|>"]
        model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eos, pad_token_id=eot)
    model.to(torch.bfloat16).save_pretrained(folder)
    model.to(torch.float32)
    (folder / "config.json").rename(folder / "config.transformers5.json")
    (folder / "config.json").write_text(json.dumps(hub_config(spec, model.config), indent=2) + "\n")

    tok.save_pretrained(folder)
    # Add what the hub repos' tokenizer_config.json also carries (older tools read the template and the added
    # tokens from there) and name the hub's tokenizer class; AutoTokenizer still loads tokenizer.json as written.
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.update(
        add_bos_token=spec is LLAMA,
        add_eos_token=False,
        added_tokens_decoder={
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(tok.added_tokens_decoder.items())
        },
        chat_template=tok.chat_template,
        tokenizer_class={
            "tiny-phi3": "LlamaTokenizer",
            "tiny-llama": "PreTrainedTokenizerFast",
            "tiny-qwen": "Qwen2Tokenizer",
        }.get(spec.name, "GPT2Tokenizer"),  # fmt: skip
    )
    if spec is PHI3:
        tok_cfg["legacy"] = False
        shutil.copy(sp_model, folder / "tokenizer.model")
    tok_cfg_path.write_text(json.dumps(dict(sorted(tok_cfg.items())), indent=2, ensure_ascii=False) + "\n")
    for f in folder.iterdir():
        f.chmod(0o644)
    shutil.rmtree(final, ignore_errors=True)
    folder.rename(final)
    return final


def load(folder: Path, config_name: str = "config.json") -> torch.nn.Module:
    """Load a fixture in fp32, using `config_name` as its config.json (via a temporary copy)."""
    if config_name == "config.json":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        for f in folder.iterdir():
            if f.name not in ("config.json", config_name):
                (Path(tmp) / f.name).symlink_to(f)
        shutil.copy(folder / config_name, Path(tmp) / "config.json")
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


def load_with_hub_config(folder: Path, edit: dict[str, object]) -> torch.nn.Module:
    """Load with a modified hub config.json; proves a setting is live when the logits change."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(edit)
    with tempfile.TemporaryDirectory() as tmp:
        for f in folder.iterdir():
            if f.name != "config.json":
                (Path(tmp) / f.name).symlink_to(f)
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids[None]).logits[0]


@torch.no_grad()
def heldout_ppl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Perplexity over non-overlapping 256-token windows of heldout.txt (no BOS, as the converters measure it)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, SEQ_LEN):
        window = ids[start : start + SEQ_LEN]
        if len(window) < 2:
            break
        logits = logits_of(model, window)
        nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count)


@torch.no_grad()
def greedy_chat(spec: Spec, model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> tuple[str, bool, int]:
    """The converters' smoke test: chat template, greedy, at most 48 tokens, stop at the end-of-turn token."""
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor(tok.encode(text, add_special_tokens=False))
    end = tok.convert_tokens_to_ids(spec.end)
    out: list[int] = []
    for _ in range(48):
        nxt = int(logits_of(model, torch.cat([ids, torch.tensor(out, dtype=torch.long)]))[-1].argmax())
        if nxt == end:
            return tok.decode(out), True, len(out) + 1
        out.append(nxt)
    return tok.decode(out), False, len(out)


def verify(spec: Spec, folder: Path, corpus: Corpus, sp_model: Path | None) -> dict[str, object]:
    """Reload the saved folder and check tokenizer, template, config layouts and LongRoPE; measure quality."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = load(folder)
    check_rules(model, tok)
    special_ids = {s: tok.convert_tokens_to_ids(s) for s in spec.specials}
    assert list(special_ids.values()) == list(range(len(tok) - len(spec.specials), len(tok))), special_ids

    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == spec.rendered, rendered
    chat_ids = tok.encode(rendered, add_special_tokens=False)
    assert special_ids[spec.end] in chat_ids, chat_ids
    if spec is LLAMA:  # the tokenizer itself prepends BOS, as Llama-3's does
        bos = special_ids["<|begin_of_text|>"]
        assert tok("a").input_ids[0] == bos != tok("a", add_special_tokens=False).input_ids[0]

    heldout_ids = tok.encode(corpus.heldout, add_special_tokens=False)
    assert tok.decode(heldout_ids) == corpus.heldout, "tokenizer does not round-trip the held-out text"
    if sp_model is not None:
        sp = spm.SentencePieceProcessor(model_file=str(sp_model))
        for line in corpus.heldout.splitlines() + [corpus.heldout]:
            assert tok.encode(line, add_special_tokens=False) == sp.encode(line), f"HF != SentencePiece: {line!r}"

    # Both config layouts must give the same model, bit for bit.
    ids = torch.tensor(heldout_ids[:200])
    reference = logits_of(model, ids)
    assert torch.equal(reference, logits_of(load(folder, "config.transformers5.json"), ids)), "config layouts differ"
    result: dict[str, object] = {"special_ids": special_ids}
    if spec is PHI4:
        # The LongRoPE and partial-rotary settings must be live: changing either changes the logits.
        no_partial = load_with_hub_config(
            folder,
            {
                "partial_rotary_factor": 1.0,
                "rope_scaling": {
                    "long_factor": LONG_FACTOR + [1.0] * 8,
                    "short_factor": SHORT_FACTOR + [1.0] * 8,
                    "type": "longrope",
                },
            },
        )
        short_only = load_with_hub_config(
            folder, {"rope_scaling": {"long_factor": SHORT_FACTOR, "short_factor": SHORT_FACTOR, "type": "longrope"}}
        )
        result["diff_no_partial_rotary"] = (logits_of(no_partial, ids) - reference).abs().max().item()
        result["diff_short_as_long"] = (logits_of(short_only, ids) - reference).abs().max().item()
        assert result["diff_no_partial_rotary"] > 1e-3 and result["diff_short_as_long"] > 1e-3, result
        # ...and the long factor is not used for inputs up to original_max_position_embeddings.
        assert torch.equal(logits_of(model, ids[:100]), logits_of(short_only, ids[:100]))
    if spec is LLAMA:  # the llama3 rope scaling must be live
        unscaled = load_with_hub_config(folder, {"rope_scaling": None})
        result["diff_no_rope_scaling"] = (logits_of(unscaled, ids) - reference).abs().max().item()
        assert result["diff_no_rope_scaling"] > 1e-3, result
    if spec is QWEN:  # the q/k/v biases are trained, not zero
        bias = model.model.layers[0].self_attn.q_proj.bias
        assert bias is not None and bias.abs().max().item() > 1e-3

    text, stopped, n_tokens = greedy_chat(spec, model, tok)
    result.update(
        ppl=heldout_ppl(model, torch.tensor(heldout_ids)),
        heldout_tokens=len(heldout_ids),
        generation=text,
        stopped_at_end=stopped,
        generated_tokens=n_tokens,
        vocab_size=len(tok),
        params=sum(p.numel() for p in model.parameters()),
        size_mb=sum(f.stat().st_size for f in folder.iterdir()) / 1e6,
    )
    return result


# ------------------------------------------------------------------------------------------------------ main


def readme(corpus: Corpus, results: dict[str, dict[str, object]]) -> str:
    """The fixtures' README, with the numbers this run measured."""

    def row(name: str) -> str:
        r = results[name]
        end = next(spec.end for spec in SPECS if spec.name == name)
        ending = f"then `{end}`" if r["stopped_at_end"] else f"no `{end}` within 48 tokens"
        return (
            f"| {name} | {r['params'] / 1e6:.2f} M | {r['vocab_size']} | {r['train_loss']:.3f} | {r['ppl']:.1f} | "
            f"`{r['generation']}` ({r['generated_tokens']} tokens, {ending}) |"
        )

    versions = f"Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}"
    ids3 = results["tiny-phi3"]["special_ids"]
    ids4 = results["tiny-phi4mini"]["special_ids"]
    ids_llama = results["tiny-llama"]["special_ids"]
    ids_qwen = results["tiny-qwen"]["special_ids"]
    return f"""# Test fixtures

Built by `python scripts/build_fixtures.py [NAME...]` (seeded, CPU, about 3 minutes per fixture on 2 idle cores).
{versions}. Do not edit by hand: rerun the script.

## Files

- `tiny-phi3/` - shaped like microsoft/Phi-3-mini-4k-instruct: `Phi3ForCausalLM`, {LAYERS} layers, hidden {HIDDEN},
  4 heads x 64 (MHA, 4 KV heads), intermediate {INTERMEDIATE}, untied LM head, RoPE theta 10000 with no scaling,
  max positions 2048, sliding_window 2047. Tokenizer: SentencePiece BPE (`tokenizer.model`, byte fallback,
  `<unk>`=0 `<s>`=1 `</s>`=2) plus the same vocabulary as `tokenizer.json`; Phi-3's 11 added tokens follow the
  SentencePiece pieces: {", ".join(f"`{k}`={v}" for k, v in ids3.items())}.
  BOS 1; EOS/PAD `<|endoftext|>`; generation_config eos = [`<|endoftext|>`, `<|assistant|>`, `<|end|>`].
- `tiny-phi4mini/` - shaped like microsoft/Phi-4-mini-instruct: `Phi3ForCausalLM`, {LAYERS} layers, hidden {HIDDEN},
  4 query heads x 64 with 2 KV heads (GQA), partial_rotary_factor 0.75 (rotary dim 48), tied embeddings, LongRoPE
  (24 short factors 1.0-1.2, 24 long factors 1.0-8.0; original_max_position_embeddings 128, max positions 1024, so
  inputs longer than 128 tokens use the long factors in transformers), sliding_window 262144. Tokenizer: byte-level
  BPE with an o200k-regex `Split` + `ByteLevel` pre-tokenizer (Phi-4-mini's style), special tokens after the BPE
  vocabulary: {", ".join(f"`{k}`={v}" for k, v in ids4.items())}.
  BOS = EOS = PAD = `<|endoftext|>`; generation_config eos = [`<|end|>`, `<|endoftext|>`].
- `tiny-llama/` - shaped like meta-llama/Llama-3.1-8B-Instruct: `LlamaForCausalLM`, {LAYERS} layers, hidden {HIDDEN},
  4 query heads x 64 with 2 KV heads, untied, RoPE theta 500000 with `llama3` rope scaling (factor 8, low/high
  frequency factors 1/4, original context shrunk to 128 so the scaling changes short inputs too). Tokenizer: byte-level
  BPE with Llama-3's split regex and `ignore_merges`, BOS prepended by the tokenizer's post-processor; special tokens
  after the BPE vocabulary: {", ".join(f"`{k}`={v}" for k, v in ids_llama.items())}; Llama-3-Instruct's chat template.
  generation_config eos = [`<|end_of_text|>`, `<|eot_id|>`].
- `tiny-qwen/` - shaped like Qwen/Qwen2.5-0.5B-Instruct: `Qwen2ForCausalLM`, {LAYERS} layers, hidden {HIDDEN}, 4 query
  heads x 64 with 2 KV heads, q/k/v biases, tied embeddings, RoPE theta 1000000. Tokenizer: NFC, byte-level BPE with
  Qwen2's split regex (single digits), no BOS; special tokens after the BPE vocabulary:
  {", ".join(f"`{k}`={v}" for k, v in ids_qwen.items())}; ChatML template. EOS `<|im_end|>`, PAD `<|endoftext|>`;
  generation_config eos = [`<|im_end|>`, `<|endoftext|>`].
- Each folder: `model.safetensors` (bfloat16), `config.json` (hub / transformers-4 layout: top-level `rope_theta`,
  `partial_rotary_factor`, `original_max_position_embeddings`, `rope_scaling` with `"type"`),
  `config.transformers5.json` (what transformers 5 `save_pretrained` writes: `rope_parameters`),
  `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` (Microsoft's template).
- `heldout.txt` - the pydoc topics {", ".join(HELDOUT_TOPICS)} ({len(corpus.heldout)} characters); no paragraph of
  them occurs in the training text.
- `calibration.txt` - {len(corpus.calibration)} characters of training-split prose, blank-line separated blocks of
  1.2-2 KB (each longer than 256 tokens), the default data for data-aware quantization.

## How they were trained

Corpus: Python's own reference text (`pydoc_data.topics`), minus the held-out topics, with duplicated paragraphs
removed. Every tokenizer was trained on it. Each batch is about 70 % random 256-token crops of the plain text and
30 % crops of chat-formatted samples ({len(corpus.qa)} pairs such as "What is <section title>?" -> first sentence(s)
of a paragraph of that section, end of turn), rendered with each model's own chat template. AdamW, fp32, warmup +
cosine decay; tiny-phi4mini alternates 128-token and 256-token batches so both LongRoPE factor sets are trained.

| fixture | params | vocab | final train loss | held-out ppl (fp32) | greedy chat reply |
|---|---|---|---|---|---|
{row("tiny-phi3")}
{row("tiny-phi4mini")}
{row("tiny-llama")}
{row("tiny-qwen")}

Held-out perplexity: transformers, fp32, weights as saved (bf16), non-overlapping 256-token windows, no BOS.
Greedy chat: "{PROMPT}" through the chat template, at most 48 new tokens, stop at the end-of-turn token.

## Rules the build checks

- `config.vocab_size == len(tokenizer)`; hidden >= 256 and head_dim >= 64 (K-quants, ORT GenAI rotary kernel).
- No `nn.Linear` other than `lm_head` has out_features == vocab size (ORT GenAI's builder picks the LM head by it).
- Loading with `config.json` or with `config.transformers5.json` gives bitwise-identical fp32 logits.
- tiny-phi4mini: on a 200-token input, dropping partial_rotary_factor or using the short factors as long ones
  changes the logits; on a 100-token input the long factors have no effect.
- tiny-llama: dropping the `llama3` rope scaling changes the logits; the tokenizer itself prepends BOS.
- tiny-qwen: the q/k/v biases are trained (not zero).
- The tokenizer round-trips `heldout.txt`; for tiny-phi3, `tokenizer.json` and `tokenizer.model` tokenize every
  held-out line identically; the end-of-turn and other added tokens resolve to the ids above; the chat template
  renders as the original model's does.
- Note: transformers 5 loads `tokenizer.json` verbatim through `AutoTokenizer` when `config.json` (model_type
  phi3) is present, as for the real Phi models; `LlamaTokenizer.from_pretrained` / `GPT2Tokenizer.from_pretrained`
  rebuild the pipeline from class defaults instead.
"""


def long_heldout() -> str:
    """The docstrings of LONG_HELDOUT_MODULES and of their public functions and classes, blank-line separated."""
    import importlib
    import inspect

    parts = []
    for name in LONG_HELDOUT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for member in getattr(module, "__all__", []):
            doc = inspect.getdoc(getattr(module, member))
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(p.strip() for p in parts if p.strip()) + "\n"


def main() -> None:
    torch.set_num_threads(THREADS)
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus()
    (OUT / "heldout.txt").write_text(corpus.heldout + "\n" + long_heldout())
    (OUT / "calibration.txt").write_text(corpus.calibration)
    print(
        f"corpus: {len(corpus.train_docs)} training topics, {sum(map(len, corpus.train_docs))} chars, "
        f"{len(corpus.qa)} QA pairs, heldout {len(corpus.heldout)} chars, calibration {len(corpus.calibration)}"
    )

    wanted = sys.argv[1:] or [spec.name for spec in SPECS]
    unknown = set(wanted) - {spec.name for spec in SPECS}
    if unknown:
        sys.exit(f"unknown fixture(s) {', '.join(sorted(unknown))}; known: {', '.join(s.name for s in SPECS)}")
    record = OUT / "build.json"
    results: dict[str, dict[str, object]] = json.loads(record.read_text()) if record.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        sp_model = train_sentencepiece(tokenizer_texts(corpus), Path(tmp))
        for spec in (s for s in SPECS if s.name in wanted):
            random.seed(SEED)
            torch.manual_seed(SEED)
            tok = tokenizer_for(spec, corpus, sp_model)
            config = make_config(spec, tok)
            phi = spec.name.startswith("tiny-phi")
            model = Phi3ForCausalLM(config) if phi else AutoModelForCausalLM.from_config(config)
            check_rules(model, tok)
            plain, chat = token_streams(spec, tok, corpus, random.Random(SEED))
            print(f"{spec.name}: vocab {len(tok)}, plain {len(plain)} tokens, chat {len(chat)} tokens")
            train_loss = train(model, spec, plain, chat)
            folder = save_fixture(spec, model, tok, sp_model if spec is PHI3 else None)
            results[spec.name] = verify(spec, folder, corpus, sp_model if spec is PHI3 else None)
            results[spec.name]["train_loss"] = train_loss
            r = results[spec.name]
            print(
                f"{spec.name}: train loss {train_loss:.3f}, held-out ppl {r['ppl']:.1f}, "
                f"{r['size_mb']:.1f} MB, chat -> {r['generation']!r} (stopped at {spec.end}: {r['stopped_at_end']})"
            )
            record.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if all(spec.name in results for spec in SPECS):
        (OUT / "README.md").write_text(readme(corpus, results))
    else:
        print(f"README.md not rewritten: build.json lacks {[s.name for s in SPECS if s.name not in results]}")
    print(json.dumps({name: results[name] for name in wanted}, indent=1, default=str))
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
