"""MLX target: every precision of both bundled fixtures against the source's fp32 logits, longrope's short/long
factors, layers mlx-lm leaves unquantized, GPTQ without the network, a chat that stops at <|end|>, and errors."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURE_NAMES, checkpoint, leftovers, stage, whole

from phiconvert import convert, pipeline, source
from phiconvert.calibration import samples as calibration_samples
from phiconvert.errors import PhiconvertError
from phiconvert.targets import ExportJob, load
from phiconvert.verify import Fidelity, bound_for, compare

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
TARGET = load("mlx")
OPTIONS = {option.name: None for option in TARGET.options}
CALIBRATION = calibration_samples(None)


def export(staging: Path, tmp_path: Path, precision: str, **options) -> tuple[Path, dict]:
    output, work = tmp_path / f"out-{precision}", tmp_path / f"work-{precision}"
    output.mkdir()
    work.mkdir()
    job = ExportJob(staging, output, precision, {**OPTIONS, **options}, CALIBRATION, work)
    return output, TARGET.export(job)


def fidelity(reference, name: str, artifact: Path) -> Fidelity:
    sequences, source_logits = reference(name)
    return compare(source_logits, whole(TARGET.logits(artifact, sequences)), sequences)


@pytest.mark.parametrize("precision", ["4bit", "8bit", "fp16", "bf16"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_precision_within_bound(tmp_path, reference, name, precision):
    artifact, details = export(stage(tmp_path, name), tmp_path, precision)
    numbers = fidelity(reference, name, artifact)
    assert numbers.failures(bound_for(TARGET.precisions[precision].bound)) == []
    if precision in ("4bit", "8bit"):
        assert details["quantization"] == {"group_size": 64, "bits": int(precision[0]), "mode": "affine"}
        assert details["full_precision_layers"] == {}
        assert int(precision[0]) < details["bits_per_weight"] < int(precision[0]) + 1
    else:
        assert details["quantization"] is None
        assert details["float_dtypes"] == [{"fp16": "float16", "bf16": "bfloat16"}[precision]]
        # the fixtures' weights are bf16: a 16-bit artifact computed in f32 is the source, to rounding
        assert numbers.failures(bound_for("fp32")) == []


def test_transformers5_layout_exports_the_same_model(tmp_path, reference):
    artifact, _ = export(stage(tmp_path, "tiny-phi4mini", "transformers5"), tmp_path, "bf16")
    assert fidelity(reference, "tiny-phi4mini", artifact).failures(bound_for("fp32")) == []


def stock_logits(artifact: Path, sequences: list[list[int]]) -> list[np.ndarray]:
    """Logits of the model exactly as mlx-lm builds it (longrope always on its long factor), in f32."""
    model, _ = mlx_lm.load(str(artifact))
    model.set_dtype(mx.float32)
    return [np.array(model(mx.array([ids]))[0]) for ids in sequences]


def test_longrope_short_and_long_factor_match_transformers(tmp_path, reference):
    """mlx-lm rotates with long_factor at every length; transformers uses short_factor up to 128 tokens here.

    logits() applies transformers' choice, so the lossless bf16 artifact matches the source in both windows; the
    stock runtime matches on the long window only, and logits() also yields it on the short window (the "stock"
    variant), which verification measures against the source and reports as a caveat."""
    sequences, source_logits = reference("tiny-phi4mini")
    assert len(sequences[0]) <= 128 < len(sequences[1])
    artifact, details = export(stage(tmp_path, "tiny-phi4mini"), tmp_path, "bf16")
    yielded = list(TARGET.logits(artifact, sequences))
    ours = whole(yielded)
    assert [index for index, _, _ in yielded if not isinstance(index, int)] == [("stock", 0)]
    stock_short = next(chunk for index, _, chunk in yielded if index == ("stock", 0))
    for window in (0, 1):
        assert compare([source_logits[window]], [ours[window]], [sequences[window]]).failures(bound_for("fp32")) == []
    assert np.array_equal(stock_logits(artifact, sequences[1:])[0], ours[1])
    assert np.allclose(stock_logits(artifact, sequences[:1])[0], stock_short, atol=1e-4)
    short_stock = compare([source_logits[0]], [stock_short], [sequences[0]])
    assert short_stock.failures(bound_for("fp32")), "the fixture's short and long factors should differ visibly"
    assert details["rope"]["original_max_position_embeddings"] == 128


def test_tiny_phi3_has_no_longrope_and_a_sliding_window_mlx_lm_ignores(tmp_path):
    _, details = export(stage(tmp_path, "tiny-phi3"), tmp_path, "bf16")
    assert details["rope"] is None
    assert details["sliding_window_ignored"] == 2047
    assert details["caveats"] == [
        "mlx-lm ignores the 2047-token sliding window: beyond it every token attends to the whole context, "
        "unlike transformers"
    ]


@pytest.mark.parametrize("recipe", ["mixed_4_6", "mixed_3_4"])
def test_recipe(tmp_path, reference, recipe):
    artifact, details = export(stage(tmp_path, "tiny-phi4mini"), tmp_path, "4bit", recipe=recipe)
    low, high = {"mixed_4_6": ("4", "6"), "mixed_3_4": ("3", "4")}[recipe]
    assert set(details["quantized_layers_by_bits"]) == {low, high}
    assert details["settings"]["recipe"] == recipe
    numbers = fidelity(reference, "tiny-phi4mini", artifact)
    assert details.get("bound", "4bit") == ("mixed_3_4" if recipe == "mixed_3_4" else "4bit")
    assert numbers.failures(bound_for(details.get("bound", "int4"))) == []


@pytest.mark.slow
def test_gptq_uses_our_calibration_and_never_the_network(tmp_path, reference, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mlx-lm tried to download its calibration text")

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    artifact, details = export(stage(tmp_path, "tiny-phi4mini"), tmp_path, "4bit", method="gptq")
    assert not (tmp_path / "home").exists()
    assert details["settings"]["method"] == "gptq"
    assert details["settings"]["calibration"]["samples"] >= 1
    assert details["quantized_layers_by_bits"]["6"] == 1  # the tied embedding: mlx-lm's GPTQ fallback width
    assert fidelity(reference, "tiny-phi4mini", artifact).failures(bound_for("int4")) == []


def uneven_checkpoint(tmp_path: Path) -> Path:
    """A random tiny-phi4mini-shaped model whose MLP width (720) is not a multiple of 32, 64 or 128."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fixture = source.FIXTURES / "tiny-phi4mini"
    folder = tmp_path / "uneven"
    config = AutoConfig.from_pretrained(fixture)
    config.intermediate_size = 720
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    for item in fixture.iterdir():
        if item.name.startswith(("tokenizer", "chat_template", "special_tokens", "generation_config")):
            (folder / item.name).unlink(missing_ok=True)
            (folder / item.name).symlink_to(item)
    return source.stage(source.resolve(str(folder)), tmp_path / "staging-uneven")


