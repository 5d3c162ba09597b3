"""The source model: find it, check it, and normalise it into one staging copy that every backend reads.

Backends disagree on config layouts: ONNX Runtime GenAI's builder crashes on the transformers-5 layout
(`rope_parameters`), mlx-lm silently ignores it. The staging copy always has the hub (transformers-4) layout, so
both layouts of one model give identical artifacts.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phiconvert import archs
from phiconvert.errors import PhiconvertError

FIXTURES = Path(__file__).parent / "fixtures"
BUNDLED_PREFIX = "bundled:"
DEFAULT_MODEL = BUNDLED_PREFIX + "tiny-phi4mini"
HELDOUT = FIXTURES / "heldout.txt"  # the text every artifact's logits are compared on
CALIBRATION = FIXTURES / "calibration.txt"  # data-aware quantization's default samples
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.py"]
# The model each bundled fixture is shaped after (its architecture, tokenizer and quirks, at a tiny size): a
# toolchain's known-good settings for that model apply to the fixture too, so CI runs the defaults users get.
SHAPED_AFTER = {
    "tiny-phi3": "microsoft/Phi-3-mini-4k-instruct",
    "tiny-phi4mini": "microsoft/Phi-4-mini-instruct",
    "tiny-llama": "meta-llama/Llama-3.2-1B-Instruct",
    "tiny-qwen": "Qwen/Qwen2.5-0.5B-Instruct",
}
# Keys transformers 5 moves under `rope_parameters` that hub configs keep at the top level.
TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class Source:
    model: str  # what the user asked for
    path: Path  # resolved local folder
    config: dict[str, Any]  # as found on disk
    layout: str  # "hub" or "transformers5"

    @property
    def name(self) -> str:
        return self.path.name if not self.model.startswith(BUNDLED_PREFIX) else self.model[len(BUNDLED_PREFIX) :]

    @property
    def model_id(self) -> str:
        """The Hub id (or folder) toolchains key their per-model defaults on; a fixture's is the model it is
        shaped after."""
        return SHAPED_AFTER.get(self.name, self.model) if self.model.startswith(BUNDLED_PREFIX) else self.model


def bundled(name: str) -> Path:
    """Path of a checkpoint shipped with phiconvert (tiny-phi3, tiny-phi4mini, tiny-llama, tiny-qwen)."""
    path = FIXTURES / name
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())
        raise PhiconvertError(f"no bundled model '{name}'; bundled: {', '.join(shipped)}")
    return path


def resolve(model: str | None) -> Source:
    """Find the model folder (local, bundled or Hub cache) and check it is a checkpoint we can convert."""
    model = model or DEFAULT_MODEL
    if model.startswith(BUNDLED_PREFIX):
        path = bundled(model[len(BUNDLED_PREFIX) :])
    elif Path(model).expanduser().exists():
        path = Path(model).expanduser().resolve()
        if not path.is_dir():
            raise PhiconvertError(f"'{model}' is a file; give the checkpoint's folder")
    elif _looks_like_local_path(model):
        raise PhiconvertError(f"no such folder: {model}")
    else:
        path = _download(model)
    config = read_config(path)
    archs.profile(normalise_config(config), model)
    check_weights(path)
    layout = "transformers5" if "rope_parameters" in config else "hub"
    return Source(model=model, path=path, config=config, layout=layout)


def _looks_like_local_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model)


def _download(repo_id: str) -> Path:
    """Fetch from the Hub into its cache (honours HF_HOME and HF_HUB_OFFLINE); the files the converters read."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise PhiconvertError(f"'{repo_id}' is gated on the Hugging Face Hub: accept its licence and log in") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise PhiconvertError(f"unknown model '{repo_id}': no such local folder or Hugging Face Hub repo") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable"
        raise PhiconvertError(f"model '{repo_id}' is not a local folder, not in the Hub cache, and {why}") from None
    except OSError as error:
        raise PhiconvertError(f"cannot fetch '{repo_id}' from the Hugging Face Hub: {error}") from None


def read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise PhiconvertError(f"no config.json in {path}: not a Hugging Face checkpoint folder")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PhiconvertError(f"{config_path} is not valid JSON: {error}") from None


def check_weights(path: Path) -> None:
    """Open every safetensors header now, so a corrupt file fails before minutes of work, not during export."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PhiconvertError(f"no *.safetensors weights in {path} (PyTorch .bin checkpoints are not supported)")
    for file in files:
        try:
            with safe_open(str(file), framework="np") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own SafetensorError and OSError variants
            raise PhiconvertError(f"corrupt safetensors file {file.name}: {str(error).splitlines()[0]}") from None


def normalise_config(config: dict[str, Any]) -> dict[str, Any]:
    """The hub (transformers-4) layout of ``config``: top-level rope keys and ``rope_scaling`` with ``"type"``."""
    out = {k: v for k, v in config.items() if k != "rope_parameters"}
    rope = dict(config.get("rope_parameters") or {})
    if "full_attention" in rope:  # per layer type (Gemma-3): the hub keeps the sliding layers' theta apart
        if "sliding_attention" in rope:
            out["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = dict(rope["full_attention"])
    for key in TOP_LEVEL_ROPE_KEYS:
        if key in rope:
            out[key] = rope.pop(key)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None)
    if rope_type and rope_type != "default":
        out["rope_scaling"] = {"type": rope_type, **rope}
    elif "rope_parameters" in config:
        out["rope_scaling"] = None
    scaling = out.get("rope_scaling")
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        scaling["type"] = scaling.pop("rope_type", None) or scaling["type"]
        out["rope_scaling"] = scaling
    kinds = config.get("layer_types") or []
    if "full_attention" in kinds and "sliding_attention" in kinds and "sliding_window_pattern" not in out:
        period = kinds.index("full_attention") + 1  # the hub's Gemma-3 key: every period-th layer attends fully
        if all((kind == "full_attention") == ((i + 1) % period == 0) for i, kind in enumerate(kinds)):
            out["sliding_window_pattern"] = period
    if "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out["dtype"]
    return out


def stage(source: Source, staging: Path) -> Path:
    """Write the normalised config beside links to every other file of the source folder."""
    staging.mkdir(parents=True)
    for item in source.path.iterdir():
        # other config variants (our fixtures ship config.transformers5.json) would only confuse the backends
        if not item.name.startswith((".", "config.")):
            (staging / item.name).symlink_to(item.resolve())
    config = normalise_config(source.config)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return staging


def parameter_count(path: Path) -> int:
    """Number of weights in a checkpoint folder, read from the safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total
