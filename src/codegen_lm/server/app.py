"""The HTTP server: a Starlette app over one engine running in its background thread, so requests from
every client are batched together (continuous batching).

Routes: OpenAI's completions (/v1/completions, and /v1/engines/{engine}/completions for copilot.vim /
FauxPilot clients, with token healing on), OpenAI's chat completions (/v1/chat/completions: the CodeGen
paper's multi-turn program synthesis, the reply being the code for the last user turn; chat.py),
/v1/models, /copilot_internal/v2/token, TGI's /generate, /generate_stream and POST /, /health,
/metrics (Prometheus) and the playground page at /.

Bad input is answered with a 4xx naming the field (OpenAI's error shape; TGI's on the TGI routes) and
the server goes on. A streamed request whose client goes away is cancelled, so its slots free at the
next engine step; a waiting non-streamed one too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import EngineError, RequestHandle, RequestOutput, StreamEvent
from . import chat, completions, tgi
from .context import ServerContext
from .errors import APIError

log = logging.getLogger("codegen_lm.server")


class _Tracker:
    """Per request: the samples it holds against the queue bound, and its latency metrics."""

    def __init__(self, ctx: ServerContext, samples: int, prompt_tokens: int) -> None:
        self.ctx, self.samples = ctx, samples
        self.arrived = time.perf_counter()
        self.last: dict[tuple[int, int], float] = {}
        self.first = False
        self.ended: set[int] = set()  # requests the route stopped itself, their output complete
        ctx.metrics.prompt_tokens.inc(prompt_tokens)

    def observe(self, prompt: int, event: StreamEvent) -> None:
        now = time.perf_counter()
        m = self.ctx.metrics
        if event.token_ids:
            m.generation_tokens.inc(len(event.token_ids))
            if not self.first:
                self.first = True
                m.time_to_first_token.observe(now - self.arrived)
            key = (prompt, event.index)
            if key in self.last:
                gap = (now - self.last[key]) / len(event.token_ids)
                for _ in event.token_ids:
                    m.inter_token_latency.observe(gap)
            self.last[key] = now
        if event.finish_reason is not None and event.finish_reason != "cancelled":  # those: at _close
            m.finished.labels(event.finish_reason).inc()

    def end(self, handle: RequestHandle) -> None:
        """Stop a request whose output is complete (a chat turn's code, cut): counted as a stop, not as
        a cancellation."""
        handle.cancel()
        self.ended.add(handle.id)
        self.ctx.metrics.finished.labels("stop").inc()

    def done(self, handles: list[RequestHandle]) -> None:
        self.ctx.inflight -= self.samples
        self.ctx.metrics.e2e_latency.observe(time.perf_counter() - self.arrived)
        for h in handles:
            out = h.output()
            if out.scheduled_at is not None:
                self.ctx.metrics.queue_time.observe(out.scheduled_at - out.submitted_at)


def create_app(ctx: ServerContext) -> Starlette:
    """The app; the engine's background thread starts with it and stops when it shuts down."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        ctx.engine.start()
        yield
        ctx.engine.stop()

    def route(path: str, handler: Callable, methods: list[str], shape: str = "openai", auth: bool = True) -> Route:
        async def endpoint(request: Request) -> Response:
            status = 500
            try:
                if auth:
                    _check_key(request, ctx)
                response = await handler(request)
                status = response.status_code
                return response
            except APIError as exc:
                status = exc.status
                return JSONResponse(exc.tgi() if shape == "tgi" else exc.openai(), status_code=exc.status)
            except EngineError as exc:
                log.exception("engine failure")
                return JSONResponse(APIError(500, str(exc), type="server_error").openai(), status_code=500)
            finally:
                ctx.metrics.requests.labels(path, str(status)).inc()

        return Route(path, endpoint, methods=methods)

    async def playground(request: Request) -> Response:
        page = resources.files("codegen_lm.server").joinpath("playground.html").read_text()
        return HTMLResponse(page.replace("{{MODEL}}", html.escape(ctx.model_name)))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": ctx.model_name})

    async def metrics(request: Request) -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": ctx.model_name, "object": "model", "created": ctx.started, "owned_by": "codegen-lm",
             "max_model_len": ctx.context}]})

    async def copilot_token(request: Request) -> Response:
        now = int(time.time())
        return JSONResponse({"token": "codegen-lm-local", "expires_at": now + 3600, "refresh_in": 1800})

    async def openai_completions(request: Request) -> Response:
        return await _completions(request, ctx, engine_route=False)

    async def engine_completions(request: Request) -> Response:
        return await _completions(request, ctx, engine_route=True)

    async def chat_completions(request: Request) -> Response:
        return await _chat(request, ctx)

    async def tgi_generate(request: Request) -> Response:
        return await _tgi(request, ctx, stream=False)

    async def tgi_generate_stream(request: Request) -> Response:
        return await _tgi(request, ctx, stream=True)

    async def tgi_compat(request: Request) -> Response:
        return await _tgi(request, ctx, stream=None)

    ctx.started = int(time.time())
    routes = [
        route("/", playground, ["GET"], auth=False),
        route("/", tgi_compat, ["POST"], "tgi"),
        route("/health", health, ["GET"], auth=False),
        route("/metrics", metrics, ["GET"], auth=False),
        route("/v1/models", models, ["GET"]),
        route("/v1/completions", openai_completions, ["POST"]),
        route("/v1/engines/{engine}/completions", engine_completions, ["POST"]),
        route("/v1/chat/completions", chat_completions, ["POST"]),
        route("/copilot_internal/v2/token", copilot_token, ["GET"]),
        route("/generate", tgi_generate, ["POST"], "tgi"),
        route("/generate_stream", tgi_generate_stream, ["POST"], "tgi"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "method not allowed here" if status == 405 else f"no route {request.url.path}"
        return JSONResponse(APIError(status, message, type="invalid_request_error").openai(), status_code=status)

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_found)
    return app


def _check_key(request: Request, ctx: ServerContext) -> None:
    if ctx.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() not in ("bearer", "token"):
        key = request.headers.get("x-api-key") or request.headers.get("api-key") or ""
    if not hmac.compare_digest(key.strip().encode(), ctx.api_key.encode()):
        what = "a wrong API key" if key else "no API key (send 'Authorization: Bearer KEY')"
        raise APIError(401, f"this server needs its API key, and the request has {what}", code="invalid_api_key")


async def _body(request: Request, ctx: ServerContext) -> object:
    """The JSON body, read up to the size limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > ctx.max_body_bytes:
        raise APIError(413, f"the request body of {declared} bytes is over this server's limit of "
                            f"{ctx.max_body_bytes} bytes", code="request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > ctx.max_body_bytes:
            raise APIError(413, f"the request body is over this server's limit of {ctx.max_body_bytes} bytes",
                           code="request_too_large")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _reserve(ctx: ServerContext, samples: int) -> None:
    """Refuse with 429 when the samples in flight would pass the slots plus the queue bound."""
    limit = ctx.engine.max_batch + ctx.max_queue
    if ctx.inflight and ctx.inflight + samples > limit:
        raise APIError(429, f"the server is busy: {ctx.inflight} samples are running or queued and the limit is "
                            f"{limit} (--max-batch + --max-queue); retry later", code="queue_full")
    ctx.inflight += samples


async def _completions(request: Request, ctx: ServerContext, engine_route: bool) -> Response:
    job = completions.parse(await _body(request, ctx), ctx, engine_route)
    _reserve(ctx, len(job.prompts) * job.best_of)
    tracker = _Tracker(ctx, len(job.prompts) * job.best_of, sum(len(p) for p in job.prompts))
    try:
        handles = completions.submit(job, ctx)
    except BaseException:
        ctx.inflight -= tracker.samples
        raise
    if job.stream:
        return _sse(completions.stream(job, ctx, handles, tracker.observe), handles, tracker, "[DONE]")
    try:
        results = await _unless_disconnected(request, _observed(handles, tracker))
    finally:
        _close(handles, tracker)
    return JSONResponse(completions.complete(job, ctx, results))


async def _chat(request: Request, ctx: ServerContext) -> Response:
    job = chat.parse(await _body(request, ctx), ctx)
    _reserve(ctx, job.n)
    tracker = _Tracker(ctx, job.n, len(job.prompt_ids))
    try:
        handles = chat.submit(job, ctx)
    except BaseException:
        ctx.inflight -= tracker.samples
        raise
    replies = chat.Replies(handles, tracker)
    if job.stream:
        return _sse(chat.stream(job, replies), handles, tracker, "[DONE]")
    try:
        body = await _unless_disconnected(request, chat.complete(job, replies))
    finally:
        _close(handles, tracker)
    return JSONResponse(body)


async def _tgi(request: Request, ctx: ServerContext, stream: bool | None) -> Response:
    job = tgi.parse(await _body(request, ctx), ctx, stream)
    _reserve(ctx, 1)
    tracker = _Tracker(ctx, 1, len(job.prompt_ids))
    try:
        handle = ctx.engine.submit(job.prompt_ids, job.params)
    except ValueError as exc:
        ctx.inflight -= 1
        raise APIError(400, str(exc), "inputs") from None
    if job.stream:
        return _sse(tgi.stream(job, ctx, handle, tracker.observe), [handle], tracker, None)
    try:
        (result,) = await _unless_disconnected(request, _observed([handle], tracker))
    finally:
        _close([handle], tracker)
    body = tgi.response(job, ctx, result)
    return JSONResponse([body] if stream is None else body)


async def _observed(handles: list[RequestHandle], tracker: _Tracker) -> list[RequestOutput]:
    """The requests' results, their events fed to the metrics on the way."""
    async def watch(i: int, h: RequestHandle) -> RequestOutput:
        async for event in h.astream():
            tracker.observe(i, event)
        return h.output()

    return list(await asyncio.gather(*(watch(i, h) for i, h in enumerate(handles))))


async def _unless_disconnected(request: Request, work):
    """Run `work`; if the client goes away first, cancel it (the handles are cancelled by the caller)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise APIError(499, "the client went away")
    return task.result()


def _close(handles: list[RequestHandle], tracker: _Tracker) -> None:
    """The response is over (sent, failed or abandoned): cancel what is still running."""
    for h in handles:
        unfinished = sum(o.finish_reason is None for o in h.output().outputs)
        if unfinished and h.id not in tracker.ended:
            h.cancel()
            tracker.ctx.metrics.finished.labels("cancelled").inc(unfinished)
    tracker.done(handles)


def _sse(chunks: AsyncIterator[dict], handles: list[RequestHandle], tracker: _Tracker, done: str | None) -> Response:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            if done is not None:
                yield f"data: {done}\n\n"
        except EngineError as exc:
            log.exception("engine failure")
            yield f"data: {json.dumps(APIError(500, str(exc), type='server_error').openai())}\n\n"
        finally:  # also when the client disconnected and Starlette cancelled the response
            _close(handles, tracker)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
