"""The HTTP side of serve.py: a FastAPI app speaking OpenAI's API over one model and a Batcher,
and uvicorn to run it (as serve.py's process, or in a thread for bench.py and tests).

    /health                  {"status": "ok", "queued", "active", "tokens"} (no key needed)
    /v1/models               the one model served
    /v1/completions          prompt as text or ids (or a list), n, stop, seed, logprobs, echo, stream
    /v1/chat/completions     messages through the model's chat template

A streamed answer is server-sent events: `data: {chunk}` per piece, then `data: [DONE]`. A client
that goes away ends its rows at their next token, streamed or not.
"""
import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager

from batcher import Batcher, Job
from configurator import UserError
from openai_api import ApiError, Namer, Served, chunk, parse_chat, parse_completion, response, usage_chunk

SETTINGS = dict(
    max_tokens=1024,  # the most new tokens a request may ask for, per row
    max_rows=64,  # the most rows (prompts x n) one request may ask for
    max_logprobs=64,  # the most log-probs per token (logprobs=, top_logprobs=) a request may ask for
    tokens_as_ids=False,  # name every token "token_id:<id>" in log-probs (a request may ask it itself)
    batch_rows=32,  # the most rows generated together
    batch_wait_ms=5.0,  # once a request comes, how long to wait for others to batch with it
)
SETTINGS_LIMITS = dict(max_tokens="[1, inf)", max_rows="[1, inf)", max_logprobs="[0, inf)",
                       batch_rows="[1, inf)", batch_wait_ms="[0, inf)")
MAX_BODY = 32 << 20


def served_model(model, tok, name, settings, chat=None, chat_stop_ids=()):
    eot = frozenset(() if tok.eot is None else (tok.eot,))
    return Served(name=name, tok=tok, block_size=model.config.block_size, vocab_size=model.config.vocab_size,
                  stop_ids=eot, chat=chat, chat_stop_ids=frozenset(chat_stop_ids) | eot,
                  max_tokens=settings["max_tokens"], max_rows=settings["max_rows"],
                  max_logprobs=settings["max_logprobs"], tokens_as_ids=settings["tokens_as_ids"])


def _no_constants(name):
    raise ValueError(f"{name} is not a JSON number")


async def _body(request):
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise ApiError(413, f"the body is larger than {MAX_BODY >> 20} MiB")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY >> 20} MiB")
    try:
        body = json.loads(bytes(raw), parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object of request fields")
    return body


def _event(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


async def _stream(job, head, namer):
    req, offsets, started = job.req, {}, set()
    try:
        while (event := await job.events.get())[0] == "piece":
            _, index, text, entries, finish = event
            yield _event(chunk(req, head, namer, index, text, entries, offsets.get(index, 0), finish,
                               first=index not in started))
            started.add(index)
            if req.logprobs is not None and not req.chat:
                offsets[index] = offsets.get(index, 0) + sum(len(namer.text(i)) for i, _, _ in entries)
        if event[0] == "error":
            yield _event(ApiError(500, event[1], kind="server_error").body())
        elif req.include_usage:
            yield _event(usage_chunk(req, head, job.choices))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away mid-stream: its rows end at their next token


async def _finished(job, receive):
    """Wait for a job that does not stream; False when its client went away first."""
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        while True:
            event = asyncio.ensure_future(job.events.get())
            await asyncio.wait((event, gone), return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                job.cancel()
                return False
            kind, *rest = event.result()
            if kind == "error":
                raise ApiError(500, rest[0], kind="server_error")
            if kind == "end":
                return True
    finally:
        gone.cancel()


async def _disconnect(receive):
    """Returns when the client closes its connection: once the body is read, the next message
    the server hands the app is that one."""
    while (await receive())["type"] != "http.disconnect":
        pass


def make_app(served, batcher, api_key=None):
    """The FastAPI app; it starts the batcher's worker with itself and stops it on shutdown."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def check_key(request: Request):
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if api_key is not None and not (scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), api_key.encode())):
            raise ApiError(401, "invalid or missing API key: send it as the header Authorization: Bearer <key>",
                           code="invalid_api_key")
    keyed = [Depends(check_key)]

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown paths and methods, in the same shape
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e):
        return JSONResponse(ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        return dict(status="ok", **batcher.stats())

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return dict(object="list", data=[dict(id=served.name, object="model", created=int(time.time()),
                                              owned_by="nanodistill", max_model_len=served.block_size)])

    async def answer(request, parse, prefix):
        req = parse(await _body(request), served)
        job = Job(req, served.tok, asyncio.get_running_loop())
        batcher.submit(job)
        head = dict(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=served.name)
        namer = Namer(served.tok, req.tokens_as_ids)
        if req.stream:
            return StreamingResponse(_stream(job, head, namer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if not await _finished(job, request.receive):
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(response(req, job.choices, head, namer))

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        return await answer(request, parse_completion, "cmpl")

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request):
        return await answer(request, parse_chat, "chatcmpl")

    return app


def build(model, tok, rt, name, settings, chat=None, chat_stop_ids=(), api_key=None):
    """The app over a loaded model (in eval mode) and its tokenizer."""
    batcher = Batcher(model, rt, settings["batch_rows"], settings["batch_wait_ms"] / 1000)
    return make_app(served_model(model, tok, name, settings, chat, chat_stop_ids), batcher, api_key)


def listen(host, port):
    """A socket bound and listening at host:port (port 0: a free one): connections wait in its
    backlog until the server takes them, so clients may come as soon as it returns."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): choose another port= (0 picks a "
                        f"free one) or host=") from None
    sock.listen(2048)
    return sock


def uvicorn_server(app):
    import uvicorn
    # no access log: a line per request would cost more than a tiny model's step
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))


def url_of(sock):
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


class InThread:
    """An app served from a thread of this process, at `url`, until close()."""

    def __init__(self, app, host="127.0.0.1", port=0):
        self.sock = listen(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)
        self.thread.start()

    def close(self):
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()
