"""Calibration text for data-aware quantization (GPTQ, AWQ, OpenVINO's data-aware AWQ, MLX GPTQ, ORT GenAI's int4).

``--calibration`` takes the bundled text (the default), a text file or a literal text (paragraphs are samples), or
rows of a dataset through the ``datasets`` library: ``hf:NAME[:CONFIG][:SPLIT][:COLUMN]`` for a Hub dataset or a
local dataset folder, and the short names the quantization guides use (``c4``, ``wikitext2``). Datasets are
streamed: only the rows taken are read, never a whole C4 shard.
"""

from __future__ import annotations

from pathlib import Path

from phiconvert import source
from phiconvert.errors import PhiconvertError

# The guides' calibration sets, as hf: specs (C4's English validation split, as GPTQ's and AutoRound's recipes use)
NAMED = {
    "c4": "hf:allenai/c4:en:validation:text",
    "wikitext2": "hf:Salesforce/wikitext:wikitext-2-raw-v1:train:text",
}
ROWS = 256  # non-empty rows taken from a dataset: more than any target's 128 calibration chunks need


def samples(calibration: str | None) -> list[str]:
    """Calibration strings: a dataset's rows, a text file's or a literal text's paragraphs; the bundled text when
    none is given."""
    if calibration is not None and (calibration in NAMED or calibration.startswith("hf:")):
        return dataset_rows(NAMED.get(calibration, calibration))
    if calibration is None:
        text = source.CALIBRATION.read_text()
    elif Path(calibration).expanduser().is_file():
        text = Path(calibration).expanduser().read_text()
    else:
        text = calibration
    found = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not found:
        raise PhiconvertError("calibration text is empty")
    return found


def parse(spec: str) -> tuple[str, str | None, str, str]:
    """``hf:NAME[:CONFIG][:SPLIT][:COLUMN]`` → (name, config or None, split (train), column (text))."""
    parts = spec.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 4:
        raise PhiconvertError(f"--calibration {spec}: expected hf:NAME[:CONFIG][:SPLIT][:COLUMN]")
    parts += [""] * (4 - len(parts))
    return parts[0], parts[1] or None, parts[2] or "train", parts[3] or "text"


def dataset_rows(spec: str) -> list[str]:
    """The first ``ROWS`` non-empty values of a dataset's column, streamed."""
    name, config, split, column = parse(spec)
    try:
        import datasets
    except ImportError:
        hint = 'pip install "phiconvert[datasets]"'
        raise PhiconvertError(f"--calibration {spec} needs the datasets library: {hint}") from None
    where = f"calibration dataset {name}" + (f" ({config})" if config else "")
    if not Path(name).expanduser().exists():
        check_hub(name, where)
    try:
        data = datasets.load_dataset(name, config, split=split, streaming=True)
        rows: list[str] = []
        for row in data:
            if column not in row:
                raise PhiconvertError(f"{where} has no column '{column}'; it has: {', '.join(row)}")
            text = str(row[column]).strip()
            if text:
                rows.append(text)
            if len(rows) >= ROWS:
                break
    except PhiconvertError:
        raise
    except Exception as error:  # not found, no such config or split, not in the cache offline: one line
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE and not Path(name).expanduser().exists():
            raise PhiconvertError(f"{where} is not in the datasets cache and HF_HUB_OFFLINE is set") from None
        first = (str(error).strip().splitlines() or [""])[0][:300]
        raise PhiconvertError(f"{where} could not be read: {type(error).__name__}: {first}") from None
    if not rows:
        raise PhiconvertError(f"{where} has no non-empty '{column}' rows in split '{split}'")
    return rows


def check_hub(name: str, where: str) -> None:
    """Ask the Hub for the dataset first: an unknown name or an unreachable Hub is then one clear line, not the
    datasets library's retries and a closed client's error. Offline (HF_HUB_OFFLINE), the cache decides."""
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().dataset_info(name)
    except GatedRepoError:
        raise PhiconvertError(f"{where} is gated on the Hugging Face Hub: accept its terms and log in") from None
    except RepositoryNotFoundError:
        raise PhiconvertError(f"{where}: no such local folder or Hugging Face Hub dataset") from None
    except httpx.TransportError:
        raise PhiconvertError(f"{where} could not be read: the Hugging Face Hub is unreachable (a local dataset "
                              "folder works offline: --calibration hf:PATH)") from None  # fmt: skip
