"""lmforge export --format onnx with onnxruntime as the oracle's reader: the graph onnxruntime runs gives
lmforge's outputs to 1e-4 for a decoder (the whole padded prompt, then greedy decoding with the graph's KV
cache: the same tokens as lmforge's generate and each step's logits), a masked LM (logits and hidden states),
a LoRA classifier (written merged) and a tagger with adapters, on padded batches; the int8 graph runs and stays
close; and every refusal is one line that leaves nothing behind.

Each export traces the model with torch.onnx's exporter (torch.export), 15 to 40 s on a shared CPU, so those
tests are slow; the refusals, which are found before tracing, are not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_base, one_line_error
from lmforge.cli import main
from lmforge.data.tokenizer import SEQ2SEQ_SPECIALS
from lmforge.generate import generate
from lmforge.hf.onnx import CONFIG_FILE, INT8_FILE, MODEL_FILE, export_onnx, ort_session
from lmforge.io import save_weights
from lmforge.model.transformer import SequenceClassifier
from lmforge.runs import WEIGHTS, load_run
from lmforge.train.distributed import Dist, full_weights

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4
STEPS = 8  # greedy tokens generated


def assert_close(ours, theirs, what: str, tol: float = TOL) -> float:
    diff = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    print(f"max abs diff, {what}: {diff:.2e}")
    assert diff < tol, (what, diff)
    return diff


def run_of(root: Path, task: str, sections: dict | None = None, **model) -> Path:
    """A tiny run with noise on every weight (biases, norms and a LoRA's B are not at their start values)
    and a spread of logits wide enough that greedy choices are not near-ties."""
    run = make_base(root / task, task, sections=sections, **model)
    lm, _, _ = load_run(run)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=g, device="cpu") * 0.1)
    save_weights(full_weights(Dist(), lm), run / WEIGHTS, {"step": "0"})
    return run


def padded(vocab: int, lengths: list[int], seed: int = 0, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, max(lengths)] and their attention mask (1 at real tokens), padded on the right or left."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g, device="cpu")
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device="cpu")
    for i, n in enumerate(lengths):
        if left:
            mask[i, width - n:] = 1
        else:
            mask[i, :n] = 1
    return ids, mask


def read_info(out: Path) -> dict:
    return json.loads((out / CONFIG_FILE).read_text())


# -- decoders: the KV cache ----------------------------------------------------------------------------


def ort_greedy(session, info: dict, prompt: np.ndarray, mask: np.ndarray, steps: int):
    """Greedy decoding with onnxruntime and the graph's KV cache: the prompt with a past of 0 positions, then
    one token a step with the present returned as the next past. Returns the tokens [B, steps], each step's
    logits [B, V] and the prompt pass's logits [B, T, V]."""
    B = prompt.shape[0]
    empty = np.zeros((B, info["n_kv_head"], 0, info["head_dim"]), np.float32)
    past = {f"past_key_values.{i}.{kv}": empty for i in range(info["n_layer"]) for kv in ("key", "value")}
    names = [o.name for o in session.get_outputs()]
    ids, tokens, step_logits, first = prompt, [], [], None
    for _ in range(steps):
        out = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": mask, **past})))
        first = out["logits"] if first is None else first
        step_logits.append(out["logits"][:, -1])
        tokens.append(step_logits[-1].argmax(-1))
        past = {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}
        ids = tokens[-1][:, None]
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
    return np.stack(tokens, axis=1), step_logits, first


DECODERS = {
    # Llama's layout with grouped-query attention (1 KV head for 2 query heads), RoPE
    "clm": ("clm", None, dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1)),
    # GPT-2's layout (learned positions) and a prefix (peft.method prefix): keys that are never cached
    "sft-prefix": ("sft", {"peft": {"method": "prefix", "prefix_length": 3}},
                   dict(pos="learned", norm="layernorm", mlp="gelu", bias=True)),
}


