"""`lmforge export` of encoder-decoders as transformers' BartForConditionalGeneration, checked against
transformers itself: teacher-forced logits equal lmforge's on a padded batch, and generate() (greedy and beam
search, with the folder's generation_config.json or other beam widths and length penalties) gives lmforge's
decoding token for token; layouts BART cannot hold are refused in one line and nothing is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import make_base, number_pairs, one_line_error
from lmforge.cli import main
from lmforge.data.tokenizer import SEQ2SEQ_SPECIALS, seq2seq_special_ids
from lmforge.generate import beam_search, greedy_decode, translate
from lmforge.hf.export import export_hf
from lmforge.io import save_weights
from lmforge.runs import WEIGHTS, load_run
from lmforge.tasks.seq2seq import collate
from lmforge.train.distributed import Dist, full_weights

transformers = pytest.importorskip("transformers")

BART = dict(pos="learned", norm="layernorm", norm_position="post", mlp="gelu", bias=True, max_seq_len=40)
PAIRS = number_pairs(400, 0)
TEXTS = [s for pair in PAIRS for s in pair]
SOURCES = [s for s, _ in number_pairs(6, 1)]


def encoded(tok, texts: list[str], eos: int) -> list[list[int]]:
    return [e.ids + [eos] for e in tok.encode_batch(texts, add_special_tokens=False)]


def ending_at_times(run: Path, scale: float = 4.0) -> None:
    """Random weights with </s>'s output row scaled up, so that its logit swings with the context: hypotheses
    end at different lengths, some beams end before greedy's and the length penalty changes which wins (about
    what an early training step gives, without its time)."""
    model, tok, _ = load_run(run)
    with torch.no_grad():
        model.head.weight[seq2seq_special_ids(tok)[2]] *= scale
    save_weights(full_weights(Dist(), model), run / WEIGHTS, {"step": "0"})


def base(tmp: Path, task: str = "seq2seq", sections: dict | None = None, **model) -> Path:
    return make_base(tmp / "run", task, specials=SEQ2SEQ_SPECIALS, texts=TEXTS, sections=sections, **model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (run, export). bart: BART's own layout (biases, tied output), beam 4 and length penalty 0.6 in its
    config. plain: no biases but q, k, v ones, an untied output, ReLU, a deeper decoder. span: a span-corruption
    run."""
    runs = {
        "bart": dict(sections={"seq2seq": {"beam_size": 4, "length_penalty": 0.6}}, **BART),
        "plain": dict(sections={"seq2seq": {"decoder_layers": 3}},
                      **{**BART, "bias": False, "qkv_bias": True, "tie_embeddings": False, "mlp": "relu"}),
        "span": dict(task="span", **BART),
    }
    out = {}
    for name, settings in runs.items():
        tmp = tmp_path_factory.mktemp(name)
        run = base(tmp, init_std=0.1, **settings)
        ending_at_times(run)
        export_hf(run, tmp / "hf")
        out[name] = run, tmp / "hf"
    return out


def loaded(pair: tuple[Path, Path]):
    run, folder = pair
    model, tok, cfg = load_run(run)
    hf, info = transformers.BartForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    hf.eval()
    return model.eval(), tok, cfg, hf, transformers.AutoTokenizer.from_pretrained(folder)


