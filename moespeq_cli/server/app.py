"""The Starlette application: the routes, request bodies read with their limits, the
responses and Server-Sent Events, and the log line of each request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
import uuid

from moespeq_cli.chat_template import TemplateError
from moespeq_cli.server.access import Gate
from moespeq_cli.server.errors import ApiError, shutting_down
from moespeq_cli.server.requests import (
    assistant_turn,
    chat_messages,
    completion_prompt,
    ignored_fields,
    lone_surrogate,
    parse_options,
    refuse_the_other_endpoints,
    template_variables,
)
from moespeq_cli.server.worker import Job, Worker
from moespeq_cli.text import counted

MAX_BODY = 16 * 2**20
REASONING = "reasoning"  # tags a streamed piece of reasoning


def build_app(
    engine,
    name: str,
    context: int,
    api_key: str | None = None,
    queue_size: int = 16,
    default_max: int = 512,
    bind: str = "127.0.0.1",
    address: str | None = None,
):
    """The Starlette application serving ``engine`` as model ``name`` on ``bind`` (the
    ``--host`` given; ``address``: the address its socket is bound to, where they differ)."""
    from concurrent.futures import ThreadPoolExecutor

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    worker = Worker(engine, queue_size)
    halted = asyncio.Event()  # the server is shutting down (``HaltingServer.handle_exit``)
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moespeq-encode")  # one at a time: off the loop
    created = int(time.time())

    def log_line(method: str, path: str, status: int, extra: str = "") -> None:
        sys.stderr.write(f"{method} {path} {status}{' · ' + extra if extra else ''}\n")
        sys.stderr.flush()

    def log(request, status: int, extra: str = "") -> None:
        log_line(request.method, request.url.path, status, extra)

    def error(request, e: ApiError, detail: str = ""):
        log(request, e.status, e.message + (f" ({detail})" if detail else ""))  # (the detail: for the operator)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)

    def check_key(request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110), the key is not
        if not (scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    async def read_json(request) -> dict:
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
            # a web page may send a form or text/plain to 127.0.0.1 without asking (no CORS
            # preflight): a body is read as JSON only when it says it is
            raise ApiError(
                415,
                f"the request body must be JSON, sent with 'Content-Type: application/json' (got {media[:60] or 'none'}); "
                "with curl, add -H 'Content-Type: application/json'",
                "unsupported_media_type",
            )
        too_big = ApiError(413, f"the request body is over {MAX_BODY // 2**20} MiB", "request_too_large")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            raise too_big

        async def collect() -> bytes:
            chunks, total = [], 0
            async for chunk in request.stream():  # chunked bodies too: never more than MAX_BODY held
                total += len(chunk)
                if total > MAX_BODY:
                    raise too_big
                chunks.append(chunk)
            return b"".join(chunks)

        # a shutdown while the body is coming answers 503: a client that stalls mid-upload
        # held Ctrl-C and SIGTERM as long as it stalled
        reading, stop = asyncio.ensure_future(collect()), asyncio.ensure_future(halted.wait())
        try:
            await asyncio.wait({reading, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not reading.done():
                reading.cancel()
        if not reading.done():
            raise shutting_down()
        raw = reading.result()  # (ClientDisconnect: the client left mid-upload)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", "invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body's JSON is nested too deeply", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_json")
        if (where := lone_surrogate(body)) is not None:
            raise ApiError(
                400,
                f"'{where}' is not valid Unicode text (it holds a lone surrogate, \\ud800-\\udfff); send UTF-8 text",
                "invalid_value",
                where,
            )
        if body.get("model") is not None:
            check_model(body["model"])
        return body

    def check_model(asked) -> None:
        if not isinstance(asked, str):
            got = json.dumps(asked)
            raise ApiError(400, f"'model' must be a string, got {got[:40]}", "invalid_value", "model")
        if asked != name:
            raise ApiError(404, f"the model {asked!r} does not exist here; this server has {name!r}", "model_not_found")

    async def health(request):
        """200 while answers can be given; 503 while the last answer failed reading the
        checkpoint's files and one is still changed (a shard cut short or rewritten under the
        server: each request would fail alike until it is whole again, or the server
        restarted), so that a health check sees it. (No key is asked here: the reason is
        said without paths; the log has them.)"""
        if worker.unhealthy():
            message = "the checkpoint's files changed under the server; answers fail until they are whole again"
            return JSONResponse({"status": "error", "model": name, "message": message}, status_code=503)
        return JSONResponse({"status": "ok", "model": name})

    card = {"id": name, "object": "model", "created": created, "owned_by": "moespeq"}

    async def models(request):
        try:
            check_key(request)
        except ApiError as e:
            return error(request, e)
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request):
        """One model's card (the openai client's ``models.retrieve``); ``/v1/models/`` is
        the list."""
        if not request.path_params["model"]:
            return await models(request)
        try:
            check_key(request)
            check_model(request.path_params["model"])
        except ApiError as e:
            return error(request, e)
        return JSONResponse(card)

    async def generate(request, chat: bool):
        try:
            check_key(request)
            body = await read_json(request)
            tok = engine.tokenizer
            refuse_the_other_endpoints(body, chat)
            if chat:
                messages = chat_messages(body)
                variables = template_variables(body)
                turn = assistant_turn(body, messages)
                text = "".join(m["content"] for m in messages)
            else:
                text = completion_prompt(body)
            if tok.min_tokens(text) > context:  # refused by arithmetic, before any tokenizing
                raise ApiError(
                    400,
                    f"the prompt is longer than the context of {context} tokens; shorten it",
                    "context_length_exceeded",
                    "messages" if chat else "prompt",
                )
            encode = (lambda: tok.encode_messages(messages, variables, **turn)) if chat else (lambda: tok.encode(text))
            prompt_ids = await asyncio.get_running_loop().run_in_executor(encoder, encode)
            if not prompt_ids:
                raise ApiError(
                    400,
                    "the chat template renders these messages as an empty prompt"
                    if chat and tok.chat_template
                    else "the prompt encodes to no tokens",
                    "invalid_value",
                    "messages" if chat else "prompt",
                )
            max_tokens, sampling, stops, stream, include_usage = parse_options(
                body, len(prompt_ids), context, default_max, chat
            )
        except ApiError as e:
            return error(request, e)
        except ClientDisconnect:  # before its body was all sent: nobody to answer
            log(request, 499, "cancelled: the client went away while sending the request")
            return Response(status_code=499)
        except TemplateError as e:  # the template refused these messages (its raise_exception), or failed on them
            if e.refused:
                return error(
                    request,
                    ApiError(
                        400,
                        f"the model's chat template refused these messages: {e.detail}",
                        "invalid_value",
                        "messages",
                    ),
                )
            return error(
                request,
                ApiError(500, f"the model's chat template failed on these messages ({e.detail})", "template_error"),
            )
        except Exception as e:  # noqa: BLE001 - a template or tokenizer failure on this input
            refused = ApiError(400, "cannot encode the request's text with this model's tokenizer", "invalid_value")
            return error(request, refused, str(e)[:200])  # (its paths stay in the server's log)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        job = Job(
            prompt_ids, max_tokens, sampling, stops, channels=chat and bool(tok.chat_template)
        )  # completions: raw
        if stream:
            job.on_text = lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t)
            if chat:  # reasoning as vLLM and llama.cpp stream it: ``delta.reasoning_content``
                job.on_reasoning = lambda t: loop.call_soon_threadsafe(pieces.put_nowait, (REASONING, t))
        job.notify = lambda: loop.call_soon_threadsafe(pieces.put_nowait, None)  # after every piece: FIFO
        started = asyncio.Event()  # a stream's 200 goes out once its generation starts
        job.on_start = lambda: loop.call_soon_threadsafe(started.set)
        try:
            worker.submit(job)
        except ApiError as e:
            return error(request, e)

        def usage() -> dict:
            n = len(job.answer.token_ids)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def finish_log(status: int) -> None:
            s = job.stats or {}
            tps = s.get("tokens_per_s")
            parts = [counted(len(job.answer.token_ids), "token")]
            if tps:
                parts.append(f"{tps:.1f} tok/s ({s.get('clock')} clock)")
            if s.get("acceptance_rate") is not None:
                parts.append(f"accept {s['acceptance_rate']:.0%}")
            if s.get("expert_hit_rate") is not None:
                parts.append(f"hit rate {s['expert_hit_rate']:.0%}")
            if job.cancelled:
                parts.append("cancelled: the client went away")
            if stream and job.error is not None:  # said in an event after the stream's 200
                parts.append(f"ended by an error event: {getattr(job.error, 'message', job.error)}")
            if ignored := ignored_fields(body):
                parts.append("ignored: " + ignored)
            log(request, status, " · ".join(parts))

        if not stream:
            try:
                while not job.done.is_set():
                    try:
                        await asyncio.wait_for(pieces.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancelled = True
            finally:  # cancelled (a shutdown, the client gone): the worker drops the job
                if not job.done.is_set():
                    job.cancelled = True
            if isinstance(job.error, ApiError):  # the server stopping: logged by ``error``
                return error(request, job.error)
            if job.error is not None:
                finish_log(500)
                return JSONResponse(
                    {
                        "error": {
                            "message": f"generation failed: {job.error}",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    },
                    status_code=500,
                )
            if job.cancelled:  # the client went away: logged as a streaming answer's would be
                finish_log(499)
                return Response(status_code=499)
            a = job.answer
            choice = {"index": 0, "finish_reason": a.finish_reason, "logprobs": None}
            message = {"role": "assistant", "content": a.text, "refusal": None} | (
                {"reasoning_content": a.reasoning} if a.reasoning else {}
            )
            choice |= {"message": message} if chat else {"text": a.text}
            finish_log(200)
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": int(time.time()),
                    "model": name,
                    "choices": [choice],
                    "usage": usage(),
                    "moespeq": job.stats or {},
                }
            )

        waiting = asyncio.ensure_future(started.wait())
        try:  # in the queue: a shutdown is still a 503, and a client that leaves is dropped
            while not (await asyncio.wait({waiting}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    job.cancelled = True
                    finish_log(499)
                    return Response(status_code=499)
        except BaseException:  # this handler cancelled (uvicorn's shutdown timeout): nobody will read
            job.cancelled = True
            raise
        finally:
            waiting.cancel()
        if not job.running and isinstance(job.error, ApiError):  # dropped before it started
            return error(request, job.error)

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list, **extra) -> str:
            data = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": name, "choices": choices}
            if include_usage:  # null but in the last chunk, as OpenAI sends it
                data["usage"] = None
            return "data: " + json.dumps(data | extra) + "\n\n"

        def piece(text: str | None, finish: str | None = None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        async def events():
            try:
                if chat:
                    first = piece("")
                    first["delta"]["role"] = "assistant"
                    yield event([first])
                while (text := await pieces.get()) is not None:
                    if isinstance(text, tuple):  # (REASONING, text)
                        reasoning = {"index": 0, "delta": {"reasoning_content": text[1]}, "finish_reason": None}
                        yield event([reasoning | {"logprobs": None}])
                    else:
                        yield event([piece(text)])
                if isinstance(job.error, ApiError):
                    yield "data: " + json.dumps(job.error.body()) + "\n\n"
                elif job.error is not None:
                    err = {
                        "message": f"generation failed: {job.error}",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                    yield "data: " + json.dumps({"error": err}) + "\n\n"
                else:
                    yield event([piece(None, job.answer.finish_reason)], moespeq=job.stats or {})
                    if include_usage:
                        yield event([], usage=usage())
                yield "data: [DONE]\n\n"
                finish_log(200)
            finally:
                if not job.done.is_set():  # the client went away mid-answer
                    job.cancelled = True
                    finish_log(499)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def completions(request):
        return await generate(request, chat=False)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.loop = asyncio.get_running_loop()  # where a signal handler sets ``halted``
        yield
        worker.stop()
        encoder.shutdown(wait=False, cancel_futures=True)

    async def http_error(request, exc: HTTPException):
        """Starlette's own 404 (no such route) and 405 (wrong method), as OpenAI errors; under
        /v1/ the key is checked first, as OpenAI does (no route is told to a client without it)."""
        try:
            if request.url.path.startswith("/v1/"):
                check_key(request)
        except ApiError as e:
            return error(request, e)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error(request, ApiError(exc.status_code, message, headers=exc.headers))  # (405: Allow)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
        middleware=[Middleware(Gate, bind=bind, log=log_line, address=address)],
    )
    app.router.redirect_slashes = False  # (the Gate drops trailing slashes)
    app.state.worker = worker
    app.state.halted = halted  # set by Ctrl-C or SIGTERM (``HaltingServer.handle_exit``)
    return app
