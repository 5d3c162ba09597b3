"""chat and serve over the session's `--target all` artifacts: the OpenAI client and a raw HTTP client against the
server in three formats, every malformed request, concurrency, a dropped stream, SIGTERM; and the session worker's
stop-string handling on a fake runtime."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import psutil
import pytest
from conftest import ROOT, converted_by_all, run_cli

from phiconvert import targets, vllm_serve, worker
from phiconvert.errors import PhiconvertError

FORMATS = [("gguf", "q4_k_m"), ("openvino", "int4"), ("mlx", "4bit")]
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(artifact: str, *args: str):
    """`phiconvert serve` in a subprocess, up once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "phiconvert", "serve", artifact, "--port", str(port), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        yield base, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.parametrize("target,precision", FORMATS, ids=[t for t, _ in FORMATS])
def test_served_greedy_reply_equals_the_smoke_test_streamed_or_not(target_all, target, precision):
    report = converted_by_all(target_all, target, precision)
    smoke = report["smoke"]
    with server(report["output"], "--exact", "--api-key", KEY) as (base, _):
        api = client(base)
        model = api.models.list().data[0].id
        ask = {"model": model, "messages": smoke["messages"], "max_tokens": 48, "temperature": 0}
        answer = api.chat.completions.create(**ask)
        assert answer.choices[0].message.content == smoke["text"]
        assert answer.choices[0].finish_reason == ("stop" if smoke["stopped_at_eot"] else "length")
        assert answer.usage.completion_tokens == smoke["tokens"]
        pieces, usage = [], None
        for chunk in api.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
            pieces += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(pieces) == smoke["text"]
        assert usage.total_tokens == answer.usage.total_tokens
        text = api.completions.create(model=model, prompt="The river", max_tokens=8, temperature=0)
        assert text.choices[0].text and text.usage.completion_tokens <= 8


