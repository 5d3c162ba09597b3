"""Real size, proven small: the streamed reference, windows from the model, pre-flight, progress, the report of a
failed verification, and bench/realsize.py on a tiny shape (the real shapes are measured by hand: README)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, checkpoint, leftovers, run_cli
from test_verify import logits, short_factor_everywhere, windows

from phiconvert import convert, preflight, progress, reference, source, targets, verify
from phiconvert.source import FIXTURES

sys.path.insert(0, str(ROOT / "bench"))
import shapes  # noqa: E402

PHI4_MINI = {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
             "original_max_position_embeddings": 4096, "max_position_embeddings": 131072}  # fmt: skip


def test_streamed_reference_is_the_float32_model_exactly(tmp_path):
    """One layer at a time from disk, upcast to float32: bit for bit what a whole float32 load computes."""
    from transformers import AutoModelForCausalLM

    folder = FIXTURES / "tiny-phi4mini"
    ids = windows(folder)[1]
    reference.write_logprobs(reference.SourceModel(folder), ids, tmp_path / "lp.npy", lambda done, total: None)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1).numpy()
    assert np.array_equal(np.load(tmp_path / "lp.npy"), expected)
    assert np.array_equal(verify.read_rows(tmp_path / "lp.npy", 100, 7), expected[100:107])


def test_greedy_reply_is_exact_whatever_the_draft():
    """A right draft is checked in one pass, a wrong one costs passes, never correctness."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = FIXTURES / "tiny-phi3"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is a tuple?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stop = {3507}  # <|end|>
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=list(stop))
    expected = out[0, len(prompt) :].tolist()
    streamed = reference.SourceModel(folder)
    for drafts, passes in (([], len(expected)), ([expected], 1), ([expected[:4] + [5, 6, 7]], None)):
        units: list[int] = []
        streamed.on_unit = lambda: units.append(1)  # noqa: B023 (read in this iteration only)
        assert reference.greedy_reply(streamed, prompt, 24, stop, drafts, lambda d, t: None) == expected
        if passes is not None:
            assert len(units) == passes * streamed.passes()


def test_a_longrope_model_gets_a_window_past_its_original_context():
    assert verify.windows(PHI4_MINI) == (verify.WINDOWS, (0, 4096 + verify.LONG_MARGIN))
    assert verify.windows({"rope_scaling": None}) == (verify.WINDOWS, None)
    # the bundled fixture's original context is 128: the longer standard window already crosses it
    config = source.normalise_config(json.loads((FIXTURES / "tiny-phi4mini" / "config.json").read_text()))
    assert verify.windows(config) == (verify.WINDOWS, None)
    assert max(length for _, length in verify.WINDOWS) > config["original_max_position_embeddings"]
    # the held-out text is long enough for a real model's long window (tiny-phi3's small vocabulary: most tokens)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(FIXTURES / "tiny-phi3")(source.HELDOUT.read_text())["input_ids"]
    assert len(ids) > 3 * (4096 + verify.LONG_MARGIN)


def test_swapped_factors_fail_in_the_window_past_the_original_context(tmp_path):
    """The long factor only acts past the original context: the window there is where a swap shows."""
    good = checkpoint(tmp_path, "tiny-phi4mini")
    sequences = windows(good)
    (tmp_path / "broken").mkdir()
    broken = checkpoint(tmp_path / "broken", "tiny-phi4mini", edit=short_factor_everywhere)
    fid = verify.compare(logits(good, sequences), logits(broken, sequences), sequences)
    short, long = fid.windows
    assert long.length > 128 >= short.length
    assert long.top1 < verify.bound_for("int4").top1 <= short.top1
    assert fid.failures(verify.bound_for("int4"))


def test_quick_skips_the_long_window_and_says_so():
    from phiconvert.pipeline import verify_windows

    full, _ = verify_windows(PHI4_MINI, "full")
    quick, caveats = verify_windows(PHI4_MINI, "quick")
    assert full == [*quick, (0, 4352)] and quick == verify.WINDOWS
    assert "--verify quick: the 4352-token window past the original context (4096 tokens)" in caveats[0]
    assert verify_windows(PHI4_MINI, "none") == ([], [])


