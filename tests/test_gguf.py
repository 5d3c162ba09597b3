"""llama.cpp GGUF target: the file our writer produces, llama.cpp's tokenisation of it, and fidelity per precision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import whole  # noqa: E402

from phiconvert import source  # noqa: E402
from phiconvert.errors import PhiconvertError  # noqa: E402
from phiconvert.gguf_writer import write_gguf  # noqa: E402
from phiconvert.targets import ExportJob  # noqa: E402
from phiconvert.verify import bound_for, compare  # noqa: E402

FIXTURES = ("tiny-phi3", "tiny-phi4mini")
WINDOWS = ((0, 64), (64, 384))  # as the pipeline: the second is past tiny-phi4mini's original context (128)
MESSAGES = [{"role": "user", "content": "What is a list comprehension?"}]


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Normalised staging copies of both bundled checkpoints, as the pipeline hands them to export()."""
    root = tmp_path_factory.mktemp("staging")
    return {name: source.stage(source.resolve(f"bundled:{name}"), root / name) for name in FIXTURES}


@pytest.fixture(scope="module")
def f16(staged: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each fixture written by our writer as an F16 GGUF, alone in an artifact folder."""
    files = {}
    for name, folder in staged.items():
        artifact = tmp_path_factory.mktemp(f"{name}-f16")
        write_gguf(folder, artifact / "model-F16.gguf", "f16")
        files[name] = artifact / "model-F16.gguf"
    return files


@pytest.fixture(scope="module")
def reference(staged: dict[str, Path]) -> dict[str, tuple[list[list[int]], list[np.ndarray]]]:
    """Held-out windows and their fp32 transformers logits, per fixture (what the pipeline compares against)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for name, folder in staged.items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = tokenizer(source.FIXTURES.joinpath("heldout.txt").read_text(), add_special_tokens=False).input_ids
        sequences = [ids[start : start + length] for start, length in WINDOWS]
        with torch.no_grad():
            out[name] = (sequences, [model(torch.tensor([s])).logits[0].numpy() for s in sequences])
    return out


def fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_phi4mini_metadata_and_tensors(f16: dict[str, Path], staged: dict[str, Path]) -> None:
    config = json.loads((staged["tiny-phi4mini"] / "config.json").read_text())
    meta = fields(f16["tiny-phi4mini"])
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert meta["general.architecture"] == "phi3"
    assert meta["phi3.rope.dimension_count"] == int(config["partial_rotary_factor"] * head_dim)
    assert meta["phi3.rope.scaling.type"] == "longrope"
    assert meta["phi3.rope.scaling.original_context_length"] == config["original_max_position_embeddings"]
    factor = config["max_position_embeddings"] / config["original_max_position_embeddings"]
    attn = np.sqrt(1 + np.log(factor) / np.log(config["original_max_position_embeddings"]))
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(attn, rel=1e-6)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-4o"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[meta["tokenizer.ggml.eot_token_id"]] == "<|end|>"
    assert "tokenizer.chat_template" in meta
    tensors = {t.name: t for t in gguf.GGUFReader(f16["tiny-phi4mini"]).tensors}
    assert "output.weight" not in tensors  # tied embeddings
    long = tensors["rope_factors_long.weight"]
    assert np.array_equal(long.data, np.asarray(config["rope_scaling"]["long_factor"], np.float32))
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_phi3_sentencepiece_vocab(f16: dict[str, Path], staged: dict[str, Path]) -> None:
    meta = fields(f16["tiny-phi3"])
    assert meta["tokenizer.ggml.model"] == "llama"
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.scores"])
    assert meta["tokenizer.ggml.tokens"][meta["tokenizer.ggml.eot_token_id"]] == "<|end|>"
    assert gguf.TokenType.BYTE in meta["tokenizer.ggml.token_type"]


def test_bf16_is_bit_exact(staged: dict[str, Path], tmp_path: Path) -> None:
    """A bf16 checkpoint written as BF16 keeps every weight bit for bit."""
    import torch
    from safetensors import safe_open

    path = tmp_path / "model-BF16.gguf"
    write_gguf(staged["tiny-phi4mini"], path, "bf16")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    with safe_open(str(staged["tiny-phi4mini"] / "model.safetensors"), framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        qkv = f.get_tensor("model.layers.1.self_attn.qkv_proj.weight")
    for name, weight in (("token_embd.weight", embed), ("blk.1.attn_qkv.weight", qkv)):
        assert weight.dtype == torch.bfloat16
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.BF16
        expected = weight.view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(tensors[name].data.view(np.uint16).reshape(expected.shape), expected)


def test_both_config_layouts_write_the_same_file(tmp_path: Path) -> None:
    """The writer reads the transformers-5 layout (rope_parameters) as the hub layout: byte-identical files."""
    from conftest import checkpoint

    for layout in ("hub", "transformers5"):
        write_gguf(checkpoint(tmp_path, "tiny-phi4mini", layout), tmp_path / f"{layout}.gguf", "f16")
    assert (tmp_path / "hub.gguf").read_bytes() == (tmp_path / "transformers5.gguf").read_bytes()


def test_unknown_pre_tokenizer_is_one_clear_line(staged: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "odd-tokenizer"
    shutil.copytree(staged["tiny-phi4mini"], folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    for part in tokenizer["pre_tokenizer"]["pretokenizers"]:
        if part["type"] == "Split":
            part["pattern"]["Regex"] = r"\p{L}+|\p{N}+"
    (folder / "tokenizer.json").unlink()  # a link into the fixture: replace, never write through it
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(PhiconvertError, match=r"splits text like none of llama.cpp's \(gpt-4o, ") as error:
        write_gguf(folder, tmp_path / "x.gguf", "f16")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", FIXTURES)
def test_llama_cpp_tokenises_like_the_source(name: str, f16: dict[str, Path], staged: dict[str, Path]) -> None:
    """Held-out text, a chat-templated prompt and the BOS rule: llama.cpp's ids equal the HF tokenizer's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(staged[name])
    llm = llama_cpp.Llama(model_path=str(f16[name]), vocab_only=True, verbose=False)
    text = source.FIXTURES.joinpath("heldout.txt").read_text()
    assert llm.tokenize(text.encode(), add_bos=False) == hf(text, add_special_tokens=False).input_ids
    assert llm.tokenize(text[:200].encode(), add_bos=True) == hf(text[:200]).input_ids
    prompt = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == expected
    llm.close()


def test_longrope_factors_follow_transformers(f16: dict[str, Path], reference: dict) -> None:
    """64 tokens use the short factors, 384 the long ones, as in transformers (see targets.gguf._open).

    A plain 64-token llama.cpp context is padded to 256 > 128 and would use the long factors: measurably off.
    """
    from llama_cpp import GGML_TYPE_F32, Llama

    from phiconvert.targets import gguf as target

    sequences, expected = reference["tiny-phi4mini"]
    got = whole(target.logits(f16["tiny-phi4mini"].parent, sequences))
    diffs = [float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True)]
    assert max(diffs) < 0.01, diffs

    short = sequences[0]
    plain = Llama(
        model_path=str(f16["tiny-phi4mini"]), n_ctx=len(short), n_batch=len(short), n_ubatch=len(short),
        logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False,
    )  # fmt: skip
    plain.eval(short)
    plain_diff = float(np.abs(np.array(plain.scores[: len(short)]) - expected[0]).max())
    plain.close()
    assert plain_diff > 10 * diffs[0], (plain_diff, diffs[0])


PRECISIONS = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", FIXTURES)
def test_fidelity(name: str, precision: str, staged: dict, reference: dict, tmp_path: Path) -> None:
    """Export, smoke-test and compare with fp32 transformers: within the precision's bound."""
    pytest.importorskip("llama_cpp")
    from phiconvert.targets import gguf as target

    output, work = tmp_path / "artifact", tmp_path / "work"
    output.mkdir()
    work.mkdir()
    job = ExportJob(source=staged[name], output=output, precision=precision, options={}, calibration=["x"], work=work)
    details = target.export(job)
    assert [p.name for p in output.iterdir()] == [details["file"]]
    assert not list(work.iterdir())  # the intermediate F16 file is gone
    smoke = target.TARGET.smoke(output, MESSAGES, 16)
    assert smoke.tokens > 0
    sequences, expected = reference[name]
    fidelity = compare(expected, whole(target.logits(output, sequences)), sequences)
    print(f"{name} {precision}: {fidelity.to_dict()} bpw={details['bits_per_weight']:.2f} {details['tensor_types']}")
    assert fidelity.failures(bound_for(target.TARGET.precisions[precision].bound)) == []
    if precision == "f16":  # F16 weights of a bf16 checkpoint are exact; llama.cpp computes with f16 activations
        assert fidelity.top1 == 1.0 and fidelity.max_abs_logprob_diff < 0.01


@pytest.mark.slow
def test_convert_end_to_end(tmp_path: Path) -> None:
    """Through the public API: default model (bundled tiny-phi4mini), default precision, report and artifact."""
    pytest.importorskip("llama_cpp")
    from phiconvert import convert

    report = convert(target="gguf", output=tmp_path / "out")
    assert report["precision"] == "q4_k_m"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model-Q4_K_M.gguf", "phiconvert.json"]
    assert report["fidelity"]["passed"] and report["smoke"]["stopped_at_eot"]
    details = report["details"]
    assert details["file_type"] == "MOSTLY_Q4_K_M"
    assert {"Q4_K", "Q6_K"} <= set(details["tensor_types"]) and details["k_quant_fallbacks"] == {}
    assert 4.5 < details["bits_per_weight_matrices"] < 6.0
