"""Decoding: the KV cache changes nothing but speed; greedy, top-k and top-p sample what they promise;
stop strings and context limits behave; `lmforge generate` prints a continuation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import shakespeare_text, synthetic_text, tiny_config, write_corpus
from lmforge.cli import main
from lmforge.data.tokenizer import eos_id, train_tokenizer
from lmforge.errors import UserError
from lmforge.generate import generate, generate_text, sample_next
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import GPT
from lmforge.runs import load_run
from lmforge.train.loop import train

VOCAB = 50


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False).ids
CONFIGS = {
    "learned": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "rope-gqa-rms-swiglu": dict(pos="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False,
                                tie_embeddings=False),
}


def make_model(kind: str, seed: int = 0, **extra) -> GPT:
    # a larger init std than training uses spreads the logits, so greedy choices are far from ties
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=48, n_layer=2, n_head=4, d_model=32, init_std=0.2,
                      **{**CONFIGS[kind], **extra})
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def greedy_oracle(model, prompt, n):
    """Greedy decoding the slow, obvious way: the whole sequence through the model for every token."""
    seq = prompt
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("kind", CONFIGS)
def test_left_padded_rows_decode_as_if_alone(kind):
    """Prompts of different lengths decoded together (left-padded, the server's batching) give each row
    the logits and the greedy tokens it gets alone, with and without the cache."""
    model = make_model(kind)
    torch.manual_seed(2)
    prompts = [torch.randint(VOCAB, (n,)).tolist() for n in (9, 3, 6)]
    width = max(map(len, prompts))
    pads = torch.tensor([width - len(p) for p in prompts])
    batch = torch.tensor([[7] * (width - len(p)) + p for p in prompts])
    with torch.no_grad():
        logits = model(batch, left_pad=pads)
    for row, p in enumerate(prompts):
        with torch.no_grad():
            alone = model(torch.tensor([p]))
        torch.testing.assert_close(logits[row, -len(p):], alone[0], atol=1e-5, rtol=1e-5)
    for use_cache in (True, False):
        together = generate(model, batch, 12, temperature=0.0, left_pad=pads, use_cache=use_cache)
        for row, p in enumerate(prompts):
            assert together[row].tolist() == greedy_oracle(model, torch.tensor([p]), 12)[0].tolist()
    # sampled: a generator per row draws for that row what the same seed draws for the prompt alone
    seeded = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = generate(model, batch, 12, temperature=1.0, left_pad=pads, generator=seeded([5, 6, 7]))
    for row, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), 12, temperature=1.0, generator=seeded([5 + row])[0])
        assert together[row].tolist() == alone[0].tolist()
    assert together[0].tolist() != together[2].tolist()  # the seeds differ, so do the samples


@pytest.mark.parametrize("kind", CONFIGS)
def test_cached_logits_equal_full_forward(kind):
    model = make_model(kind)
    torch.manual_seed(1)
    idx = torch.randint(VOCAB, (2, 20))
    with torch.no_grad():
        full = model(idx)
        # prefill 5 tokens, then one token at a time
        caches = model.new_caches(2, 20)
        steps = [model(idx[:, :5], caches)] + [model(idx[:, t:t + 1], caches) for t in range(5, 20)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
        # chunks after a cached prefix (the offset causal mask)
        caches = model.new_caches(2, 20)
        chunks = [model(idx[:, a:b], caches) for a, b in ((0, 3), (3, 11), (11, 12), (12, 20))]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    if kind != "learned":
        assert caches[0].k.shape == (2, 2, 20, 8)  # the cache holds n_kv_head heads, not n_head


@pytest.mark.parametrize("kind", CONFIGS)
def test_greedy_with_cache_equals_without_and_batched_rows(kind):
    model = make_model(kind)
    torch.manual_seed(2)
    prompt = torch.randint(VOCAB, (3, 6))
    with_cache = generate(model, prompt, 30, temperature=0.0, use_cache=True)
    without = generate(model, prompt, 30, temperature=0.0, use_cache=False)
    assert with_cache.shape == (3, 30)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache, greedy_oracle(model, prompt, 30))
    for row in range(3):
        assert torch.equal(generate(model, prompt[row:row + 1], 30, temperature=0.0)[0], with_cache[row])
    assert len(set(with_cache.flatten().tolist())) > 3  # not a degenerate constant output


def test_generation_is_bounded_by_the_context_and_restores_training_mode():
    model = make_model("learned").train()
    out = generate(model, torch.zeros(1, 40, dtype=torch.long), 100, temperature=0.0)
    assert out.shape == (1, 8)  # 48 - 40
    assert model.training


def test_prompt_that_fills_the_context_is_a_user_error():
    model = make_model("rope-gqa-rms-swiglu")
    with pytest.raises(UserError, match="48"):
        generate(model, torch.zeros(1, 48, dtype=torch.long), 5)
    with pytest.raises(UserError):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 5)


def test_bad_sampling_settings_are_user_errors():
    model = make_model("learned")
    prompt = torch.zeros(1, 3, dtype=torch.long)
    for kwargs in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(UserError, match="top_"):
            generate(model, prompt, 5, **kwargs)


def test_stop_ids_end_rows_and_repeat_their_stop_token():
    model = make_model("learned")
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = generate(model, prompt, 20, temperature=0.0)
    stop = int(free[0, 4])  # row 0 emits this at step 5 (or earlier)
    first = int((free[0] == stop).nonzero()[0])
    out = generate(model, prompt, 20, temperature=0.0, stop_ids={stop})
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first:] == stop).all()
    # row 1 goes on as before until it stops too or the output ends
    hits = (free[1] == stop).nonzero()
    end = int(hits[0]) + 1 if len(hits) else out.shape[1]
    assert torch.equal(out[1, :end], free[1, :end])


def test_top_k_1_equals_greedy():
    torch.manual_seed(3)
    logits = torch.randn(64, 100) * 3
    g = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 3.0):
        assert torch.equal(sample_next(logits, temperature, top_k=1, generator=g), logits.argmax(-1))
    model = make_model("rope-gqa-rms-swiglu")
    prompt = torch.randint(VOCAB, (2, 4))
    sampled = generate(model, prompt, 20, temperature=0.9, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sampled, generate(model, prompt, 20, temperature=0.0))


def test_top_k_and_top_p_sample_only_inside_their_sets():
    probs = torch.tensor([0.42, 0.28, 0.15, 0.10, 0.05])
    perm = torch.tensor([3, 0, 4, 2, 1])
    # row 0 in sorted order, row 1 the same distribution with the tokens permuted
    logits = torch.stack([probs.log(), probs[perm].log()]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)

    # nucleus for top_p = 0.75: the smallest prefix of the sorted tokens whose mass reaches 0.75
    out = sample_next(logits, 1.0, top_p=0.75, generator=g).view(2000, 2)
    assert set(out[:, 0].tolist()) == {0, 1, 2}
    assert set(out[:, 1].tolist()) == {int((perm == t).nonzero()) for t in (0, 1, 2)}
    share = (out[:, 0] == 0).float().mean().item()
    assert share == pytest.approx(0.42 / 0.85, abs=0.04)  # renormalised inside the nucleus

    assert set(sample_next(logits, 1.0, top_p=0.3, generator=g).view(2000, 2)[:, 0].tolist()) == {0}
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).view(2000, 2)[:, 0].tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, generator=g).view(2000, 2)[:, 0].tolist()) == {0, 1, 2, 3, 4}


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer([synthetic_text(5000)], "char", 100, ["<|endoftext|>"])


def char_model(tok, **extra):
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), max_seq_len=64, n_layer=2, n_head=2, d_model=32,
                      init_std=0.2, **extra)
    torch.manual_seed(0)
    return GPT(cfg).eval()


def test_stop_strings_cut_the_text(char_tok):
    model = char_model(char_tok)
    free = generate_text(model, char_tok, "the king", 50, temperature=0.0, stop_at_eos=False)
    assert len(free) == 50
    stop = free[20:22]
    cut = free.index(stop)

    calls = 0
    forward = model.forward

    def counting_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        return forward(*args, **kwargs)

    model.forward = counting_forward
    text = generate_text(model, char_tok, "the king", 50, temperature=0.0, stop_at_eos=False, stop=[stop])
    assert text == free[:cut]
    assert calls <= cut + len(stop) + 1  # generation ended at the stop string, not at max_new_tokens
    assert generate_text(model, char_tok, "the king", 50, temperature=0.0, stop_at_eos=False,
                         stop=["never produced \u2603", stop]) == free[:cut]


class ScriptedLM(torch.nn.Module):
    """A stand-in model that continues any prompt with a fixed script of token ids, then `filler`."""

    def __init__(self, script, vocab, filler):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.cfg = SimpleNamespace(max_seq_len=64)
        self.script, self.vocab, self.filler, self.prompt_len = script, vocab, filler, None

    def new_caches(self, batch, max_len=None):
        return [SimpleNamespace(length=0)]

    def forward(self, idx, caches=None):
        B, T = idx.shape
        start = caches[0].length if caches else 0
        if caches:
            caches[0].length += T
        if start == 0:
            self.prompt_len = self.prompt_len or T
        logits = torch.full((B, T, self.vocab), -10.0)
        for t in range(T):
            k = start + t + 1 - self.prompt_len  # the index in the script of the token after position start + t
            logits[:, t, self.script[k] if 0 <= k < len(self.script) else self.filler] = 10.0
        return logits


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_text_cuts_at_end_of_text_and_stop_strings(char_tok, use_cache):
    eos, dot = eos_id(char_tok), char_tok.token_to_id(".")
    script = ids_of(char_tok, "the king is dead") + [eos] + ids_of(char_tok, "long life")

    def run(**kwargs):
        model = ScriptedLM(script, char_tok.get_vocab_size(), dot)
        kwargs.setdefault("max_new_tokens", 40)
        return generate_text(model, char_tok, "so", temperature=0.0, use_cache=use_cache, **kwargs)

    assert run() == "the king is dead"
    assert run(stop_at_eos=False) == "the king is dead\nlong life" + "." * (40 - len(script))
    assert run(stop=["is"]) == "the king "
    assert run(stop=["dead"]) == "the king is "
    assert run(stop=["life"], stop_at_eos=False) == "the king is dead\nlong "
    assert run(max_new_tokens=3) == "the"


def test_empty_prompt_starts_from_end_of_text(char_tok):
    model = char_model(char_tok)
    eos = eos_id(char_tok)
    from_empty = generate_text(model, char_tok, "", 20, temperature=0.0, stop_at_eos=False)
    assert from_empty == generate_text(model, char_tok, [eos], 20, temperature=0.0, stop_at_eos=False)
    no_eos = train_tokenizer(["abc"], "char", 10, [])
    with pytest.raises(UserError, match="empty"):
        generate_text(char_model(no_eos), no_eos, "", 5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(tmp, shakespeare_text(60_000))
    cfg = tiny_config(tmp, corpus, model__n_layer=2, model__n_head=4, model__d_model=48, model__max_seq_len=64,
                      model__pos="rope", model__n_kv_head=2, model__norm="rmsnorm", model__mlp="swiglu",
                      train__batch_size=16, train__max_steps=40, train__lr=1e-2, train__min_lr=1e-3,
                      train__warmup_steps=4)
    return train(cfg).run_dir


@pytest.mark.slow  # the module's trained_run: 40 training steps
def test_trained_model_cache_equals_no_cache(trained_run):
    model, tok, cfg = load_run(trained_run)
    assert cfg.model.pos == "rope" and not model.training
    prompts = ["ROMEO:\n", "First Citizen:\nWe are", "KING"]
    for p in prompts:
        a = generate_text(model, tok, p, 40, temperature=0.0, use_cache=True)
        b = generate_text(model, tok, p, 40, temperature=0.0, use_cache=False)
        assert a == b


@pytest.mark.slow  # the module's trained_run: 40 training steps
def test_cli_generate_prints_a_continuation(trained_run, capsys):
    model, tok, _ = load_run(trained_run)
    expected = generate_text(model, tok, "ROMEO:", 40, temperature=0.0)
    argv = ["generate", "--checkpoint", str(trained_run), "--prompt", "ROMEO:", "--max-new-tokens", "40",
            "--temperature", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out == "ROMEO:" + expected + "\n"
    assert len(expected) > 10
    assert main(argv + ["--no-cache"]) == 0
    assert capsys.readouterr().out == out

    # the best weights file itself is accepted too
    assert main(argv[:2] + [str(trained_run / "model.safetensors")] + argv[3:]) == 0
    assert capsys.readouterr().out == out

    ckpt = next((trained_run / "checkpoints").glob("step_*.pt"))
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "KING", "--max-new-tokens", "20",
                 "--num-samples", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("KING") >= 2


@pytest.mark.slow  # the module's trained_run: 40 training steps
def test_cli_generate_reports_bad_settings_in_one_line(trained_run, capsys):
    assert main(["generate", "--checkpoint", str(trained_run), "--top-p", "0"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == ("lmforge: error: generate: argument --top-p: 0: must be in [1e-06, 1] "
                                         "(see lmforge generate --help)\n")
    long_prompt = "x" * 64  # the model's context is 64 characters
    assert main(["generate", "--checkpoint", str(trained_run), "--prompt", long_prompt]) == 2
    assert capsys.readouterr().err.startswith("lmforge: error: generate: the prompt has 64 tokens")


@pytest.mark.slow  # the module's trained_run: 40 training steps
def test_cli_generate_with_damaged_weights_is_one_line(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    (run / "model.safetensors").write_bytes(b"garbage" * 10)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "A"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: checkpoint: ") and "model.safetensors" in err