@pytest.fixture(scope="module", params=list(DECODERS))
def decoder(request, tmp_path_factory):
    task, sections, model = DECODERS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    run = run_of(root, task, sections, **model)
    out = root / "onnx"
    assert main(["export", str(run), str(out), "--format", "onnx", "--quantize", "int8"]) == 0
    return run, out


@pytest.mark.slow
def test_decoder_graph_generates_lmforges_greedy_tokens_with_its_kv_cache(decoder):
    run, out = decoder
    lm, _, _ = load_run(run)
    info = read_info(out)
    assert info["graph"] == "decoder" and info["padding"] == "left" and info["files"] == {"float32": MODEL_FILE,
                                                                                          "int8": INT8_FILE}
    session = ort_session(out / MODEL_FILE)
    # two prompts, the second left-padded; then one prompt of one token (the graph was traced with more)
    for lengths in ([6, 4], [1]):
        prompt, mask = padded(lm.cfg.vocab_size, lengths, seed=2, left=True)
        left_pad = (mask == 0).sum(1)
        ours = generate(lm, prompt, STEPS, temperature=0, left_pad=left_pad)
        tokens, step_logits, first = ort_greedy(session, info, prompt.numpy(), mask.numpy(), STEPS)
        assert np.array_equal(tokens, ours.numpy()), (lengths, tokens, ours)
        with torch.no_grad():  # lmforge's logits of the whole sequence at once: the prompt's and each step's
            logits = lm(torch.cat([prompt, ours], dim=1), left_pad=left_pad)
        T = prompt.shape[1]
        assert_close(first, logits[:, :T], f"decoder, the logits of prompts {lengths}")
        for k, step in enumerate(step_logits):
            assert_close(step, logits[:, T - 1 + k], f"decoder, step {k} logits (KV cache)")
    # the int8 graph decodes with the same cache, close to the fp32 one
    _, int8_logits, _ = ort_greedy(ort_session(out / INT8_FILE), info, prompt.numpy(), mask.numpy(), 1)
    scale = float(np.abs(step_logits[0]).max())
    assert_close(int8_logits[0], step_logits[0], "decoder, int8 against fp32 logits", tol=0.1 * scale)


# -- encoders, classifiers, taggers --------------------------------------------------------------------


