"""`lmforge serve`: a trained run answers HTTP requests (FastAPI on uvicorn).

The endpoint follows the run's task: /v1/generate (clm, sft), /v1/classify (classify, regress, multilabel),
/v1/tag (tag), /v1/translate (seq2seq), /v1/score (reward); /health and /metadata always. Answers are computed by the same
code as the CLI (`task.predict`, `translate`, `generate_text`), so they equal `lmforge predict`,
`lmforge translate` and `lmforge generate` for the same input.

Batching: one worker thread owns the model. Requests are queued; whenever the worker is free it takes
the oldest request together with every queued request that can share its forward pass (same endpoint and
decoding settings), up to --max-batch inputs. Nothing waits for a batch to fill: an idle server answers
at once, a busy one answers many requests per forward pass. A batch that fails is computed again one request
at a time, so only the request that fails gets an error. Reading a request (tokenizing, the length checks)
runs on a thread pool, neither on the event loop nor on the model's thread.

Every client mistake is a 4xx JSON body {"error": "FIELD: what is wrong; expected what", "field": FIELD},
found before the request can join a batch (every count and number of a request is bounded). A server bug is
a 500 {"error": "internal error; request id ID", "field": null, "request_id": ID} that keeps the connection;
the traceback goes to stderr under the id, and every answer carries an X-Request-Id header. A connection
that does not send a request's head or body within --read-timeout is closed (a stalled body gets a 408), an
idle one after --keep-alive seconds. With --api-key (or LMFORGE_API_KEY) every path but /health needs
`Authorization: Bearer KEY` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lmforge import __version__, chat
from lmforge.data.labelled import Example, split_answer
from lmforge.config import ServeLimits as Limits
from lmforge.errors import UserError
from lmforge.fields import MIN_TEMPERATURE, MIN_TOP_P, SEED_MAX, temperature_range
from lmforge.generate import generate_texts, prompt_ids, translate
from lmforge.rundir import check_serves
from lmforge.runs import INFERENCE_DTYPES, chat_template, end_token_ids, load_run, run_dir_of
from lmforge.tasks import make_task, registry
from lmforge.tasks.seq2seq import source_tokenizer
from lmforge.train.device import pick_device

class RequestError(Exception):
    """A client mistake: answered with `status` and one line naming the field."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


def error_response(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": f"{field}: {message}", "field": field}, status_code=status)


# -- request bodies: strict types (a number is not a text), unknown fields refused, every count and number
# bounded, so that nothing a client sends can fail inside a batch it shares with others -----------------

MAX_STOPS, MAX_STOP_CHARS = 16, 256  # each stop string is matched against every row's text at every token
MAX_MESSAGES = 1024


def _sampling_temperature(value: float) -> float:
    """The CLI's rule (fields.temperature_range); an endpoint may bound it lower (chat: OpenAI's 2)."""
    ok, expected = temperature_range()
    if not ok(value):
        raise ValueError(f"expected {expected}")
    return value


Temperature = Annotated[float, AfterValidator(_sampling_temperature)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]  # "" would stop before every text
Stops = Annotated[list[StopText], Field(max_length=MAX_STOPS)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]  # one torch takes (as lmforge generate --seed)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # Python's JSON reads NaN


class TextPair(Body):
    text: str
    pair: str


class ClassifyRequest(Body):
    inputs: Union[str, list[Union[str, TextPair]]] = Field(
        description="a text, or a list of texts (objects {text, pair} for a sentence-pair model)")


class TagRequest(Body):
    inputs: Union[str, list[Union[str, list[str]]]] = Field(
        description="a sentence (split on white space), or a list of sentences or of word lists")


class TranslateRequest(Body):
    inputs: Union[str, list[str]] = Field(description="a sentence or a list of sentences")
    beam: int | None = Field(None, ge=1, le=32, description="beam width; 1 = greedy [default: the run's]")
    length_penalty: float | None = Field(None, ge=0, le=5, description="rank beams by log p / length^this")


class GenerateRequest(Body):
    prompt: str = Field(description="text to continue; empty = the start of a document")
    max_new_tokens: int | None = Field(None, ge=1, description="at most this many new tokens [default: the "
                                       "server's --max-new-tokens]")
    temperature: Temperature = Field(0.8, ge=0, le=100, description=f"0 = greedy, else at least {MIN_TEMPERATURE}")
    top_k: int = Field(0, ge=0, le=1_000_000, description="sample from the k most likely tokens; 0 = all")
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1, description="nucleus sampling mass; 1 = off")
    stop: Stops | None = Field(None, description=f"stop before any of these strings (at most {MAX_STOPS}, each 1 to "
                                                 f"{MAX_STOP_CHARS} characters)")
    seed: Seed = Field(0, description="sampling seed (as lmforge generate --seed)")
    stream: bool = Field(False, description="send the text as server-sent events while it is generated")


