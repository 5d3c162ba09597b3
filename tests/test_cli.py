"""The CLI's other verbs and --target auto: machine-readable, and honest about which toolchain really runs."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from phiconvert import hardware, targets


def test_doctor_json_lists_every_target(tmp_path):
    result = run_cli("doctor", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [row["target"] for row in report["targets"]] == targets.names()
    assert report["recommendation"]["target"] in targets.names()
    assert report["machine"]["ram_gib"] > 1
    for row in report["targets"]:
        assert row["ready"] or row["fix"], row


def test_doctor_reports_the_managed_environment_versions(tmp_path):
    rows = {row["target"]: row for row in json.loads(run_cli("doctor", "--json", cwd=tmp_path).stdout)["targets"]}
    if "environment" not in rows["gptq"]["versions"]:
        pytest.skip("the managed gptq environment is not set up here")
    assert rows["gptq"]["versions"]["gptqmodel"]  # lives only in the managed environment
    assert rows["gptq"]["versions"]["transformers"] != rows["openvino"]["versions"]["transformers"]


@pytest.mark.slow
def test_target_auto_uses_the_detectors_choice(tmp_path):
    choice = hardware.recommend(hardware.probe())
    result = run_cli("--target", "auto", "--output", "out", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["target"], report["precision"]) == (choice.target, choice.precision)
    assert report["auto"] == choice.reason
    assert f"--target auto: {choice.reason}" in result.stderr