def padded_sources(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    pad, _, eos = seq2seq_special_ids(tok)
    rows = encoded(tok, texts, eos)
    batch = collate(rows, rows, pad, seq2seq_special_ids(tok)[1])
    return batch["input"], batch["source_mask"]


@pytest.mark.parametrize("name", ["bart", "plain", "span"])
def test_teacher_forced_logits_equal_lmforge_on_a_padded_batch(exported, name):
    model, tok, _, hf, _ = loaded(exported[name])
    pad, bos, eos = seq2seq_special_ids(tok)
    pairs = number_pairs(5, 2)
    batch = collate(encoded(tok, [s for s, _ in pairs], eos), encoded(tok, [t for _, t in pairs], eos), pad, bos)
    assert not batch["source_mask"].all()  # sources of different lengths: padding is masked
    with torch.no_grad():
        ours = model(batch["input"], batch["decoder_input"], batch["source_mask"])
        theirs = hf(input_ids=batch["input"], attention_mask=batch["source_mask"].long(),
                    decoder_input_ids=batch["decoder_input"]).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_the_folder_says_how_lmforge_decodes(exported):
    _, tok, cfg, hf, hf_tok = loaded(exported["bart"])
    pad, bos, eos = seq2seq_special_ids(tok)
    gen = hf.generation_config
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (bos, eos, pad)
    assert (gen.num_beams, gen.length_penalty, gen.early_stopping) == (4, 0.6, True)
    assert gen.forced_eos_token_id is None and gen.forced_bos_token_id is None
    assert gen.max_length == cfg.model.max_seq_len
    # the HF tokenizer ends a source with </s>, as lmforge's encoder reads it
    assert hf_tok(SOURCES)["input_ids"] == encoded(tok, SOURCES, eos)
    batch = hf_tok(SOURCES, padding=True, return_tensors="pt")
    source, mask = padded_sources(tok, SOURCES)
    assert torch.equal(batch["input_ids"], source) and torch.equal(batch["attention_mask"].bool(), mask)
    span = loaded(exported["span"])[3].generation_config
    assert span.num_beams == 1


def hypotheses(generated: torch.Tensor, eos: int) -> list[list[int]]:
    """generate()'s rows as lmforge returns hypotheses: without the start token, cut before </s> (what follows
    it is filler: the pad id, or </s> itself where beam search's fill falls back to it when the pad id is 0)."""
    rows = [row[1:] for row in generated.tolist()]
    return [row[:row.index(eos)] if eos in row else row for row in rows]


@pytest.mark.parametrize("name", ["bart", "plain"])
@pytest.mark.parametrize("beams, penalty", [(None, None), (1, None), (4, 1.0), (4, 2.0), (3, 0.0)])
def test_generate_gives_lmforges_beam_search(exported, name, beams, penalty):
    """(None, None): the folder's generation_config.json alone (trained: beam 4, length penalty 0.6)."""
    model, tok, cfg, hf, _ = loaded(exported[name])
    pad, bos, eos = seq2seq_special_ids(tok)
    source, mask = padded_sources(tok, SOURCES)
    limit = 14
    k = beams or hf.generation_config.num_beams
    lp = penalty if penalty is not None else hf.generation_config.length_penalty
    lengths = torch.full((len(SOURCES),), limit, device="cpu")
    ours = (greedy_decode(model, source, mask, bos, eos, lengths) if k == 1 else
            beam_search(model, source, mask, bos, eos, lengths, beam_size=k, length_penalty=lp))
    options = {} if beams is None else {"num_beams": beams} | ({} if penalty is None else {"length_penalty": penalty})
    with torch.no_grad():
        theirs = hf.generate(input_ids=source, attention_mask=mask.long(), max_new_tokens=limit, **options)
    assert hypotheses(theirs, eos) == ours
    if beams is None:  # a search that matters: hypotheses that end before the limit, and not greedy's
        assert any(len(h) < limit for h in ours) and ours != greedy_decode(model, source, mask, bos, eos, lengths)


def test_generate_per_sentence_gives_lmforge_translate(exported):
    """lmforge caps each sentence at max_length_ratio x its source tokens + 10; generate() with that many new
    tokens, on the HF tokenizer's ids, decodes to translate()'s text."""
    model, tok, cfg, hf, hf_tok = loaded(exported["bart"])
    ours = translate(model, tok, SOURCES[:3], beam_size=cfg.seq2seq.beam_size,
                     length_penalty=cfg.seq2seq.length_penalty, max_length_ratio=cfg.seq2seq.max_length_ratio)
    theirs = []
    for text in SOURCES[:3]:
        ids = hf_tok(text, return_tensors="pt")
        cap = min(math.ceil(cfg.seq2seq.max_length_ratio * ids["input_ids"].shape[1]) + 10, cfg.model.max_seq_len - 1)
        with torch.no_grad():
            out = hf.generate(**ids, max_new_tokens=cap)
        theirs.append(hf_tok.decode(out[0], skip_special_tokens=True).strip())
    assert theirs == ours


def test_lmforges_default_encoder_decoder_is_refused_with_what_bart_needs(tmp_path, capsys):
    run = base(tmp_path, sections={"seq2seq": {"source_vocab_size": 300}})  # RoPE, RMSNorm, SwiGLU, pre-norm
    out = tmp_path / "hf"
    line = one_line_error(capsys, ["export", str(run), str(out)], "BartForConditionalGeneration", "model.pos = learned",
                          "model.norm = layernorm", "model.norm_position = post", "model.mlp = gelu or gelu_tanh or relu",
                          "seq2seq.source_vocab_size = 0", "bart-tiny")
    assert "model.bias" not in line  # biases lmforge has not are written as zeros
    assert not out.exists()


def test_an_encoder_decoder_has_no_decoder_only_format(tmp_path, capsys):
    run = base(tmp_path, **BART)
    one_line_error(capsys, ["export", str(run), str(tmp_path / "hf"), "--format", "llama"], "--format llama",
                   "encoder-decoder", "auto")
    assert not (tmp_path / "hf").exists()


def test_export_prints_how_to_generate(tmp_path, capsys):
    run = base(tmp_path, **BART)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "BartForConditionalGeneration" in printed and "generate" in printed
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["decoder_start_token_id"] == config["bos_token_id"]