def test_server_refuses_malformed_requests_queues_clients_and_survives_a_dropped_stream(target_all):
    report = converted_by_all(target_all, "gguf", "q4_k_m")
    with server(report["output"], "--api-key", KEY, "--model-name", "tiny", "--max-tokens-limit", "64") as (
        base,
        process,
    ):
        auth = {"Authorization": f"Bearer {KEY}"}
        http = httpx.Client(base_url=base, headers=auth, timeout=60)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 16}

        def refused(status: int, body=None, path="/v1/chat/completions", **kw) -> dict:
            response = http.post(path, json=body, **kw) if body is not None else http.post(path, **kw)
            assert response.status_code == status, response.text
            return response.json()["error"]

        assert refused(400, content=b"{not json")["message"] == "the request body is not valid JSON"
        assert refused(400, content=b"[1, 2]")["message"] == "the request body must be a JSON object"
        assert refused(404, {**chat, "model": "other"})["code"] == "model_not_found"
        assert refused(400, {**chat, "max_tokens": 65})["param"] == "max_tokens"
        assert refused(400, {**chat, "max_tokens": "ten"})["param"] == "max_tokens"
        assert refused(400, {**chat, "temperature": 3})["param"] == "temperature"
        assert refused(400, {**chat, "top_p": 0})["param"] == "top_p"
        assert refused(400, {**chat, "seed": -1})["param"] == "seed"
        assert refused(400, {**chat, "stop": ["a", "b", "c", "d", "e"]})["param"] == "stop"
        assert refused(400, {**chat, "n": 2})["param"] == "n"
        assert refused(400, {**chat, "messages": []})["param"] == "messages"
        assert refused(400, {**chat, "messages": [{"role": "robot", "content": "x"}]})["param"] == "messages"
        assert refused(400, {**chat, "logprobs": True})["param"] == "logprobs"
        assert refused(400, {"model": "tiny", "prompt": 3}, path="/v1/completions")["param"] == "prompt"
        long = {**chat, "messages": [{"role": "user", "content": "word " * 3000}]}
        assert refused(400, long)["code"] == "context_length_exceeded"
        assert refused(400, {**long, "stream": True})["code"] == "context_length_exceeded"
        assert refused(413, content=b"x" * (2 << 20))["message"].startswith("request body over")
        assert httpx.post(base + "/v1/chat/completions", json=chat).status_code == 401
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(base + "/health").json()["status"] == "ok"  # no key needed
        assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
        assert http.get("/v1/chat/completions").status_code == 405

        api = client(base)
        greedy = api.chat.completions.create(**chat).choices[0].message.content
        first = greedy.split()[0]
        stopped = api.chat.completions.create(**chat, stop=[first[-1] if first else "x"])
        assert stopped.choices[0].finish_reason == "stop" and len(stopped.choices[0].message.content) < len(greedy)
        sampled = [api.chat.completions.create(**{**chat, "temperature": 1.0}, seed=7).choices[0].message.content
                   for _ in range(2)]  # fmt: skip
        assert sampled[0] == sampled[1]  # the same seed, the same reply

        replies: queue.Queue = queue.Queue()
        threads = [threading.Thread(target=lambda: replies.put(api.chat.completions.create(**chat))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {replies.get().choices[0].message.content for _ in threads} == {greedy}  # one at a time, no mixing

        with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True, "max_tokens": 64,
                                                                  "temperature": 1.0}) as response:  # fmt: skip
            next(response.iter_lines())  # one event, then the client leaves
        start = time.time()
        assert api.chat.completions.create(**chat).choices[0].message.content == greedy
        assert time.time() - start < 30 and not http.get("/health").json()["busy"]

        (runtime,) = psutil.Process(process.pid).children()  # the session's worker: a native crash, simulated
        runtime.kill()
        deadline = time.time() + 30
        while http.get("/health").status_code != 503:  # the server reaps it and says so
            assert time.time() < deadline
            time.sleep(0.2)
        failed = http.post("/v1/chat/completions", json=chat)
        assert failed.status_code == 500 and "runtime ended unexpectedly" in failed.json()["error"]["message"]

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_serve_refuses_a_busy_port_and_a_missing_artifact(target_all, tmp_path):
    report = converted_by_all(target_all, "gguf", "q4_k_m")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("serve", report["output"], "--port", str(taken.getsockname()[1]), cwd=tmp_path)
    assert result.returncode == 1 and "error: could not listen on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_cli("serve", str(tmp_path / "nothing"), cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: no such folder")