class ChatMessage(Body):
    role: str = Field(max_length=32, description="system, user or assistant")
    content: str


class ScoreInput(Body):
    messages: list[ChatMessage] | None = Field(None, min_length=2, max_length=MAX_MESSAGES, description="a "
                                               "conversation that ends with the assistant's answer to score")
    prompt: str | None = Field(None, description="a prompt (with response: its answer to score)")
    response: str | None = Field(None, description="the answer to the prompt to score")


class ScoreRequest(ScoreInput):
    """One answer to score ({"messages"} or {"prompt", "response"}), or several ({"inputs": [...]})."""
    inputs: list[ScoreInput] | None = Field(None, description="several answers to score, each {\"messages\": [...]} "
                                            "or {\"prompt\": ..., \"response\": ...}")


class ChatRequest(Body):
    """OpenAI's chat completions request, the fields lmforge honours (others are refused by name)."""
    model: str | None = Field(None, max_length=256, description="ignored: the server serves one model")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES, description="the conversation so far")
    max_tokens: int | None = Field(None, ge=1, description="at most this many new tokens [default: the server's "
                                   "--max-new-tokens]")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    temperature: Temperature = Field(1.0, ge=0, le=2, description=f"0 = greedy, else at least {MIN_TEMPERATURE}")
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1, description="nucleus sampling mass; 1 = off")
    stop: Union[StopText, Stops, None] = Field(None, description="stop before this string (or any of these)")
    seed: Seed | None = Field(None, description="sampling seed")
    stream: bool = Field(False, description="send chat.completion.chunk server-sent events, then data: [DONE]")


# -- the model -----------------------------------------------------------------------------------------

