"""lmforge's encoder-decoder (model/seq2seq.py) as transformers' BartForConditionalGeneration: the weight
tables, config.json, generation_config.json and the tokenizer of the folder `hf.export.export_hf` writes for
a seq2seq or span run. No files are written here.

Why BART: of transformers' encoder-decoders it is the one whose maths equals a layout lmforge trains. BART is
post-norm (a LayerNorm after each residual add, none at the end), normalises the embeddings (lmforge's
post-norm `emb_norm`), has learned positions in each stack (HF's table has two extra rows first: position p
reads row p + 2), one embedding shared by both stacks and tied to the output, biases everywhere (lmforge's
missing ones are written as zeros, which add nothing), LayerNorm eps 1e-5 and no embedding scaling (scale_embedding
false). Marian, Pegasus, M2M100 and FSMT have fixed sinusoidal positions, which lmforge has not; mBART is pre-norm
but also normalises the embeddings, which a pre-norm lmforge stack does not; T5 uses relative position buckets.
lmforge's default RoPE / RMSNorm / SwiGLU / pre-norm encoder-decoder therefore has no transformers class, and
export says which model.* values it would need (the `bart-tiny` and `bart-base` presets have them).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from lmforge.data.tokenizer import SEQ2SEQ_SPECIALS, seq2seq_special_ids
from lmforge.hf import keymap
from lmforge.hf.arch import ACTIVATIONS, Arch
from lmforge.hf.layouts import BART_CLASS  # layouts.BART_LAYOUT: the model.* values BART needs
from lmforge.hf.tokenizer import ending_with

CLASS = BART_CLASS
POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding reads row position + 2


def _layers(side: str) -> dict:
    """The weight table of one stack's blocks: lmforge name -> BART name(s), `{i}` the layer."""
    layer = f"model.{side}.layers.{{i}}"
    table = {
        "blocks.{i}.attn.qkv": tuple(f"{layer}.self_attn.{p}_proj" for p in "qkv"),
        "blocks.{i}.attn.proj": f"{layer}.self_attn.out_proj",
        "blocks.{i}.norm1": f"{layer}.self_attn_layer_norm",
        "blocks.{i}.mlp.up": f"{layer}.fc1",
        "blocks.{i}.mlp.down": f"{layer}.fc2",
        "blocks.{i}.norm2": f"{layer}.final_layer_norm",
    }
    if side == "decoder":  # cross-attention: lmforge's kv is k and v stacked
        table.update({
            "blocks.{i}.cross.q": f"{layer}.encoder_attn.q_proj",
            "blocks.{i}.cross.kv": (f"{layer}.encoder_attn.k_proj", f"{layer}.encoder_attn.v_proj"),
            "blocks.{i}.cross.proj": f"{layer}.encoder_attn.out_proj",
            "blocks.{i}.norm_cross": f"{layer}.encoder_attn_layer_norm",
        })
    return table


def _stack(side: str, tok_emb: str) -> Arch:
    """One stack's table as an Arch, so that hf.keymap maps it (the blocks of `model.encoder` or
    `model.decoder`, each with its own depth)."""
    return Arch(
        name="bart", title=f"BART {side}", task="seq2seq", classes=(CLASS,), model_types=("bart",), prefix="model.",
        weights={"tok_emb": tok_emb, "pos_emb": f"model.{side}.embed_positions",
                 "emb_norm": f"model.{side}.layernorm_embedding", **_layers(side)},
        config={}, fixed={}, layout={})


# the decoder's token embedding is the encoder's (one vocabulary; a separate one is refused)
ENCODER, DECODER = _stack("encoder", "model.shared"), _stack("decoder", "model.decoder.embed_tokens")

EMBEDDINGS = ("shared.weight", "embed_tokens.weight", "embed_positions.weight")  # the only BART weights without a bias


