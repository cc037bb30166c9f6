"""The architectures lmforge reads and writes, each described once as data (an `Arch`):
  weights  lmforge name -> the HF tensor(s) it is made of. A name is one tensor, or a module whose
           .weight and .bias follow; a tuple of HF names is stacked along dim 0 (q, k, v into
           attn.qkv; gate, up into mlp.up). `{i}` is the layer index.
  config   config.json key -> (ModelConfig field, HF's default when the key is absent).
  fixed    config.json options lmforge computes at one value only: import refuses any other value,
           export writes that one.
  layout   the ModelConfig values the architecture implies: import sets them, export requires them.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Callable

from lmforge.errors import UserError
from lmforge.fields import gt
from lmforge.model.config import ModelConfig

REQUIRED = object()  # a config.json key without a default: a file lacking it is refused

# HF activation name -> lmforge model.mlp. Export writes the first name listed for each value:
# gelu_pytorch_tanh is F.gelu(approximate="tanh"), exactly what lmforge computes (gelu_new is the same
# function written out in Python, equal to ~1e-7).
ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}

# lmforge names of output heads a checkpoint may lack (BertModel, GPT2Model, LlamaModel save none):
# they keep lmforge's fresh initialisation and the import says so.
OPTIONAL_HEADS = ("head.", "mlm_head.", "pooler.", "classifier.")

# Old checkpoints converted from TensorFlow name LayerNorm parameters gamma and beta.
OLD_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}


@dataclass(frozen=True)
class Arch:
    name: str  # the --format value
    title: str  # for messages
    task: str  # the lmforge task its models become
    classes: tuple[str, ...]  # HF `architectures` imported; export writes the first
    model_types: tuple[str, ...]  # accepted when config.json has no `architectures`; export writes the first
    prefix: str  # the base model's prefix inside the *For* classes; bare base models save without it
    weights: dict
    config: dict
    fixed: dict
    layout: dict
    activation: tuple[str, str] | None = None  # (config.json key naming the MLP activation, its default)
    mha_only: bool = False  # no grouped-query attention
    skip: tuple[str, ...] = ()  # key suffixes of tensors that are not weights (buffers)
    # {copy: original}: HF names saved as a second copy of a weight (HF's own tying). Export writes both;
    # import reads the copy where the original is absent.
    copies: dict = field(default_factory=dict)
    conv1d: tuple[str, ...] = ()  # key suffixes of GPT-2's Conv1D weights, stored [in, out]
    read_extra: Callable | None = None  # (config.json, weight names, where) -> additions to the config tree
    write_extra: Callable | None = None  # Config -> additions to config.json


# The sizes under the names most HF configs give them (BERT, Llama and Mistral alike; GPT-2 has its own).
STANDARD_SIZES = {
    "vocab_size": ("vocab_size", REQUIRED),
    "max_position_embeddings": ("max_seq_len", REQUIRED),
    "hidden_size": ("d_model", REQUIRED),
    "num_hidden_layers": ("n_layer", REQUIRED),
    "num_attention_heads": ("n_head", REQUIRED),
    "intermediate_size": ("d_ff", REQUIRED),
}

# -- config.json's values: of the JSON type and in the range of the ModelConfig field each sets ------------

_JSON_TYPES = {int: "an integer", float: "a number", bool: "true or false"}


def _field_type(tp) -> type:
    return next(t for t in typing.get_args(tp) or (tp,) if t is not type(None))  # int | None -> int


# ModelConfig field -> (its type, its check)
_MODEL_FIELDS = {f.name: (_field_type(typing.get_type_hints(ModelConfig)[f.name]), f.metadata.get("check"))
                 for f in fields(ModelConfig)}


def _json_typed(value, tp) -> bool:
    """Whether a JSON value is of the type `tp` (a whole float counts as an integer; a bool is no number)."""
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, (int, float)) and math.isfinite(value)


def json_value(key: str, value, tp: type, check, where: str, sets: str = ""):
    """A config.json value of the type `tp` that passes `check` (lmforge.fields), or one line naming config.json's
    key, its value and what was expected; `sets`: what it becomes in lmforge, for that line."""
    if not _json_typed(value, tp) or (check and not check[0](value)):
        in_range = f" {check[1]}" if check else ""
        raise UserError(f"{where}: config.json {key} = {json.dumps(value)}: expected {_JSON_TYPES[tp]}{in_range}{sets}")
    return tp(value)


def model_value(key: str, ours: str, value, where: str):
    """config.json's `key` as the ModelConfig field `ours` takes it: of its type and in its declared range."""
    tp, check = _MODEL_FIELDS[ours]
    return json_value(key, value, tp, check, where, f" (lmforge's model.{ours})")