class Engine:
    """A loaded run and the functions that answer a batch of inputs (called on the worker thread only)."""

    def __init__(self, run: str, device_name: str, limits: Limits, dtype: str = "auto"):
        self.device = pick_device(device_name, "serve: --device")
        self.model, self.tok, self.cfg = load_run(run, self.device, INFERENCE_DTYPES[dtype])
        self.end_ids = end_token_ids(run)  # an imported chat model stops at its own end of turn
        self.run, self.limits = str(run), limits
        spec = registry.spec(self.cfg.task)
        check_serves(run, self.cfg.task)  # cmd_serve checked a run directory's before loading; an HF folder's here
        self.endpoint = spec.endpoint  # the registry says which request each task answers
        self.task = None
        if spec.finetune:  # labelled-example tasks encode and predict through their Task
            self.task = make_task(self.cfg)
            self.task.prepare_inference(self.tok, run_dir_of(Path(run)))
        self.source_tok = self.tok
        # (template, special-token strings); None: /v1/chat/completions answers 404 saying so
        self.chat = chat_template(run) if self.endpoint == "generate" else None
        if self.endpoint == "translate":
            self.source_tok = source_tokenizer(Path(run)) or self.tok
        context = self.cfg.model.max_seq_len
        self.max_input_tokens = min(limits.max_input_tokens or context, context - (self.endpoint == "generate"))

    def metadata(self) -> dict:
        m = self.cfg.model
        labels = self.task.labels.labels if self.task is not None and self.task.labels is not None else None
        return {"run": self.run, "task": self.cfg.task, "endpoint": f"/v1/{self.endpoint}", "labels": labels,
                "model": {"parameters": self.model.num_params(), "layers": m.n_layer, "width": m.d_model,
                          "heads": m.n_head, "context": m.max_seq_len, "vocab_size": self.tok.get_vocab_size()},
                "limits": {**asdict(self.limits), "max_input_tokens": self.max_input_tokens},
                "device": str(self.device), "lmforge": __version__}

    def check_length(self, text: str, where: str, tok=None) -> list[int]:
        # encode_batch, not encode: it lets go of the GIL, so that while a long text is tokenized on a thread
        # (create_app's `checked`) the event loop goes on answering (encode held it ~1.5 s for 1 MB)
        ids = (tok or self.tok).encode_batch([text], add_special_tokens=False)[0].ids
        if len(ids) > self.max_input_tokens:
            raise RequestError(422, where, f"{len(ids)} tokens; expected at most {self.max_input_tokens} "
                                           "(the server's --max-input-tokens or the model's context)")
        return ids

    def predict(self, examples: list) -> list[dict]:
        return self.task.predict(self.model, examples, "request")

    def score_example(self, item: ScoreInput, where: str) -> Example:
        """A /v1/score input as the reward task's prediction input (what `lmforge predict` reads from a line
        {"messages": [...]} or {"prompt", "response"}), checked here, before it can join a batch: a 422 naming
        `where` (inputs[i], or the request's own field) for anything its encoding refuses."""
        prefix = f"{where}." if where else ""
        if item.messages is not None:
            if item.prompt is not None or item.response is not None:
                raise RequestError(422, f"{prefix}messages", "given with prompt or response; expected either a "
                                                            "conversation or a prompt and a response")
            turns = [m.model_dump() for m in item.messages]
            field = f"{prefix}messages"
            try:
                example = Example(*split_answer(chat.check_messages(turns, field), field))
            except UserError as e:
                raise RequestError(422, field, str(e).removeprefix(f"{field}: ")) from None
            text = " ".join(m["content"] for m in turns)
        else:
            for name in ("prompt", "response"):
                if getattr(item, name) is None or not getattr(item, name).strip():
                    raise RequestError(422, f"{prefix}{name}", "missing or empty; expected {\"messages\": [...]} "
                                                               "or {\"prompt\": ..., \"response\": ...}")
            example = Example(item.prompt, item.response)
            text = f"{item.prompt} {item.response}"
        field = where or ("messages" if item.messages is not None else "body")
        self.check_length(text, field)
        try:
            self.task.encode_at([example], [field])
        except UserError as e:
            raise RequestError(422, field, str(e).removeprefix(f"{field}: ")) from None
        return example

    def translate(self, texts: list[str], beam: int, length_penalty: float) -> list[dict]:
        sc = self.cfg.seq2seq
        out = translate(self.model, self.tok, texts, beam_size=beam, length_penalty=length_penalty,
                        max_length_ratio=sc.max_length_ratio, source_tokenizer=self.source_tok)
        return [{"source": s, "translation": t} for s, t in zip(texts, out)]

    def generate(self, items: list[tuple[list[int], int]], req: GenerateRequest, on_text=None) -> list[str]:
        """items: (prompt ids, seed) of requests that share req's other settings; each row samples from a
        generator seeded with its own request's seed, as `lmforge generate --seed` does."""
        generators = [torch.Generator(device=self.device).manual_seed(seed) for _, seed in items] \
            if req.temperature > 0 else None
        return generate_texts(self.model, self.tok, [ids for ids, _ in items], req.max_new_tokens, req.temperature,
                              req.top_k, req.top_p, stop=req.stop, generator=generators, on_text=on_text,
                              end_ids=self.end_ids)


# -- batching ------------------------------------------------------------------------------------------

