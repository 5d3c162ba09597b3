"""The targets' declarations (precisions, options, artifact signatures) and what reads them: consistent with each
other, with the verification bounds, and with the CLI, so adding a target is its module and nothing else."""

from __future__ import annotations

import json

import pytest

from phiconvert import cli, targets, verify


@pytest.mark.parametrize("name", targets.names())
def test_a_target_declares_what_the_checks_and_reports_read(name):
    target = targets.load(name)
    assert target.default_precision in target.precisions
    for precision, declared in target.precisions.items():
        assert declared.bound in verify.BOUNDS, (precision, declared.bound)
        assert 1 < declared.bits <= 32 and declared.note, precision
    for option in target.options:
        assert set(option.precisions) <= set(target.precisions), option.name
        assert option.type in (str, int, bool), option.name


def test_the_cli_has_one_flag_per_declared_option_and_takes_them_to_convert():
    parser = cli.convert_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    for name, declared in targets.options().items():
        assert declared[0][1].flag in flags, name
    args = parser.parse_args(["--target", "ort-genai", "--asym", "--no-int8-lm-head", "--accuracy-level", "1"])
    assert (args.sym, args.int8_lm_head, args.accuracy_level, args.group_size) == (False, False, 1, None)
    assert set(targets.options()) <= set(vars(args))


def test_help_lists_every_precision_with_its_note():
    text = cli.convert_parser().format_help()
    for name in targets.names():
        for precision, declared in targets.load(name).precisions.items():
            assert f"{precision:<8} {declared.note}" in text


def test_int4_selects_every_precision_whose_bound_is_int4():
    from phiconvert.pipeline import select

    expected = {(n, p) for n in targets.names() for p, d in targets.load(n).precisions.items() if d.bound == "int4"}
    assert set(select("all", "int4")) == expected


@pytest.mark.parametrize(
    ("files", "config", "expected"),
    [
        ({"model-q4_k_m.gguf": ""}, None, "gguf"),
        ({"openvino_model.xml": ""}, {"quantization_config": {"quant_method": "awq"}}, "openvino"),
        ({"genai_config.json": "{}"}, {}, "ort-genai"),
        ({}, {"quantization": {"group_size": 64, "bits": 4}}, "mlx"),
        ({}, {"quantization_config": {"quant_method": "gptq"}}, "gptq"),
        ({}, {"quantization_config": {"quant_method": "awq"}}, "awq"),
        ({}, {"quantization_config": {"quant_method": "bitsandbytes"}}, "bnb"),
        ({}, {"quantization_config": {"quant_method": "torchao"}}, "torchao"),
        ({}, {"architectures": ["LlamaForCausalLM"]}, None),
    ],
)
def test_an_artifact_is_recognised_by_its_targets_signature(tmp_path, files, config, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    assert targets.recognise(tmp_path) == expected


def test_readme_targets_table_is_generated_from_the_declarations():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    shown = readme.split("<!-- targets -->\n", 1)[1].split("<!-- /targets -->", 1)[0]
    assert shown == targets.markdown_table()
    assert all((root / "docs" / "tutorials" / targets.load(name).tutorial).is_file() for name in targets.names())


def fake_runtime(tokens: list[int], stop: int, log: list[str]) -> targets.Runtime:
    def stream(ids, new_tokens, to_the_end, sampling):
        try:
            yield from tokens[:new_tokens]
        finally:
            log.append("closed")

    return targets.Runtime(prompt=lambda messages: [1, 2], stream=stream,
                           decode=lambda ids, new: " ".join(map(str, new)), is_stop=lambda t: t == stop,
                           encode=lambda text: [1], context=64)  # fmt: skip


def test_a_reply_ends_at_the_first_stop_id_and_stops_the_runtime():
    log: list[str] = []
    smoke = targets.reply(fake_runtime([5, 6, 9, 7, 8], stop=9, log=log), [], 48)
    assert (smoke.ids, smoke.text, smoke.stopped_at_eot, smoke.tokens) == ([5, 6, 9], "5 6", True, 3)
    assert log == ["closed"]
    unfinished = targets.reply(fake_runtime([5, 6, 7], stop=9, log=[]), [], 2)
    assert (unfinished.ids, unfinished.stopped_at_eot) == ([5, 6], False)
    assert targets.generator(fake_runtime([5, 9, 7, 8], stop=9, log=[]))([1], 4) == 4  # bench: end-of-turn ignored


def test_a_callback_runtime_streams_and_stops_when_the_consumer_does():
    pushed: list[int] = []

    def run(push):  # a runtime that would go on for a long while
        for token in range(1_000_000):
            pushed.append(token)
            if not push(token):
                return

    stream = targets.streamed(run)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert len(pushed) < 1_000_000  # the runtime was told to stop

    def failing(push):
        push(1)
        raise RuntimeError("the runtime failed")

    with pytest.raises(RuntimeError, match="the runtime failed"):
        list(targets.streamed(failing))


def test_sampling_picks_within_top_p_and_repeats_with_its_seed():
    import torch

    from phiconvert.targets import hf_common

    logits = torch.tensor([4.0, 3.9, 0.0, -1.0])  # softmax: about 0.51, 0.46, 0.01, 0.005
    assert hf_common.pick(logits, targets.GREEDY, None) == 0
    narrow = targets.Sampling(temperature=1.0, top_p=0.5)  # the smallest head reaching 0.5: the first token only
    assert {hf_common.pick(logits, narrow, torch.Generator().manual_seed(s)) for s in range(20)} == {0}
    wide = targets.Sampling(temperature=1.0, top_p=0.9)  # the first two
    assert {hf_common.pick(logits, wide, torch.Generator().manual_seed(s)) for s in range(40)} == {0, 1}
    draws = [[hf_common.pick(logits, wide, g) for _ in range(10)] for g in
             (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))]  # fmt: skip
    assert draws[0] == draws[1]


def test_a_worker_starts_with_the_environment_its_target_declares(monkeypatch):
    """torchao's and bnb's workers start with PyTorch's huge-page allocation on (read once, when the process
    starts: setting it later does nothing); a variable the user set wins, and other workers get none of it."""
    from phiconvert import workers

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert workers.worker_env("torchao")["THP_MEM_ALLOC_ENABLE"] == "1"
    assert workers.worker_env("bnb")["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "THP_MEM_ALLOC_ENABLE" not in workers.worker_env("gguf")
    assert "THP_MEM_ALLOC_ENABLE" not in workers.worker_env("source") | workers.worker_env()
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert workers.worker_env("torchao")["THP_MEM_ALLOC_ENABLE"] == "0"
    assert str(workers.PACKAGE_ROOT) in workers.worker_env("torchao")["PYTHONPATH"]
