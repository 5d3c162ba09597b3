"""OpenVINO through the whole pipeline: both fixtures × int4/int8/fp16, verified, with fidelity bounds asserted."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURE_NAMES, checkpoint, converted_by_all

from phiconvert import convert
from phiconvert.verify import bound_for

pytestmark = pytest.mark.slow
PRECISIONS = ("int4", "int8", "fp16")
_done: dict[tuple[str, str], dict] = {}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, target_all):
    """Convert each (fixture, precision) once for all the tests of this module; the bundled default model's
    conversions are the session's --target all run's."""

    def get(name: str, precision: str) -> dict:
        if name == "tiny-phi4mini":
            return converted_by_all(target_all, "openvino", precision)
        if (name, precision) not in _done:
            out = tmp_path_factory.mktemp("ov") / f"{name}-{precision}"
            _done[name, precision] = convert(f"bundled:{name}", target="openvino", precision=precision, output=out)
        return _done[name, precision]

    return get


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_conversion_is_verified_within_bounds(converted, name, precision):
    report = converted(name, precision)
    fidelity, bound = report["fidelity"], bound_for(precision)
    assert fidelity["passed"], fidelity["failures"]
    assert fidelity["worst_top1"] >= bound.top1
    assert fidelity["worst_kl"] <= bound.kl
    assert fidelity["ppl_pct"] <= bound.ppl_pct
    assert fidelity["positions"] == 64 + 384
    assert report["smoke"]["stopped_at_eot"], "the artifact did not stop at <|end|>"
    if precision != "int4":
        assert fidelity["greedy_match"], (report["smoke"]["text"], fidelity["source_reply"])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_artifact_is_complete_and_reported(converted, precision):
    report = converted("tiny-phi4mini", precision)
    out = report["output"]
    on_disk = json.loads(open(f"{out}/phiconvert.json").read())
    assert on_disk["fidelity"] == report["fidelity"]
    for name in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml", "phiconvert.json"):
        assert name in report["files"]
    assert report["toolchain"]["openvino"] and report["toolchain"]["nncf"]
    assert [s["stage"] for s in report["stages"]] == [
        "load source", "source logits 64", "source logits 384", "export", "smoke test", "artifact logits",
        "load source", "source chat",  # the source's reply comes last, checked against the artifact's as a draft
    ]  # fmt: skip
    bits = report["details"]["bits_per_weight"]
    assert {"int4": 4 < bits < 7, "int8": 8 <= bits < 9, "fp16": 16 <= bits < 16.1}[precision], bits


def test_int4_settings_follow_the_model(converted):
    """The fixtures get the settings optimum-intel keeps for the models they are shaped after."""
    phi4 = converted("tiny-phi4mini", "int4")
    assert phi4["details"]["settings"]["group_size"] == 64 and not phi4["caveats"]
    phi3 = converted("tiny-phi3", "int4")
    settings = phi3["details"]["settings"]
    assert (settings["group_size"], settings["defaults_from"]) == (64, "microsoft/Phi-3-mini-4k-instruct")
    assert phi3["details"]["integer_constants"].get("u4")
    assert "data-aware on wikitext2; this run was data-free" in phi3["caveats"][0]  # its recipe wants data


def test_int4_defaults_are_optimum_intels_per_model_table():
    from phiconvert.targets.openvino import GENERIC_INT4, int4_defaults

    assert int4_defaults("microsoft/Phi-4-mini-instruct") == {
        "group_size": 64, "sym": False, "ratio": 1.0, "recipe": "microsoft/Phi-4-mini-instruct", "recipe_dataset": None
    }  # fmt: skip
    assert int4_defaults("/models/Phi-3.5-mini-instruct")["group_size"] == 64  # a local folder, by its name
    assert int4_defaults("Qwen/Qwen2.5-1.5B-Instruct")["ratio"] == 0.9  # some layers kept at 8 bits
    assert int4_defaults("someone/some-model") == {**GENERIC_INT4, "recipe": "generic", "recipe_dataset": None}


def test_both_config_layouts_give_identical_artifacts(converted, tmp_path):
    hub = converted("tiny-phi4mini", "int8")
    folder = checkpoint(tmp_path, "tiny-phi4mini", layout="transformers5")
    tf5 = convert(str(folder), target="openvino", precision="int8", output=tmp_path / "tf5")
    assert tf5["source"]["layout"] == "transformers5" and hub["source"]["layout"] == "hub"
    for name in ("openvino_model.bin", "openvino_model.xml", "openvino_tokenizer.bin"):
        assert (tmp_path / "tf5" / name).read_bytes() == open(f"{hub['output']}/{name}", "rb").read(), name
    assert tf5["fidelity"] == hub["fidelity"]


def test_force_replaces_only_after_verification(converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    report = convert("bundled:tiny-phi3", target="openvino", precision="int8", output=out, force=True)
    assert not (out / "old.txt").exists() and (out / "openvino_model.xml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert report["fidelity"]["passed"]
