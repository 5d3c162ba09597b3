"""Source resolution and config normalisation: both layouts must stage to the same hub-layout config."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURE_NAMES, checkpoint

from phiconvert import source
from phiconvert.errors import PhiconvertError


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_both_layouts_stage_identically(tmp_path, name):
    hub, tf5 = (
        json.loads((source.stage(source.resolve(str(checkpoint(tmp_path, name, layout))), tmp_path / layout)
                    / "config.json").read_text())
        for layout in ("hub", "transformers5")
    )  # fmt: skip
    # Hub configs carry extra keys at their default values (attention_bias: false, ...); every key both have agrees.
    shared = (hub.keys() & tf5.keys()) - {"transformers_version"}
    assert {k: hub[k] for k in shared} == {k: tf5[k] for k in shared}
    for config in (hub, tf5):
        assert "rope_parameters" not in config
        assert {"rope_theta", "rope_scaling", "original_max_position_embeddings"} <= config.keys()


def test_phi4mini_rope_settings_survive_normalisation(tmp_path):
    src = source.resolve(str(checkpoint(tmp_path, "tiny-phi4mini", "transformers5")))
    config = source.normalise_config(src.config)
    assert config["partial_rotary_factor"] == 0.75
    assert config["rope_scaling"]["type"] == "longrope"
    assert len(config["rope_scaling"]["long_factor"]) == 24
    assert config["original_max_position_embeddings"] == 128
    assert config["tie_word_embeddings"] is True


def test_default_model_is_bundled_phi4mini():
    src = source.resolve(None)
    assert src.model == "bundled:tiny-phi4mini"
    assert src.name == "tiny-phi4mini"


def test_staging_links_weights_and_tokenizer(tmp_path):
    staging = source.stage(source.resolve("bundled:tiny-phi3"), tmp_path / "staging")
    assert (staging / "model.safetensors").is_symlink()
    assert (staging / "tokenizer.model").exists()
    assert not (staging / "config.transformers5.json").exists()


def error_of(model: str) -> str:
    with pytest.raises(PhiconvertError) as info:
        source.resolve(model)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path):
    assert "no such folder" in error_of(str(tmp_path / "nope"))


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = error_of("nobody-here/not-a-model")
    assert "not-a-model" in message and "HF_HUB_OFFLINE" in message


def test_no_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "no config.json" in error_of(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    folder = checkpoint(tmp_path, "tiny-phi3", edit=lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    message = error_of(str(folder))
    assert "GPT2LMHeadModel" in message and "Phi3ForCausalLM" in message


def test_corrupt_safetensors(tmp_path):
    folder = checkpoint(tmp_path, "tiny-phi3")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 2])
    assert "corrupt safetensors" in error_of(str(folder))
