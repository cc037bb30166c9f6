"""Hugging Face model folders in and out: BERT, GPT-2 and the Llama family (Llama, and Mistral without
a sliding window), as `save_pretrained` writes them and `from_pretrained` reads them.

Each architecture is described once, as data that import and export both read, so the two directions
cannot drift apart (an `Arch` below):
  weights  lmforge name -> the HF tensor(s) it is made of. A name is one tensor, or a module whose
           .weight and .bias follow; a tuple of HF names is stacked along dim 0 (q, k, v into
           attn.qkv; gate, up into mlp.up). `{i}` is the layer index.
  config   config.json key -> (ModelConfig field, HF's default when the key is absent).
  fixed    config.json options lmforge computes at one value only: import refuses any other value,
           export writes that one.
  layout   the ModelConfig values the architecture implies: import sets them, export requires them.

`load_hf(folder)` builds the lmforge model in memory (checkpoint.load_run calls it for any folder with a
config.json and no config.yaml); `import_hf` writes it as a run directory; `export_hf` writes a run as
a folder transformers loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.errors import UserError

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


def _llama_read(hf: dict, names: set[str], where: str) -> dict:
    # transformers 5 writes rope_parameters; older configs write rope_theta and rope_scaling
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(key) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{where}: config.json {key} = {json.dumps(rope)}: lmforge's RoPE has no scaling "
                        f"(it needs {key} null or rope_type default)")
    natural = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, natural):
        raise UserError(f"{where}: config.json head_dim = {hf['head_dim']}: lmforge's head size is hidden_size / "
                        f"num_attention_heads = {natural}")
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
    if window is not None and window < context:
        raise UserError(f"{where}: config.json sliding_window = {window}: lmforge attends to the whole context, "
                        f"so it needs sliding_window null or >= max_position_embeddings = {context}")
    return {"model": {"rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0))}}


def _llama_write(cfg) -> dict:
    m = cfg.model
    # both spellings of the RoPE base, for transformers 5 and for older versions
    return {"rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "head_dim": m.head_dim}


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
        "rms_norm_eps": ("norm_eps", 1e-6),
        "attention_dropout": ("dropout", 0.0),
        "initializer_range": ("init_std", 0.02),
        "tie_word_embeddings": ("tie_embeddings", False),
    },
    fixed={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    layout=dict(pos="rope", norm="rmsnorm", norm_position="pre", bias=False, mlp="swiglu", type_vocab_size=0),
    skip=("rotary_emb.inv_freq",),
    read_extra=_llama_read, write_extra=_llama_write,
)

ARCHS = {a.name: a for a in (BERT, GPT2, LLAMA)}
FORMATS = ("auto", *ARCHS)


# -- key maps, both ways ----------------------------------------------------------------------------


def _mapping(arch: Arch, model: torch.nn.Module) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    """The arch's weight table expanded for this model: {lmforge parameter: HF names}, and the HF names
    of tied copies (an output weight that is the token embedding), which are neither read nor written."""
    names, params = model.state_dict().keys(), dict(model.named_parameters())  # named_parameters drops tied aliases
    mapping = {}
    for lm, hf in arch.weights.items():
        hf = (hf,) if isinstance(hf, str) else hf
        for i in range(model.cfg.n_layer) if "{i}" in lm else [0]:
            name, parts = lm.format(i=i), tuple(p.format(i=i) for p in hf)
            if name in names:
                mapping[name] = parts
            else:
                mapping.update({f"{name}.{s}": tuple(f"{p}.{s}" for p in parts)
                                for s in ("weight", "bias") if f"{name}.{s}" in names})
    unmapped = [p for p in params if p not in mapping]
    if unmapped:  # a gap in a table above, not a user mistake
        raise RuntimeError(f"hf: no {arch.title} name for lmforge parameter {unmapped[0]}")
    tied = {p for lm, parts in mapping.items() if lm not in params for p in parts}
    return {lm: parts for lm, parts in mapping.items() if lm in params}, tied


def _split_sizes(lm: str, n_parts: int, rows: int, m) -> list[int]:
    """Rows of each HF tensor stacked into lmforge's fused `lm`: q, k, v (k and v with n_kv_head heads),
    or equal parts (gate, up)."""
    if ".attn.qkv." in lm:
        return [m.n_head * m.head_dim] + [m.n_kv_head * m.head_dim] * 2
    return [rows // n_parts] * n_parts


def _to_hf(tensors: dict[str, torch.Tensor], mapping: dict, arch: Arch, m) -> dict[str, torch.Tensor]:
    """lmforge tensors -> HF tensors (views: split fused tensors, transpose Conv1D weights)."""
    out = {}
    for lm, parts in mapping.items():
        t = tensors[lm]
        pieces = t.split(_split_sizes(lm, len(parts), t.shape[0], m)) if len(parts) > 1 else (t,)
        for name, piece in zip(parts, pieces, strict=True):
            out[name] = piece.t() if name.endswith(arch.conv1d) else piece
    return out


def _to_lm(hf: dict[str, torch.Tensor], mapping: dict, arch: Arch) -> dict[str, torch.Tensor]:
    """HF tensors -> lmforge tensors (the inverse of _to_hf)."""
    return {lm: torch.cat([hf[p].t() if p.endswith(arch.conv1d) else hf[p] for p in parts])
            for lm, parts in mapping.items()}


# -- reading a folder -------------------------------------------------------------------------------


def _read_json(path: Path, where: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: {path.name} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: {path.name}: expected a JSON object")
    return data


def _find_arch(hf: dict, where: str) -> tuple[Arch, str]:
    """The Arch for a config.json, and the HF class it names."""
    classes = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for arch in ARCHS.values():
        if classes and classes[0] in arch.classes:
            return arch, classes[0]
        if not classes and model_type in arch.model_types:
            return arch, model_type
    supported = ", ".join(c for a in ARCHS.values() for c in a.classes)
    found = classes[0] if classes else f"model_type {model_type!r}" if model_type else "no architectures or model_type"
    raise UserError(f"{where}: architecture {found} is not supported; lmforge imports {supported}")


def _load_tensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise several types for a damaged file
        raise UserError(f"{where}: {path.name} cannot be read ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None


def _read_weights(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """model.safetensors, pytorch_model.bin, or either sharded with its .index.json."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _load_tensors(folder / name, where)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index, where).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing or not shards:
                raise UserError(f"{where}: {index.name} names shard {missing[0] if missing else '(none)'}, "
                                "which is not in the folder")
            return {k: v for s in shards for k, v in _load_tensors(folder / s, where).items()}
    raise UserError(f"{where}: no weights; expected model.safetensors, pytorch_model.bin or a sharded "
                    "model.safetensors.index.json")


