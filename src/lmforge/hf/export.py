"""Writing Hugging Face folders: `import_hf` turns a folder into an lmforge run directory, `export_hf`
turns anything `runs.load_run` reads into a folder that transformers loads (a LoRA run's adapter in the
peft library's format beside it, `write_peft_adapter`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tokenizers import Tokenizer

from lmforge import chat
from lmforge.config import save_config
from lmforge.errors import UserError
from lmforge.hf.arch import ACTIVATIONS, BERT, Arch
from lmforge.hf.layouts import body_task, check_exportable, decoder_classifier, hf_class, sentence_layout
from lmforge.hf import bart, keymap
from lmforge.hf.load import Imported, load_hf
from lmforge.hf.sentence import DENSE_DIR, sentence_files, split_tensors
from lmforge.hf.tokenizer import ending_with, special_tokens
from lmforge.io import atomic_dir, atomic_text, atomic_write, fill_folder, save_weights, write_safetensors
from lmforge.peft import Adapter, PrefixAttention, lora_layers, peft_method, strip_peft
from lmforge.quant import dequantise_model
from lmforge.runs import TOKEN_ID_KEYS, WEIGHTS, hf_side_files, load_run, write_hf_side_files
from lmforge.tasks import registry
from lmforge.train.distributed import Dist, full_weights


def check_out(out: Path, what: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{what}: {out} already exists and is not an empty folder; give a new one")


def write_dir(out: Path, what: str, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary folder that becomes `out` once complete: a failure leaves nothing."""
    check_out(out, what)
    atomic_dir(out, write)  # it makes the folders above `out` too, and removes them again on failure


def import_hf(folder: str | Path, out: str | Path) -> Imported:
    """A Hugging Face model folder -> an lmforge run directory (config.yaml, model.safetensors, tokenizer.json,
    and the folder's chat template, special tokens and generation settings as they were, runs.HF_SIDE_FILES)."""
    out = Path(out)
    check_out(out, "import")  # before reading a large checkpoint
    imported = load_hf(folder)
    side = hf_side_files(folder)

    def write(tmp: Path) -> None:
        save_config(imported.config, tmp / "config.yaml")
        save_weights(full_weights(Dist(), imported.model), tmp / WEIGHTS, {"source": str(folder)})
        imported.tokenizer.save(str(tmp / "tokenizer.json"))
        write_hf_side_files(tmp, side)

    write_dir(out, "import", write)
    return imported



# transformers' problem_type of a sequence classifier, by the kind of label it predicts
PROBLEM_TYPES = {"class": "single_label_classification", "value": "regression", "classes": "multi_label_classification"}


def _finetuned_config(arch: Arch, cfg, run) -> dict:
    """config.json additions of a fine-tuned model: its class (the registry's hf_classes; BertModel for the
    sentence-transformers layout), labels and problem type."""
    spec = registry.spec(cfg.task)
    if not spec.finetune:
        return {}
    cls = hf_class(arch, cfg, run)
    out = {"architectures": [cls]}
    if spec.label in (*PROBLEM_TYPES, "tags", "preference"):
        labels = cfg.finetune.labels or ["score" if spec.label == "preference" else "value"]  # one output
        out.update(id2label={str(i): name for i, name in enumerate(labels)},
                   label2id={name: i for i, name in enumerate(labels)})
        out["classifier_dropout"] = cfg.finetune.classifier_dropout
    if spec.label in PROBLEM_TYPES:
        out["problem_type"] = PROBLEM_TYPES[spec.label]
    return out


NEW_PAD = "<pad>"


def _decoder_classifier_tokenizer(tok: Tokenizer, specials: dict[str, str]) -> tuple[Tokenizer, dict[str, str]]:
    """The tokenizer and special tokens of a decoder classifier's export. The run read `text eos` (a pair:
    `a eos b eos`, SequenceTask.join) and pooled its last real token; transformers' *ForSequenceClassification
    pools the last token that is not config.pad_token_id, so the pad token must never end a text: the run's own
    padding token where it has one other than eos, else a new one (NEW_PAD, the next id). Its post-processor
    adds the eos as the run did, replacing the source's (which may add a bos the run never read)."""
    eos, pad = specials.get("eos_token"), specials.get("pad_token")
    tok = ending_with(tok, eos) if eos is not None else Tokenizer.from_str(tok.to_str())
    if pad is None or pad == eos:  # (a vocabulary holding NEW_PAD would have given it as the pad token)
        pad = NEW_PAD
        tok.add_special_tokens([pad])
    return tok, {**specials, "pad_token": pad}


