"""`--target all`, target lists, the side-by-side report and `phiconvert bench`.

The `--target all` run on the bundled model is CI's proof that every target/precision pair converts, verifies and
benches here; its numbers are checked against the fidelity bounds again from report.json, as a user's script would.
"""

from __future__ import annotations

import dataclasses
import html
import json

import pytest
from conftest import leftovers, run_cli

from phiconvert import cli, pipeline, targets
from phiconvert.errors import PhiconvertError
from phiconvert.pipeline import select as pairs
from phiconvert.protocol import TargetJob
from phiconvert.report import caveats
from phiconvert.verify import bound_for

FOUR_BIT = {("openvino", "int4"), ("ort-genai", "int4"), ("mlx", "4bit"), ("gguf", "q4_k_m"), ("gguf", "q5_k_m"),
            ("gguf", "q4_0"), ("gptq", "int4"), ("awq", "int4"), ("bnb", "nf4"), ("bnb", "fp4"),
            ("torchao", "8da4w"), ("executorch", "8da4w")}  # fmt: skip


def test_all_is_every_pair_and_precision_narrows_it_by_class():
    every = pairs("all", None)
    stable = [(n, p) for n in targets.names() for p, d in targets.load(n).precisions.items() if not d.experimental]
    assert len(every) == len(stable)  # experimental precisions only when asked for by name or class
    assert ("gptq", "int3") not in every and pairs("gptq:int3", None) == [("gptq", "int3")]
    assert set(pairs("all", "int4")) == FOUR_BIT


def test_a_list_takes_explicit_precisions_defaults_or_the_given_one():
    assert pairs("openvino,gguf:q8_0", None) == [("openvino", "int4"), ("gguf", "q8_0")]
    assert pairs("openvino,mlx", "int8") == [("openvino", "int8"), ("mlx", "8bit")]


