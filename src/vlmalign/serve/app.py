"""The FastAPI app: ``/v1/models``, ``/v1/chat/completions`` (JSON or server-sent events) and
``/health``. Every refusal is OpenAI's error JSON (:mod:`.errors`)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .errors import APIError, error_body, validation_error
from .guard import Guard
from .limits import ServeLimits
from .messages import check_params, to_messages
from .prepare import prepare
from .schemas import ChatRequest
from .worker import Busy, Job, Worker


def create_app(adapter, model_name: str, *, image_root: str | None = None, api_key: str | None = None,
               limits: ServeLimits | None = None) -> FastAPI:
    """The server's app for ``adapter`` (loaded, on its device, in eval mode) served as ``model_name``.
    Its worker thread starts now and stops with the app's lifespan (or ``app.state.worker.close()``)."""
    limits = limits or ServeLimits()
    worker = Worker(adapter, limits.max_batch_size, limits.max_queue)
    prep_lock = threading.Lock()   # one request at a time through the tokenizer and image processor
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="vlmalign", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    _error_handlers(app)
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "vlmalign"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": worker.queued(), **worker.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        params = check_params(req, [model_name], limits)

        def checked():   # off the event loop: base64, file system, image decoding, tokenizing
            msgs, images = to_messages(req, image_root, limits, adapter.placeholder_token)
            with prep_lock:
                return prepare(adapter, msgs, images, image_root, limits)

        example, inputs = await run_in_threadpool(checked)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(example, inputs, params, req.stream, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            worker.submit(job)
        except Busy as e:
            raise APIError(503, str(e), code="server_busy") from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        usage = {"prompt_tokens": len(example.rows["input_ids"])}   # once, also for n > 1 (as OpenAI)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, events, head, usage, include_usage), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            texts, reasons, usage["completion_tokens"] = await _collect(events, params.n)
        finally:
            job.cancelled.set()   # no-op once done; stops the rows of a client that went away
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": reasons[i]} for i in range(params.n)]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage}

    return app


async def _events(events: asyncio.Queue, n: int):
    """The job's events until all ``n`` completions are done; a worker error raises APIError(500)."""
    done = 0
    while done < n:
        ev = await events.get()
        if ev[0] == "error":
            raise APIError(500, ev[1], code="server_error")
        done += ev[0] == "done"
        yield ev


async def _collect(events, n):
    texts, reasons, tokens = [""] * n, [None] * n, 0
    async for ev in _events(events, n):
        if ev[0] == "delta":
            texts[ev[1]] += ev[2]
        else:
            reasons[ev[1]] = ev[2]
            tokens += ev[3]
    return texts, reasons, tokens


async def _sse(job: Job, events, head: dict, usage: dict, include_usage: bool):
    def chunk(choices, **extra):
        return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    def choice(i, delta, reason=None):
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}

    tokens = 0
    try:
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(job.params.n)])
        async for ev in _events(events, job.params.n):
            if ev[0] == "delta":
                yield chunk([choice(ev[1], {"content": ev[2]})])
            else:
                tokens += ev[3]
                yield chunk([choice(ev[1], {}, ev[2])])
        if include_usage:
            total = usage["prompt_tokens"] + tokens
            yield chunk([], usage={**usage, "completion_tokens": tokens, "total_tokens": total})
    except APIError as e:
        yield "data: " + json.dumps(e.body()) + "\n\n"
    finally:
        job.cancelled.set()
    yield "data: [DONE]\n\n"


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        err = validation_error(e.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(error_body(e.status_code, f"{request.method} {request.url.path}: {e.detail}"),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        return JSONResponse(error_body(500, f"internal error ({type(e).__name__}: {e})", code="server_error"),
                            status_code=500)