def _grow_embedding(tensors: dict, mapping: dict, hf_cfg: dict, rows: int) -> None:
    """Zero rows for tokens the export added (NEW_PAD) past the model's vocabulary: a padding token's row is
    never read, its positions masked and not pooled."""
    if rows > hf_cfg["vocab_size"]:
        emb = mapping["tok_emb.weight"][0]
        extra = torch.zeros(rows - hf_cfg["vocab_size"], tensors[emb].shape[1], device=tensors[emb].device)
        tensors[emb] = torch.cat([tensors[emb], extra])
        hf_cfg["vocab_size"] = rows


def _set_side_tokens(side: dict[str, str], specials: dict[str, str]) -> None:
    """The export's pad token in the tokenizer files a source model brought along, and the tokenizer class that
    reads tokenizer.json as it is (a LlamaTokenizerFast would rebuild the post-processor from add_bos_token)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = {**json.loads(side[name]), "pad_token": specials["pad_token"]}
        if name == "tokenizer_config.json":
            data = {k: v for k, v in data.items() if k not in ("add_bos_token", "add_eos_token")}
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
        side[name] = _json_text(data)


def _token_tagger_head(tensors: dict, arch: Arch, cfg) -> None:
    """A causal body's tagger has a bias-free classifier (as GPT-2's and Llama's `score`); transformers'
    *ForTokenClassification has a bias, written as zeros. GPT2ForTokenClassification calls its layer
    `classifier`, not `score`."""
    if registry.spec(cfg.task).model != "token_tagger" or body_task(cfg) != "clm":
        return
    weight = tensors.pop(arch.weights["classifier"] + ".weight")
    name = "classifier" if arch.name == "gpt2" else arch.weights["classifier"]
    tensors[f"{name}.weight"] = weight
    tensors[f"{name}.bias"] = torch.zeros(weight.shape[0], device=weight.device)


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


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def _add_named_template(side: dict[str, str], cfg) -> None:
    """A chat SFT trained with a named template (finetune.chat_template = chatml) on a model that had none:
    the export's tokenizer_config.json gets that template, so apply_chat_template renders what it learned."""
    named = chat.NAMED.get(cfg.finetune.chat_template)
    tokenizer_config = json.loads(side["tokenizer_config.json"])
    if named and "chat_template.jinja" not in side and not tokenizer_config.get("chat_template"):
        side["tokenizer_config.json"] = _json_text({**tokenizer_config, "chat_template": named})


def _source_token_ids(side: dict[str, str]) -> dict:
    """config.json's bos/eos/pad ids as the source model had them (a chat model's eos is its end-of-turn
    token, or a list of ids), where the run came from an imported model."""
    text = side.pop("source_config.json", None)  # read here, not written as a file of its own
    source = json.loads(text) if text else {}
    return {k: source[k] for k in TOKEN_ID_KEYS if k in source}


