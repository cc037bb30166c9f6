"""`lmforge serve` over real HTTP: each test starts the server as its own process on 127.0.0.1, checks that
every endpoint answers what the CLI answers for the same input, that bad requests get a 4xx JSON error
naming the field while the server keeps serving, and that SIGTERM lets the request in flight finish."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
from pathlib import Path

import httpx
import pytest

from helpers import (SEQ2SEQ_TINY, classify_files, conll_lines, finetune, free_port, make_base, number_pairs,
                      server, synthetic_text, tiny_overrides, write_corpus, write_lines, write_tsv)
from lmforge.cli import main

# every test here starts a server process, trains a run or loads the server's stack: all slow
pytestmark = pytest.mark.slow


def cli_records(capsys, argv: list[str]) -> list[dict]:
    capsys.readouterr()
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def refused(response: httpx.Response, status: int, field: str, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field and body["error"].startswith(f"{field}: "), body
    for word in words:
        assert word in body["error"], body
    return body["error"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "encoder", "mlm")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, encoder) -> Path:
    tmp = tmp_path_factory.mktemp("classify")
    train, dev = classify_files(tmp)
    return finetune(tmp, encoder, train, dev, "classify", "--finetune.epochs", "2")


TEXTS = ["the good lord", "the rome and queen", "what is this", "sweet prince we are such stuff as dreams are made on"]


def test_classify_answers_what_predict_answers_and_refuses_bad_requests(tmp_path, classifier, capsys):
    inputs = write_lines(tmp_path / "in.tsv", ["text"] + TEXTS)
    expected = cli_records(capsys, ["predict", "--checkpoint", str(classifier), "--input", str(inputs), "--device", "cpu"])
    with server(classifier, "--max-body-bytes", "4000", "--max-batch", "8") as (client, _):
        assert client.post("/v1/classify", json={"inputs": TEXTS}).json() == {"results": expected}
        assert client.post("/v1/classify", json={"inputs": TEXTS[1]}).json() == {"results": [expected[1]]}

        # concurrent one-text requests: batched into shared forward passes, the same answers
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: client.post("/v1/classify", json={"inputs": TEXTS[i % 4]}), range(32)))
        for i, answer in enumerate(answers):
            record = answer.json()["results"][0]
            assert record["label"] == expected[i % 4]["label"]
            assert record["probs"] == pytest.approx(expected[i % 4]["probs"], abs=1e-5)
        meta = client.get("/metadata").json()
        assert meta["task"] == "classify" and meta["labels"] == ["neg", "pos"] and meta["endpoint"] == "/v1/classify"
        assert meta["stats"]["largest_batch"] > 1 and meta["stats"]["forward_batches"] < meta["stats"]["requests"]

        post = lambda body: client.post("/v1/classify", content=body, headers={"content-type": "application/json"})  # noqa: E731
        refused(post('{"inputs": ["the king",'), 400, "body", "malformed JSON")
        refused(post("[1, 2]"), 422, "body", "expected a JSON object")
        refused(client.post("/v1/classify", json={"inputs": 5}), 422, "inputs", "valid string", "expected a text")
        refused(client.post("/v1/classify", json={"inputs": ["ok", 3]}), 422, "inputs[1]", "valid string")
        refused(client.post("/v1/classify", json={"inputs": "ok", "lang": "en"}), 422, "lang", "unknown field")
        refused(client.post("/v1/classify", json={"inputs": []}), 422, "inputs", "at least one")
        refused(client.post("/v1/classify", json={"inputs": ["a"] * 9}), 413, "inputs", "at most 8")
        too_long = " ".join(["king"] * 40)  # the model's context is 32 tokens
        refused(client.post("/v1/classify", json={"inputs": ["good", too_long]}), 422, "inputs[1]", "at most 32")
        refused(client.post("/v1/classify", json={"inputs": "x" * 5000}), 413, "body", "at most 4000")
        chunked = client.post("/v1/classify", content=iter([b'{"inputs": "', b"x" * 5000, b'"}']),
                              headers={"content-type": "application/json"})
        refused(chunked, 413, "body", "at most 4000")
        refused(client.post("/v1/generate", json={"prompt": "a"}), 404, "path", "POST /v1/classify")
        # still serving, and the schema is published
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/v1/classify", json={"inputs": TEXTS}).json() == {"results": expected}
        schema = client.get("/openapi.json").json()
        assert "/v1/classify" in schema["paths"] and "ClassifyRequest" in schema["components"]["schemas"]


def test_tag_answers_what_predict_answers(tmp_path, encoder, capsys):
    train = write_lines(tmp_path / "train.conll", conll_lines(60, 8))
    run = finetune(tmp_path, encoder, train, None, "tag", "--finetune.epochs", "1")
    sentences = [["the", "king", "of", "rome"], ["sweet", "queen", "and", "the", "king", "speak"]]
    inputs = write_lines(tmp_path / "words.txt", [w for s in sentences for w in s + [""]])
    expected = cli_records(capsys, ["predict", "--checkpoint", str(run), "--input", str(inputs), "--device", "cpu"])
    with server(run) as (client, _):
        assert client.post("/v1/tag", json={"inputs": sentences}).json() == {"results": expected}
        assert client.post("/v1/tag", json={"inputs": "the king of rome"}).json() == {"results": expected[:1]}
        refused(client.post("/v1/tag", json={"inputs": [["the", "two words"]]}), 422, "inputs[0]", "without spaces")
        refused(client.post("/v1/tag", json={"inputs": [["the", 7]]}), 422, "inputs[0][1]", "valid string")


def test_translate_answers_what_translate_answers(tmp_path, capsys):
    train = write_tsv(tmp_path / "train.tsv", number_pairs(300, 0))
    run = tmp_path / "run"
    assert main(["train", "--task", "seq2seq", *SEQ2SEQ_TINY, "--seq2seq.train", str(train), "--seq2seq.dev", str(train),
                 "--data.tokenizer.vocab_size", "300", "--train.max_steps", "30", "--train.warmup_steps", "5", "--train.lr", "3e-3",
                 "--seq2seq.beam_size", "2", "--log.run_dir", str(run)]) == 0
    sources = [s for s, _ in number_pairs(6, 5)]
    src = write_lines(tmp_path / "src.txt", sources)
    capsys.readouterr()
    assert main(["translate", "--checkpoint", str(run), "--input", str(src), "--device", "cpu"]) == 0
    expected = capsys.readouterr().out.splitlines()
    assert main(["translate", "--checkpoint", str(run), "--input", str(src), "--device", "cpu", "--beam", "1"]) == 0
    greedy = capsys.readouterr().out.splitlines()
    with server(run) as (client, _):
        answer = client.post("/v1/translate", json={"inputs": sources}).json()["results"]
        assert [a["translation"] for a in answer] == expected and [a["source"] for a in answer] == sources
        answer = client.post("/v1/translate", json={"inputs": sources, "beam": 1}).json()["results"]
        assert [a["translation"] for a in answer] == greedy
        refused(client.post("/v1/translate", json={"inputs": "one", "beam": 0}), 422, "beam", "greater than")
        refused(client.post("/v1/translate", json={"inputs": "one", "beam": "2"}), 422, "beam", "valid integer")


def events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def gpt(tmp_path_factory) -> Path:
    """A tiny char-level GPT trained 30 steps, context 256."""
    tmp = tmp_path_factory.mktemp("gpt")
    corpus = write_corpus(tmp, synthetic_text(20_000))
    over = tiny_overrides(tmp, corpus, **{"train.max_steps": 30, "model.max_seq_len": 256})
    assert main(["pretrain", *[f"--{k}={v}" for k, v in over.items()]]) == 0
    return tmp / "run"


def test_generate_answers_what_generate_answers_and_streams(gpt, capsys):
    run = gpt

    def cli(*options: str, prompt: str = "The king") -> str:
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(run), "--device", "cpu", "--prompt", prompt, *options]) == 0
        return capsys.readouterr().out.removesuffix("\n").removeprefix(prompt)

    prompts = ["The king", "Sweet", "What is this good night, my lord"]
    greedy_of = {p: cli("--max-new-tokens", "30", "--temperature", "0", prompt=p) for p in prompts}
    greedy = greedy_of["The king"]
    sampled = cli("--max-new-tokens", "30", "--seed", "7")
    sampled_of = {(p, seed): cli("--max-new-tokens", "30", "--seed", str(seed), prompt=p) for p in prompts[1:]
                  for seed in (1, 2)}
    stopped = cli("--max-new-tokens", "30", "--temperature", "0", "--stop", greedy[8:10])
    with server(run, "--max-new-tokens", "40") as (client, _):
        ask = lambda **kw: client.post("/v1/generate", json={"prompt": "The king", "max_new_tokens": 30, **kw})  # noqa: E731
        assert ask(temperature=0).json() == {"prompt": "The king", "text": greedy}
        assert ask(seed=7).json()["text"] == sampled
        assert ask(temperature=0, stop=[greedy[8:10]]).json()["text"] == stopped
        # concurrent greedy requests share forward passes (prompts of different lengths left-padded) and
        # still answer what each gets alone
        ask_greedy = lambda i: client.post("/v1/generate", json={  # noqa: E731
            "prompt": prompts[i % 3], "max_new_tokens": 30, "temperature": 0}).json()["text"]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            texts = list(pool.map(ask_greedy, range(24)))
        assert texts == [greedy_of[prompts[i % 3]] for i in range(24)]
        # so do sampled ones, each row drawing from its own request's seed
        cases = list(sampled_of) * 4
        ask_sampled = lambda case: client.post("/v1/generate", json={  # noqa: E731
            "prompt": case[0], "max_new_tokens": 30, "seed": case[1]}).json()["text"]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            texts = list(pool.map(ask_sampled, cases))
        assert texts == [sampled_of[case] for case in cases]
        assert client.get("/metadata").json()["stats"]["largest_batch"] > 1
        with client.stream("POST", "/v1/generate", json={"prompt": "The king", "max_new_tokens": 30, "seed": 7,
                                                         "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            got = events(response)
        assert got[-1] == {"done": True, "text": sampled}
        assert len(got) > 5 and "".join(e["text"] for e in got[:-1]) == sampled
        refused(ask(max_new_tokens=41), 422, "max_new_tokens", "at most 40")
        refused(ask(temperature="hot"), 422, "temperature", "valid number")
        refused(ask(top_p=1.5), 422, "top_p", "less than or equal to 1")
        refused(client.post("/v1/generate", json={"prompt": "x" * 300}), 422, "prompt", "at most 255")
        assert ask(temperature=0).json()["text"] == greedy


def test_a_hugging_face_folder_is_served_like_its_run(gpt, tmp_path, capsys):
    assert main(["export", str(gpt), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(gpt), "--prompt", "The", "--max-new-tokens", "20", "--temperature",
                 "0"]) == 0
    expected = capsys.readouterr().out.removesuffix("\n").removeprefix("The")
    with server(tmp_path / "hf") as (client, _):
        assert client.get("/metadata").json()["task"] == "clm"
        answer = client.post("/v1/generate", json={"prompt": "The", "max_new_tokens": 20, "temperature": 0}).json()
        assert answer["text"] == expected


def test_sigterm_finishes_the_request_in_flight(gpt):
    with server(gpt) as (client, proc):
        with client.stream("POST", "/v1/generate", json={"prompt": "The", "max_new_tokens": 250, "temperature": 0,
                                                         "stream": True}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # mid-generation
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert "text" in json.loads(first[6:]) and rest[-1]["done"] is True
        assert proc.wait(timeout=30) == 0


def test_serve_refuses_what_it_cannot_serve(tmp_path, encoder, classifier, capsys):
    capsys.readouterr()
    assert main(["serve", str(encoder), "--port", str(free_port())]) == 2  # refused from config.yaml, before loading
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mlm model, which answers no requests" in err and "lmforge finetune" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(classifier), "--port", str(taken.getsockname()[1])]) == 2
    assert "choose another --port" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nothing"), "--port", str(free_port())]) == 2
    assert "not a run directory" in capsys.readouterr().err
