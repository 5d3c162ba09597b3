"""phiconvert: one Hugging Face model (Phi first) into every deployment format, each artifact proven against the
source."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["convert", "__version__"]


def __getattr__(name: str) -> Any:
    """``phiconvert.convert`` imported on first use: a worker (``python -m phiconvert.worker``, perhaps in a managed
    environment with only its toolchain) imports this package without the pipeline, psutil or rich."""
    if name == "convert":
        from phiconvert.pipeline import convert

        return convert
    raise AttributeError(f"module 'phiconvert' has no attribute {name!r}")
