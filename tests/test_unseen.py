"""Checkpoints no fixture resembles: for each profiled architecture without a bundled fixture, and for Llama-2 style
SentencePiece Llama, a small random model with other sizes, head counts and another fixture's tokenizer, converted
at full precision on every target that has one, with top-1 >= 0.95 against the source.

The weights are random but drawn wide (std 0.1), so the source's next-token choices are clear and a converter
that mis-wires a tensor, a rope or a head dimension shows up as disagreement, not as noise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from phiconvert import archs, convert
from phiconvert.errors import PhiconvertError
from phiconvert.source import FIXTURES

# architecture -> (model_type, the donor fixture whose tokenizer and chat template it takes, shapes)
UNSEEN = {
    "llama2-sentencepiece": ("llama", "tiny-phi3", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8,
                                                         intermediate_size=512)),
    "mistral": ("mistral", "tiny-phi3", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                                               intermediate_size=640, sliding_window=4096)),
    "qwen3": ("qwen3", "tiny-phi4mini", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                              head_dim=64, intermediate_size=512, tie_word_embeddings=True)),
    # Gemma: (1 + w) norms, scaled embeddings, softcapping, and a sliding window short enough to act on the windows
    "gemma2": ("gemma2", "tiny-phi3", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                            query_pre_attn_scalar=64, intermediate_size=512, sliding_window=32)),
    "gemma3": ("gemma3_text", "tiny-phi3", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                                                 head_dim=64, query_pre_attn_scalar=64, intermediate_size=512,
                                                 sliding_window=32, layer_types=["sliding_attention", "full_attention"],
                                                 rope_scaling={"rope_type": "linear", "factor": 8.0})),
}  # fmt: skip
# the full-precision pair of every target that has one
PAIRS = ("openvino:fp16", "ort-genai:fp32", "mlx:fp16", "gguf:f16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
                   "generation_config.json")  # fmt: skip


@pytest.fixture(scope="session")
def unseen(tmp_path_factory):
    """name -> folder of a random checkpoint, written once per session."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            model_type, donor, shapes = UNSEEN[name]
            folder = tmp_path_factory.mktemp(name)
            donor_config = json.loads((FIXTURES / donor / "config.json").read_text())
            ids = {k: donor_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            settings = dict(vocab_size=donor_config["vocab_size"], num_hidden_layers=2, max_position_embeddings=2048,
                            initializer_range=0.1, **ids, **shapes)  # fmt: skip
            config = AutoConfig.for_model(model_type, **settings)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
            for file in TOKENIZER_FILES:
                if (FIXTURES / donor / file).exists():
                    shutil.copy(FIXTURES / donor / file, folder / file)
            made[name] = folder
        return made[name]

    return get


def refusal(folder: Path, target: str) -> str | None:
    return archs.profile(json.loads((folder / "config.json").read_text())).unsupported.get(target)


@pytest.fixture(scope="session")
def compared(unseen, tmp_path_factory):
    """name -> {"target:precision": run} of one `--target LIST --no-bench` comparison per checkpoint, over the pairs
    its architecture supports: one reference and one source chat serve them all."""
    done: dict[str, dict[str, dict]] = {}

    def get(name: str) -> dict[str, dict]:
        if name not in done:
            folder = unseen(name)
            pairs = [p for p in PAIRS if not refusal(folder, p.split(":")[0])]
            output = tmp_path_factory.mktemp(f"{name}-compare") / "report"
            comparison = convert(str(folder), target=",".join(pairs), output=output, benchmark=False)
            done[name] = {f"{r['target']}:{r['precision']}": r for r in comparison["runs"]}
        return done[name]

    return get


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("name", list(UNSEEN))
def test_unseen_checkpoint_converts_at_full_precision(unseen, compared, tmp_path, name, pair):
    """The bar is top-1 >= 0.95, not each precision's own bound: on the random Llama OpenVINO's IR agrees 1.000 on
    the 64-token window and 0.958 on the 384-token one, in fp16 and in fp32 alike (not its fp16 compression; the
    cause is not pinned down yet), where the trained fixtures stay at 1.000."""
    target, precision = pair.split(":")
    folder = unseen(name)
    why = refusal(folder, target)
    if why:  # refused in one line naming the target and the architecture, before any work
        with pytest.raises(PhiconvertError, match=f"--target {target} cannot convert .*ForCausalLM: ") as refused:
            convert(str(folder), target=target, precision=precision, output=tmp_path / "out")
        assert why in str(refused.value) and not (tmp_path / "out").exists()
        return
    run = compared(name)[pair]
    assert "report" in run, run.get("error")  # a failed verification still has its report: the bar is below
    fidelity = run["report"]["fidelity"]
    assert fidelity["top1"] >= 0.95, fidelity
    if UNSEEN[name][2].get("sliding_window", 4096) < 384:
        # top-1 on random weights does not see a sliding window at all (diffuse attention); the mean KL does: a
        # runtime attending past the window is ~1e-2 from the source, a faithful full-precision one ~1e-6
        assert fidelity["kl"] < 1e-3, fidelity
