"""The HTTP routes of `tetra serve`: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (whole or
streamed as server-sent events), and /health. Every refusal is OpenAI's JSON error with a 4xx status.

Entry point: create_app(server) -> FastAPI application (the server's engine runs while the app does).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tetra.infer.sampling import SamplingConfig
from tetra.serve import responses as body
from tetra.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from tetra.serve.responses import ChoiceResult
from tetra.serve.server import Launched, Server


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        param = param or (location[0] if location else None)
        if item.get("type") == "json_invalid":
            problems.append("the body is not valid JSON")
        else:
            problems.append(f"{'.'.join(location) or 'body'}: {item.get('msg')}")
    return "Invalid request: " + "; ".join(problems) + ".", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return JSONResponse(ApiError(400, message, param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)


async def _gather(launched: Launched, count: int) -> list[ChoiceResult]:
    results = [ChoiceResult() for _ in range(count)]
    finished = 0
    try:
        while finished < count:
            event = await launched.queue.get()
            results[event.index].add(event)
            finished += event.kind == "end"
    finally:
        launched.cancel()
    for result in results:
        if result.finish_reason == "error":
            raise ApiError(500, f"Generation failed: {result.error}", kind="server_error")
    return results


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _stream(launched: Launched, count: int, chunk) -> AsyncIterator[str]:
    """Server-sent events: chunk(index, text, finish_reason) per piece, then [DONE]; a client that goes away
    cancels the choices still running (the finally runs when the response is closed)."""
    finished = 0
    try:
        while finished < count:
            event = await launched.queue.get()
            if event.kind == "token" and event.text:
                yield _sse(chunk(event.index, event.text, None))
            elif event.kind == "end":
                finished += 1
                if event.finish_reason == "error":
                    yield _sse(ApiError(500, f"Generation failed: {event.error}", kind="server_error").body())
                    continue
                if event.text:
                    yield _sse(chunk(event.index, event.text, None))
                yield _sse(chunk(event.index, "", event.finish_reason))
        yield "data: [DONE]\n\n"
    finally:
        launched.cancel()


def create_app(server: Server) -> FastAPI:
    """The application; starting it (uvicorn) starts the server's engine thread, stopping it stops the thread."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="tetra serve", lifespan=lifespan)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": server.name, "running": len(server.engine.active)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "tetra", "max_model_len": server.max_length}]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        server.check_model(request.model)
        prompts = server.completion_prompts(request)  # validates token ids before anything runs them
        prompt = request.prompt
        texts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)
        await asyncio.to_thread(server.screen, texts, "prompt")
        budgets = [server.token_budget(ids, request.max_tokens) for ids in prompts]
        expanded = [ids for ids in prompts for _ in range(request.n)]
        launched = server.launch(expanded, [b for b in budgets for _ in range(request.n)],
                                 SamplingConfig(request.temperature, top_p=request.top_p), request.seed,
                                 request.stop_strings, request.logprobs, request.echo and request.logprobs is not None)
        launched.prompt_tokens = sum(len(ids) for ids in prompts)
        request_id = body.new_id("cmpl")
        if request.stream:
            return StreamingResponse(_stream(launched, len(expanded), lambda i, text, reason: body.completion_chunk(
                request_id, server.name, i, text, reason)), media_type="text/event-stream")
        results = await _gather(launched, len(expanded))
        choices = []
        for index, (ids, result) in enumerate(zip(expanded, results, strict=True)):
            prompt_text = server.tokenizer.decode(ids, skip_special_tokens=False) if request.echo else ""
            logprobs = None
            if request.logprobs is not None:
                tokens = (ids if request.echo else []) + result.token_ids
                scores = (result.prompt_logprobs if request.echo else []) + result.logprobs
                logprobs = body.completion_logprobs(server.tokenizer, tokens, scores)
            choices.append({"index": index, "text": prompt_text + result.text, "logprobs": logprobs,
                            "finish_reason": result.finish_reason})
        generated = sum(len(result.token_ids) for result in results)
        return body.completion_body(request_id, server.name, choices, body.usage(launched.prompt_tokens, generated))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        server.check_model(request.model)
        users = [message.text() for message in request.messages if message.role == "user"]
        await asyncio.to_thread(server.screen, users[-1:], "messages")
        prompt = server.chat_prompt(request)
        budget = server.token_budget(prompt, request.token_limit)
        top = (request.top_logprobs or 0) if request.logprobs else None
        launched = server.launch([prompt] * request.n, [budget] * request.n,
                                 SamplingConfig(request.temperature, top_p=request.top_p), request.seed,
                                 request.stop_strings, top, False)
        launched.prompt_tokens = len(prompt)
        request_id = body.new_id("chatcmpl")
        if request.stream:
            def chunk(index: int, text: str, reason: str | None) -> dict:
                return body.chat_chunk(request_id, server.name, index, {"content": text} if text or reason is None
                                       else {}, reason)

            async def with_role() -> AsyncIterator[str]:
                for index in range(request.n):
                    yield _sse(body.chat_chunk(request_id, server.name, index,
                                               {"role": "assistant", "content": ""}, None))
                async for event in _stream(launched, request.n, chunk):
                    yield event

            return StreamingResponse(with_role(), media_type="text/event-stream")
        results = await _gather(launched, request.n)
        choices = [{"index": index, "message": {"role": "assistant", "content": result.text},
                    "logprobs": body.chat_logprobs(server.tokenizer, result.token_ids, result.logprobs)
                    if request.logprobs else None, "finish_reason": result.finish_reason}
                   for index, result in enumerate(results)]
        generated = sum(len(result.token_ids) for result in results)
        return body.chat_body(request_id, server.name, choices, body.usage(len(prompt), generated))

    return app