def test_chat_answers_once_and_keeps_a_conversation(target_all, tmp_path):
    report = converted_by_all(target_all, "openvino", "int4")
    smoke = report["smoke"]
    (question,) = [m["content"] for m in smoke["messages"] if m["role"] == "user"]
    once = run_cli("chat", report["output"], "--exact", "--prompt", question, cwd=tmp_path)
    assert once.returncode == 0, once.stderr
    assert once.stdout == smoke["text"] + "\n"
    talk = subprocess.run([sys.executable, "-m", "phiconvert", "chat", report["output"], "--max-tokens", "8"],
                          input="hello\n/system be brief\n/bogus\nhi\n/reset\n/exit\nnot read\n", capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert talk.returncode == 0, talk.stderr
    assert len(talk.stdout.splitlines()) == 2  # two replies; /exit ends the chat before the last line
    assert "(system prompt set, conversation reset)" in talk.stderr and "commands:" in talk.stderr
    bad = run_cli("chat", report["output"], "--temperature", "9", cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: temperature must be a number from 0 to 2, not 9.0"


class FakeRuntime:
    """Tokens are characters: stream yields the ids of ``reply`` one by one."""

    def __init__(self, reply: str, stop_id: int = 0) -> None:
        self.reply, self.stop_id, self.closed = reply, stop_id, 0

    def runtime(self) -> targets.Runtime:
        def stream(ids, n, to_the_end, sampling):
            try:
                yield from [ord(c) for c in self.reply][:n]
            finally:
                self.closed += 1

        return targets.Runtime(prompt=lambda messages: [1], stream=stream, is_stop=lambda t: t == self.stop_id,
                               decode=lambda ids, new: "".join(map(chr, new)), encode=lambda text: [1] * len(text),
                               context=100)  # fmt: skip


def answer(reply: str, **request) -> tuple[list[str], dict]:
    events: list[dict] = []
    fake = FakeRuntime(reply)
    worker.answer(fake.runtime(), {"text": "x", "max_tokens": 50, **request}, queue.Queue(), events.append)
    assert fake.closed == 1
    return [e["piece"] for e in events if "piece" in e], events[-1]["end"]


def test_stop_strings_end_the_text_before_them_and_are_never_shown_in_part():
    pieces, end = answer("hello world", stop=["o w"])
    assert "".join(pieces) == "hell" and end["finish_reason"] == "stop"
    assert all("o" not in p for p in pieces)  # "o" could have begun the stop string: held back, then cut
    pieces, end = answer("hello\x00 after")  # the stop id (0) ends the turn; its text is not shown
    assert "".join(pieces) == "hello" and end == {"finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 6}
    pieces, end = answer("abcdef", max_tokens=3)
    assert "".join(pieces) == "abc" and end["finish_reason"] == "length"
    pieces, end = answer("ab", stop=["b"], max_tokens=1)
    assert "".join(pieces) == "a" and end["finish_reason"] == "length"


def test_a_cancel_ends_the_generation_and_a_too_long_prompt_is_refused():
    requests: queue.Queue = queue.Queue()
    requests.put({"cancel": True})
    events: list[dict] = []
    fake = FakeRuntime("abcdef")
    worker.answer(fake.runtime(), {"text": "x", "max_tokens": 50}, requests, events.append)
    assert events == [{"end": {"finish_reason": "cancelled", "prompt_tokens": 1, "completion_tokens": 0}}]
    assert fake.closed == 1
    with pytest.raises(worker.PromptTooLong, match="the prompt is 100 tokens; this model's context is 100"):
        worker.answer(fake.runtime(), {"text": "x" * 100}, queue.Queue(), events.append)


def test_vllm_engine_is_refused_in_one_line_without_cuda_and_for_formats_it_cannot_read(tmp_path):
    from phiconvert import hardware

    if hardware.probe().nvidia_gpu:
        pytest.skip("this machine has an NVIDIA GPU: the refusal is for machines without one")
    result = run_cli("serve", "bundled:tiny-phi4mini", "--engine", "vllm", cwd=tmp_path)
    assert result.returncode == 1 and "needs an NVIDIA GPU with CUDA" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    gguf = tmp_path / "gguf-q4_k_m"
    gguf.mkdir()
    (gguf / "phiconvert.json").write_text('{"target": "gguf", "precision": "q4_k_m", "source": {}}')
    with pytest.raises(PhiconvertError, match="serves gptq and awq artifacts and Hugging Face checkpoints; .* is gguf"):
        vllm_serve.command(str(gguf), "127.0.0.1", 8000)


def test_vllm_engine_runs_vllm_serve_from_its_environment_with_the_same_settings(tmp_path, monkeypatch):
    """The argument wiring, on a machine that pretends to have a GPU and the managed environment."""
    from phiconvert import envs, hardware

    monkeypatch.setattr(hardware, "probe", lambda: hardware.Machine(nvidia_gpu="NVIDIA H200"))
    monkeypatch.setattr(envs, "python", lambda name: None)
    with pytest.raises(PhiconvertError, match="run `phiconvert setup vllm` first"):
        vllm_serve.command("bundled:tiny-phi4mini", "127.0.0.1", 8000)
    monkeypatch.setattr(envs, "python", lambda name: tmp_path / name / "bin" / "python")
    argv, env = vllm_serve.command("bundled:tiny-phi4mini", "0.0.0.0", 8123, api_key=KEY, model="phi")
    assert argv[:2] == [str(tmp_path / "vllm" / "bin" / "vllm"), "serve"]
    assert argv[2].endswith("tiny-phi4mini") and KEY not in argv and env["VLLM_API_KEY"] == KEY
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--served-model-name") + 1] == "phi"
    assert "VLLM_API_KEY" not in vllm_serve.command("bundled:tiny-phi4mini", "127.0.0.1", 8000)[1]