def export_hf(run: str | Path, out: str | Path, fmt: str = "auto", merge: bool = False) -> dict:
    """A run directory, checkpoint or HF folder (anything load_run reads) -> a Hugging Face folder:
    model.safetensors, config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json (and
    generation_config.json, chat_template.jinja: a run from an imported model writes its source's side
    files back unchanged); a LoRA run's base model there and its adapter in OUT/adapter in the peft
    library's format (peft.PeftModel.from_pretrained(base, OUT/adapter)), or with `merge` the base plus the
    LoRA update as one plain model. A run on a quantised base (peft.base_dtype) is written with the base's
    dequantised values: the weights it computed with.

    Fine-tuned models: *ForSequenceClassification / *ForTokenClassification (BERT, GPT-2, Llama, Qwen2,
    Qwen3 bodies), except an encoder classifier pooled otherwise than with BERT's pooler, which is written in
    the sentence-transformers layout (hf/sentence.py: BertModel at the root, 1_Pooling, 2_Dense), its LoRA
    always merged (that layout has no peft adapter). Returns the config.json written."""

    out = Path(out)
    check_out(out, "export")
    trained, tok, cfg = load_run(run)
    method = peft_method(trained)
    arch = check_exportable(cfg, run, fmt, merge, method)  # `lmforge export` asked before loading a run directory
    if arch is None:
        return _export_encoder_decoder(trained, tok, cfg, out)
    dequantise_model(trained)
    sentence = sentence_layout(cfg)
    if sentence and method == "lora" and not merge:
        print(f"lmforge: note: {run}: the LoRA update is merged into the weights (a sentence-transformers folder "
              "holds no peft adapter)", file=sys.stderr)
        merge = True
    # the base weights, its adapter written on its own below; merged: the base plus the LoRA update
    model = strip_peft(trained, merge=merge)
    method = "none" if merge else method
    mapping, _ = keymap.mapping(arch, model)  # tied output weights are left out: from_pretrained ties them again
    tensors = keymap.to_hf({k: p.detach() for k, p in model.named_parameters()}, mapping, arch, cfg.model)
    tensors.update({copy: tensors[original] for copy, original in arch.copies.items() if original in tensors})
    if arch is BERT and cfg.model.type_vocab_size == 0:
        tensors["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.model.d_model, device="cpu")
    _token_tagger_head(tensors, arch, cfg)
    specials = special_tokens(tok, body_task(cfg))
    if decoder_classifier(cfg):
        tok, specials = _decoder_classifier_tokenizer(tok, specials)
    hf_cfg = {**_hf_config(arch, cfg, specials, tok), **_finetuned_config(arch, cfg, run)}
    side = {**_tokenizer_files(specials, cfg), **hf_side_files(run)}  # the source's own, where the run came from one
    hf_cfg.update(_source_token_ids(side))
    _add_named_template(side, cfg)
    if decoder_classifier(cfg):  # the pad token chosen above, whatever the source said
        _set_side_tokens(side, specials)
        hf_cfg["pad_token_id"] = tok.token_to_id(specials["pad_token"])
        _grow_embedding(tensors, mapping, hf_cfg, tok.get_vocab_size())
    files = {}  # {path inside OUT: tensors} beside model.safetensors
    if sentence:
        tensors, files[f"{DENSE_DIR}/model.safetensors"] = split_tensors(tensors, arch.prefix, cfg.model.d_model)
        side.update(sentence_files(cfg.finetune.pooling, cfg.model.d_model, len(hf_cfg["id2label"]),
                                   min(cfg.finetune.max_length, cfg.model.max_seq_len), list(hf_cfg["label2id"])))

    def write(tmp: Path) -> None:
        _write_model(tmp, {"model.safetensors": tensors, **files}, {"config.json": _json_text(hf_cfg), **side}, tok)
        if method == "lora":  # in a sub-folder: beside config.json, transformers would load it in place of the base
            write_peft_adapter(trained, arch, tmp / ADAPTER_DIR, base_model_path=str(out.resolve()),
                               hf_class=hf_cfg["architectures"][0], mapping=mapping)

    write_dir(out, "export", write)
    return hf_cfg


def _tokenizer_files(specials: dict[str, str], cfg) -> dict[str, str]:
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast",  # reads tokenizer.json as it is: the same ids
               "model_max_length": cfg.model.max_seq_len, "clean_up_tokenization_spaces": False, **specials}
    return {"tokenizer_config.json": _json_text(tok_cfg), "special_tokens_map.json": _json_text(specials)}


def _write_model(tmp: Path, weights: dict[str, dict[str, torch.Tensor]], texts: dict[str, str], tok: Tokenizer) -> None:
    """weights: {path inside the folder: tensors} (model.safetensors, a sentence-transformers head's file);
    texts: {path: the file's text}; and tokenizer.json."""
    for name, tensors in weights.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        # clone: safetensors refuses views that share storage (the parts of a fused tensor)
        write_safetensors({k: v.contiguous().clone() for k, v in tensors.items()}, tmp / name, {"format": "pt"})
    for name, text in texts.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text, encoding="utf-8")
    tok.save(str(tmp / "tokenizer.json"))


