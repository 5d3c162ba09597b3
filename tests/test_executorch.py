"""ExecuTorch: the weight and params mapping is exact against transformers (llama_transformer in eager float32, no
export: seconds), the session's `--target all` `.pte` carries what a phone runner needs, and what ExecuTorch would
compute differently is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import converted_by_all, run_cli

from phiconvert import pipeline, source, targets, verify
from phiconvert.source import FIXTURES
from phiconvert.targets import executorch

pytest.importorskip("executorch")


def eager_logits(folder: Path, ids: list[int], **changes) -> np.ndarray:
    """Every position's logits of llama_transformer built from our state and params (``changes`` over them)."""
    import torch
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    config = source.normalise_config(source.read_config(folder))
    state = executorch.llama_state(folder, config)
    params = executorch.llama_params(config, state) | changes
    model = construct_transformer(ModelArgs(**params, max_context_len=128, max_seq_len=128, generate_full_logits=True))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).float().numpy()[0]


def source_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


IDS = list(range(7, 7 + 96))  # within every fixture's vocabulary, and within tiny-phi4mini's original 128 tokens


@pytest.mark.parametrize("fixture", ["tiny-phi4mini", "tiny-phi3", "tiny-qwen"])
def test_the_mapping_is_exact_in_float32(fixture):
    """Partial rotary and longrope's short factor (Phi-4-mini), fused q/k/v and gate/up (Phi-3), q/k/v biases and a
    tied head (Qwen2): llama_transformer with our weights and params computes what transformers computes."""
    fidelity = verify.compare([source_logits(FIXTURES / fixture, IDS)], [eager_logits(FIXTURES / fixture, IDS)], [IDS])
    assert fidelity.top1 == 1.0 and fidelity.kl < 1e-6, fidelity


def test_the_exactness_check_fails_on_the_wrong_longrope_factor():
    """The check above can fail: rotating with the long factor below the original context (what a static rope table
    past it does) moves the logits far past the fp32 bound."""
    config = source.read_config(FIXTURES / "tiny-phi4mini")
    long = {"rope_scaling_short_factor": config["rope_scaling"]["long_factor"]}
    fidelity = verify.compare(
        [source_logits(FIXTURES / "tiny-phi4mini", IDS)], [eager_logits(FIXTURES / "tiny-phi4mini", IDS, **long)], [IDS]
    )
    assert verify.bound_for("fp32").kl < fidelity.kl, fidelity


def test_the_pte_carries_what_a_phone_runner_needs(target_all):
    report = converted_by_all(target_all, "executorch", "8da4w")
    folder = Path(report["output"])
    assert (folder / executorch.PTE).is_file() and (folder / "tokenizer.json").is_file()
    assert targets.recognise(folder) == "executorch"
    details = report["details"]
    assert details["settings"]["untied_embeddings"] and details["settings"]["group_size"] == 32
    assert details["settings"]["max_context"] == 128  # tiny-phi4mini's original context: the short factors
    end_of_turn = 3502  # <|end|>: the reply's end, which the tokenizer's eos is not
    assert end_of_turn in details["metadata"]["eos_ids"]
    assert report["smoke"]["stopped_at_eot"] and report["fidelity"]["passed"]
    assert any("384-token window" in caveat for caveat in report["caveats"])
    assert [w["length"] for w in report["fidelity"]["windows"]] == [64]
    assert 4 < details["bits_per_weight"] < 8


def test_a_prompt_as_long_as_the_context_is_prefilled_in_calls_the_program_takes(target_all):
    """export_llama's program takes at most max_seq_len - 1 tokens per call: a 128-token prompt (the bundled
    program's whole context) is two calls, not one the program refuses (found at real size by bench's 128 tokens)."""
    from phiconvert.targets import GREEDY

    runtime = executorch.open_runtime(Path(converted_by_all(target_all, "executorch", "8da4w")["output"]))
    ids = runtime.encode(" ".join(["word"] * 200))[: runtime.context]
    assert len(ids) == runtime.context == 128
    assert list(runtime.stream(ids, 0, False, GREEDY)) == []
    assert len(list(runtime.stream(ids[:100], 28, True, GREEDY))) == 28


def test_a_context_past_the_original_is_refused_before_any_work(tmp_path):
    result = run_cli("--target", "executorch", "--max-context", "256", "--output", "o", cwd=tmp_path)
    assert result.returncode != 0 and not (tmp_path / "o").exists()
    line = result.stderr.strip().splitlines()[-1]
    assert "past this model's original context (128)" in line and "Traceback" not in result.stderr


def test_a_rope_scaling_executorch_lacks_is_refused_before_any_work():
    config = source.normalise_config(json.loads((FIXTURES / "tiny-llama" / "config.json").read_text()))  # llama3
    why = pipeline.model_refusal(pipeline.plan("executorch", None, {}), config)
    assert why.startswith("--target executorch: ExecuTorch's llama_transformer has no 'llama3' rope scaling"), why


def test_the_context_stays_within_a_sliding_window_llama_transformer_is_not_given():
    phi3 = source.read_config(FIXTURES / "tiny-phi3")  # Phi-3-mini's 2047-token window
    assert executorch.context_for(phi3, None) == 2047
    assert "2047-token sliding window" in executorch.refuse(phi3, {"max_context": 4096})
    qwen = source.read_config(FIXTURES / "tiny-qwen")  # declares a window it switches off
    assert executorch.context_for(qwen, None) == 1024 and executorch.refuse(qwen, {"max_context": 2048}) is None


def test_the_export_shows_its_steps_and_counts_the_quantized_weights(monkeypatch):
    """export_llama reports nothing for minutes at real size: each LLMEdgeManager step becomes a named step, and the
    quantization a count of the weights torchao has replaced (here with ExecuTorch's own 8da4w and embedding
    configs), the methods restored afterwards."""
    import time

    import torch
    from executorch.extension.llm.export.builder import LLMEdgeManager
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    from phiconvert import progress

    def quantize(self, transforms):
        quantize_(self.model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                  filter_fn=lambda m, _: isinstance(m, torch.nn.Embedding))  # fmt: skip
        quantize_(self.model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                                    weight_granularity=PerGroup(32)))  # fmt: skip
        time.sleep(1.5)  # the count is polled every second
        return self

    events = []
    monkeypatch.setattr(progress, "_send", events.append)
    monkeypatch.setattr(LLMEdgeManager, "source_transform", quantize)
    monkeypatch.setattr(LLMEdgeManager, "save_to_pte", lambda self, name: None)
    manager = type("Manager", (), {})()
    manager.model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32))
    with executorch._named_steps():
        LLMEdgeManager.source_transform(manager, [])
        LLMEdgeManager.save_to_pte(manager, "model.pte")
    steps = [(e.get("what"), e["done"], e["total"]) for e in events]
    assert steps[0] == (executorch.STEPS["source_transform"], 0, None)
    assert (executorch.STEPS["source_transform"], 3, 3) in steps
    assert steps[-1] == (executorch.STEPS["save_to_pte"], 0, None)
    assert LLMEdgeManager.source_transform is quantize
