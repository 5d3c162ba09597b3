"""Fidelity of an artifact against its source: the numbers that prove a conversion did not break the model.

Both sides see the same token ids. We compare next-token distributions position by position (top-1 agreement,
KL divergence of the artifact from the source) and the perplexity each side assigns to the held-out text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Bound:
    """The worst fidelity a precision may show before the run fails."""

    top1: float  # minimum top-1 agreement with the source, in every window
    kl: float  # maximum mean KL(source || artifact), nats per token, in every window
    ppl_pct: float  # maximum perplexity increase, percent of the source perplexity


# One table for every target, keyed by precision name, checked on the worst window. Set from measurements on the
# bundled trained fixtures (docs/fidelity.md): every target's own numbers pass with margin, while the classic
# silent breakages fail even the int4 row (tests/test_verify.py): longrope's short and long factors swapped
# (worst window top-1 0.78-0.88, KL 0.026), a dropped partial rotary factor (0.63-0.73, KL 0.08-0.10), an untied
# or mis-wired LM head (top-1 0).
BOUNDS: dict[str, Bound] = {
    "fp32": Bound(top1=0.995, kl=1e-4, ppl_pct=0.1),
    "fp16": Bound(top1=0.98, kl=1e-3, ppl_pct=0.5),
    "bf16": Bound(top1=0.97, kl=2e-3, ppl_pct=1.0),
    "int8": Bound(top1=0.95, kl=2e-3, ppl_pct=1.0),
    "int4": Bound(top1=0.89, kl=0.015, ppl_pct=5.0),
    # mlx-lm's mixed_3_4 recipe: 3.6 bits per weight, measured top-1 0.86, KL 0.015 on tiny-phi4mini
    "mixed_3_4": Bound(top1=0.78, kl=0.04, ppl_pct=8.0),
}
# Precision names of the individual targets that share a row of the table above.
ALIASES = {
    "f16": "fp16",
    "8bit": "int8",
    "q8_0": "int8",
    "q6_k": "int8",
    "q5_k_m": "int4",
    "4bit": "int4",
    "q4_k_m": "int4",
    "q4_0": "int4",
    "nf4": "int4",
    "fp4": "int4",
    "8da4w": "int4",
}


def bound_for(precision: str) -> Bound:
    return BOUNDS[ALIASES.get(precision, precision)]


@dataclass(frozen=True)
class Fidelity:
    positions: int
    top1: float
    kl: float
    # the worst window: a rope error can hide in one regime (longrope's short or long factor) and be diluted overall
    worst_top1: float
    worst_kl: float
    ppl_source: float
    ppl_artifact: float
    ppl_delta: float
    ppl_pct: float
    max_abs_logit_diff: float

    def failures(self, bound: Bound) -> list[str]:
        """Human-readable reasons the bound is broken; empty when the artifact passes."""
        reasons = []
        if self.worst_top1 < bound.top1:
            reasons.append(f"top-1 agreement {self.worst_top1:.3f} < {bound.top1}")
        if self.worst_kl > bound.kl:
            reasons.append(f"KL {self.worst_kl:.4f} > {bound.kl}")
        if self.ppl_pct > bound.ppl_pct:
            reasons.append(f"perplexity +{self.ppl_pct:.2f}% > +{bound.ppl_pct}%")
        return reasons

    def to_dict(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(source: list[np.ndarray], artifact: list[np.ndarray], sequences: list[list[int]]) -> Fidelity:
    """Fidelity of ``artifact`` logits against ``source`` logits, each (len(ids), vocab) per sequence (window)."""
    agree, kls, nll_src, nll_art, max_diff = [], [], [], [], 0.0
    for src, art, ids in zip(source, artifact, sequences, strict=True):
        if src.shape != art.shape:
            raise ValueError(f"logits shapes differ: source {src.shape}, artifact {art.shape}")
        lp_src, lp_art = _log_softmax(src), _log_softmax(art)
        agree.append(src.argmax(-1) == art.argmax(-1))
        kls.append((np.exp(lp_src) * (lp_src - lp_art)).sum(-1))
        nxt = np.asarray(ids[1:])
        rows = np.arange(len(nxt))
        nll_src.append(-lp_src[rows, nxt])
        nll_art.append(-lp_art[rows, nxt])
        max_diff = max(max_diff, float(np.abs(src.astype(np.float64) - art).max()))
    ppl_src = float(np.exp(np.concatenate(nll_src).mean()))
    ppl_art = float(np.exp(np.concatenate(nll_art).mean()))
    return Fidelity(
        positions=int(sum(len(a) for a in agree)),
        top1=float(np.concatenate(agree).mean()),
        kl=float(max(np.concatenate(kls).mean(), 0.0)),
        worst_top1=float(min(a.mean() for a in agree)),
        worst_kl=float(max(max(k.mean() for k in kls), 0.0)),
        ppl_source=ppl_src,
        ppl_artifact=ppl_art,
        ppl_delta=ppl_art - ppl_src,
        ppl_pct=100.0 * (ppl_art - ppl_src) / ppl_src,
        max_abs_logit_diff=max_diff,
    )
