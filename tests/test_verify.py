"""The check must be able to fail: the classic silent breakages of Phi conversions break even the int4 bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from phiconvert.source import HELDOUT
from phiconvert.verify import BOUNDS, WINDOWS, bound_for, compare


def windows(folder) -> list[list[int]]:
    ids = AutoTokenizer.from_pretrained(folder)(HELDOUT.read_text(), add_special_tokens=False)["input_ids"]
    return [ids[start : start + length] for start, length in WINDOWS]


def logits(folder, sequences, mutate=None) -> list[np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if mutate:
        mutate(model)
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].numpy() for s in sequences]


def test_identical_logits_pass_every_bound():
    x = [np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)]
    fid = compare(x, x, [[1, 2, 3, 4, 5]])
    # the source's log-probabilities are kept in float32 (as on disk): identical logits differ by its rounding only
    assert fid.top1 == 1.0 and fid.kl < 1e-7 and abs(fid.ppl_delta) < 1e-6
    assert all(not fid.failures(b) for b in BOUNDS.values())


def drop_partial_rotary(config):
    """Rotate the whole head, as a backend that ignores partial_rotary_factor does (factors padded to fit)."""
    config.pop("partial_rotary_factor")
    for key in ("short_factor", "long_factor"):
        config["rope_scaling"][key] += [1.0] * 8


def long_factor_everywhere(config):
    config["rope_scaling"]["short_factor"] = config["rope_scaling"]["long_factor"]


def short_factor_everywhere(config):
    config["rope_scaling"]["long_factor"] = config["rope_scaling"]["short_factor"]


def untie(config):
    config["tie_word_embeddings"] = False  # lm_head stays randomly initialised: a converter that forgot the tie


@pytest.mark.parametrize("edit", [drop_partial_rotary, long_factor_everywhere, short_factor_everywhere, untie])
def test_phi4mini_traps_fail_verification(tmp_path, edit):
    good = checkpoint(tmp_path, "tiny-phi4mini")
    sequences = windows(good)
    (tmp_path / "broken").mkdir()
    broken = checkpoint(tmp_path / "broken", "tiny-phi4mini", edit=edit)
    fid = compare(logits(good, sequences), logits(broken, sequences), sequences)
    assert fid.failures(bound_for("int4")), f"{edit.__name__} passed the int4 bound: {fid}"


def test_lm_head_wired_to_embeddings_fails(tmp_path):
    """tiny-phi3 has untied embeddings: a converter that assumes a tie writes the wrong head."""
    folder = checkpoint(tmp_path, "tiny-phi3")
    sequences = windows(folder)

    def tie(model):
        model.lm_head.weight = model.model.embed_tokens.weight

    fid = compare(logits(folder, sequences), logits(folder, sequences, tie), sequences)
    assert fid.failures(bound_for("int4"))
