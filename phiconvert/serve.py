"""`phiconvert serve ARTIFACT`: an OpenAI-compatible HTTP server over any artifact, in its own runtime.

Starlette on uvicorn. One model per server, held by a ``Session`` worker; requests to it are queued, one
generation at a time (a runtime holds one KV cache), so concurrent clients wait their turn instead of sharing
state. Routes: /health, /v1/models, /v1/chat/completions, /v1/completions, with and without ``stream``. Every
error is a JSON body in the OpenAI API's shape with a 4xx status; a client that leaves mid-stream cancels its
generation and frees the model for the next request.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from phiconvert import vllm_serve
from phiconvert.errors import PhiconvertError
from phiconvert.protocol import Event
from phiconvert.session import BadSetting, PromptRefused, Session, check_sampling

MAX_BODY = 1 << 20  # bytes of a request body
MAX_TOKENS = 1024  # the largest max_tokens a request may ask for (--max-tokens-limit)
ENGINES = ("phiconvert", "vllm")  # the built-in server over the artifact's own runtime, or vLLM's (CUDA)
MAX_STOPS = 4  # stop strings per request, as the OpenAI API allows
ROLES = ("system", "user", "assistant")


class Refused(Exception):
    """A request the server answers with an OpenAI-style error: status, message, the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}
    return {"error": {"message": message, "type": kind.get(status, "invalid_request_error" if status < 500
                      else "server_error"), "param": param, "code": code}}  # fmt: skip


