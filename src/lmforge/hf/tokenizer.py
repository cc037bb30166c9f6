"""A Hugging Face folder's tokenizer as a `tokenizers.Tokenizer` (tokenizer.json, or BERT's vocab.txt, or
GPT-2's vocab.json + merges.txt, built as transformers' fast tokenizers build them), and the special-token
roles an exported folder declares, and an exported tokenizer that ends each text as lmforge does (ending_with)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.data.tokenizer import eos_id, load_tokenizer
from lmforge.errors import UserError
from lmforge.io import read_json


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


def hf_tokenizer(folder: Path, where: str) -> tuple[Tokenizer, list[str]]:
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            settings.update(read_json(folder / name, where))
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



# Hugging Face special-token roles and the tokens that fill them, the first in the vocabulary wins.
# The end of text is lmforge's own (data.tokenizer.eos_id); GPT-2 uses it as bos and eos alike.
CLM_ROLES = {"bos_token": ("<s>", "<|begin_of_text|>"), "unk_token": ("<unk>", "[UNK]"), "pad_token": ("<pad>", "[PAD]")}
MLM_ROLES = {"unk_token": ("[UNK]",), "sep_token": ("[SEP]",), "pad_token": ("[PAD]",), "cls_token": ("[CLS]",),
             "mask_token": ("[MASK]",)}


def special_tokens(tok: Tokenizer, task: str) -> dict[str, str]:
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


def ending_with(tok: Tokenizer, end: str) -> Tokenizer:
    """A copy of `tok` whose post-processor adds the token `end` after each text (a pair: after each part), as
    lmforge ends what its models read (a seq2seq source, a classifier's text): transformers' tokenizer then
    gives the ids the run was trained on."""
    out = Tokenizer.from_str(tok.to_str())
    out.post_processor = processors.TemplateProcessing(single=f"$A {end}", pair=f"$A {end} $B:1 {end}:1",
                                                       special_tokens=[(end, out.token_to_id(end))])
    return out
