"""`phiconvert serve ARTIFACT --engine vllm`: the artifact behind vLLM's own OpenAI-compatible server, on CUDA.

vLLM reads GPTQ and AWQ checkpoints and plain Hugging Face checkpoints directly, so nothing is converted again:
phiconvert checks the artifact and the machine before anything starts, then hands the process over to `vllm serve`
from the managed `vllm` environment (vLLM pins its own torch and transformers: phiconvert/envs/vllm.txt) with the
built-in server's host, port, model name and API key. vLLM checks the key on its /v1 routes and leaves /health open,
as the built-in server does; the key travels in vLLM's environment variable, never on a command line.
"""

from __future__ import annotations

import os
from pathlib import Path

from phiconvert import envs, hardware
from phiconvert.bench import SOURCE, identify
from phiconvert.errors import PhiconvertError

FORMATS = ("gptq", "awq", SOURCE)  # what vLLM loads as it is


def command(
    artifact: str, host: str, port: int, api_key: str | None = None, model: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and environment for ``artifact``, or a one-line refusal saying why not."""
    target, path, _ = identify(artifact)
    if target not in FORMATS:
        raise PhiconvertError(
            f"--engine vllm serves gptq and awq artifacts and Hugging Face checkpoints; {path.name} is {target} "
            "(serve it with the built-in engine)"
        )
    machine = hardware.probe()
    if not machine.nvidia_gpu:
        raise PhiconvertError("--engine vllm needs an NVIDIA GPU with CUDA; this machine has none (nvidia-smi)")
    python = envs.python("vllm")
    if python is None:
        raise PhiconvertError("--engine vllm runs in its own environment: run `phiconvert setup vllm` first")
    argv = [str(Path(python).parent / "vllm"), "serve", str(path), "--host", host, "--port", str(port),
            "--served-model-name", model or path.name, "--generation-config", "auto"]  # fmt: skip
    env = dict(os.environ)
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return argv, env


def run(artifact: str, host: str, port: int, api_key: str | None = None, model: str | None = None) -> None:
    """Replace this process with vLLM's server (its signals, shutdown and exit status are then vLLM's own)."""
    argv, env = command(artifact, host, port, api_key, model)
    os.execve(argv[0], argv, env)