def _normalise(state: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """Checkpoint names as the *For* classes write them: gamma/beta renamed, the base-model prefix added
    where a bare base model saved without it, buffers dropped, a copy kept only where its original is absent."""
    bare = not any(k.startswith(arch.prefix) for k in state)
    out = {}
    for key, tensor in state.items():
        for old, new in OLD_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        if not key.endswith(arch.skip):
            out[arch.prefix + key if bare else key] = tensor
    for copy, original in arch.copies.items():
        if copy in out:
            out.setdefault(original, out.pop(copy))
    return out


def _config_tree(arch: Arch, hf: dict, names: set[str], where: str) -> dict:
    """config.json -> the lmforge config tree (task, model, mlm) it describes."""
    for key, only in arch.fixed.items():
        if hf.get(key, only) != only:
            raise UserError(f"{where}: config.json {key} = {json.dumps(hf[key])}: lmforge computes {arch.title} "
                            f"only with {key} = {json.dumps(only)}")
    model = dict(arch.layout)
    if arch.activation:
        key, default = arch.activation
        name = hf.get(key, default)
        if name not in ACTIVATIONS:
            raise UserError(f"{where}: config.json {key} = {json.dumps(name)}: lmforge has {', '.join(ACTIVATIONS)}")
        model["mlp"] = ACTIVATIONS[name]
    for key, (ours, default) in arch.config.items():
        value = hf.get(key)
        value = default if value is None else value
        if value is REQUIRED:
            raise UserError(f"{where}: config.json has no {key}, which {arch.title} needs")
        if value is not None:
            model.setdefault(ours, value)
    tree = {"task": arch.task, "model": model}
    for section, values in (arch.read_extra(hf, names, where) if arch.read_extra else {}).items():
        tree.setdefault(section, {}).update(values)
    return tree


def _modules(names) -> str:
    """Tensor names shortened to their modules, once each, for notes."""
    return ", ".join(dict.fromkeys(n.removesuffix(".weight").removesuffix(".bias") for n in names))


def _load_weights(model: torch.nn.Module, arch: Arch, hf: dict[str, torch.Tensor], kind: str,
                  where: str) -> tuple[list[str], list[str]]:
    """Copy the checkpoint into `model` after checking every tensor against the shapes config.json
    implies; returns notes on heads left at their fresh init and tensors with no place in lmforge, and
    those heads' module names."""
    mapping, tied = _mapping(arch, model)
    expected = _to_hf(dict(model.named_parameters()), mapping, arch, model.cfg)
    fresh, used = [], set(tied)
    for lm, parts in mapping.items():
        if lm.startswith(OPTIONAL_HEADS) and not any(p in hf for p in parts):
            fresh.append(lm)
            continue
        for p in parts:
            if p not in hf:
                raise UserError(f"{where}: weight {p} is missing from the checkpoint (lmforge's {lm} needs it)")
            if hf[p].shape != expected[p].shape:
                raise UserError(f"{where}: weight {p} has shape {tuple(hf[p].shape)}, but config.json implies "
                                f"{tuple(expected[p].shape)}")
        used.update(parts)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for lm, tensor in _to_lm(hf, {k: v for k, v in mapping.items() if k not in fresh}, arch).items():
            params[lm].copy_(tensor)
    notes = []
    if fresh:
        notes.append(f"not in the checkpoint, so left at lmforge's fresh initialisation (train before using it): "
                     f"{_modules(fresh)}")
    unused = [k for k in hf if k not in used]
    if unused:
        notes.append(f"not imported, lmforge's {kind} has no place for them: {_modules(unused)}")
    return notes, _modules(fresh).split(", ") if fresh else []


# -- tokenizers -------------------------------------------------------------------------------------


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else token  # tokenizer_config.json may hold AddedToken dicts


def _declared_specials(settings: dict, default: list[str]) -> list[str]:
    found = [_content(v) for k, v in settings.items() if k.endswith("_token") and v]
    found += [_content(v) for v in settings.get("additional_special_tokens") or []]
    return found or default


def _add_specials(tok: Tokenizer, tokens: list[str]) -> None:
    # only tokens the vocabulary has: one outside it would have no row in the embedding
    tok.add_special_tokens([t for t in dict.fromkeys(tokens) if tok.token_to_id(t) is not None])


def _wordpiece_tokenizer(vocab: Path, settings: dict, where: str) -> Tokenizer:
    """BERT's tokenizer from vocab.txt, built as transformers' BertTokenizerFast builds it."""
    tok = Tokenizer(models.WordPiece(models.WordPiece.read_file(str(vocab)),
                                     unk_token=_content(settings.get("unk_token") or "[UNK]")))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        strip_accents=settings.get("strip_accents"), lowercase=settings.get("do_lower_case", True))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    _add_specials(tok, _declared_specials(settings, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = _content(settings.get("cls_token") or "[CLS]"), _content(settings.get("sep_token") or "[SEP]")
    if tok.token_to_id(cls) is None or tok.token_to_id(sep) is None:
        raise UserError(f"{where}: vocab.txt lacks {cls} or {sep}, which BERT's tokenizer puts around every text")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


def _byte_bpe_tokenizer(vocab: Path, merges: Path, settings: dict) -> Tokenizer:
    """GPT-2's byte-level BPE from vocab.json and merges.txt."""
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=settings.get("add_prefix_space", False))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_specials(tok, _declared_specials(settings, ["<|endoftext|>"]))
    return tok


def _hf_tokenizer(folder: Path, where: str) -> tuple[Tokenizer, list[str]]:
    from lmforge.data.tokenizer import load_tokenizer

    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            settings.update(_read_json(folder / name, where))
    if (folder / "tokenizer.json").is_file():
        tok = load_tokenizer(folder)
    elif (folder / "vocab.txt").is_file():
        tok = _wordpiece_tokenizer(folder / "vocab.txt", settings, where)
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = _byte_bpe_tokenizer(folder / "vocab.json", folder / "merges.txt", settings)
    else:
        raise UserError(f"{where}: no tokenizer; expected tokenizer.json, vocab.txt (BERT) or vocab.json with "
                        "merges.txt (GPT-2)")
    notes = []
    if tok.padding or tok.truncation:
        # sentence-transformers folders pad every text to a fixed length; lmforge batches and cuts itself,
        # and would otherwise pad or cut whole documents
        notes.append("the tokenizer's own padding and truncation are switched off (lmforge pads and cuts sequences itself)")
        tok.no_padding()
        tok.no_truncation()
    return tok, notes


# -- import -----------------------------------------------------------------------------------------


@dataclass
class Imported:
    model: torch.nn.Module  # in eval mode
    tokenizer: Tokenizer
    config: object  # lmforge.config.Config
    source: str  # the HF class, e.g. BertForMaskedLM
    notes: list[str]
    fresh: list[str]  # modules the checkpoint had no weights for (left at their fresh initialisation)

    def summary(self) -> str:
        m = self.config.model
        n = sum(p.numel() for p in self.model.parameters())
        return (f"{self.source} as an lmforge {self.config.task} model: {m.n_layer} layers, d_model {m.d_model}, "
                f"{m.n_head} heads ({m.n_kv_head} key/value), {n / 1e6:.2f}M parameters")


def load_hf(folder: str | Path, build: Callable | None = None) -> Imported:
    """A Hugging Face model folder -> the equivalent lmforge model, its tokenizer and config, in memory.

    build(config) makes the model to fill instead of the arch's own (a fine-tuning model on the same
    body): heads it has that the checkpoint lacks, or has at another size (a classifier for other
    labels), keep their fresh initialisation."""
    from lmforge.config import load_config
    from lmforge.tasks import make_task

    folder = Path(folder)
    where = f"hf: {folder}"
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: no config.json; expected a folder written by transformers' save_pretrained")
    hf_cfg = _read_json(folder / "config.json", where)
    arch, source = _find_arch(hf_cfg, where)
    tok, notes = _hf_tokenizer(folder, where)
    state = _normalise(_read_weights(folder, where), arch)
    try:
        cfg = load_config(base=_config_tree(arch, hf_cfg, set(state), where))
    except UserError as e:
        if str(e).startswith(where):
            raise
        raise UserError(f"{where}: config.json does not describe a model lmforge can build ({e})") from None
    with torch.random.fork_rng(devices=[]):  # the same fresh heads (if any) on every import of a folder
        torch.manual_seed(cfg.train.seed)
        model = build(cfg) if build else make_task(cfg).build_model()
    kind = "mlm model without mlm.nsp" if cfg.task == "mlm" and not cfg.mlm.nsp else f"{cfg.task} model"
    if build:
        kind = type(model).__name__
        heads = {k: v.shape for k, v in model.state_dict().items() if k.startswith(OPTIONAL_HEADS)}
        mapping, _ = _mapping(arch, model)
        for lm, parts in mapping.items():
            if lm in heads and any(p in state and state[p].shape != heads[lm] for p in parts):
                notes.append(f"{_modules(parts)} of the checkpoint has another shape than {lm} "
                             f"{tuple(heads[lm])} and was left out")
                for p in parts:
                    state.pop(p, None)
    loaded_notes, fresh = _load_weights(model, arch, state, kind, where)
    return Imported(model.eval(), tok, cfg, source, loaded_notes + notes, fresh)


def _check_out(out: Path, what: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{what}: {out} already exists and is not an empty folder; give a new one")


def _write_dir(out: Path, what: str, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary folder that becomes `out` once complete: a failure leaves nothing."""
    from lmforge.data.store import atomic_dir

    _check_out(out, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(out, write)


def import_hf(folder: str | Path, out: str | Path) -> Imported:
    """A Hugging Face model folder -> an lmforge run directory (config.yaml, model.safetensors, tokenizer.json)."""
    from lmforge.config import save_config
    from lmforge.train.checkpoint import WEIGHTS, save_weights
    from lmforge.train.distributed import Dist, full_weights

    out = Path(out)
    _check_out(out, "import")  # before reading a large checkpoint
    imported = load_hf(folder)

    def write(tmp: Path) -> None:
        save_config(imported.config, tmp / "config.yaml")
        save_weights(full_weights(Dist(), imported.model), tmp / WEIGHTS, {"source": str(folder)})
        imported.tokenizer.save(str(tmp / "tokenizer.json"))

    _write_dir(out, "import", write)
    return imported


# -- export -----------------------------------------------------------------------------------------


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _body_task(cfg) -> str:
    """The pre-training task whose layout a model's body has: a fine-tuned model's is its body's."""
    from lmforge.config import FINETUNE_TASKS

    if cfg.task not in FINETUNE_TASKS:
        return cfg.task
    return "clm" if cfg.finetune.body == "decoder" else "mlm"


# The HF class of a fine-tuned model by (arch, task); what is absent has no HF class lmforge writes.
FINETUNED_CLASSES = {
    ("bert", "classify"): "BertForSequenceClassification", ("bert", "regress"): "BertForSequenceClassification",
    ("bert", "multilabel"): "BertForSequenceClassification", ("bert", "tag"): "BertForTokenClassification",
    ("gpt2", "sft"): "GPT2LMHeadModel", ("llama", "sft"): "LlamaForCausalLM",
}
PROBLEM_TYPES = {"classify": "single_label_classification", "regress": "regression",
                 "multilabel": "multi_label_classification"}


def _gaps(arch: Arch, cfg) -> list[str]:
    """What keeps this config from the architecture's layout, as 'model.x = needed (it has y)'."""
    if _body_task(cfg) != arch.task:
        return [f"task = {arch.task} (it is {cfg.task})"]
    m = cfg.model
    needs = {k: (v,) for k, v in arch.layout.items()}
    if arch.activation:
        needs["mlp"] = tuple(dict.fromkeys(ACTIVATIONS.values()))
    if arch.mha_only:
        needs["n_kv_head"] = (m.n_head,)
    return [f"model.{k} = {' or '.join(map(_show, ok))} (it has {_show(getattr(m, k))})"
            for k, ok in needs.items() if getattr(m, k) not in ok]


def _export_arch(cfg, fmt: str, run) -> Arch:
    if fmt not in FORMATS:
        raise UserError(f"export: --format {fmt}: expected one of {', '.join(FORMATS)}")
    candidates = [ARCHS[fmt]] if fmt != "auto" else [a for a in ARCHS.values() if a.task == _body_task(cfg)]
    gaps = [(a, _gaps(a, cfg)) for a in candidates]
    for arch, missing in gaps:
        if not missing:
            return arch
    reasons = "; ".join(f"{a.title} needs {', '.join(g)}" for a, g in gaps)
    raise UserError(f"export: {run}: the model fits no Hugging Face layout lmforge writes: {reasons}")


def _finetuned_config(arch: Arch, cfg, run) -> dict:
    """config.json additions of a fine-tuned model: its class, labels and problem type."""
    from lmforge.config import FINETUNE_TASKS

    if cfg.task not in FINETUNE_TASKS:
        return {}
    cls = FINETUNED_CLASSES.get((arch.name, cfg.task))
    if cls is None:
        raise UserError(f"export: {run}: a {cfg.task} model on a {arch.title} body has no Hugging Face class "
                        f"lmforge writes (it writes {', '.join(sorted(set(FINETUNED_CLASSES.values())))})")
    if cls == "BertForSequenceClassification" and cfg.finetune.pooling != "pooler":
        raise UserError(f"export: {run}: BertForSequenceClassification pools with BERT's pooler; this model has "
                        f"finetune.pooling = {cfg.finetune.pooling}, which transformers cannot compute")
    out = {"architectures": [cls]}
    if cfg.task in PROBLEM_TYPES or cfg.task == "tag":
        labels = cfg.finetune.labels or ["value"]
        out.update(id2label={str(i): name for i, name in enumerate(labels)},
                   label2id={name: i for i, name in enumerate(labels)})
        out["classifier_dropout"] = cfg.finetune.classifier_dropout
    if cfg.task in PROBLEM_TYPES:
        out["problem_type"] = PROBLEM_TYPES[cfg.task]
    return out


# Hugging Face special-token roles and the tokens that fill them, the first in the vocabulary wins.
# The end of text is lmforge's own (data.tokenizer.eos_id); GPT-2 uses it as bos and eos alike.
CLM_ROLES = {"bos_token": ("<s>", "<|begin_of_text|>"), "unk_token": ("<unk>", "[UNK]"), "pad_token": ("<pad>", "[PAD]")}
MLM_ROLES = {"unk_token": ("[UNK]",), "sep_token": ("[SEP]",), "pad_token": ("[PAD]",), "cls_token": ("[CLS]",),
             "mask_token": ("[MASK]",)}


def _special_tokens(tok: Tokenizer, task: str) -> dict[str, str]:
    from lmforge.data.tokenizer import eos_id

    roles = {}
    for role, candidates in (MLM_ROLES if task == "mlm" else CLM_ROLES).items():  # task: the body's
        found = next((t for t in candidates if tok.token_to_id(t) is not None), None)
        if found:
            roles[role] = found
    eos = eos_id(tok)
    if task == "clm" and eos is not None:
        roles["eos_token"] = tok.id_to_token(eos)
        roles.setdefault("bos_token", roles["eos_token"])
    return roles


def _hf_config(arch: Arch, cfg, specials: dict[str, str], tok: Tokenizer) -> dict:
    m = cfg.model
    hf = {"architectures": [arch.classes[0]], "model_type": arch.model_types[0]}
    hf.update({key: getattr(m, field) for key, (field, _) in arch.config.items()})
    hf.update(arch.fixed)
    if arch.activation:
        hf[arch.activation[0]] = next(name for name, mlp in ACTIVATIONS.items() if mlp == m.mlp)
    hf.update({f"{role[:-6]}_token_id": tok.token_to_id(t) for role, t in specials.items()
               if role in ("bos_token", "eos_token", "pad_token")})
    hf.setdefault("pad_token_id", None)  # not HF's default 0, which would make token 0 padding
    hf.update(torch_dtype="float32", dtype="float32")  # the older and the newer key
    if arch.write_extra:
        hf.update(arch.write_extra(cfg))
    return hf


ADAPTER_DIR = "adapter"


def export_hf(run: str | Path, out: str | Path, fmt: str = "auto") -> dict:
    """A run directory, checkpoint or HF folder (anything load_run reads) -> a Hugging Face folder:
    model.safetensors, config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json; a
    LoRA run's base model there and its adapter in OUT/adapter in the peft library's format
    (peft.PeftModel.from_pretrained(base, OUT/adapter)). Returns the config.json written."""
    from lmforge.train.checkpoint import load_run, write_safetensors

    out = Path(out)
    _check_out(out, "export")
    from lmforge.peft import peft_method, strip_peft, write_peft_adapter

    trained, tok, cfg = load_run(run)
    arch = _export_arch(cfg, fmt, run)
    method = peft_method(trained)
    if method not in ("none", "lora"):
        raise UserError(f"export: {run}: a model with peft.method = {method} has no Hugging Face layout; only LoRA "
                        "adapters are written (in the peft library's format)")
    model = strip_peft(trained)  # the base weights (a LoRA run's adapter is written on its own, below)
    mapping, _ = _mapping(arch, model)  # tied output weights are left out: from_pretrained ties them again
    tensors = _to_hf({k: p.detach() for k, p in model.named_parameters()}, mapping, arch, cfg.model)
    tensors.update({copy: tensors[original] for copy, original in arch.copies.items() if original in tensors})
    if arch is BERT and cfg.model.type_vocab_size == 0:
        tensors["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.model.d_model, device="cpu")
    specials = _special_tokens(tok, _body_task(cfg))
    hf_cfg = {**_hf_config(arch, cfg, specials, tok), **_finetuned_config(arch, cfg, run)}
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast",  # reads tokenizer.json as it is: the same ids
               "model_max_length": cfg.model.max_seq_len, "clean_up_tokenization_spaces": False, **specials}

    def write(tmp: Path) -> None:
        # clone: safetensors refuses views that share storage (the parts of a fused tensor)
        write_safetensors({k: v.contiguous().clone() for k, v in tensors.items()}, tmp / "model.safetensors",
                          {"format": "pt"})
        for name, data in (("config.json", hf_cfg), ("tokenizer_config.json", tok_cfg),
                           ("special_tokens_map.json", specials)):
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tok.save(str(tmp / "tokenizer.json"))
        if method == "lora":  # in a sub-folder: beside config.json, transformers would load it in place of the base
            write_peft_adapter(trained, arch, tmp / ADAPTER_DIR, base_model_path=str(out.resolve()),
                               hf_class=hf_cfg["architectures"][0], mapping=mapping)

    _write_dir(out, "export", write)
    return hf_cfg