def app(session: Session, model: str, api_key: str | None = None, max_tokens: int = MAX_TOKENS) -> Any:
    """The ASGI application over one loaded session."""
    import anyio
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    turn = asyncio.Lock()  # one generation at a time; waiting requests queue here, in arrival order

    def refuse(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        return JSONResponse(error_body(status, message, param, code), status_code=status)

    def authorised(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return api_key is None or secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def body_of(request: Request) -> dict[str, Any]:
        if not authorised(request):
            raise Refused(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY:
            raise Refused(413, f"request body over {MAX_BODY} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise Refused(413, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Refused(400, "the request body must be a JSON object")
        if body.get("model") != model:
            raise Refused(404, f"model {body.get('model')!r} is not served here; this server serves {model!r}",
                          "model", "model_not_found")  # fmt: skip
        return body

    def settings(body: dict[str, Any]) -> dict[str, Any]:
        """The generation settings of a request, checked: the keywords of Session.generate."""
        for name in ("logprobs", "echo", "suffix", "tools"):
            if body.get(name):
                raise Refused(400, f"{name} is not supported by phiconvert serve ({session.target})", name)
        if body.get("n", 1) != 1:
            raise Refused(400, "n must be 1: one choice per request", "n")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        limit = max_tokens if limit is None else limit
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
            raise Refused(400, f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
        chosen = {"max_tokens": limit, "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
                  "seed": body.get("seed")}  # fmt: skip
        try:
            check_sampling(**chosen)
        except BadSetting as error:
            raise Refused(400, str(error), error.param) from None
        if limit > max_tokens:
            raise Refused(400, f"max_tokens must be at most {max_tokens} on this server", "max_tokens")
        if not isinstance(body.get("stream", False), bool):
            raise Refused(400, "stream must be true or false", "stream")
        return {**chosen, "stop": stop}

    def messages_of(body: dict[str, Any]) -> list[dict[str, str]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Refused(400, "messages must be a non-empty list", "messages")
        plain = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise Refused(400, "only text content parts are supported", "messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(content, str):
                raise Refused(400, f"each message needs a role ({', '.join(ROLES)}) and text content", "messages")
            plain.append({"role": message["role"], "content": content})
        return plain

    def prompt_of(body: dict[str, Any]) -> str:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise Refused(400, "prompt must be a string (one prompt per request)", "prompt")
        return prompt

    async def start(request: dict[str, Any]) -> tuple[Iterator[Event], Event | None]:
        """Take the model's turn and the reply's first event; a refusal (over-long prompt) gives the turn back."""
        await turn.acquire()
        events = session.generate(**request)
        try:
            return events, await run_in_threadpool(next, events, None)
        except BaseException:
            await run_in_threadpool(events.close)
            turn.release()
            raise

    def finisher(events: Iterator[Event]) -> Callable[[], Any]:
        async def finish() -> None:
            await run_in_threadpool(events.close)  # cancels a generation still under way
            turn.release()

        return finish

    async def collect(request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        events, event = await start(request)
        pieces = []
        try:
            while event is not None and "end" not in event:
                pieces.append(event.get("piece", ""))
                event = await run_in_threadpool(next, events, None)
        finally:
            await finisher(events)()
        return "".join(pieces), (event or {}).get("end", {})

    class Streamed(StreamingResponse):
        """Server-sent events whose generation is cancelled and whose turn is given back however the response
        ends: finished, failed, or its client gone."""

        def __init__(self, chunks: AsyncIterator[str], finish: Callable[[], Any]) -> None:
            super().__init__(chunks, media_type="text/event-stream")
            self.finish = finish

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.body_iterator.aclose()
                    await self.finish()

    def usage(end: dict[str, Any]) -> dict[str, int]:
        prompt, made = end.get("prompt_tokens", 0), end.get("completion_tokens", 0)
        return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}

    async def completions(request: Request, chat: bool) -> Any:
        try:
            body = await body_of(request)
            wanted = settings(body)
            wanted.update({"messages": messages_of(body)} if chat else {"text": prompt_of(body)})
            if body.get("stream"):
                events, first = await start(wanted)
            else:
                text, end = await collect(wanted)
        except Refused as error:
            return refuse(error.status, str(error), error.param, error.code)
        except PromptRefused as error:  # the runtime's refusal: the prompt does not fit, or its template refused it
            return refuse(400, str(error), "messages" if chat else "prompt", error.code)
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice = {"index": 0, "finish_reason": end.get("finish_reason", "length")}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else
                          {"text": text, "logprobs": None})  # fmt: skip
            return JSONResponse({"id": ident, "object": kind, "created": created, "model": model,
                                 "choices": [choice], "usage": usage(end)})  # fmt: skip
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(piece: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
            data = {"id": ident, "object": kind + ".chunk" if chat else kind, "created": created, "model": model,
                    "choices": [choice]}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n"

        async def chunks() -> AsyncIterator[str]:
            event: Event | None = first
            if chat:
                yield chunk(None, None, role=True)
            while event is not None and "end" not in event:
                if event.get("piece"):
                    yield chunk(event["piece"], None)
                event = await run_in_threadpool(next, events, None)
            end = (event or {}).get("end", {})
            yield chunk(None if chat else "", end.get("finish_reason", "length"))
            if include_usage:
                data = {"id": ident, "object": kind + ".chunk" if chat else kind, "created": created,
                        "model": model, "choices": [], "usage": usage(end)}  # fmt: skip
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        return Streamed(chunks(), finisher(events))

    async def chat_completions(request: Request) -> Any:
        return await completions(request, chat=True)

    async def text_completions(request: Request) -> Any:
        return await completions(request, chat=False)

    async def models(request: Request) -> Any:
        if not authorised(request):
            return refuse(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                             "owned_by": "phiconvert", "target": session.target,
                             "context_length": session.context}]})  # fmt: skip

    async def health(request: Request) -> Any:
        if not session.alive:  # the runtime's worker has ended (a native crash, killed): nothing can be answered
            return JSONResponse({"status": "down", "model": model, "target": session.target}, status_code=503)
        return JSONResponse({"status": "ok", "model": model, "target": session.target, "busy": turn.locked(),
                             "rss_bytes": session.rss})  # fmt: skip

    async def http_error(request: Request, error: HTTPException) -> Any:
        return refuse(error.status_code, f"{request.method} {request.url.path}: {error.detail}")

    async def runtime_error(request: Request, error: Exception) -> Any:  # the worker failed under a request
        return refuse(500, str(error) if isinstance(error, PhiconvertError) else type(error).__name__)

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: runtime_error})


def serve(
    artifact: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model: str | None = None,
    max_tokens: int = MAX_TOKENS,
    exact: bool = False,
    announce: Callable[[str], None] = print,
    engine: str = "phiconvert",
) -> None:
    """Load the artifact, then serve it until SIGINT or SIGTERM (uvicorn's graceful shutdown: requests under way
    get a few seconds to finish, then the session worker ends). ``engine`` "vllm": vLLM's server instead, on CUDA
    (``phiconvert.vllm_serve``)."""
    if engine not in ENGINES:
        raise PhiconvertError(f"--engine must be one of {', '.join(ENGINES)}, not '{engine}'")
    if engine == "vllm":
        if exact or max_tokens != MAX_TOKENS:
            raise PhiconvertError("--exact and --max-tokens-limit apply to the built-in engine, not to vllm")
        vllm_serve.run(artifact, host, port, api_key, model)
        return
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise PhiconvertError('phiconvert serve needs its web stack: pip install "phiconvert[serve]"') from None
    if max_tokens < 1:
        raise PhiconvertError(f"--max-tokens-limit must be positive, not {max_tokens}")
    with Session(artifact, exact=exact) as session:
        name = model or session.name
        config = uvicorn.Config(app(session, name, api_key, max_tokens), host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=5, limit_concurrency=64)  # fmt: skip
        server = uvicorn.Server(config)
        announce(f"serving {name} ({session.target}, context {session.context}) at http://{host}:{port}/v1")
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it found:
        # with these no-op handlers that ends its run, and the session's worker is closed below (exit 0)
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind, having logged why
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not server.started:
            raise PhiconvertError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