def json_object(key: str, value, where: str) -> dict:
    """A config.json value that must be an object (or null: {})."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: config.json {key} = {json.dumps(value)}: expected an object or null")
    return value


def json_flag(hf: dict, key: str, default: bool, where: str) -> bool:
    """A config.json switch that lmforge reads but no ModelConfig field holds (use_sliding_window)."""
    value = hf.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"{where}: config.json {key} = {json.dumps(value)}: expected true or false")
    return value


# -- BERT -------------------------------------------------------------------------------------------

# BERT's pooler (dense + tanh on [CLS]) on its own: the next-sentence head and the sequence classifier
# (pooling = pooler) use it.
BERT_POOLER = {"pooler": "bert.pooler.dense"}


def _bert_read(hf: dict, names: set[str], where: str) -> dict:
    # BertForPreTraining carries the next-sentence head; with it the model is built with mlm.nsp.
    # BERT's tokenizer is a WordPiece one with [CLS], [SEP] and [MASK], as the mlm task requires.
    return {"mlm": {"nsp": "cls.seq_relationship.weight" in names}, "data": {"tokenizer": {"kind": "wordpiece"}}}


def _bert_write(cfg) -> dict:
    # HF's BERT always adds a token-type embedding; a model without segments exports one zero row
    # (see export_hf), which adds nothing
    return {"architectures": ["BertForPreTraining" if cfg.mlm.nsp else "BertForMaskedLM"],
            "type_vocab_size": max(cfg.model.type_vocab_size, 1)}


BERT = Arch(
    name="bert", title="BERT", task="mlm",
    classes=("BertForMaskedLM", "BertForPreTraining", "BertModel", "BertForSequenceClassification",
             "BertForTokenClassification"),
    model_types=("bert",), prefix="bert.",
    weights={
        "tok_emb": "bert.embeddings.word_embeddings",
        "pos_emb": "bert.embeddings.position_embeddings",
        "seg_emb": "bert.embeddings.token_type_embeddings",
        "emb_norm": "bert.embeddings.LayerNorm",
        "blocks.{i}.attn.qkv": ("bert.encoder.layer.{i}.attention.self.query", "bert.encoder.layer.{i}.attention.self.key",
                                "bert.encoder.layer.{i}.attention.self.value"),
        "blocks.{i}.attn.proj": "bert.encoder.layer.{i}.attention.output.dense",
        "blocks.{i}.norm1": "bert.encoder.layer.{i}.attention.output.LayerNorm",
        "blocks.{i}.mlp.up": "bert.encoder.layer.{i}.intermediate.dense",
        "blocks.{i}.mlp.down": "bert.encoder.layer.{i}.output.dense",
        "blocks.{i}.norm2": "bert.encoder.layer.{i}.output.LayerNorm",
        "mlm_head.dense": "cls.predictions.transform.dense",
        "mlm_head.norm": "cls.predictions.transform.LayerNorm",
        "mlm_head.out.weight": "cls.predictions.decoder.weight",
        "mlm_head.out.bias": "cls.predictions.decoder.bias",
        **BERT_POOLER,
        "nsp_head": "cls.seq_relationship",
        "classifier": "classifier",  # BertForSequenceClassification and BertForTokenClassification
    },
    config={
        **STANDARD_SIZES,
        "type_vocab_size": ("type_vocab_size", 2),
        "layer_norm_eps": ("norm_eps", 1e-12),
        "hidden_dropout_prob": ("dropout", 0.1),  # lmforge has one dropout: the first key present sets it
        "attention_probs_dropout_prob": ("dropout", 0.1),
        "initializer_range": ("init_std", 0.02),
        "tie_word_embeddings": ("tie_embeddings", True),
    },
    fixed={"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False},
    layout=dict(pos="learned", norm="layernorm", norm_position="post", bias=True),
    activation=("hidden_act", "gelu"), mha_only=True,
    skip=("embeddings.position_ids",),
    # transformers 5 saves a tied model's output bias only as cls.predictions.bias, an untied one's as both
    # (forward uses decoder.bias); transformers 4 uses one tensor under both names
    copies={"cls.predictions.bias": "cls.predictions.decoder.bias"},
    read_extra=_bert_read, write_extra=_bert_write,
)

# -- GPT-2 ------------------------------------------------------------------------------------------

GPT2 = Arch(
    name="gpt2", title="GPT-2", task="clm", classes=("GPT2LMHeadModel", "GPT2Model"), model_types=("gpt2",),
    prefix="transformer.",
    weights={
        "tok_emb": "transformer.wte",
        "pos_emb": "transformer.wpe",
        "blocks.{i}.norm1": "transformer.h.{i}.ln_1",
        "blocks.{i}.attn.qkv": "transformer.h.{i}.attn.c_attn",  # already q, k, v stacked
        "blocks.{i}.attn.proj": "transformer.h.{i}.attn.c_proj",
        "blocks.{i}.norm2": "transformer.h.{i}.ln_2",
        "blocks.{i}.mlp.up": "transformer.h.{i}.mlp.c_fc",
        "blocks.{i}.mlp.down": "transformer.h.{i}.mlp.c_proj",
        "norm": "transformer.ln_f",
        "head": "lm_head",
        "classifier": "score",  # GPT2ForSequenceClassification
    },
    config={
        "vocab_size": ("vocab_size", REQUIRED),
        "n_positions": ("max_seq_len", REQUIRED),
        "n_embd": ("d_model", REQUIRED),
        "n_layer": ("n_layer", REQUIRED),
        "n_head": ("n_head", REQUIRED),
        "n_inner": ("d_ff", None),  # null: 4 * n_embd, lmforge's default too
        "layer_norm_epsilon": ("norm_eps", 1e-5),
        "resid_pdrop": ("dropout", 0.1),
        "embd_pdrop": ("dropout", 0.1),
        "attn_pdrop": ("dropout", 0.1),
        "initializer_range": ("init_std", 0.02),
        "tie_word_embeddings": ("tie_embeddings", True),
    },
    fixed={"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
           "add_cross_attention": False},
    layout=dict(pos="learned", norm="layernorm", norm_position="pre", bias=True, type_vocab_size=0),
    activation=("activation_function", "gelu_new"), mha_only=True,
    skip=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers of older checkpoints
    conv1d=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
)

# -- Llama ------------------------------------------------------------------------------------------


# rope_type llama3's config.json keys -> the ModelConfig fields they set
LLAMA3_ROPE = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor", "original_max_position_embeddings": "rope_original_max_len"}


def _rope_read(hf: dict, where: str) -> dict:
    """The RoPE base and scaling of a config.json -> ModelConfig values."""
    # transformers 5 writes rope_parameters, older versions rope_theta and rope_scaling; as transformers 5 does,
    # a rope_scaling that is set wins
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = json_object(key, hf.get(key), where)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise UserError(f"{where}: config.json {key} = {json.dumps(rope)}: lmforge's RoPE has no scaling but llama3's "
                        f"(it needs {key} null or rope_type default or llama3)")
    theta_key = f"{key}.rope_theta" if "rope_theta" in rope else "rope_theta"
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    model = {"rope_theta": model_value(theta_key, "rope_theta", theta, where)}
    if kind == "llama3":
        missing = [k for k in LLAMA3_ROPE if rope.get(k) is None]
        if missing:
            raise UserError(f"{where}: config.json {key} has no {missing[0]}, which rope_type llama3 needs")
        model.update(rope_scaling="llama3", **{ours: model_value(f"{key}.{k}", ours, rope[k], where)
                                               for k, ours in LLAMA3_ROPE.items()})
    return model


def _llama_read(hf: dict, names: set[str], where: str) -> dict:
    # Qwen2 keeps a sliding_window it does not use unless use_sliding_window is true; Mistral has no switch
    window = hf.get("sliding_window") if json_flag(hf, "use_sliding_window", True, where) else None
    context = model_value("max_position_embeddings", "max_seq_len", hf.get("max_position_embeddings", 2048), where)
    if window is not None and json_value("sliding_window", window, int, gt(0), where) < context:
        raise UserError(f"{where}: config.json sliding_window = {window}: lmforge attends to the whole context, "
                        f"so it needs sliding_window null or >= max_position_embeddings = {context}")
    return {"model": _rope_read(hf, where)}


def _llama_write(cfg) -> dict:
    m = cfg.model
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        rope.update(rope_type="llama3", **{k: getattr(m, ours) for k, ours in LLAMA3_ROPE.items()})
    # both spellings, for transformers 5 and for older versions (which read rope_theta and rope_scaling)
    out = {"rope_theta": m.rope_theta, "rope_parameters": rope}
    return {**out, "rope_scaling": rope} if m.rope_scaling != "none" else out


LLAMA = Arch(
    name="llama", title="Llama", task="clm",
    classes=("LlamaForCausalLM", "LlamaModel", "MistralForCausalLM", "MistralModel"), model_types=("llama", "mistral"),
    prefix="model.",
    weights={
        "tok_emb": "model.embed_tokens",
        "blocks.{i}.norm1": "model.layers.{i}.input_layernorm",
        "blocks.{i}.attn.qkv": ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                                "model.layers.{i}.self_attn.v_proj"),
        "blocks.{i}.attn.proj": "model.layers.{i}.self_attn.o_proj",
        "blocks.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",  # Qwen3 (model.qk_norm)
        "blocks.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm",
        "blocks.{i}.norm2": "model.layers.{i}.post_attention_layernorm",
        "blocks.{i}.mlp.up": ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
        "blocks.{i}.mlp.down": "model.layers.{i}.mlp.down_proj",
        "norm": "model.norm",
        "head": "lm_head",
        "classifier": "score",  # LlamaForSequenceClassification
    },
    config={
        **STANDARD_SIZES,
        "num_key_value_heads": ("n_kv_head", None),  # null: as many as attention heads
        "head_dim": ("head_dim", None),  # null: hidden_size / num_attention_heads
        "rms_norm_eps": ("norm_eps", 1e-6),
        "attention_dropout": ("dropout", 0.0),
        "initializer_range": ("init_std", 0.02),
        "tie_word_embeddings": ("tie_embeddings", False),
    },
    fixed={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    layout=dict(pos="rope", norm="rmsnorm", norm_position="pre", bias=False, qkv_bias=False, qk_norm=False,
                mlp="swiglu", type_vocab_size=0),
    skip=("rotary_emb.inv_freq",),
    read_extra=_llama_read, write_extra=_llama_write,
)

# -- Qwen2 / Qwen2.5 --------------------------------------------------------------------------------


def _qwen2_write(cfg) -> dict:
    return {**_llama_write(cfg), "use_sliding_window": False}  # lmforge attends to the whole context


# Llama's layout, names and sizes, with biases on q, k and v (not on o_proj, not in the MLP); no attention_bias
# or mlp_bias switches
QWEN2 = replace(
    LLAMA, name="qwen2", title="Qwen2", classes=("Qwen2ForCausalLM", "Qwen2Model"), model_types=("qwen2",),
    fixed={"hidden_act": "silu"}, layout={**LLAMA.layout, "qkv_bias": True}, write_extra=_qwen2_write,
)

# -- Qwen3 ------------------------------------------------------------------------------------------

# Llama's layout with an RMSNorm on each head's queries and keys, head_dim its own (128 where config.json has
# none), and Qwen2's unused sliding window; attention_bias would bias o_proj too, which lmforge has not
QWEN3 = replace(
    LLAMA, name="qwen3", title="Qwen3", classes=("Qwen3ForCausalLM", "Qwen3Model"), model_types=("qwen3",),
    config={**LLAMA.config, "head_dim": ("head_dim", 128)}, fixed={"hidden_act": "silu", "attention_bias": False},
    layout={**LLAMA.layout, "qk_norm": True}, write_extra=_qwen2_write,
)

ARCHS = {a.name: a for a in (BERT, GPT2, LLAMA, QWEN2, QWEN3)}
FORMATS = ("auto", *ARCHS)  # the Hugging Face layouts export_hf writes
EXPORT_FORMATS = (*FORMATS, "onnx")  # lmforge export --format: one of those, or an ONNX graph (hf/onnx.py)
ONNX_QUANTIZE = ("int8",)  # lmforge export --format onnx --quantize