def test_a_machine_too_small_is_told_before_any_work(tmp_path, monkeypatch, capsys):
    from phiconvert import cli

    monkeypatch.setattr(preflight, "available_memory", lambda: 200 * 2**20)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        cli.main(["--target", "gguf", "--output", "out"])
    assert exit.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs ~" in err[0] and "GiB of memory" in err[0] and "this machine has 0.2 GiB" in err[0]
    assert leftovers(tmp_path) == []


def test_doctor_shows_the_largest_model_per_target(tmp_path):
    result = run_cli("doctor", "--json", cwd=tmp_path)
    rows = json.loads(result.stdout)["targets"]
    assert all(row["largest_model"] > 0 for row in rows)
    assert "largest model" in run_cli("doctor", cwd=tmp_path).stdout


def test_progress_is_counted_and_rate_limited():
    sent = []
    progress.attach(sent.append)
    progress.stage("export")
    assert list(progress.track(range(1000), unit="tensors")) == list(range(1000))
    assert 2 <= len(sent) < 20  # the first, the last, and a few in between
    assert sent[-1] == {"stage": "export", "status": "progress", "done": 1000.0, "total": 1000.0, "unit": "tensors"}


@pytest.mark.slow
def test_a_failed_verification_prints_its_whole_report(tmp_path):
    """Random weights quantized to 4 bits fail the bound; --json still gives stages, peak memory and fidelity, and
    progress bars moved through every long stage."""
    folder = tmp_path / "random"
    shapes.write_checkpoint("tiny", folder)
    events = []
    with pytest.raises(Exception) as failure:
        convert(str(folder), target="gguf", precision="q4_0", output=tmp_path / "out", progress=events.append)
    assert "verification failed for gguf q4_0: top-1 agreement" in str(failure.value)
    moved = {e["stage"] for e in events if e["status"] == "progress"}
    assert {"source logits 64", "source logits 384", "export", "artifact logits"} <= moved
    result = run_cli(str(folder), "--target", "gguf", "--precision", "q4_0", "--output", "out", "--json", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: verification failed")
    printed = json.loads(result.stdout)
    report = printed["report"]
    assert printed["error"].startswith("verification failed") and not report["fidelity"]["passed"]
    assert {"export", "artifact logits", "source logits 384"} <= {s["stage"] for s in report["stages"]}
    assert report["peak_rss"]["target"] > 0 and report["fidelity"]["kl_p999"] >= report["fidelity"]["kl_median"]
    assert leftovers(tmp_path) == ["random"]


@pytest.mark.slow
def test_realsize_bench_runs_on_a_tiny_shape(tmp_path):
    """bench/realsize.py keeps working: phiconvert and the anchor at the same settings (a flag given to one target
    reaches its anchor through the report), one table, JSON."""
    out = tmp_path / "realsize.json"
    command = [sys.executable, str(ROOT / "bench" / "realsize.py"), "--shape", "tiny", "--targets", "mlx,gguf:q8_0",
               "--verify", "quick", "--workdir", str(tmp_path / "work"), "--json", str(out),
               "--option", "mlx:--group-size=32"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["target"], r["precision"]) for r in rows] == [("mlx", "4bit"), ("gguf", "q8_0")]
    for r in rows:  # random weights fail 4-bit verification, and the report still says what each stage cost
        assert r["export_s"] > 0 and r["reference_peak_rss"] > 0 and r["verification_s"] > 0
    assert rows[0]["error"].startswith("verification failed for mlx 4bit")
    assert rows[0]["anchor"]["code"] == 0 and rows[0]["export_time_vs_anchor"] > 0
    assert rows[0]["flags"] == ["--group-size=32"] and rows[1]["flags"] == []
    assert "--q-group-size 32" in rows[0]["anchor"]["commands"][0]
    assert "pass --llama-cpp" in rows[1]["anchor"]["skipped"]
    assert "time vs anchor" in result.stdout


