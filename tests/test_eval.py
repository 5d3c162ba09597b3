"""phiconvert eval: a real lm-eval run of the bundled tasks on the bundled model in two formats beside the source;
an fp32 artifact scores as the source does, and a broken model scores measurably lower (the check can fail)."""

from __future__ import annotations

import json

from conftest import checkpoint, converted_by_all, run_cli


def untie(config):
    config["tie_word_embeddings"] = False  # lm_head stays randomly initialised: a converter that forgot the tie


def test_eval_puts_artifacts_beside_the_source_and_flags_a_broken_one(target_all, tmp_path):
    fp32 = converted_by_all(target_all, "ort-genai", "fp32")["output"]
    int4 = converted_by_all(target_all, "openvino", "int4")["output"]
    broken = checkpoint(tmp_path, "tiny-phi4mini", edit=untie)
    result = run_cli("eval", fp32, int4, str(broken), "--limit", "40", "--output", "out", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["baseline"]["model"] == "bundled:tiny-phi4mini"  # the source its phiconvert.json names
    lines = {(line["model"], line["task"], line["metric"]): line for line in report["table"]}
    assert {task for _, task, _ in lines} == {"pydoc_cloze", "pydoc_next_word"}
    assert all(line["samples"] == 40 for line in lines.values())
    cloze = lines[("tiny-phi4mini-hub", "pydoc_cloze", "acc")]
    assert cloze["baseline"] > 0.5  # the task is within the tiny model's reach (chance: 0.25)
    assert cloze["delta"] < -0.2 and cloze["flagged"]
    for (model, _, _), line in lines.items():
        if model != "tiny-phi4mini-hub":
            assert not line["flagged"] and abs(line["delta"]) <= 0.1, line
    for (model, task, metric), line in lines.items():
        if model.startswith("ort-genai-fp32"):
            assert line["score"] == line["baseline"], (task, metric)  # float32 all through: the same answers
    assert (tmp_path / "out" / "eval.html").read_text().count("<tr") == len(lines) + 1
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["table"] == report["table"]


def test_eval_errors_are_one_line(target_all, tmp_path):
    artifact = converted_by_all(target_all, "ort-genai", "fp32")["output"]
    folder = checkpoint(tmp_path, "tiny-phi4mini")
    for args, expected in [
        ((artifact, "--tasks", "no_such_task"), "error: unknown task 'no_such_task'"),
        ((artifact, "--limit", "0"), "error: --limit must be positive, not 0"),
        ((str(folder),), f"error: no source model known for {folder}: give --baseline"),
    ]:
        result = run_cli("eval", *args, cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
        assert "Traceback" not in result.stderr


def test_eval_of_a_comparison_is_refused_before_any_work(tmp_path):
    for args, expected in [
        (("--target", "gguf", "--eval", "pydoc_cloze"), "error: --eval applies to --target all or a list"),
        (("--target", "gguf,mlx", "--eval", "no_such_task"), "error: unknown task 'no_such_task'"),
    ]:
        result = run_cli(*args, "--output", "out", cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
        assert not (tmp_path / "out").exists()


def test_eval_scores_become_report_columns_flagged_beyond_noise(target_all):
    """The report of `--target LIST --eval TASKS`: a column per task and metric, * where phiconvert eval flags it
    (the scores are set here; the run that makes them is phiconvert eval's, tested above)."""
    from phiconvert import report

    _, comparison = target_all
    comparison = json.loads(json.dumps(comparison))
    comparison["baseline"]["eval"] = {"pydoc_cloze": {"acc": [0.75, 0.07]}}
    first, second = [r for r in comparison["runs"] if r["status"] == "passed"][:2]
    first["eval"], second["eval"] = {"pydoc_cloze": {"acc": [0.74, 0.07]}}, {"pydoc_cloze": {"acc": [0.25, 0.07]}}
    comparison["eval"] = {"tasks": ["pydoc_cloze"], "limit": 40, "table": [
        {"task": "pydoc_cloze", "metric": "acc", "model": first["artifact"], "flagged": False},
        {"task": "pydoc_cloze", "metric": "acc", "model": second["artifact"], "flagged": True}]}  # fmt: skip
    cells = {r["name"]: r for r in report.rows(comparison)}
    assert cells[f"{first['target']} {first['precision']}"]["eval"] == {("pydoc_cloze", "acc"): 0.74}
    page = report.render_html(comparison)
    assert "<th>pydoc_cloze acc</th>" in page and "<td>0.250 *</td>" in page and "<td>0.740</td>" in page