def tensors(model) -> dict[str, torch.Tensor]:
    """An EncoderDecoder's weights under BART's names: biases lmforge has not are zeros, the position tables
    get BART's two leading rows (never read), final_logits_bias is zeros; a tied output weight is left out
    (from_pretrained ties lm_head to model.shared again)."""
    out = {}
    for stack, arch in ((model.encoder, ENCODER), (model.decoder, DECODER)):
        mapping, _ = keymap.mapping(arch, stack)
        out.update(keymap.to_hf({k: p.detach() for k, p in stack.named_parameters()}, mapping, arch, stack.cfg))
    # the one token embedding under all three names: transformers ties the stacks' embed_tokens to model.shared
    # only while tie_word_embeddings is true (an untied output leaves all three untied)
    out["model.encoder.embed_tokens.weight"] = out["model.shared.weight"]
    for side in ("encoder", "decoder"):
        key = f"model.{side}.embed_positions.weight"
        out[key] = torch.cat([out[key].new_zeros(POSITION_OFFSET, out[key].shape[1]), out[key]])
    for key in [k for k in out if k.endswith(".weight") and not k.endswith(EMBEDDINGS)]:
        out.setdefault(key[:-len("weight")] + "bias", out[key].new_zeros(out[key].shape[0]))
    head = model.head.weight.detach()
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = head
    out["final_logits_bias"] = head.new_zeros(1, head.shape[0])
    return out


def token_ids(tok: Tokenizer) -> dict[str, int]:
    """How lmforge starts and stops decoding: the decoder starts from <s>, a hypothesis ends at </s>."""
    pad, bos, eos = seq2seq_special_ids(tok)
    return {"pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos, "decoder_start_token_id": bos}


# generate's additions that lmforge's decoding never makes: BartConfig's defaults force token 2 at max_length.
# transformers 5 reads them from generation_config.json, older versions from config.json: null in both.
NO_FORCED_TOKENS = {"forced_bos_token_id": None, "forced_eos_token_id": None}


def config(model, tok: Tokenizer) -> dict:
    m = model.cfg
    activation = next(name for name, mlp in ACTIVATIONS.items() if mlp == m.mlp)
    return {
        "architectures": [CLASS], "model_type": "bart", "is_encoder_decoder": True,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len, "d_model": m.d_model,
        "encoder_layers": model.encoder.cfg.n_layer, "decoder_layers": model.decoder.cfg.n_layer,
        "encoder_attention_heads": m.n_head, "decoder_attention_heads": m.n_head,
        "encoder_ffn_dim": m.d_ff, "decoder_ffn_dim": m.d_ff, "activation_function": activation,
        # lmforge's one dropout is on the embeddings, attention and residual branches; it has none after the
        # MLP's activation
        "dropout": m.dropout, "attention_dropout": m.dropout, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "init_std": m.init_std,
        "scale_embedding": False, "tie_word_embeddings": m.tie_embeddings, "use_cache": True,
        **token_ids(tok), **NO_FORCED_TOKENS, "torch_dtype": "float32", "dtype": "float32",
    }


def generation_config(cfg, tok: Tokenizer) -> dict:
    """generate()'s defaults = lmforge's decoding (generate.beam_search): the run's beam size and length
    penalty; early_stopping true (a source is done with num_beams ended hypotheses, as in lmforge); max_length
    the model's context. lmforge also caps each sentence at seq2seq.max_length_ratio x its source tokens + 10,
    which generate cannot say per sentence: pass max_new_tokens for that."""
    beams = cfg.seq2seq.beam_size if cfg.task == "seq2seq" else 1
    out = {**token_ids(tok), **NO_FORCED_TOKENS, "max_length": cfg.model.max_seq_len, "min_length": 0,
           "num_beams": beams, "do_sample": False, "no_repeat_ngram_size": 0}
    if beams > 1:  # transformers warns about beam settings on greedy decoding
        out.update(length_penalty=cfg.seq2seq.length_penalty, early_stopping=True)
    return out


def special_tokens(tok: Tokenizer) -> dict[str, str]:
    roles = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token"), SEQ2SEQ_SPECIALS))
    return {role: t for role, t in roles.items() if tok.token_to_id(t) is not None}


def tokenizer(tok: Tokenizer) -> Tokenizer:
    """The run's tokenizer with </s> after each text, as lmforge ends every source: the HF tokenizer's
    ids of a sentence are then what lmforge's encoder reads."""
    return ending_with(tok, tok.id_to_token(seq2seq_special_ids(tok)[2]))