def test_progress_in_a_log_is_a_line_every_so_often():
    """No terminal (CI, a log file): the bar becomes a plain line with the count and the time so far."""
    import io

    from rich.console import Console

    from phiconvert.cli import StageLines

    out = io.StringIO()
    lines = StageLines(Console(file=out, width=100))
    lines({"stage": "export", "status": "start"})
    for done in range(1, 4):
        lines({"stage": "export", "status": "progress", "done": done, "total": 32, "unit": "layers", "what": "GPTQ"})
    lines({"stage": "export", "status": "done", "seconds": 2.0, "peak_rss": 2**30})
    shown = out.getvalue().splitlines()
    assert shown[0].startswith("  export · GPTQ: 1/32 layers after") and len(shown) == 2  # then LOG_EVERY later
    assert shown[1].startswith("✓ export") and "peak 1.00 GiB" in shown[1]


def test_a_step_without_a_total_does_not_show_the_last_steps_total(monkeypatch):
    """A toolchain step that counts nothing (ExecuTorch's export_llama after our rename of 194 tensors) says it is
    running, not "0/194" for twenty minutes."""
    import io

    from rich.console import Console

    from phiconvert.cli import StageLines

    monkeypatch.setattr(StageLines, "LOG_EVERY", 0.0)
    out = io.StringIO()
    lines = StageLines(Console(file=out, width=100))
    lines({"stage": "export", "status": "start"})
    lines({"stage": "export", "status": "progress", "done": 194, "total": 194, "unit": "tensors", "what": "rename"})
    lines({"stage": "export", "status": "progress", "done": 0, "total": None, "unit": "", "what": "lowering"})
    shown = out.getvalue().splitlines()
    assert shown[0].startswith("  export · rename: 194/194 tensors"), shown
    assert shown[1].startswith("  export · lowering: running, "), shown


def test_toolchain_bars_are_forwarded_but_not_disabled_ones(monkeypatch):
    """A tqdm bar's count reaches the parent; a disabled one (torch.fx's interpreter, once per graph pass of
    ExecuTorch's lowering) would only ever say 0 of its nodes, and is left out. Tapping twice in one process (an
    earlier in-process run) still sends one event per update."""
    from tqdm import tqdm

    from phiconvert import progress

    events = []
    monkeypatch.setattr(progress, "_send", events.append)
    monkeypatch.setattr(progress, "INTERVAL", 0)  # every change, for the test: the rate limit is advance()'s
    monkeypatch.setattr(tqdm, "update", tqdm.update)  # the tap's patches are undone after the test
    monkeypatch.setattr(tqdm, "refresh", tqdm.refresh)
    progress._tap_tqdm()
    progress._tap_tqdm()
    for _ in tqdm(range(3), desc="layers", disable=True):
        pass
    with tqdm(total=502, disable=True) as bar:
        bar.update(1)
    with tqdm(total=3, desc="shards", mininterval=0) as bar:
        bar.update(3)
    with tqdm(total=32, desc="Quantizing model.layers.0") as bar:  # a slow first step: shown before any update
        bar.set_description("Quantizing model.layers.1")
    assert [(e["what"], e["done"], e["total"]) for e in events] == [
        ("shards", 0.0, 3.0),
        ("shards", 3.0, 3.0),
        ("Quantizing model.layers.0", 0.0, 32.0),
        ("Quantizing model.layers.1", 0.0, 32.0),
    ]


def test_a_stage_with_no_progress_still_gets_a_line_in_a_log(monkeypatch):
    """A toolchain step that reports nothing (optimum-intel's torch export) is not silent in a log."""
    import io
    import time

    from rich.console import Console

    from phiconvert.cli import StageLines

    monkeypatch.setattr(StageLines, "LOG_EVERY", 0.5)
    out = io.StringIO()
    with StageLines(Console(file=out, width=100)) as lines:
        lines({"stage": "export", "status": "start"})
        time.sleep(2.5)
        lines({"stage": "export", "status": "done", "seconds": 2.5, "peak_rss": 2**30})
    shown = [line for line in out.getvalue().splitlines() if line]
    assert len(shown) >= 3 and all(line.startswith("  export: running, ") for line in shown[:-1]), shown
    assert shown[-1].startswith("✓ export")


