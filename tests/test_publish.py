"""publish: the model card from phiconvert.json, and the upload through huggingface_hub against a local stand-in of
the Hub's HTTP API (huggingface_hub pointed at it by HF_ENDPOINT); the token never shows."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
import time

import pytest
import uvicorn
import yaml
from conftest import converted_by_all, run_cli
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

TOKEN = "hf_test_token_never_shown"


class Hub:
    """The few routes create_repo and create_commit use; repositories and their files kept in memory."""

    def __init__(self, refuse: int | None = None) -> None:
        self.refuse, self.repos, self.files, self.auth = refuse, {}, {}, set()

    async def route(self, request: Request) -> JSONResponse:
        path, body = request.url.path, await request.body()
        self.auth.add(request.headers.get("authorization"))
        if self.refuse and path.startswith("/api/repos"):
            return JSONResponse({"error": "refused"}, status_code=self.refuse)
        base = str(request.base_url).rstrip("/")
        if path == "/api/repos/create":
            asked = json.loads(body)
            repo = f"{asked['organization']}/{asked['name']}"
            self.repos[repo] = asked
            return JSONResponse({"url": f"{base}/{repo}"})
        if path == "/api/validate-yaml":
            return JSONResponse({"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return JSONResponse({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                           for f in files]})  # fmt: skip
        if "/commit/" in path:
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            for line in body.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    self.files[(repo, entry["value"]["path"])] = base64.b64decode(entry["value"]["content"])
            return JSONResponse({"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return JSONResponse({"error": "not found"}, status_code=404)


@pytest.fixture
def hub():
    """A Hub stand-in on a free loopback port, serving in a thread."""

    def start(refuse: int | None = None):
        state = Hub(refuse)
        app = Starlette(routes=[Route("/{path:path}", state.route, methods=["GET", "POST", "HEAD"])])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        servers.append(server)
        return state, f"http://127.0.0.1:{port}"

    servers: list = []
    yield start
    for server in servers:
        server.should_exit = True


@pytest.fixture
def artifact(target_all, tmp_path):
    """A copy of the session's openvino int4 artifact (publish --dry-run writes its card into the folder)."""
    report = converted_by_all(target_all, "openvino", "int4")
    return shutil.copytree(report["output"], tmp_path / "tiny-phi4mini-openvino-int4"), report


def test_publish_uploads_the_artifact_and_a_card_with_the_measured_numbers(hub, artifact, tmp_path):
    state, endpoint = hub()
    folder, report = artifact
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = run_cli("publish", str(folder), "me/tiny-ov", "--private", "--base-model", "acme/tiny-base",
                     cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert f"Bearer {TOKEN}" in state.auth
    assert state.repos["me/tiny-ov"]["visibility"] == "private"
    uploaded = {path for repo, path in state.files}
    assert uploaded == {p.name for p in folder.iterdir()} | {"README.md"}
    assert state.files[("me/tiny-ov", "openvino_model.bin")] == (folder / "openvino_model.bin").read_bytes()
    assert not (folder / "README.md").exists()  # the card went up, the artifact folder is untouched
    card = state.files[("me/tiny-ov", "README.md")].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "acme/tiny-base" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "openvino" and {"phiconvert", "int4"} <= set(meta["tags"])
    fidelity = report["fidelity"]
    assert f"{fidelity['top1']:.1%} over {fidelity['positions']} positions" in card
    assert f"{fidelity['kl']:.5f}" in card
    assert "phiconvert bundled:tiny-phi4mini --target openvino --precision int4" in card
    assert f"openvino {report['toolchain']['openvino']}" in card
    for files in [p for p in tmp_path.rglob("*") if p.is_file()]:
        assert TOKEN.encode() not in files.read_bytes()


def test_publish_dry_run_writes_the_card_and_lists_the_files(artifact, tmp_path):
    folder, _ = artifact
    result = run_cli("publish", str(folder), "me/tiny-ov", "--dry-run", "--json", cwd=tmp_path,
                     env={"HF_ENDPOINT": "http://127.0.0.1:9"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["dry_run"] and "openvino_model.xml" in done["files"] and "README.md" in done["files"]
    meta = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert "base_model" not in meta  # a bundled model has no Hub id: none is made up


def test_publish_errors_are_one_line(hub, artifact, tmp_path):
    folder, _ = artifact
    _, endpoint = hub(refuse=401)
    for args, env, expected in [
        ((str(folder), "me/x"), {"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN},
         "error: the Hub refused the upload to me/x: HTTP 401 (no token, or one without write access"),
        ((str(folder), "me/x"), {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": TOKEN},
         "error: could not reach the Hub to upload me/x"),
        ((str(folder), "not a repo"), {}, "error: 'not a repo' is not a Hub repository id (OWNER/NAME)"),
        ((str(tmp_path), "me/x"), {}, f"error: {tmp_path} has no phiconvert.json"),
    ]:  # fmt: skip
        result = run_cli("publish", *args, cwd=tmp_path, env={"HF_HUB_OFFLINE": "0", **env})
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
        assert "Traceback" not in result.stderr and TOKEN not in result.stderr