@dataclass
class Job:
    key: object                   # jobs with equal keys may share a forward pass
    items: list                   # the request's inputs
    run: Callable[[list], list]   # inputs -> one answer per input (on the worker thread)
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, batching: bool, max_items: int):
        self.batching, self.max_items = batching, max_items
        self.jobs: deque[Job] = deque()
        self.wake = asyncio.Event()
        self.closing = False
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lmforge-model")
        self.stats = {"requests": 0, "forward_batches": 0, "largest_batch": 0, "retried_batches": 0}

    async def submit(self, key, items: list, run: Callable[[list], list]) -> list:
        job = Job(key, items, run, asyncio.get_running_loop().create_future())
        self.jobs.append(job)
        self.stats["requests"] += 1
        self.wake.set()
        return await job.future

    def _take(self) -> list[Job]:
        """The oldest waiting job and, with batching, every later one that can join it."""
        first = self.jobs.popleft()
        batch, n, rest = [first], len(first.items), deque()
        while self.batching and self.jobs:
            job = self.jobs.popleft()
            if job.key == first.key and n + len(job.items) <= self.max_items:
                batch.append(job)
                n += len(job.items)
            else:
                rest.append(job)
        self.jobs = rest + self.jobs
        return [j for j in batch if not j.future.done()]  # a client that went away is not computed for

    async def work(self) -> None:
        while self.jobs or not self.closing:
            if not self.jobs:
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = self._take()
            if batch:
                await self._answer(batch)

    async def _answer(self, batch: list[Job]) -> None:
        """Computes a batch on the model's thread and settles its jobs. A batch that fails is computed again
        one job at a time, so that an input the model fails on fails its own request only, and the requests
        that shared its batch get their answers (each the answer it would get alone)."""
        items = [x for job in batch for x in job.items]
        self.stats["forward_batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        try:
            answers = await asyncio.get_running_loop().run_in_executor(self.pool, batch[0].run, items)
        except Exception as e:  # noqa: BLE001 - the request's own error (a 500 for it alone); the server goes on
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(e)
                return
            self.stats["retried_batches"] += 1
            for job in batch:
                if not job.future.done():
                    await self._answer([job])
            return
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(answers[start:start + len(job.items)])
            start += len(job.items)

    def close(self) -> None:
        self.closing = True
        self.wake.set()


# -- the app -------------------------------------------------------------------------------------------

def _numbered(inputs, limits: Limits) -> list[tuple[str, object]]:
    """(field name, input) for each input of a request (a single input or a list), within the count limits."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise RequestError(422, "inputs", "an empty list; expected at least one input")
    if len(items) > limits.max_batch:
        raise RequestError(413, "inputs", f"{len(items)} inputs; expected at most {limits.max_batch} a request "
                                          "(the server's --max-batch)")
    return [(f"inputs[{i}]" if isinstance(inputs, list) else "inputs", x) for i, x in enumerate(items)]


def _field(loc) -> str:
    """pydantic's location ('body', 'inputs', 'list[str]', 3) as inputs[3]; the branch names of a union
    (a type's name in the location: str, list[str], constrained-str, TextPair) are not fields."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and "-" not in part and part not in ("str", "TextPair"):
            out += f".{part}" if out else part
    return out or "body"


class BodyTooLarge(Exception):
    pass


class BodyReader:
    """ASGI middleware: reads a request's whole body before the application sees it, refusing one over
    --max-body-bytes (413: from its Content-Length, or counted as a chunked body arrives) and one that has not
    arrived within --read-timeout seconds (408, and the connection is closed: a client that stalls mid-body
    would otherwise hold the connection and a request task for ever)."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = error_response(413, "body", f"{length.decode(errors='replace')} bytes; expected at most "
                                                   f"{self.limit} (the server's --max-body-bytes)")
            return await response(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except BodyTooLarge:
            response = error_response(413, "body", f"expected at most {self.limit} bytes (the server's "
                                                   "--max-body-bytes)")
            return await response(scope, receive, send)
        except TimeoutError:
            response = error_response(408, "body", f"incomplete after {self.timeout} s; expected the whole body "
                                                   "within the server's --read-timeout")
            response.headers["Connection"] = "close"  # the rest of the body may still come: no next request
            return await response(scope, receive, send)
        if body is None:
            return  # the client went away

        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:  # after the body: http.disconnect, which a streaming answer listens for
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The body, or None when the client disconnects first."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                raise BodyTooLarge()
            if not message.get("more_body", False):
                return b"".join(chunks)


class BearerAuth:
    """ASGI middleware (--api-key): every path but /health needs the header `Authorization: Bearer KEY`, checked
    before the body is read, so that a client without the key cannot make the server read or compute anything."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        given = dict(scope.get("headers", ())).get(b"authorization", b"")
        if scope["type"] != "http" or scope["path"] == "/health" or hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        response = error_response(401, "authorization", "missing or wrong; expected the header Authorization: "
                                                        "Bearer KEY (the server's --api-key)")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def internal_error(request_id: str) -> JSONResponse:
    return JSONResponse({"error": f"internal error; request id {request_id}", "field": None,
                         "request_id": request_id}, status_code=500)


def log_internal_error(request_id: str, error: BaseException) -> None:
    """The traceback goes to the server's stderr under the id its client got, never to the client."""
    trace = "".join(traceback.format_exception(error))
    print(f"lmforge serve: internal error; request id {request_id}\n{trace}", end="", file=sys.stderr, flush=True)


class RequestIds:
    """ASGI middleware, the outermost: every answer carries an X-Request-Id header, and an error that escapes a
    handler is answered here, as a 500 naming only that id (internal_error; the traceback goes to stderr under
    the same id). Answering here rather than in an `Exception` handler keeps the connection open: Starlette
    re-raises after such a handler has answered, and uvicorn closes a connection whose application raised."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = os.urandom(8).hex()
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id, for a stream's error
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 - a server bug: answered and logged, the server goes on
            log_internal_error(request_id, e)
            if not started:  # else too late for a status: uvicorn closes a connection whose answer is incomplete
                await internal_error(request_id)(scope, receive, send_with_id)


def create_app(engine: Engine, batching: bool = True, api_key: str | None = None) -> FastAPI:
    """The server's application; api_key: every path but /health needs `Authorization: Bearer API_KEY`."""
    limits = engine.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(batching, limits.max_batch)
        worker = asyncio.create_task(app.state.batcher.work())
        yield
        app.state.batcher.close()  # requests still queued are answered first
        await worker
        app.state.batcher.pool.shutdown()

    app = FastAPI(title="lmforge", version=__version__, lifespan=lifespan,
                  description=f"{engine.cfg.task} model from {engine.run}: POST /v1/{engine.endpoint}")

    # the last added is the outermost: a request id for every answer, then the key, then the body is read
    app.add_middleware(BodyReader, limit=limits.max_body_bytes, timeout=limits.read_timeout)
    if api_key is not None:
        app.add_middleware(BearerAuth, key=api_key)
    app.add_middleware(RequestIds)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return error_response(e.status, e.field, e.message)

    @app.exception_handler(UserError)
    async def user_error(request, e: UserError):
        return error_response(422, "body", str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        if e.status_code == 404:
            return error_response(404, "path", f"{request.url.path} is not served here; this {engine.cfg.task} "
                                               f"model answers POST /v1/{engine.endpoint} (see /docs)")
        if e.status_code == 405:
            return error_response(405, "method", f"{request.method} {request.url.path}: not allowed; see /docs")
        return error_response(e.status_code, "body", str(e.detail))

    request_model = {"/v1/classify": ClassifyRequest, "/v1/tag": TagRequest, "/v1/translate": TranslateRequest,
                     "/v1/generate": GenerateRequest, "/v1/chat/completions": ChatRequest, "/v1/score": ScoreRequest}

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0]
        if first["type"] == "json_invalid":
            return error_response(400, "body", f"malformed JSON ({first.get('ctx', {}).get('error', 'cannot parse')} "
                                               f"at character {first['loc'][-1]}); expected a JSON object")
        if first["type"] == "missing" and tuple(first["loc"]) == ("body",):
            return error_response(422, "body", "missing; expected a JSON object (Content-Type: application/json)")
        if first["type"] == "model_attributes_type":
            return error_response(422, "body", "expected a JSON object")
        # a union reports one error per branch: the deepest one names the field best, and of equally deep
        # ones, one that is not "a valid <other branch's type>"
        error = max(errors, key=lambda x: (len(x["loc"]), not x["type"].endswith("_type")))
        where = _field(error["loc"])
        if error["type"] == "extra_forbidden":
            return error_response(422, where, "unknown field; see /docs for the request's fields")
        message = error["msg"][0].lower() + error["msg"][1:]
        top = where.split("[")[0].split(".")[0]
        described = request_model.get(request.url.path)
        info = described.model_fields.get(top) if described else None
        if info is not None and info.description and len(errors) > 1:
            message += f"; {top}: expected {info.description}"
        return error_response(422, where, message)

    @app.get("/health", summary="liveness: 200 while the server answers")
    async def health():
        return {"status": "ok", "task": engine.cfg.task}

    @app.get("/metadata", summary="the model, its task and labels, the limits and batching counters")
    async def metadata(request: Request):
        batcher = request.app.state.batcher
        return {**engine.metadata(), "batching": batcher.batching, "stats": dict(batcher.stats)}

    def batcher_of(request: Request) -> Batcher:
        return request.app.state.batcher

    async def checked(check: Callable, *args):
        """check(*args), what reads an input (tokenizing, the length checks, a chat template), on a thread of
        Starlette's pool for blocking calls: not on the event loop, which would stop answering (/health too)
        for the second a 1 MB prompt takes, nor on the model's thread, where it would wait behind the batches."""
        return await run_in_threadpool(check, *args)

    if engine.endpoint == "classify":
        pair_model = engine.cfg.finetune.pair_field is not None

        def classify_examples(req: ClassifyRequest) -> list[Example]:
            examples = []
            for i, (where, item) in enumerate(_numbered(req.inputs, limits)):
                if pair_model != isinstance(item, TextPair):
                    raise RequestError(422, where, "expected an object {\"text\": ..., \"pair\": ...} for this "
                                       "sentence-pair model" if pair_model else "expected a text (this model "
                                       "takes single sentences)")
                text, pair = (item.text, item.pair) if pair_model else (item, None)
                engine.check_length(text + (" " + pair if pair else ""), where)
                examples.append(Example(text, pair, None, i + 1))
            return examples

        @app.post("/v1/classify", summary="label texts (classify), score them (regress) or tag them with labels "
                  "(multilabel); the records of lmforge predict")
        async def classify(req: ClassifyRequest, request: Request):
            examples = await checked(classify_examples, req)
            return {"results": await batcher_of(request).submit("classify", examples, engine.predict)}

    if engine.endpoint == "tag":
        def tag_examples(req: TagRequest) -> list[Example]:
            examples = []
            for i, (where, item) in enumerate(_numbered(req.inputs, limits)):
                words = item.split() if isinstance(item, str) else item
                if not words or any(not w or w != w.strip() or " " in w for w in words):
                    raise RequestError(422, where, "expected a non-empty sentence, or a list of words without "
                                                   "spaces")
                engine.check_length(" ".join(words), where)
                examples.append(Example(words, None, None, i + 1))
            return examples

        @app.post("/v1/tag", summary="tag each word (NER); the records of lmforge predict")
        async def tag(req: TagRequest, request: Request):
            examples = await checked(tag_examples, req)
            return {"results": await batcher_of(request).submit("tag", examples, engine.predict)}

    if engine.endpoint == "score":
        @app.post("/v1/score", summary="score answers with a reward model: {\"scores\": [...]}, one per input, as "
                  "lmforge predict scores them")
        async def score(req: ScoreRequest, request: Request):
            if req.inputs is not None:
                given = [name for name in ("messages", "prompt", "response") if getattr(req, name) is not None]
                if given:
                    raise RequestError(422, given[0], "given with inputs; expected one answer at the top level or a "
                                                      "list of them in inputs")
                items = _numbered(req.inputs, limits)
            else:
                items = [("", req)]
            examples = await checked(lambda: [engine.score_example(item, where) for where, item in items])
            records = await batcher_of(request).submit("score", examples, engine.predict)
            return {"scores": [r["score"] for r in records]}

    if engine.endpoint == "translate":
        @app.post("/v1/translate", summary="translate sentences; the output of lmforge translate")
        async def translate(req: TranslateRequest, request: Request):
            items = _numbered(req.inputs, limits)
            await checked(lambda: [engine.check_length(text, where, engine.source_tok) for where, text in items])
            sc = engine.cfg.seq2seq
            beam = req.beam or sc.beam_size
            penalty = sc.length_penalty if req.length_penalty is None else req.length_penalty
            answers = await batcher_of(request).submit(("translate", beam, penalty), [text for _, text in items],
                                                       lambda texts: engine.translate(texts, beam, penalty))
            return {"results": answers}

    if engine.endpoint == "generate":
        def prompt_tokens(prompt: str) -> list[int]:
            try:  # an empty prompt starts a document, as lmforge generate does
                return engine.check_length(prompt, "prompt") or prompt_ids(engine.tok, "")
            except UserError:
                raise RequestError(422, "prompt", "empty, and this tokenizer has no end-of-text token to start "
                                                  "from; expected some text") from None

        @app.post("/v1/generate", summary="continue a prompt (the output of lmforge generate); stream: true "
                  "sends server-sent events: data: {\"text\": new text} ..., then data: {\"done\": true, \"text\": "
                  "the whole text}")
        async def generate(req: GenerateRequest, request: Request):
            if req.max_new_tokens is None:
                req.max_new_tokens = limits.max_new_tokens
            if req.max_new_tokens > limits.max_new_tokens:
                raise RequestError(422, "max_new_tokens", f"{req.max_new_tokens}; expected at most "
                                                          f"{limits.max_new_tokens} (the server's --max-new-tokens)")
            ids = await checked(prompt_tokens, req.prompt)
            batcher = batcher_of(request)
            if req.stream:
                return StreamingResponse(_events(batcher, engine, ids, req, request.state.request_id),
                                         media_type="text/event-stream")
            # requests with the same settings share forward passes (prompts left-padded to the longest, which
            # must leave each its room for new tokens; each sampled row keeps its own seed's generator)
            fits = len(ids) + req.max_new_tokens <= engine.cfg.model.max_seq_len
            settings = (req.max_new_tokens, tuple(req.stop or ()), req.temperature) + \
                ((req.top_k, req.top_p) if req.temperature > 0 else ())
            key = ("generate", *settings) if fits else object()
            text = (await batcher.submit(key, [(ids, req.seed)], lambda items: engine.generate(items, req)))[0]
            return {"prompt": req.prompt, "text": text}

        def chat_prompt(messages: list[dict]) -> tuple[str, list[int]]:
            try:
                text = chat.render(engine.chat[0], messages, True, engine.chat[1], "template")
            except UserError as e:
                raise RequestError(422, "messages", str(e)) from None
            return text, engine.check_length(text, "messages")

        @app.post("/v1/chat/completions", summary="OpenAI-style chat: the conversation in the model's chat template, "
                  "answered as the assistant's message (stream: true sends chat.completion.chunk events)")
        async def chat_completions(req: ChatRequest, request: Request):
            if engine.chat is None:
                raise RequestError(404, "path", "this model has no chat template; POST /v1/generate continues text")
            messages = [m.model_dump() for m in req.messages]  # the schema checked their fields' types
            for i, m in enumerate(messages):
                if m["role"] not in chat.ROLES:
                    raise RequestError(422, f"messages[{i}].role", f"{m['role']!r}; expected one of {', '.join(chat.ROLES)}")
            text, ids = await checked(chat_prompt, messages)
            limit = req.max_completion_tokens or req.max_tokens or limits.max_new_tokens
            if limit > limits.max_new_tokens:
                raise RequestError(422, "max_tokens", f"{limit}; expected at most {limits.max_new_tokens} "
                                                      "(the server's --max-new-tokens)")
            gen = GenerateRequest(prompt=text, max_new_tokens=limit, temperature=req.temperature, top_p=req.top_p,
                                  stop=[req.stop] if isinstance(req.stop, str) else req.stop, seed=req.seed or 0)
            reply = ChatReply(engine, len(ids), limit)
            if req.stream:
                return StreamingResponse(_events(batcher_of(request), engine, ids, gen, request.state.request_id,
                                                 reply.chunk, "[DONE]"), media_type="text/event-stream")
            answer = (await batcher_of(request).submit(object(), [(ids, gen.seed)],
                                                        lambda items: engine.generate(items, gen)))[0]
            return reply.completion(answer)

    return app


class ChatReply:
    """OpenAI's response shapes for one chat request: the whole completion, or the stream's chunks."""

    def __init__(self, engine: Engine, prompt_tokens: int, limit: int):
        self.engine, self.prompt_tokens, self.limit = engine, prompt_tokens, limit
        self.id, self.created = f"chatcmpl-{os.urandom(12).hex()}", int(time.time())
        self.role_sent = False

    def _finish(self, answer: str) -> tuple[str, int]:
        n = len(self.engine.tok.encode(answer, add_special_tokens=False).ids)
        return ("length" if n >= self.limit else "stop"), n

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.engine.run}

    def completion(self, answer: str) -> dict:
        reason, n = self._finish(answer)
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": reason}],
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                          "total_tokens": self.prompt_tokens + n}}

    def chunk(self, piece: str | None, whole: str | None = None) -> list[dict]:
        """The events for a new piece of the answer, or (whole given) the end of the stream."""
        if whole is None:
            delta = {"content": piece} if self.sent_role() else {"role": "assistant", "content": piece}
            return [{**self._head("chat.completion.chunk"), "choices": [{"index": 0, "delta": delta,
                                                                         "finish_reason": None}]}]
        events = [] if piece is None else self.chunk(piece)
        reason, _ = self._finish(whole)
        return events + [{**self._head("chat.completion.chunk"),
                          "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}]

    def sent_role(self) -> bool:
        """Whether the role went out already: OpenAI's first chunk carries it, the others only content."""
        sent, self.role_sent = self.role_sent, True
        return sent


def _generate_events(piece: str | None, whole: str | None = None) -> list[dict]:
    """/v1/generate's events: {"text": new text} as it is made, then {"done": true, "text": the whole}."""
    events = [{"text": piece}] if piece else []
    return events + ([{"done": True, "text": whole}] if whole is not None else [])


async def _events(batcher: Batcher, engine: Engine, ids: list[int], req: GenerateRequest, request_id: str,
                  shape=_generate_events, last: str | None = None):
    """Server-sent events of one generation: each new piece of text as it is made, then the whole text, in
    `shape`'s objects (piece, whole=None) -> events; `last` a closing line (OpenAI's [DONE]). An error is an
    event {"error": ...}: a user's mistake in one line, a server bug as internal_error's text."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()
    # text that a stop string may still cut, or a character still incomplete, is held back
    hold = max((len(s) for s in req.stop or ()), default=1) - 1

    def on_text(texts: list[str]) -> bool:
        loop.call_soon_threadsafe(updates.put_nowait, ("text", texts[0]))
        return gone.is_set()

    async def produce():
        try:
            final = await batcher.submit(object(), [(ids, req.seed)], lambda items: engine.generate(items, req, on_text))
            updates.put_nowait(("done", final[0]))
        except UserError as e:  # reported in the stream: the status line is already sent
            updates.put_nowait(("error", str(e)))
        except Exception as e:  # noqa: BLE001 - a server bug: logged under the id, which is all the client gets
            log_internal_error(request_id, e)
            updates.put_nowait(("error", f"internal error; request id {request_id}"))

    producer = asyncio.create_task(produce())
    sent = ""
    try:
        while True:
            kind, text = await updates.get()
            if kind == "error":
                yield f"data: {json.dumps({'error': text})}\n\n"
                return
            if kind == "done":
                rest = text[len(sent):] if text.startswith(sent) else ""
                for event in shape(rest or None, text):
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                if last:
                    yield f"data: {last}\n\n"
                return
            safe = text[:len(text) - hold] if hold else text
            safe = safe.rstrip("\ufffd")
            if safe.startswith(sent) and len(safe) > len(sent):
                for event in shape(safe[len(sent):]):
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                sent = safe
    finally:
        gone.set()  # a client that disconnected stops the generation at its next token
        await producer


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"serve: cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") \
            from None


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, so that the exit status says
            # "killed"; a server stopped on purpose that answered every request in flight exits 0 instead.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def _protocol_class(read_timeout: float):
    """uvicorn's HTTP protocol (httptools or h11, as uvicorn picks), with a deadline for each request's head."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadDeadline(AutoHTTPProtocol):
        # uvicorn's keep-alive timer stops at a request's first byte, and nothing else times a connection: one
        # that sends nothing after connecting, or half a request line or of its headers, was held for ever

        def connection_made(self, transport):
            super().connection_made(transport)
            self._expect_head()

        def on_response_complete(self):
            super().on_response_complete()
            self._expect_head()

        def _expect_head(self):
            self.loop.call_later(read_timeout, self._close_without_head, self.cycle)

        def _close_without_head(self, cycle):
            # still the same request cycle, answered (or none yet): no request head has come in time
            if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


def server_config(app, host: str, port: int, limits: Limits, log_requests: bool = False):
    """uvicorn's settings for `lmforge serve`: the limits' timeouts, 30 s to finish the requests in flight."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, access_log=log_requests, log_level="info",
                          timeout_graceful_shutdown=30, timeout_keep_alive=limits.keep_alive,
                          http=_protocol_class(limits.read_timeout))


LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """One line when anyone on the network could use the model: listening beyond this machine without a key."""
    if api_key or host in LOCAL_HOSTS:
        return None
    return (f"lmforge: warning: serving on {host} without --api-key (or LMFORGE_API_KEY): anyone who can reach "
            "this address can use the model")


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto", threads: int | None = None,
          batching: bool = True, log_requests: bool = False, limits: Limits | None = None, dtype: str = "auto",
          api_key: str | None = None) -> None:
    limits = limits or Limits()
    for name, value in asdict(limits).items():
        if value is not None and value < 1:
            raise UserError(f"serve: --{name.replace('_', '-')} = {value}: expected a positive number")
    if threads is not None and threads < 1:
        raise UserError(f"serve: --threads = {threads}: expected a positive number")
    if api_key is not None and not api_key.strip():
        raise UserError("serve: --api-key is empty; expected the secret that clients send as Authorization: Bearer KEY")
    _check_port(host, port)
    # the HTTP loop needs a core of its own: intra-op threads that wait on each other are slowed down badly
    # by any neighbour (on 2 cores, 2 model threads beside the loop were ~10x slower for small batches)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    engine = Engine(run, device, limits, dtype)
    app = create_app(engine, batching, api_key)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # an IPv6 address in brackets
    print(f"serving {run} ({engine.cfg.task}, {engine.model.num_params() / 1e6:.2f}M parameters) at {url}\n"
          f"  POST {url}/v1/{engine.endpoint}   GET {url}/health  {url}/metadata   schema: {url}/docs\n"
          f"  batching {'on' if batching else 'off'}, {torch.get_num_threads()} model thread(s); Ctrl-C stops after "
          "the requests in flight", flush=True)
    if warning := exposure_warning(host, api_key):
        print(warning, file=sys.stderr, flush=True)
    _server_class()(server_config(app, host, port, limits, log_requests)).run()
    print("lmforge: server stopped", flush=True)