def test_a_failed_stage_stops_its_lines(monkeypatch):
    """A stage whose worker failed never says "done": the failure note ends it, so a log does not go on saying it
    is running while the next pair converts."""
    import io
    import time

    from rich.console import Console

    from phiconvert.cli import StageLines

    monkeypatch.setattr(StageLines, "LOG_EVERY", 0.3)
    out = io.StringIO()
    with StageLines(Console(file=out, width=100)) as lines:
        lines({"stage": "smoke test", "label": "ort-genai int4", "status": "start"})
        lines({"stage": "convert", "status": "note", "message": "✗ ort-genai int4: boom", "ended": True})
        time.sleep(1.0)
    shown = [line for line in out.getvalue().splitlines() if line]
    assert shown == ["✗ ort-genai int4: boom"], shown


def test_plan_says_what_each_pair_needs_without_doing_any_work(tmp_path):
    result = run_cli("--target", "all", "--plan", "--json", "--output", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["kind"] == "plan" and plan["reference"] > 0 and plan["windows"] == [list(w) for w in verify.WINDOWS]
    assert {(p["target"], p["precision"]) for p in plan["pairs"]} >= {("gguf", "q4_k_m"), ("openvino", "int4")}
    assert all(p["memory"]["export"] > 0 and p["disk"] > 0 and p["refusal"] is None for p in plan["pairs"])
    assert "fits" in run_cli("--target", "gguf", "--plan", cwd=tmp_path).stderr  # the table goes with the stage lines
    assert leftovers(tmp_path) == []


def test_an_option_that_changes_the_work_is_planned_with_its_own_memory():
    """gptq quantizes one layer from disk at a time, --method autoround tunes the whole model held in memory: Phi-4
    (27.3 GiB in bf16) fits the first on a 24 GiB machine and is refused the second before any work."""
    phi4 = preflight.Shape(14_659_507_200, 100352, 5120, 0, 100352 * 5120)
    gptq = targets.load("gptq")

    def export(**options: object) -> dict:
        return preflight.estimate(gptq, "int4", phi4, [], 24 * preflight.GiB, 10**12, options)

    assert export()["refusal"] is None and export(method="gptq")["refusal"] is None
    refused = export(method="autoround", iters=10)
    assert refused["memory"]["export"] > export()["memory"]["export"] + 10 * preflight.GiB
    assert refused["refusal"].startswith("gptq int4 needs ~30.") and "for its export" in refused["refusal"]


def test_the_disk_a_pair_needs_counts_only_the_intermediates_its_export_writes():
    """gguf writes a BF16 intermediate beside its artifact; bnb's save_pretrained writes the artifact and nothing
    else: on Phi-4 (27.3 GiB in bf16) that is 27 GiB of free disk bnb does not need."""
    phi4 = preflight.Shape(14_659_507_200, 100352, 5120, 0, 100352 * 5120)
    windows = [(0, 64), (0, 384)]
    logits = 448 * 100352 * 4

    def disk(target: str, precision: str) -> int:
        return preflight.estimate(targets.load(target), precision, phi4, windows, 10**12, 10**13)["disk"]

    nominal = {t: preflight.artifact_bytes(targets.load(t), p, phi4) for t, p in (("bnb", "nf4"), ("gguf", "q4_k_m"))}
    assert disk("bnb", "nf4") == int(1.45 * nominal["bnb"]) + logits  # its bf16 embedding: 1.18-1.41x nominal
    assert disk("gguf", "q4_k_m") == int(1.07 * nominal["gguf"] + phi4.bf16_bytes) + logits
    refused = preflight.estimate(targets.load("bnb"), "nf4", phi4, windows, 10**12, 5 * preflight.GiB)["refusal"]
    assert refused == "bnb nf4 needs ~11.3 GiB of free disk, there are 5.0 GiB"
    # torchao stores each int4 value in a byte: its checkpoint is 2.34x the nominal 4.5 bits (Phi-4-mini's shape)
    assert disk("torchao", "8da4w") > 2.3 * preflight.artifact_bytes(targets.load("torchao"), "8da4w", phi4)


def test_an_export_that_takes_long_on_a_cpu_says_so_up_front():
    """A calibrated export runs for half an hour (GPTQ) or hours (AWQ) on a laptop's CPU: the plan says how long
    before it starts, at the default settings and off a GPU only (other settings change the work)."""
    import types

    phi4_mini = preflight.Shape(3_836_021_760, 200064, 3072, 0, 200064 * 3072)

    def note(target: str, shape: preflight.Shape = phi4_mini, **options: object) -> str | None:
        adapter = targets.load(target)
        pair = types.SimpleNamespace(adapter=adapter, precision=adapter.default_precision, options=options)
        return preflight.export_time_note(pair, shape)

    awq, quicker = note("awq"), note("awq", clip=False)  # at the default settings the faster ones are named
    assert awq == (
        "awq int4's export takes ~82 min for this model on a 2-core CPU (measured on Phi-4-mini's shape); more cores "
        "(or a GPU: --device) shorten it; --no-clip takes ~29 min at some fidelity cost"
    )
    assert quicker.startswith("awq int4's export takes ~29 min") and "--no-clip" not in quicker
    assert note("awq", clip=True) == awq  # a default said out loud is still the default
    assert "~28 min" in note("gptq", device="cpu") and "autoround" not in note("gptq")  # a slower one is not named
    assert note("gptq", method="autoround").startswith("gptq int4's export takes ~2.7 h")
    assert note("gptq", device="cuda") is None and note("gptq", group_size=64) is None
    assert note("gguf") is None and note("awq", preflight.Shape(10**7, 32000, 256, 0, 32000 * 256)) is None


def test_a_runtime_slow_on_this_cpu_says_how_long_before_it_starts(monkeypatch):
    """mlx's CPU backend on Linux and torchao's dequantization at every call: the plan says how long the smoke test
    and verification will take from the speed each declares, when it is more than a few minutes."""
    monkeypatch.setattr(preflight.sys, "platform", "linux")
    phi4 = preflight.Shape(14_659_507_200, 100352, 5120, 0, 100352 * 5120)
    phi4_mini = preflight.Shape(3_836_021_760, 200064, 3072, 0, 200064 * 3072)
    torchao, mlx = targets.load("torchao"), targets.load("mlx")
    assert preflight.runtime_time_note(torchao, phi4, 448, 48) == (
        "torchao generates ~0.06 tokens/s for this model on a 2-core CPU (measured on Linux): its smoke test and "
        "verification take ~16 min; --verify none leaves the comparison out"
    )  # measured 2026-12-07: 796 + 126 s
    assert preflight.runtime_time_note(torchao, phi4_mini, 448, 48) is None  # 166 + 33 s
    assert preflight.runtime_time_note(mlx, phi4_mini, 0, 48).endswith("its smoke test takes ~21 min")
    assert preflight.runtime_time_note(targets.load("gguf"), phi4, 448, 48) is None
    monkeypatch.setattr(preflight.sys, "platform", "darwin")  # mlx on Metal
    assert preflight.runtime_time_note(mlx, phi4_mini, 448, 48) is None


def test_the_smoke_tests_reply_is_counted_token_by_token(monkeypatch):
    """A slow runtime's smoke test (mlx on a Linux CPU: 20 minutes for 48 tokens of Phi-4-mini) moves on screen."""
    import types

    events = []
    monkeypatch.setattr(progress, "_send", events.append)
    monkeypatch.setattr(progress, "INTERVAL", 0)
    runtime = types.SimpleNamespace(prompt=lambda messages: [1, 2], stream=lambda ids, n, sample, how: iter([5, 6, 9]),
                                    is_stop=lambda token: token == 9, decode=lambda ids, new: "hi")  # fmt: skip
    reply = targets.reply(runtime, [{"role": "user", "content": "Hi"}], 48)
    assert reply.stopped_at_eot and reply.tokens == 3
    assert [(e["what"], e["done"], e["total"], e["unit"]) for e in events] == [
        ("reply", done, 48.0, "tokens") for done in (0.0, 1.0, 2.0, 3.0)
    ]