@pytest.mark.parametrize(
    ("target", "precision", "message"),
    [
        ("openvino,nope", None, "unknown target 'nope'"),
        ("openvino,torchao", "int8", "target 'torchao' has no int8 precision"),
        ("openvino,ort-genai:fp16", None, "fp16 is not built for --ep cpu"),
    ],
)
def test_a_list_is_checked_before_any_work(tmp_path, target, precision, message):
    result = run_cli("--target", target, *(["--precision", precision] if precision else []), "--output", "out",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert leftovers(tmp_path) == []


def test_an_option_no_selected_target_takes_is_refused(tmp_path):
    result = run_cli("--target", "gguf,mlx", "--ep", "cpu", "--output", "out", cwd=tmp_path)
    assert result.returncode == 1 and "--ep applies to none of the selected targets and precisions" in result.stderr
    result = run_cli("--target", "gguf,mlx", "--bench-repeats", "0", "--output", "out", cwd=tmp_path)
    assert result.returncode == 1 and "repeats must be at least 1" in result.stderr and "Traceback" not in result.stderr
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_target_all_converts_verifies_and_benches_every_pair(target_all):
    folder, comparison = target_all
    assert json.loads((folder / "report.json").read_text())["runs"] == comparison["runs"]
    assert leftovers(folder.parent) == ["report", "stderr.txt"]  # stderr.txt: the fixture's copy of the terminal
    skipped = {(r["target"], r["precision"]): r["error"] for r in comparison["runs"] if r["status"] == "skipped"}
    assert list(skipped) == [("ort-genai", "fp16")]
    assert skipped["ort-genai", "fp16"].startswith("ort-genai fp16 is not built for --ep cpu")
    ran = [r for r in comparison["runs"] if r["status"] != "skipped"]
    assert len(ran) == len(pairs("all", None)) - 1
    for row in ran:
        name = f"{row['target']} {row['precision']}"
        assert row["status"] == "passed", (name, row.get("error"))
        declared = targets.load(row["target"]).precisions[row["precision"]].bound
        fidelity, bound = row["report"]["fidelity"], bound_for(row["report"]["details"].get("bound", declared))
        assert fidelity["worst_top1"] >= bound.top1, name
        assert fidelity["worst_kl"] <= bound.kl, name
        assert fidelity["ppl_pct"] <= bound.ppl_pct, name
        assert row["report"]["smoke"]["stopped_at_eot"], name
        assert (folder / row["artifact"] / "phiconvert.json").is_file()


@pytest.mark.slow
def test_every_artifact_and_the_source_are_benched(target_all):
    folder, comparison = target_all
    assert comparison["bench"] == {"prompt_lengths": [16, 128], "new_tokens": 32, "repeats": 1, "ran": True}
    benched = [comparison["baseline"], *[r for r in comparison["runs"] if r["status"] == "passed"]]
    for row in benched:
        measured = row["bench"]
        assert measured["load_s"] > 0 and measured["size_bytes"] > 0
        assert measured["load_rss"] >= measured["baseline_rss"] > 0
        assert [p["tokens"] for p in measured["prompts"]] == list(comparison["bench"]["prompt_lengths"])
        measured_prompts = [p for p in measured["prompts"] if "skipped" not in p]
        assert measured_prompts, row
        for prompt in measured_prompts:
            assert prompt["prompt_tps"] > 0 and prompt["generation_tps"] and prompt["generation_tps"] > 0, row
        for prompt in measured["prompts"]:  # only a program whose context is fixed at export skips a length
            assert "skipped" not in prompt or row["target"] == "executorch", row
    page = (folder / "report.html").read_text()
    assert page.count("<svg") == 7
    assert all(f"{r['target']} {r['precision']}" in page for r in comparison["runs"])


@pytest.mark.slow
def test_caveats_of_stock_runtimes_reach_the_terminal_and_the_page(target_all):
    folder, comparison = target_all
    found = caveats(comparison)
    mlx = [caveat for name, caveat in found if name.startswith("mlx ")]
    assert len(mlx) == 4 and all("long factor below the original context" in c for c in mlx), found
    shown = " ".join((folder.parent / "stderr.txt").read_text().split())  # rich wraps long lines
    page = (folder / "report.html").read_text()
    for name, caveat in found:
        assert f"note: {name}: {caveat}" in shown
        assert html.escape(caveat) in page


@pytest.mark.slow
def test_bench_measures_an_artifact_and_the_source_in_their_runtimes(target_all, tmp_path):
    artifact = target_all[0] / "gguf-q4_k_m"
    result = run_cli("bench", str(artifact), "bundled:tiny-phi3", "--prompt-lengths", "8,64", "--new-tokens", "8",
                     "--repeats", "1", "--json", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    gguf, phi3 = json.loads(result.stdout)
    assert (gguf["target"], gguf["precision"]) == ("gguf", "q4_k_m")
    assert (phi3["target"], phi3["precision"]) == ("source", "fp32")
    assert [p["tokens"] for p in phi3["prompts"]] == [8, 64]
    assert "prompt tok/s @64" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["./nowhere"], "no such folder: ./nowhere"),
        (["bundled:tiny-phi3", "--prompt-lengths", "2040"], "exceeds the model's 2048"),
        (["bundled:tiny-phi3", "--new-tokens", "1"], "--new-tokens must be at least 2"),
    ],
)
def test_bench_errors_are_one_line(tmp_path, args, message):
    result = run_cli("bench", *args, cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_failing_pair_is_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    real = pipeline.run_worker

    def failing_gguf(python, job, work, label, emit):
        if isinstance(job, TargetJob) and job.target == "gguf":
            raise PhiconvertError("gguf: llama.cpp crashed (simulated)")
        return real(python, job, work, label, emit)

    monkeypatch.setattr(pipeline, "run_worker", failing_gguf)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        cli.main(["--target", "gguf,ort-genai", "--output", "both"])
    assert exit.value.code == 1
    assert "1 of 2 conversions failed (gguf q4_k_m)" in capsys.readouterr().err
    comparison = json.loads((tmp_path / "both" / "report.json").read_text())
    status = {r["target"]: (r["status"], r.get("error")) for r in comparison["runs"]}
    assert status == {"gguf": ("failed", "gguf: llama.cpp crashed (simulated)"), "ort-genai": ("passed", None)}
    assert leftovers(tmp_path / "both") == ["ort-genai-int4", "report.html", "report.json"]
    assert "simulated" in (tmp_path / "both" / "report.html").read_text()


def test_a_target_whose_export_keeps_memory_is_verified_in_a_fresh_worker(monkeypatch, tmp_path):
    """ExecuTorch's export_llama holds its memory after it returns: the .pte is loaded and compared by a second
    worker, and the run's report joins the two; other targets run in one."""
    jobs = []

    def worker(python, job, work, label, emit):
        jobs.append((job.target, tuple(job.stages)))
        ran = {"export": {"details": {"bits": 5}}, "verify": {"smoke": {"text": "hi"}}}
        result = {"versions": {"x": "1"}} | {k: v for stage in job.stages for k, v in ran[stage].items()}
        stages = [{"stage": stage, "seconds": 1.0, "peak_rss": 10} for stage in job.stages]
        return {"result": result, "stages": stages, "peak_rss": 20 if "export" in job.stages else 5}

    monkeypatch.setattr(pipeline, "run_worker", worker)
    job = TargetJob("executorch", "8da4w", {}, "src", "out", "work", [], False, "m", [], 8, None, None, "pos")
    pair = pipeline.Pair("executorch", "8da4w", targets.load("executorch"))
    run = pipeline.run_target_workers(pair, job, tmp_path, lambda event: None)
    assert jobs == [("executorch", ("export",)), ("executorch", ("verify",))]
    assert run["result"] == {"versions": {"x": "1"}, "details": {"bits": 5}, "smoke": {"text": "hi"}}
    assert [s["stage"] for s in run["stages"]] == ["export", "verify"] and run["peak_rss"] == 20
    jobs.clear()
    gguf = dataclasses.replace(job, target="gguf", precision="q4_k_m")
    pipeline.run_target_workers(pipeline.Pair("gguf", "q4_k_m", targets.load("gguf")), gguf, tmp_path, print)
    assert jobs == [("gguf", ("export", "verify"))]
