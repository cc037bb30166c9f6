"""`lmforge serve` against hostile clients: every request field is bounded before it can join a batch.

The server runs in this process (Starlette's TestClient) on a random-weight GPT."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from helpers import make_base, one_line_error
from lmforge.config import ServeLimits
from lmforge.generate import SEED_MAX
from lmforge.serve import (ChatRequest, ClassifyRequest, Engine, GenerateRequest, ScoreRequest, TagRequest,
                           TranslateRequest, create_app)
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
        refused(ask(temperature=1e-300), 422, "temperature", "0 (greedy) or at least")  # inf logits: NaN
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
