"""Shared test helpers: the bundled fixtures in either config layout, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phiconvert import source, verify
from phiconvert.protocol import ReferenceJob
from phiconvert.source import FIXTURES
from phiconvert.worker import run_reference

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_NAMES = ("tiny-phi3", "tiny-phi4mini")


def checkpoint(tmp_path: Path, name: str, layout: str = "hub", edit=None) -> Path:
    """A copy of a bundled fixture (weights linked) with the config of ``layout``, optionally edited."""
    src = FIXTURES / name
    folder = tmp_path / f"{name}-{layout}"
    folder.mkdir()
    for item in src.iterdir():
        if not item.name.startswith("config."):
            (folder / item.name).symlink_to(item)
    config_file = "config.json" if layout == "hub" else "config.transformers5.json"
    config = json.loads((src / config_file).read_text())
    if edit:
        edit(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def leftovers(folder: Path) -> list[str]:
    """Anything a run left in ``folder`` (temporary folders are hidden, so list everything)."""
    return sorted(p.name for p in folder.iterdir())


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "phiconvert", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(params=FIXTURE_NAMES)
def fixture_name(request) -> str:
    return request.param


def stage(tmp_path: Path, name: str, layout: str = "hub", edit=None) -> Path:
    """The pipeline's staging copy of a bundled fixture, in either config layout, optionally with an edited config."""
    folder = checkpoint(tmp_path, name, layout, edit)
    return source.stage(source.resolve(str(folder)), tmp_path / f"staging-{name}-{layout}")


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """name -> (sequences, source fp32 log-probabilities), computed once per session by the pipeline's own
    reference code (the streamed float32 model), on the windows every fixture is verified on."""
    cache: dict[str, tuple[list[list[int]], list]] = {}

    def get(name: str):
        if name not in cache:
            tmp = tmp_path_factory.mktemp(f"reference-{name}")
            job = ReferenceJob(source=str(stage(tmp, name)), text_file=str(source.HELDOUT), windows=verify.WINDOWS,
                               out=str(tmp))  # fmt: skip
            result = run_reference(job, lambda event: None)
            cache[name] = (result["sequences"], [np.load(tmp / f"source-{i}.npy") for i in range(len(verify.WINDOWS))])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def target_all(tmp_path_factory):
    """`phiconvert --target all --json` on the bundled model, run once per session: CI's proof that every pair
    converts, verifies and benches, and the artifacts the targets' own tests inspect instead of converting again.
    The bench is as short as proves it (two prompt lengths, one repeat): 3 repeats up to 512 tokens took about 3
    of its 11 minutes in a local run, mostly MLX's CPU backend, and timings are not judged here."""
    folder = tmp_path_factory.mktemp("all")
    result = run_cli("--target", "all", "--output", "report", "--json", "--bench-prompt-lengths", "16,128",
                     "--bench-repeats", "1", cwd=folder, timeout=3600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (folder / "stderr.txt").write_text(result.stderr)  # what the user saw: stage lines, the table, notes
    return folder / "report", json.loads(result.stdout)


def whole(logits) -> list[np.ndarray]:
    """A target's logits() as one array per window (chunks joined, the stock-runtime variants left out)."""
    windows: dict[int, list[np.ndarray]] = {}
    for index, start, chunk in logits:
        if isinstance(index, int):
            assert start == sum(len(c) for c in windows.get(index, [])), "chunks out of order"
            windows.setdefault(index, []).append(chunk)
    return [np.concatenate(windows[i]) for i in sorted(windows)]


def converted_by_all(target_all, target: str, precision: str) -> dict:
    """The phiconvert.json report of one pair of the session's `--target all` run, with its artifact's folder."""
    folder, comparison = target_all
    row = next(r for r in comparison["runs"] if (r["target"], r["precision"]) == (target, precision))
    assert row["status"] == "passed", row.get("error")
    return {**row["report"], "output": str(folder / row["artifact"])}
