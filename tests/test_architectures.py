"""Architectures beyond Phi: the profiles, the facts read from each model (stop tokens, GGUF pre-tokenizer), and
every target on the bundled tiny-llama and tiny-qwen, every pair verified within its bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import checkpoint, run_cli

from phiconvert import archs, stops, targets
from phiconvert.errors import PhiconvertError
from phiconvert.source import FIXTURES, normalise_config

OTHER_FIXTURES = ("tiny-llama", "tiny-qwen")
# every fixture's end-of-turn token, found from its chat template, and llama.cpp's name for its pre-tokenizer
END_OF_TURN = {"tiny-phi3": "<|end|>", "tiny-phi4mini": "<|end|>", "tiny-llama": "<|eot_id|>",
               "tiny-qwen": "<|im_end|>"}  # fmt: skip
PRE_TOKENIZER = {"tiny-phi4mini": "gpt-4o", "tiny-llama": "llama-bpe", "tiny-qwen": "qwen2"}


# the precision rows of phiconvert.verify.BOUNDS that mean "unquantized", most exact first
FULL_PRECISION = ("fp32", "fp16", "bf16")


def every_target(fixture: str) -> list[str]:
    """Each target's default precision and its most exact stable one, where the target takes the fixture: every
    converter and runtime on the architecture at half the pairs of `--target all` (a target's other precisions
    share their code path; the Phi fixture's `--target all` runs them all)."""
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    chosen = []
    for name in targets.names():
        target = targets.load(name)
        if target.refuse and target.refuse(config, {}):
            continue
        stable = {p: d for p, d in target.precisions.items() if not d.experimental and d.bound in FULL_PRECISION}
        exact = sorted(stable, key=lambda p: FULL_PRECISION.index(stable[p].bound))[:1]
        chosen += [f"{name}:{p}" for p in [target.default_precision, *exact]]
    return chosen


@pytest.fixture(scope="session", params=OTHER_FIXTURES)
def all_of(request, tmp_path_factory):
    """`phiconvert bundled:NAME --target LIST --no-bench --json` over ``every_target``, once per fixture and session:
    each architecture's conversions and checks (the Phi fixture's run benches every pair already; benching costs
    40% of a run)."""
    folder = tmp_path_factory.mktemp(f"all-{request.param}")
    model, pairs = f"bundled:{request.param}", ",".join(every_target(request.param))
    result = run_cli(model, "--target", pairs, "--no-bench", "--output", "report", "--json", cwd=folder, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, folder / "report", json.loads(result.stdout)


def test_every_pair_converts_and_verifies(all_of):
    name, folder, comparison = all_of
    runs = {(r["target"], r["precision"]): r for r in comparison["runs"]}
    assert {r["target"] for r in comparison["runs"]} == set(targets.names()) - (
        {"executorch"} if name == "tiny-llama" else set()
    )
    failed = {pair: r.get("error") for pair, r in runs.items() if r["status"] != "passed"}
    assert not failed, failed
    for pair, run in runs.items():
        fidelity = run["report"]["fidelity"]
        assert fidelity["passed"] and run["report"]["smoke"]["stopped_at_eot"], (pair, fidelity)


def test_a_target_that_cannot_take_a_fixture_says_why():
    """tiny-llama's llama3 rope scaling, which ExecuTorch's llama_transformer does not compute."""
    config = json.loads((FIXTURES / "tiny-llama" / "config.json").read_text())
    assert "no 'llama3' rope scaling" in targets.load("executorch").refuse(config, {})


def test_gguf_is_written_as_the_profiles_architecture(all_of):
    import gguf

    name, folder, comparison = all_of
    run = next(r for r in comparison["runs"] if (r["target"], r["precision"]) == ("gguf", "f16"))
    path = next((folder / run["artifact"]).glob("*.gguf"))
    reader = gguf.GGUFReader(path)
    architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    assert architecture == {"tiny-llama": "llama", "tiny-qwen": "qwen2"}[name]
    tensors = {t.name for t in reader.tensors}
    if name == "tiny-llama":  # llama3 rope scaling travels as per-frequency divisors
        assert "rope_freqs.weight" in tensors
    else:  # Qwen2: q/k/v biases, and the tied head is the embedding
        assert "blk.0.attn_q.bias" in tensors and "output.weight" not in tensors
    eot = reader.get_field(gguf.Keys.Tokenizer.EOT_ID).contents()
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
    assert tokens.contents(eot) == END_OF_TURN[name]


@pytest.mark.parametrize("name", list(END_OF_TURN))
def test_end_of_turn_is_read_from_the_chat_template(name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / name)
    assert stops.end_of_turn(tokenizer) == END_OF_TURN[name]
    ids = stops.stop_ids(FIXTURES / name, tokenizer)
    assert tokenizer.convert_tokens_to_ids(END_OF_TURN[name]) in ids and len(ids) == len(set(ids))


def test_end_of_turn_missing_from_generation_config_is_still_a_stop_id(tmp_path):
    from transformers import AutoTokenizer

    folder = checkpoint(tmp_path, "tiny-llama")
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 3501}))  # <|end_of_text|> only
    ids = stops.stop_ids(folder, AutoTokenizer.from_pretrained(folder))
    assert ids[0] == 3501 and AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|eot_id|>") in ids


