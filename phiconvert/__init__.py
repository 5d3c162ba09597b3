"""phiconvert: one Hugging Face Phi model into every deployment format, each artifact proven against the source."""

__version__ = "0.1.0"

from phiconvert.pipeline import convert  # noqa: E402

__all__ = ["convert", "__version__"]
