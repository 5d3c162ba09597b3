"""Every tutorial's ```bash blocks run, in order, in a fresh folder: the commands users copy must work.

Blocks fenced as ```bash are run; ```console or ```sh blocks are for other machines (a Mac, a GPU) and are not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M)


@pytest.mark.slow
@pytest.mark.parametrize("tutorial", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_commands_run(tutorial: Path, tmp_path):
    blocks = bash_blocks(tutorial.read_text())
    assert blocks, f"{tutorial.name} has no ```bash block to run"
    script = "set -euo pipefail\n" + "\n".join(blocks)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, f"{tutorial.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