@pytest.mark.parametrize("name", list(PRE_TOKENIZER))
def test_gguf_pre_tokenizer_is_recognised_by_behaviour(name):
    from phiconvert.gguf_writer import _pre_tokenizer

    assert _pre_tokenizer(json.loads((FIXTURES / name / "tokenizer.json").read_text())) == PRE_TOKENIZER[name]


def test_an_equivalent_regex_written_differently_is_still_recognised():
    """Llama-3's regex spelled with explicit case classes instead of (?i:...) splits the same way."""
    from phiconvert.gguf_writer import _pre_tokenizer

    tokenizer = json.loads((FIXTURES / "tiny-llama" / "tokenizer.json").read_text())
    split = tokenizer["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    )
    assert _pre_tokenizer(tokenizer) == "llama-bpe"
    tokenizer["model"]["ignore_merges"] = False  # the same split without ignore_merges is DBRX's (Phi-4's)
    assert _pre_tokenizer(tokenizer) == "dbrx"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"architectures": ["Gemma4ForCausalLM"]}, "Gemma4ForCausalLM; supported: "),
        ({"architectures": ["BertForMaskedLM"]}, "supported: Phi3ForCausalLM"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ],
)
def test_unsupported_architecture_or_rope_is_refused_in_one_line(edit, message):
    config = {**normalise_config(json.loads((FIXTURES / "tiny-llama" / "config.json").read_text())), **edit}
    with pytest.raises(PhiconvertError, match="^'x' .*" + message.replace("(", r"\(")):
        archs.profile(config, "x")


def test_every_fixture_has_a_profile():
    for folder in sorted(Path(FIXTURES).iterdir()):
        if (folder / "config.json").is_file():
            archs.profile(normalise_config(json.loads((folder / "config.json").read_text())), folder.name)


@pytest.mark.parametrize(("inputs", "group"), [((256, 256, 768), 128), ((576, 576, 1536), 64), ((720,), 16)])
def test_gptq_and_awq_default_group_size_fits_the_model(inputs, group):
    from phiconvert.targets import awq, gptq

    assert gptq.settings("int4", {}, inputs).group_size == group
    assert gptq.settings("int4", {"group_size": 32}, inputs).group_size == 32  # the user's choice stands
    assert awq.settings({}, inputs)["group_size"] == group


def test_gptq_group_size_the_user_chose_is_refused_when_it_does_not_fit(tmp_path):
    result = run_cli("bundled:tiny-llama", "--target", "gptq", "--group-size", "48", "--output", "o", cwd=tmp_path)
    assert result.returncode != 0 and "--group-size for gptq must be one of" in result.stderr


def test_readme_support_table_is_generated_from_the_profiles():
    from phiconvert import targets

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = readme.split("<!-- architectures -->\n", 1)[1].split("<!-- /architectures -->", 1)[0]
    assert shown == archs.support_table(targets.names())


def test_phi_facts_live_in_the_profiles_only():
    """Phi's names and tokens in code (not docstrings) only where they are data: the profiles, the fixtures' names,
    and llama.cpp's own name-keyed tokenizer quirk in the GGUF writer. A `<|end|>` or an architecture check
    anywhere else is a Phi assumption another architecture would silently get."""
    import ast
    import re

    allowed = {"archs.py", "source.py", "gguf_writer.py"}
    pattern = re.compile(r"<\|end\|>|Phi3ForCausalLM|\bPHI3\b|\bphi3\b")
    found = []
    for path in sorted((Path(__file__).resolve().parent.parent / "phiconvert").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if pattern.search(node.value) and path.name not in allowed:
                    found.append(f"{path.name}:{node.lineno}: {node.value[:60]!r}")
    assert not found, found