def _export_encoder_decoder(model, tok: Tokenizer, cfg, out: Path) -> dict:
    """A seq2seq or span run (check_exportable passed) -> a BartForConditionalGeneration folder whose generate()
    decodes as lmforge does (hf/bart.py: the layout, why BART, the generation settings)."""
    hf_cfg = bart.config(model, tok)
    texts = {"config.json": _json_text(hf_cfg), "generation_config.json": _json_text(bart.generation_config(cfg, tok)),
             **_tokenizer_files(bart.special_tokens(tok), cfg)}
    tensors = bart.tensors(model)
    write_dir(out, "export", lambda tmp: _write_model(tmp, {"model.safetensors": tensors}, texts, bart.tokenizer(tok)))
    return hf_cfg


# The classes whose models peft loads as PeftModelForCausalLM (task_type CAUSAL_LM); others get none.
CAUSAL_LM_CLASSES = ("ForCausalLM", "LMHeadModel")


def write_peft_adapter(model: nn.Module, arch, out_dir: str | Path, base_model_path: str = "",
                       hf_class: str | None = None, mapping: dict | None = None) -> dict:
    """Write a LoRA model's update as HF peft writes it (adapter_config.json, adapter_model.safetensors)
    for the base model `export_hf` writes of strip_peft(model), so that
    `peft.PeftModel.from_pretrained(<that model>, out_dir)` computes what the lmforge model does.

    arch: an Arch. hf_class: the class the base folder's config.json names (default the arch's first).
    mapping: keymap.mapping(arch, strip_peft(model))[0] when the caller has it. Returns the adapter config.

    A fused lmforge layer's LoRA becomes one per HF layer (keymap.lora_tensors); GPT-2's Conv1D layers
    take the same A and B with fan_in_fan_out."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("export: the model has no LoRA layers; a Hugging Face peft adapter is written for "
                        "peft.method lora")
    if any(isinstance(m, (Adapter, PrefixAttention)) for m in model.modules()):
        raise UserError("export: the model has bottleneck adapters or a prefix, which lmforge cannot write as a "
                        "Hugging Face peft adapter; only LoRA is exported")
    settings = {(m.rank, m.alpha, getattr(m.lora_dropout, "p", 0.0)) for m in layers.values()}
    if len(settings) > 1:
        raise UserError(f"export: the LoRA layers differ in rank, alpha or dropout ({sorted(settings)}); "
                        "the peft adapter config holds one of each")
    rank, alpha, dropout = settings.pop()
    if mapping is None:
        mapping, _ = keymap.mapping(arch, strip_peft(model))
    unmapped = [name for name in layers if f"{name}.weight" not in mapping]
    if unmapped:
        raise UserError(f"export: LoRA on {unmapped[0]}, which has no {arch.title} tensor of its own; "
                        f"leave it out of peft.lora_targets")
    tensors, targets, conv = keymap.lora_tensors(layers, mapping, arch, model.cfg)
    if any(conv) and not all(conv):  # peft's fan_in_fan_out is one setting for every target
        lin = next(t for t, c in zip(targets, conv) if not c)
        raise UserError(f"export: LoRA on GPT-2's Conv1D layers and on the Linear {lin} at once cannot be one peft "
                        f"adapter (fan_in_fan_out differs); leave {lin} out of peft.lora_targets")
    hf_class = hf_class or arch.classes[0]
    causal = hf_class.endswith(CAUSAL_LM_CLASSES)
    library = f"transformers.models.{arch.model_types[0]}.modeling_{arch.model_types[0]}"
    # the keys HF peft writes (0.21 writes more, all at their defaults; these are the ones older versions know)
    config = {
        "alpha_pattern": {},
        "auto_mapping": None if causal else {"base_model_class": hf_class, "parent_library": library},
        "base_model_name_or_path": base_model_path or None,
        "bias": "none",
        "fan_in_fan_out": all(conv),
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(targets),  # full module paths: peft matches a name equal to one
        "task_type": "CAUSAL_LM" if causal else None,
        "use_dora": False,
        "use_rslora": False,
    }
    def write(folder: Path) -> None:
        atomic_write(folder / "adapter_model.safetensors", lambda tmp: write_safetensors(tensors, tmp, {"format": "pt"}))
        atomic_text(folder / "adapter_config.json", _json_text(config))

    fill_folder(Path(out_dir), write)  # both files or neither
    return config
