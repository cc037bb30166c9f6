"""`lmforge serve` against hostile clients: every request field is bounded before it can join a batch, a batch
that fails is retried one request at a time so only the bad request fails, a 500 names a request id (never the
exception) and keeps its keep-alive connection, a huge prompt is tokenized off the event loop, stalled
connections are closed, and --api-key guards every endpoint but /health.

The server runs in this process (Starlette's TestClient, or uvicorn on a thread for what only a real socket
shows) on a random-weight GPT, so the engine can be made to fail on purpose."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from helpers import free_port, make_base, one_line_error, synthetic_text
from lmforge.cli import main
from lmforge.config import ServeLimits
from lmforge.generate import SEED_MAX
from lmforge.serve import (ChatRequest, ClassifyRequest, Engine, GenerateRequest, ScoreRequest, TagRequest,
                           TranslateRequest, _server_class, create_app, exposure_warning, server_config)
from test_serve import refused


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    """A random-weight GPT (context 32, BPE): what it says does not matter, only that each answer is its own."""
    return make_base(tmp_path_factory.mktemp("gpt") / "run", "clm")


def engine_of(run: Path, **limits) -> Engine:
    return Engine(str(run), "cpu", ServeLimits(**limits))


def generate_body(prompt: str, **settings) -> dict:
    return {"prompt": prompt, "max_new_tokens": 8, "temperature": 0, **settings}


# -- 1. every field bounded ------------------------------------------------------------------------------

RUNTIME_BOUNDED = {"max_new_tokens", "max_tokens", "max_completion_tokens"}  # at most the server's --max-new-tokens


@pytest.mark.parametrize("model", [GenerateRequest, ChatRequest, TranslateRequest, ScoreRequest, ClassifyRequest,
                                   TagRequest])
def test_every_number_of_every_request_has_a_range(model):
    def numbers(schema: dict, defs: dict, path: str):
        if "$ref" in schema:
            yield from numbers(defs[schema["$ref"].split("/")[-1]], defs, path)
        for key in ("anyOf", "oneOf"):
            for branch in schema.get(key, []):
                yield from numbers(branch, defs, path)
        if schema.get("type") in ("integer", "number"):
            yield path, schema
        for name, sub in schema.get("properties", {}).items():
            yield from numbers(sub, defs, name)
        if "items" in schema:
            yield from numbers(schema["items"], defs, path)

    schema = model.model_json_schema()
    for name, field in numbers(schema, schema.get("$defs", {}), ""):
        assert {"minimum", "exclusiveMinimum"} & field.keys(), f"{model.__name__}.{name} has no lower bound"
        assert {"maximum", "exclusiveMaximum"} & field.keys() or name in RUNTIME_BOUNDED, \
            f"{model.__name__}.{name} has no upper bound"


@pytest.mark.slow  # loads the server's stack
def test_a_bad_field_is_a_422_naming_it_before_it_reaches_a_batch(gpt_run):
    with TestClient(create_app(engine_of(gpt_run))) as client:
        ask = lambda **kw: client.post("/v1/generate", json=generate_body("the king", **kw))  # noqa: E731
        refused(ask(seed=SEED_MAX + 1), 422, "seed", f"less than or equal to {SEED_MAX}")
        refused(ask(seed=2**64), 422, "seed", "less than or equal to")
        refused(ask(seed=-1), 422, "seed", "greater than or equal to 0")
        refused(ask(stop=[""]), 422, "stop[0]", "at least 1 character")
        refused(ask(stop=["a"] * 1000), 422, "stop", "at most 16 items")
        refused(ask(stop=["a" * 5000]), 422, "stop[0]", "at most 256 characters")
        refused(ask(temperature=1e-300), 422, "temperature", "0 (greedy) or 0.001 to 100")  # inf logits: NaN
        refused(ask(temperature=1.0, top_p=1e-50), 422, "top_p", "greater than or equal to")  # 0 in float32
        refused(ask(top_k=10**12), 422, "top_k", "less than or equal to")
        chat = lambda **kw: client.post("/v1/chat/completions", json={  # noqa: E731
            "messages": [{"role": "user", "content": "hi"}], **kw})
        refused(chat(seed=2**63), 422, "seed", "less than or equal to")
        refused(chat(stop=""), 422, "stop", "at least 1 character")
        refused(chat(messages=[{"role": "user", "content": "hi"}] * 5000), 422, "messages", "at most")
        assert ask(seed=SEED_MAX, temperature=1.0).status_code == 200  # the largest seed samples


def test_generate_refuses_a_seed_that_torch_cannot_take(gpt_run, capsys):
    base = ["generate", "--checkpoint", str(gpt_run), "--device", "cpu", "--max-new-tokens", "2"]
    one_line_error(capsys, base + ["--seed", str(2**64)], "--seed", str(SEED_MAX))
    one_line_error(capsys, base + ["--seed", str(SEED_MAX), "--num-samples", "2"], "--seed", str(SEED_MAX - 1))
    one_line_error(capsys, base + ["--seed", "-1"], "--seed")


# -- 2. a failure inside a batch fails only its request ------------------------------------------------------

@pytest.mark.slow  # loads the server's stack
def test_a_batch_that_fails_is_retried_per_request_so_only_the_bad_one_fails(gpt_run, monkeypatch, capsys):
    engine = engine_of(gpt_run)
    prompts = ["the king", "sweet prince", "what is this", "good night", "we are such stuff", "our little life"]
    bad = "rome shall speak"
    bodies = [generate_body(p) for p in prompts[:1] + [bad] + prompts[1:]]
    with TestClient(create_app(engine)) as client:
        alone = {p: client.post("/v1/generate", json=generate_body(p)).json()["text"] for p in prompts}
        bad_ids = engine.check_length(bad, "prompt")
        real, calls, batcher = engine.generate, [], client.app.state.batcher

        def generate(items, req, on_text=None):
            calls.append([ids for ids, _ in items])
            deadline = time.time() + 30
            while len(calls) == 1 and len(batcher.jobs) < len(bodies) - 1 and time.time() < deadline:
                time.sleep(0.01)  # the first request holds the worker until the others queue up behind it
            if bad_ids in calls[-1]:
                raise RuntimeError("secret detail of the engine")
            return real(items, req, on_text)

        monkeypatch.setattr(engine, "generate", generate)
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            first = pool.submit(client.post, "/v1/generate", json=bodies[0])
            while not calls:
                time.sleep(0.01)
            answers = [first] + [pool.submit(client.post, "/v1/generate", json=body) for body in bodies[1:]]
            answers = [a.result() for a in answers]
    assert any(bad_ids in rows and len(rows) > 1 for rows in calls), calls  # the bad input shared a batch
    assert [a.status_code for a in answers] == [200, 500] + [200] * (len(prompts) - 1)
    assert [a.json()["text"] for a in answers if a.status_code == 200] == [alone[p] for p in prompts]
    failed = answers[1]
    request_id = failed.headers["x-request-id"]
    assert failed.json() == {"error": f"internal error; request id {request_id}", "field": None,
                             "request_id": request_id}
    assert all(a.headers["x-request-id"] != request_id for a in answers[:1] + answers[2:])
    log = capsys.readouterr().err
    assert request_id in log and "secret detail of the engine" in log and "Traceback" in log


# -- 3. a 500 keeps the connection ----------------------------------------------------------------------------

@contextmanager
def uvicorn_thread(engine: Engine, **app_options):
    """`lmforge serve`'s uvicorn server for `engine`, on a thread of this process; yields its port."""
    port = free_port()
    server = _server_class()(server_config(create_app(engine, **app_options), "127.0.0.1", port, engine.limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "uvicorn did not start within 30 s"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict, http.client.HTTPResponse]:
    conn.request("POST", "/v1/generate", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read()), response


@pytest.mark.slow  # a server on a thread
def test_a_500_keeps_the_keep_alive_connection_and_hides_the_exception(gpt_run, monkeypatch, capsys):
    engine = engine_of(gpt_run)
    real = engine.generate

    def generate(items, req, on_text=None):
        if req.prompt == "fail":
            raise ValueError("secret detail of the engine")
        return real(items, req, on_text)

    monkeypatch.setattr(engine, "generate", generate)
    with uvicorn_thread(engine) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(2):
            status, body, response = post(conn, generate_body("fail"))
            assert status == 500 and "secret" not in json.dumps(body)
            assert body["request_id"] == response.getheader("X-Request-Id") and body["field"] is None
            status, body, response = post(conn, generate_body("the king"))  # the same connection
            assert status == 200 and body["prompt"] == "the king" and response.getheader("X-Request-Id")
        conn.close()
    assert "secret detail of the engine" in capsys.readouterr().err


# -- 4. tokenization off the event loop -----------------------------------------------------------------------

@pytest.mark.slow  # tokenizes a megabyte
def test_health_answers_while_a_huge_prompt_is_tokenized(gpt_run):
    engine = engine_of(gpt_run)
    prompt = synthetic_text(1_000_000)
    with TestClient(create_app(engine)) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        big = pool.submit(client.post, "/v1/generate", json=generate_body(prompt))
        time.sleep(0.3)  # the body is in, its tokenization under way (a second or two on this tokenizer)
        asked = time.perf_counter()
        assert client.get("/health").status_code == 200
        answered = time.perf_counter()
        refused(big.result(), 422, "prompt", "tokens; expected at most 31")
        done = time.perf_counter()
    assert answered < done - 0.2, f"/health waited for the prompt ({answered - started:.2f} s of {done - started:.2f} s)"
    assert answered - asked < 0.5, f"/health took {answered - asked:.2f} s"


# -- 5. stalled connections are closed ----------------------------------------------------------------------

def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


@pytest.mark.slow  # a server on a thread, and waits for its timeouts
def test_stalled_and_idle_connections_are_closed(gpt_run):
    engine = engine_of(gpt_run, read_timeout=1, keep_alive=1)
    with uvicorn_thread(engine) as port:
        def connect() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.settimeout(5)  # a server that never closes fails the test by recv's timeout
            return sock

        with connect() as half_head:
            half_head.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Le")
            start = time.perf_counter()
            assert read_until_closed(half_head) == b"" and time.perf_counter() - start < 3
        with connect() as silent:  # connected, sent nothing
            assert read_until_closed(silent) == b""
        with connect() as no_body:
            no_body.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            answer = read_until_closed(no_body)
            assert answer.startswith(b"HTTP/1.1 408 ") and b'"field":"body"' in answer, answer
        with connect() as idle:
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            start = time.perf_counter()
            assert read_until_closed(idle).startswith(b"HTTP/1.1 200 ") and time.perf_counter() - start < 3


# -- 6. --api-key -------------------------------------------------------------------------------------------

@pytest.mark.slow  # loads the server's stack
def test_an_api_key_guards_every_endpoint_but_health(gpt_run):
    with TestClient(create_app(engine_of(gpt_run), api_key="s3cret")) as client:
        assert client.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for answer in (client.post("/v1/generate", json=generate_body("the king"), headers=headers),
                           client.get("/metadata", headers=headers), client.get("/docs", headers=headers)):
                refused(answer, 401, "authorization", "Bearer")
                assert answer.headers["www-authenticate"] == "Bearer"
        key = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/generate", json=generate_body("the king"), headers=key).status_code == 200
        assert client.get("/metadata", headers=key).json()["task"] == "clm"


def test_the_api_key_comes_from_the_option_or_the_environment(monkeypatch, capsys):
    import lmforge.serve

    seen = []
    monkeypatch.setattr(lmforge.serve, "serve", lambda *args, **kw: seen.append(kw["api_key"]))
    assert main(["serve", "RUN", "--api-key", "k1"]) == 0
    monkeypatch.setenv("LMFORGE_API_KEY", "k2")
    assert main(["serve", "RUN"]) == 0 and main(["serve", "RUN", "--api-key", "k1"]) == 0
    monkeypatch.delenv("LMFORGE_API_KEY")
    assert main(["serve", "RUN"]) == 0
    assert seen == ["k1", "k2", "k1", None]


def test_a_server_open_beyond_this_machine_without_a_key_warns():
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure_warning(host, None) is None
    assert exposure_warning("0.0.0.0", "k") is None
    warning = exposure_warning("0.0.0.0", None)
    assert "\n" not in warning and "0.0.0.0" in warning and "--api-key" in warning
