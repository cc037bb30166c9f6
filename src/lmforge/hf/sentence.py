"""The sentence-transformers layout of an encoder classifier that pools otherwise than BERT's pooler (mean,
cls, last): transformers has no *ForSequenceClassification class that mean-pools, so the body is written as
a BertModel at the folder's root, the pooling as sentence-transformers' `1_Pooling` module and the head as
its `2_Dense` module (identity activation), and `SentenceTransformer(OUT).encode(texts)` gives the logits.

Only files: the names, keys and module types sentence-transformers reads (checked against its 6.2 source;
the legacy `sentence_transformers.models.*` types and `pooling_mode_*` keys, which every version since 2.x
loads). hf/export.py maps the weights and writes the folder."""

from __future__ import annotations

import json

import torch

POOLING_DIR, DENSE_DIR = "1_Pooling", "2_Dense"
# lmforge's finetune.pooling -> sentence-transformers' pooling mode
POOLING_MODES = {"mean": "mean_tokens", "cls": "cls_token", "last": "lasttoken"}
ALL_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
HEAD = {"classifier.weight": "linear.weight", "classifier.bias": "linear.bias"}  # lmforge -> Dense's names

# How transformers alone computes the same outputs (README.md and docs/huggingface.md; the tests run it):
# tokenizer and body as usual, then the pooling and the head by hand.
POOLING_CODE = {
    "mean": "mask = batch[\"attention_mask\"].unsqueeze(-1).to(hidden.dtype)\n"
            "pooled = (hidden * mask).sum(1) / mask.sum(1)                # the mean over real tokens",
    "cls": "pooled = hidden[:, 0]                                         # the first token ([CLS])",
    "last": "last = batch[\"attention_mask\"].sum(1) - 1\n"
            "pooled = hidden[torch.arange(len(last), device=last.device), last]  # the last real token (right padding)",
}
TRANSFORMERS_CODE = """\
import torch
import transformers
from safetensors.torch import load_file

tok = transformers.AutoTokenizer.from_pretrained(OUT)
body = transformers.AutoModel.from_pretrained(OUT).eval()
head = load_file(f"{{OUT}}/{dense}/model.safetensors")             # the classifier: linear.weight, linear.bias
batch = tok(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = body(**batch).last_hidden_state
{pooling}
logits = pooled @ head["linear.weight"].T + head["linear.bias"]
"""


def transformers_code(pooling: str) -> str:
    """Python that sets `logits` from `OUT` (the folder) and `texts` with transformers alone."""
    return TRANSFORMERS_CODE.format(dense=DENSE_DIR, pooling=POOLING_CODE[pooling])


def split_tensors(tensors: dict[str, torch.Tensor], prefix: str, d_model: int) -> tuple[dict, dict]:
    """A BertForSequenceClassification's tensors -> (BertModel's, the Dense module's). BertModel always
    builds a pooler, which this model does not use: it is written as zeros (its pooler_output is 0), so that
    loading reports no missing weights rather than a random, meaningless pooler."""
    head = {HEAD[k]: t for k, t in tensors.items() if k in HEAD}
    body = {k.removeprefix(prefix): t for k, t in tensors.items() if k not in HEAD}
    device = next(iter(tensors.values())).device
    body["pooler.dense.weight"] = torch.zeros(d_model, d_model, device=device)
    body["pooler.dense.bias"] = torch.zeros(d_model, device=device)
    return body, head


def _json(data) -> str:
    return json.dumps(data, indent=2) + "\n"


def sentence_files(pooling: str, d_model: int, n_out: int, max_length: int, labels: list[str]) -> dict[str, str]:
    """{path inside OUT: text} of the sentence-transformers modules around the root's BertModel."""
    modules = [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
               for i, (path, kind) in enumerate((("", "Transformer"), (POOLING_DIR, "Pooling"), (DENSE_DIR, "Dense")))]
    pool = {"word_embedding_dimension": d_model, **{f"pooling_mode_{m}": m == POOLING_MODES[pooling] for m in ALL_MODES}}
    dense = {"in_features": d_model, "out_features": n_out, "bias": True,
             "activation_function": "torch.nn.modules.linear.Identity"}
    readme = (f"# An lmforge classifier in the sentence-transformers layout\n\n"
              f"A BertModel body, {pooling} pooling and a linear head with {n_out} outputs "
              f"({', '.join(labels)}; config.json's id2label). The outputs are the model's logits "
              f"(or values), as lmforge computes them:\n\n"
              f"```python\nOUT, texts = \"path/to/this/folder\", [\"a first text\", \"another one\"]\n\n"
              f"from sentence_transformers import SentenceTransformer\n"
              f"logits = SentenceTransformer(OUT).encode(texts, convert_to_tensor=True)\n```\n\n"
              f"With transformers alone (sentence pairs: `tok(texts, pairs, ...)`):\n\n"
              f"```python\n{transformers_code(pooling)}```\n")
    return {"modules.json": _json(modules), f"{POOLING_DIR}/config.json": _json(pool),
            f"{DENSE_DIR}/config.json": _json(dense),
            # the length lmforge cuts inputs to, [CLS] and [SEP] included
            "sentence_bert_config.json": _json({"max_seq_length": max_length, "do_lower_case": False}),
            "README.md": readme}