def test_layers_with_uneven_input_stay_full_precision(tmp_path):
    staging = uneven_checkpoint(tmp_path)
    _, details = export(staging, tmp_path, "4bit")
    assert details["full_precision_layers"] == {
        f"model.layers.{i}.mlp.down_proj": "input size 720 is not a multiple of the group size 64" for i in (0, 1, 2)
    }
    assert details["bits_per_weight"] > 5  # the two down_proj stay bf16
    (tmp_path / "gptq").mkdir()
    with pytest.raises(PhiconvertError, match="multiples of --group-size 64: model.layers.0.mlp.down_proj"):
        export(staging, tmp_path / "gptq", "4bit", method="gptq")


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_artifact_loads_as_is_and_chat_stops_at_end_of_turn(tmp_path, name):
    artifact, details = export(stage(tmp_path, name), tmp_path, "4bit")
    files = {p.name for p in artifact.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    _, tokenizer = mlx_lm.load(str(artifact))
    assert tokenizer.chat_template
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in details["eos_token_ids"] and details["eos_token_ids"] == sorted(tokenizer.eos_token_ids)
    reply = TARGET.smoke(artifact, pipeline.MESSAGES, 64)
    assert reply.stopped_at_eot, reply
    assert reply.text.strip() and "<|" not in reply.text


def test_end_of_turn_added_when_generation_config_lacks_it(tmp_path):
    folder = checkpoint(tmp_path, "tiny-phi4mini")
    generation = json.loads((folder / "generation_config.json").read_text())
    end = json.loads((folder / "tokenizer.json").read_text())
    end = next(t["id"] for t in end["added_tokens"] if t["content"] == "<|end|>")
    generation["eos_token_id"] = [i for i in np.atleast_1d(generation["eos_token_id"]).tolist() if i != end]
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps(generation))
    staging = source.stage(source.resolve(str(folder)), tmp_path / "staging")
    artifact, details = export(staging, tmp_path, "bf16")
    assert end in details["eos_token_ids"]
    assert end in json.loads((artifact / "generation_config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize(
    ("precision", "options", "message"),
    [
        ("4bit", {"group_size": 48}, "must be one of 32, 64, 128"),
        ("4bit", {"method": "gptq", "recipe": "mixed_4_6"}, "cannot be combined"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, precision, options, message):
    output = tmp_path / "out"
    output.mkdir()
    job = ExportJob(tmp_path, output, precision, {**OPTIONS, **options}, ["x"], tmp_path)
    with pytest.raises(PhiconvertError, match=message) as info:
        TARGET.export(job)
    assert "\n" not in str(info.value)
    assert leftovers(output) == []


@pytest.mark.slow
def test_convert_end_to_end(tmp_path):
    output = tmp_path / "phi4mini-mlx-4bit"
    report = convert(target="mlx", precision="4bit", output=output)
    assert report["fidelity"]["passed"], report["fidelity"]
    assert report["smoke"]["stopped_at_eot"]
    assert report["fidelity"]["variants"]["stock"]["positions"] == 64  # the window within the original context
    assert report["fidelity"]["variants"]["stock"]["kl"] > report["fidelity"]["windows"][0]["kl"]
    assert report["caveats"][0].startswith("stock mlx-lm rotates with longrope's long factor below the original")
    assert (output / "model.safetensors").is_file() and (output / "phiconvert.json").is_file()
    assert leftovers(tmp_path) == ["phi4mini-mlx-4bit"]
