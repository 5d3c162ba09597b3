"""Environments phiconvert creates and keeps for toolchains whose pins conflict with the main environment.

`phiconvert setup NAME` makes a virtual environment under the user cache from the pinned requirement set shipped
in ``phiconvert/envs/NAME.txt``; a target that declares ``environment=NAME`` then runs its worker with that
environment's interpreter whenever the current one lacks its toolchain.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from phiconvert.errors import PhiconvertError

REQUIREMENTS = Path(__file__).parent / "envs"


def cache_dir() -> Path:
    base = os.environ.get("PHICONVERT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "phiconvert"
    return Path(base).expanduser()


def names() -> list[str]:
    return sorted(p.stem for p in REQUIREMENTS.glob("*.txt"))


def env_dir(name: str) -> Path:
    return cache_dir() / "envs" / name


def python(name: str) -> Path | None:
    """The interpreter of a ready managed environment, or None when `phiconvert setup NAME` has not run."""
    path = env_dir(name) / "bin" / "python"
    ready = env_dir(name) / ".ready"
    return path if path.exists() and ready.exists() else None


def setup(name: str, echo=print) -> Path:
    """Create (or refresh) the managed environment ``name`` and return its interpreter."""
    requirements = REQUIREMENTS / f"{name}.txt"
    if not requirements.is_file():
        raise PhiconvertError(f"no environment '{name}'; known: {', '.join(names())}")
    target = env_dir(name)
    (target / ".ready").unlink(missing_ok=True)
    steps = [[sys.executable, "-m", "venv", str(target)]]
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    steps += [pip + ["--upgrade", "pip"], pip + ["-r", str(requirements)]]
    for step in steps:
        echo(f"$ {' '.join(step)}")
        if subprocess.run(step, stdout=sys.stderr).returncode != 0:  # stdout carries only the interpreter path
            raise PhiconvertError(f"setting up environment '{name}' failed at: {' '.join(step[-2:])}")
    (target / ".ready").write_text(requirements.read_text())
    return target / "bin" / "python"
