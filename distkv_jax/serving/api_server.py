"""The OpenAI-compatible HTTP server (FastAPI + uvicorn; streams as
Server-Sent Events), as `vllm serve`:

    python -m distkv_jax.launch --serve --host 127.0.0.1 --port 8000 --model DIR --mesh IxT

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health (503 until the warm start is done, then 200), GET /metrics
(Prometheus text).

Every error is OpenAI's JSON body, never a traceback. A client that goes
away has its request aborted (its KV freed before the next engine step). On
SIGTERM (or SIGINT) the server stops accepting, lets running requests finish
for up to --shutdown_timeout seconds, aborts the rest and exits 0.

Multi-host: every process builds the engine; process 0 serves HTTP and
broadcasts what it admits (AsyncLLM's command channel); the others follow
until process 0 shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import sys
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import create_chat_completion
from .completions import create_completion
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body, parse_request
from .state import SSE_DONE, ServerConfig, ServerState, sse

log = logging.getLogger("distkv_jax")


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes (checked before reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes, more than the "
                       f"{limit} this server accepts (--max_request_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is more than the {limit} bytes this server "
                           "accepts (--max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, coro):
    """Run `coro`; cancel it (aborting its engine requests) if the client
    disconnects first."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise _ClientGone()


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="distkv-jax", docs_url=None, redoc_url=None, openapi_url=None)
    cfg = state.config

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            e.status_code, str(e.detail))
        return _error(APIError(e.status_code, msg))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}",
                                       "InternalServerError", None, 500), status_code=500)

    def check_auth(request: Request) -> None:
        # /v1 only, as vLLM: probes and scrapers need no key
        if cfg.api_key is not None:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode()):
                raise APIError(401, "missing or wrong API key (send the header "
                               "'Authorization: Bearer KEY')")

    @app.get("/health")
    async def health():
        if state.ready:
            return Response(status_code=200)
        if state.llm is not None and not state.llm.is_running:
            return _error(APIError(503, "the engine stopped on an error"))
        return _error(APIError(503, "shutting down" if state.draining else
                               state.startup_error or "the engine is starting (warm start)",
                               headers={"Retry-After": "5"}))

    @app.get("/metrics")
    async def metrics():
        body = await asyncio.get_running_loop().run_in_executor(None, state.metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        card = {"id": cfg.model_name, "object": "model", "created": int(time.time()),
                "owned_by": "distkv-jax"}
        if state.llm is not None:
            card["max_model_len"] = state.llm.max_model_len
        return {"object": "list", "data": [card]}

    async def _answer(request: Request, cls, handler):
        state.active += 1
        state.idle.clear()
        streaming = False
        try:
            check_auth(request)
            state.require_engine()
            body = parse_request(cls, await _read_body(request, cfg.max_request_bytes))
            if getattr(body, "stream", False):
                events = await handler(state, body)
                streaming = True
                return StreamingResponse(_guarded(state, events), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return JSONResponse(await _unless_disconnected(request, handler(state, body)))
        except APIError as e:
            return _error(e)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:
                state.finished_one()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(request, CompletionRequest, create_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(request, ChatCompletionRequest, create_chat_completion)

    return app


async def _guarded(state: ServerState, events):
    """A stream that fails after it started ends with an SSE error event."""
    try:
        async for ev in events:
            yield ev
    except APIError as e:
        yield sse(e.body())
        yield SSE_DONE
    except Exception as e:  # noqa: BLE001 - the client hears of it, the server lives on
        log.exception("stream failed")
        yield sse(error_body(f"internal error: {type(e).__name__}: {e}", "InternalServerError",
                             None, 500))
        yield SSE_DONE
    finally:
        state.finished_one()


# ------------------------------------------------------------------ running
def _uvicorn_server(app, host: str, port: int):
    import uvicorn

    class Server(uvicorn.Server):
        # our handlers drain the engine first (see _Runner.on_signal)
        @contextlib.contextmanager
        def capture_signals(self):
            yield

        def install_signal_handlers(self):
            pass

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                 timeout_graceful_shutdown=5, access_log=False))


class _Runner:
    def __init__(self, state: ServerState, engine_args, host: str, port: int):
        self.state, self.engine_args, self.host, self.port = state, engine_args, host, port
        self.server = _uvicorn_server(build_app(state), host, port)
        self.exit_code = 0
        self._draining: asyncio.Task | None = None

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        engine = loop.run_in_executor(None, self._build_engine)
        serving = asyncio.ensure_future(self.server.serve())
        try:
            await engine
        except Exception as e:  # noqa: BLE001 - reported, then the server exits
            self.state.startup_error = f"the engine failed to start: {e}"
            log.error("%s", self.state.startup_error)
            self.exit_code = 1
            self.server.should_exit = True
        else:
            if not self.server.should_exit:
                print(f"[distkv] ready: serving {self.state.config.model_name!r} on "
                      f"http://{self.host}:{self.port} (OpenAI API under /v1)",
                      file=sys.stderr, flush=True)
        await serving
        if self.state.llm is not None:
            await loop.run_in_executor(None, self.state.llm.shutdown)
        return self.exit_code

    def _build_engine(self) -> None:
        from ..async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(self.engine_args)
        if self.state.draining:  # a signal came during the warm start
            llm.shutdown()
            return
        self.state.llm = llm

    def on_signal(self, sig: int) -> None:
        if self._draining is None:
            print(f"[distkv] {signal.Signals(sig).name}: draining (up to "
                  f"{self.state.config.shutdown_timeout:g} s), then exiting",
                  file=sys.stderr, flush=True)
            self._draining = asyncio.ensure_future(self._drain())
        else:  # a second signal: stop now
            print(f"[distkv] {signal.Signals(sig).name} again: aborting every request and "
                  "exiting now", file=sys.stderr, flush=True)
            self._abort_all()
            self.server.should_exit = self.server.force_exit = True

    def _abort_all(self) -> None:
        if self.state.llm is not None:
            self.state.llm.abort_all()

    async def _drain(self) -> None:
        st = self.state
        st.draining = True
        for s in getattr(self.server, "servers", []):
            s.close()  # stop accepting connections
        if st.llm is not None:
            try:
                await asyncio.wait_for(st.idle.wait(), st.config.shutdown_timeout)
            except asyncio.TimeoutError:
                print(f"[distkv] {st.active} request(s) still running after "
                      f"{st.config.shutdown_timeout:g} s: aborting them", file=sys.stderr,
                      flush=True)
                self._abort_all()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(st.idle.wait(), 10.0)
        self.server.should_exit = True


class ServerThread:
    """The HTTP server on a background thread around an AsyncLLM that
    already runs (tests, notebooks). Signals are left to the caller."""

    def __init__(self, llm, config: ServerConfig, host: str = "127.0.0.1", port: int = 0):
        import threading

        self.llm, self.config, self.host = llm, config, host
        self._port, self._ready = port, threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="distkv-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the HTTP server did not start")

    async def _main(self) -> None:
        self.state = ServerState(self.config)
        self.state.llm = self.llm
        self.server = _uvicorn_server(build_app(self.state), self.host, self._port)
        task = asyncio.ensure_future(self.server.serve())
        while not self.server.started and not task.done():
            await asyncio.sleep(0.01)
        if self.server.started:
            self._port = self.server.servers[0].sockets[0].getsockname()[1]
        self._ready.set()
        await task

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)


def serve(engine_args, config: ServerConfig, host: str, port: int) -> int:
    """Run the server (process 0) until SIGTERM; returns the exit status."""
    import jax

    if jax.process_index() != 0:
        from ..async_llm import AsyncLLM

        # A follower stops when process 0 does (it broadcasts the shutdown);
        # dying on a signal of its own would leave process 0's collectives
        # waiting for it, so signals are left to process 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: print(
                f"[distkv] process {jax.process_index()}: {signal.Signals(s).name} ignored; "
                "it exits when process 0 shuts down", file=sys.stderr, flush=True))
        llm = AsyncLLM.from_engine_args(engine_args)
        llm.wait()  # until process 0 shuts down
        return 0

    async def run() -> int:
        state = ServerState(config)
        return await _Runner(state, engine_args, host, port).main()

    return asyncio.run(run())
