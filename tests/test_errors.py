"""Bad input: one line on stderr, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import checkpoint, leftovers, run_cli

from phiconvert import cli, pipeline


def assert_one_line_error(result, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_folder(tmp_path):
    result = run_cli("./no-such-model", "--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "no such folder")
    assert leftovers(tmp_path) == []


def test_unknown_hub_id(tmp_path):
    result = run_cli("nobody-here/no-such-model", "--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "nobody-here/no-such-model")
    assert leftovers(tmp_path) == []


def test_no_config(tmp_path):
    (tmp_path / "model").mkdir()
    result = run_cli("model", "--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "no config.json")
    assert leftovers(tmp_path) == ["model"]


def test_unsupported_architecture(tmp_path):
    checkpoint(tmp_path, "tiny-phi3", edit=lambda c: c.update(architectures=["BertForMaskedLM"]))
    result = run_cli("tiny-phi3-hub", "--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "BertForMaskedLM", "supported: Phi3ForCausalLM")
    assert leftovers(tmp_path) == ["tiny-phi3-hub"]


def test_corrupt_safetensors(tmp_path):
    folder = checkpoint(tmp_path, "tiny-phi3")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = run_cli(str(folder), "--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "corrupt safetensors")
    assert leftovers(tmp_path) == ["tiny-phi3-hub"]


def test_precision_not_supported(tmp_path):
    result = run_cli("--target", "openvino", "--precision", "q4_k_m", "--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "cannot do precision 'q4_k_m'", "int4")
    assert leftovers(tmp_path) == []


def test_option_not_supported_by_precision(tmp_path):
    result = run_cli("--precision", "int8", "--group-size", "64", "--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "--group-size")


def test_output_exists_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_cli("--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "exists", "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("calibration", ["", "   \n\n  "])
def test_empty_calibration(tmp_path, calibration):
    result = run_cli("--calibration", calibration, "--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "calibration text is empty")
    assert leftovers(tmp_path) == []


def test_empty_calibration_file(tmp_path):
    (tmp_path / "calib.txt").write_text("\n\n")
    result = run_cli("--calibration", "calib.txt", "--output", "out", cwd=tmp_path)
    assert_one_line_error(result, "calibration text is empty")


def test_missing_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(pipeline.targets, "missing_modules", lambda target: ["nncf"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: target 'openvino' needs: pip install \"phiconvert[openvino]\" (missing: nncf)"
    assert leftovers(tmp_path) == []


def test_json_error_is_machine_readable(tmp_path):
    result = run_cli("./no-such-model", "--json", cwd=tmp_path)
    assert result.returncode == 1
    assert '"error": "no such folder' in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("group", "sig", "code", "word"), [(True, signal.SIGINT, 130, "interrupted"),
                                                           (False, signal.SIGTERM, 143, "terminated")])  # fmt: skip
def test_ctrl_c_or_kill_during_export_leaves_nothing(tmp_path, group, sig, code, word):
    """Ctrl-C sends SIGINT to the whole foreground group; `kill PID` sends SIGTERM to the one process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "phiconvert", "--output", "out"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job is
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 300
    while not list(tmp_path.glob(".out.phiconvert-*/work-*/openvino.log")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # well inside the export
    (os.killpg if group else os.kill)(process.pid, sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert err.strip().splitlines()[-1] == f"error: {word}; nothing was written"
    assert "Traceback" not in err
    assert leftovers(tmp_path) == []