@pytest.mark.slow
def test_masked_lm_graph_gives_lmforges_logits_and_hidden_states(tmp_path):
    run = run_of(tmp_path, "mlm")  # BERT's layout, with segments
    lm, _, _ = load_run(run)
    info = export_onnx(run, tmp_path / "onnx")
    assert sorted(info["inputs"]) == ["attention_mask", "input_ids", "token_type_ids"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [MODEL_FILE, CONFIG_FILE, "tokenizer.json"]
    ids, mask = padded(lm.cfg.vocab_size, [9, 5, 7], seed=3)
    segments = (torch.arange(9, device="cpu") >= 4).long().expand(3, -1).contiguous()
    logits, hidden = ort_session(tmp_path / "onnx" / MODEL_FILE).run(
        ["logits", "last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                          "token_type_ids": segments.numpy()})
    with torch.no_grad():
        ours = lm.features(ids, segments=segments, pad_mask=mask.bool())
        assert_close(hidden, ours, "masked LM, hidden states")
        assert_close(logits, lm.mlm_head(ours), "masked LM, logits")


@pytest.mark.slow
def test_lora_classifier_graph_is_the_merged_model_and_int8_keeps_its_predictions(tmp_path, capsys):
    labels = ["neg", "neutral", "pos"]
    run = run_of(tmp_path, "classify", {"finetune": {"labels": labels, "body": "encoder", "pooling": "mean"},
                                        "peft": {"method": "lora"}}, type_vocab_size=2)
    lm, _, _ = load_run(run)  # LoRA unmerged: the graph holds the merged weights
    assert isinstance(lm, SequenceClassifier)
    out = tmp_path / "onnx"
    assert main(["export", str(run), str(out), "--format", "onnx", "--quantize", "int8"]) == 0
    assert "ONNX classifier graph" in capsys.readouterr().out
    info = read_info(out)
    assert info["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"} and info["pooling"] == "mean"
    ids, mask = padded(lm.cfg.vocab_size, [11, 3, 7, 1], seed=4)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())}
    (logits,) = ort_session(out / MODEL_FILE).run(None, feeds)
    with torch.no_grad():
        ours = lm(ids, pad_mask=mask.bool())  # no segments: segment 0, as token_type_ids of zeros
    assert_close(logits, ours, "classifier (LoRA, merged), logits on a padded batch")
    (int8,) = ort_session(out / INT8_FILE).run(None, feeds)
    assert_close(int8, logits, "classifier, int8 against fp32 logits", tol=0.1 * float(np.abs(logits).max()))


@pytest.mark.slow
def test_tagger_graph_with_adapters_gives_lmforges_tag_logits(tmp_path):
    run = run_of(tmp_path, "tag", {"finetune": {"labels": ["O", "B-PER", "I-PER"], "body": "decoder"},
                                   "peft": {"method": "adapter"}})
    lm, _, _ = load_run(run)
    export_onnx(run, tmp_path / "onnx")
    session = ort_session(tmp_path / "onnx" / MODEL_FILE)
    for lengths in ([4, 10], [1]):  # a batch of one token: traced with more, the graph is no less causal
        ids, mask = padded(lm.cfg.vocab_size, lengths, seed=5)
        (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            assert_close(logits, lm(ids, pad_mask=mask.bool()), f"tagger (causal, adapters), logits of {lengths}")


# -- refusals: one line, exit 2, nothing written -------------------------------------------------------


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals")
    return {"clm": make_base(root / "clm", "clm"),
            "s2s": make_base(root / "s2s", "seq2seq", specials=list(SEQ2SEQ_SPECIALS)),
            "short": make_base(root / "short", "clm", max_seq_len=6)}


@pytest.mark.parametrize("run, args, expected", [
    ("clm", ["--quantize", "int8"], ["--quantize int8 applies to --format onnx"]),
    ("clm", ["--format", "llama", "--quantize", "int8"], ["--quantize int8 applies to --format onnx", "--format llama"]),
    ("s2s", ["--format", "onnx"], ["a seq2seq model (encoder_decoder) has no ONNX graph lmforge writes"]),
    ("short", ["--format", "onnx"], ["model.max_seq_len = 6", "traces the model on 8 positions"]),
], ids=["quantize-without-onnx", "quantize-with-a-hf-layout", "encoder-decoder", "context-too-short"])
def test_export_refusals_are_one_line_and_write_nothing(small_runs, tmp_path, capsys, run, args, expected):
    line = one_line_error(capsys, ["export", str(small_runs[run]), str(tmp_path / "out"), *args], *expected)
    if "--format" in args and "onnx" in args:
        assert str(small_runs[run]) in line
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_pip_extra(small_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is not installed
    one_line_error(capsys, ["export", str(small_runs["clm"]), str(tmp_path / "out"), "--format", "onnx"],
                   "needs the onnxruntime package", "pip install 'lmforge[onnx]'")
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_not_empty_is_refused_before_loading(small_runs, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    one_line_error(capsys, ["export", str(small_runs["clm"]), str(tmp_path / "out"), "--format", "onnx"],
                   "not an empty folder")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.slow  # the exporter runs until it meets the branch
def test_a_model_the_exporter_cannot_trace_is_one_line_naming_the_run(small_runs, tmp_path, capsys, monkeypatch):
    """A forward that branches on a tensor's value (torch.export cannot trace data-dependent control flow)."""
    from lmforge.model.transformer import GPT

    forward = GPT.forward

    def branching(self, idx, caches=None, left_pad=None):
        logits = forward(self, idx, caches, left_pad)
        return logits if bool(logits.sum() > 0) else -logits

    monkeypatch.setattr(GPT, "forward", branching)
    one_line_error(capsys, ["export", str(small_runs["clm"]), str(tmp_path / "out"), "--format", "onnx"],
                   str(small_runs["clm"]), "the ONNX exporter cannot trace this model")
    assert list(tmp_path.iterdir()) == []
