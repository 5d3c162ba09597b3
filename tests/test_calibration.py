"""--calibration from a dataset (the `datasets` library): a local dataset folder stands in for the Hub, which is
unreachable here; the Hub's own failures are one line."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from phiconvert import calibration, pipeline
from phiconvert.errors import PhiconvertError
from phiconvert.protocol import TargetJob

pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A local dataset: 300 rows of JSON lines, every other 'text' empty, a second column 'body'."""
    path = tmp_path_factory.mktemp("dataset")
    with (path / "train.jsonl").open("w") as out:
        for i in range(300):
            out.write(json.dumps({"text": "" if i % 2 else f"sample {i}", "body": f"row {i} " + "word " * 20}) + "\n")
    return path


def test_a_local_dataset_folder_gives_its_non_empty_rows(folder):
    assert calibration.samples(f"hf:{folder}")[:2] == ["sample 0", "sample 2"]
    assert len(calibration.samples(f"hf:{folder}")) == 150
    assert len(calibration.samples(f"hf:{folder}::train:body")) == calibration.ROWS  # streamed, no more than needed


def test_specs_and_named_sets_parse():
    assert calibration.parse(calibration.NAMED["c4"]) == ("allenai/c4", "en", "validation", "text")
    assert calibration.parse("hf:me/data") == ("me/data", None, "train", "text")
    with pytest.raises(PhiconvertError, match="expected hf:NAME"):
        calibration.parse("hf:")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf:{folder}:::nope", "has no column 'nope'; it has: text, body"),
        ("hf:{folder}::test", "could not be read"),  # no such split
        ("c4", "the Hugging Face Hub is unreachable|HF_HUB_OFFLINE is set"),
    ],
)
def test_dataset_errors_are_one_line(folder, spec, message):
    with pytest.raises(PhiconvertError, match=message) as error:
        calibration.samples(spec.format(folder=folder))
    assert "\n" not in str(error.value)


def test_the_rows_reach_the_target_as_its_calibration(folder, tmp_path, monkeypatch):
    seen = []

    def capture(python, job, work, label, emit):
        seen.append(job)
        raise PhiconvertError("stopped after the job was written")

    monkeypatch.setattr(pipeline, "run_worker", capture)
    with pytest.raises(PhiconvertError, match="stopped after"):
        pipeline.convert(target="gptq", calibration=f"hf:{folder}", verify="none", output=tmp_path / "out")
    (job,) = seen
    assert isinstance(job, TargetJob) and job.calibration_given
    assert job.calibration == calibration.samples(f"hf:{folder}")


def test_the_cli_refuses_an_unreadable_dataset_before_any_work(tmp_path):
    result = run_cli("--target", "gptq", "--calibration", "hf:nobody/nothing", "--output", "out", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: calibration dataset nobody/nothing " in result.stderr
    assert not (tmp_path / "out").exists()
