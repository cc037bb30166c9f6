"""The GPU tier: lmforge on a CUDA device gives the results it gives on the CPU.

What it checks, each against an oracle that a wrong result fails:
- every task (and FGM, PGD, LoRA, adapters, prefix tuning) trains on the device in `train.precision auto`
  and its loss falls further than an untrained model's can;
- predict, evaluate, generate, translate (greedy and beam) and `serve` on the device answer what they
  answer on the CPU for the same run;
- fp32 training steps (TF32 off, the fused chunked loss really chunked too) equal the CPU's to 1e-4;
- greedy decoding with the KV cache and with left-padded batches, and beam search, give the CPU's tokens;
- fp16 with loss scaling resumes exactly (the GradScaler's state travels in the checkpoint);
- a checkpoint written on one device resumes on the other as if the whole run had been on the CPU;
- FSDP under torchrun trains on the device and equals one process.

Run it on a machine with CUDA: `make test-gpu` (= `pytest -m gpu tests`); `make test` skips it, saying why,
where there is no CUDA. `LMFORGE_GPU_TEST_DEVICE=cpu pytest tests/test_gpu.py` is a dry run of the
tier's own logic on the CPU: every "device versus CPU" comparison then compares the CPU with itself, and
the fp16 test (CUDA only by design) is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean

import pytest
import torch

from helpers import (GPU_TEST_DEVICE, SEQ2SEQ_TINY, classify_files, conll_lines, finetune, make_base,
                      number_pairs, read_metrics, sentences, sentiment, server, synthetic_text, tiny_config, tiny_overrides,
                      write_corpus, write_fixed_perf_cache, write_lines, write_tsv)
from lmforge.cli import main
from lmforge.generate import beam_search, generate, greedy_decode
from lmforge.model.config import ModelConfig
from lmforge.model.seq2seq import EncoderDecoder
from lmforge.model.transformer import GPT
from lmforge.runs import load_run
from lmforge.train.checkpoint import is_sharded, load_checkpoint, sharded_model_state
from lmforge.train.loop import train
from lmforge.train.precision import set_tf32

pytestmark = pytest.mark.gpu

DEV = GPU_TEST_DEVICE
ON_CUDA = torch.device(DEV).type == "cuda"
SRC = Path(__file__).resolve().parents[1] / "src"


# -- helpers -----------------------------------------------------------------------------------------


def losses(run: Path, split: str = "train") -> list[float]:
    return [r["loss"] for r in read_metrics(run, split)]


def assert_loss_falls(rows: list[float], tail: int = 10) -> None:
    """The mean of the last `tail` step losses below 0.9 x the mean of the first 3: a run whose steps do
    not learn stays within a few percent (the batch-to-batch noise)."""
    assert len(rows) >= tail + 3, rows
    assert mean(rows[-tail:]) < 0.9 * mean(rows[:3]), rows


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}.pt"


def exact_fp32() -> None:
    """IEEE fp32 matmuls on the device: a run with train.tf32 true (the default) turns TF32 on for the
    whole process, and a comparison with the CPU must not inherit it."""
    set_tf32(torch.device(DEV), False)


def cli_out(capsys, *argv: str) -> str:
    """`lmforge ARGV`'s standard output (it must succeed)."""
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def on_both(fn):
    """(fn(device), fn("cpu")): two separate runs, also in the dry run where the device is the CPU."""
    return fn(DEV), fn("cpu")


def flag_args(over: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in over.items()]


def assert_close_states(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float().cpu(), b[k].float().cpu(), atol=atol, rtol=0, msg=k)


def assert_same_records(got: list[dict], want: list[dict], atol: float = 1e-4) -> None:
    """Prediction records: every label, tag and text equal; every number within atol."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            if isinstance(w[k], float) or (isinstance(w[k], dict) and all(isinstance(v, float) for v in w[k].values())):
                assert g[k] == pytest.approx(w[k], abs=atol), (k, g, w)
            else:
                assert g[k] == w[k], (k, g, w)


# -- the training runs: every task on the device -----------------------------------------------------

FINETUNE_EPOCHS = "4"
# name -> (task, extra options); fine-tuning runs start from a tiny random base (helpers.make_base)
FAST = ("--train.lr", "1e-2")  # where the default 3e-3 learns too little in 40 steps
CASES = {
    "clm": ("clm", ()),
    "mlm-nsp": ("mlm", ()),
    "classify": ("classify", FAST),
    "regress": ("regress", ("--loss.name", "huber", "--finetune.metric", "mse")),
    "multilabel": ("multilabel", ()),
    "tag": ("tag", FAST),
    "sft": ("sft", FAST),
    "dpo": ("dpo", (*FAST, "--loss.beta", "0.5", "--finetune.epochs", "8")),
    "seq2seq": ("seq2seq", ()),
    "span": ("span", ()),
    "classify-fgm": ("classify", (*FAST, "--robust.adversarial", "fgm")),
    "classify-pgd": ("classify", (*FAST, "--robust.adversarial", "pgd")),
    "classify-lora": ("classify", (*FAST, "--peft.method", "lora", "--peft.lora_rank", "4", "--peft.lora_targets",
                                   "*.attn.qkv,*.attn.proj,*.mlp.up,*.mlp.down")),
    # a random frozen body gives a sentence's [CLS] almost nothing of its words: adapters and prefixes show
    # their training on tagging, where each word's own features reach the head
    "tag-adapter": ("tag", (*FAST, "--peft.method", "adapter", "--peft.adapter_size", "8")),
    "tag-prefix": ("tag", (*FAST, "--peft.method", "prefix", "--peft.prefix_length", "4")),
}
FINETUNED = ["classify", "regress", "multilabel", "tag", "sft", "dpo", "classify-lora", "tag-adapter", "tag-prefix"]
ON_DEVICE = ["--train.device", DEV, "--train.precision", "auto", "--log.every", "1"]


def finetune_data(tmp: Path, task: str) -> tuple[Path, Path | None]:
    """(train file, dev file or None) of a small labelled set the task can learn."""
    if task == "classify":
        return classify_files(tmp)
    if task == "regress":
        rows = [{"text": " ".join(w), "label": len(w) - 6.5} for w in sentences(160, 6)]
    elif task == "multilabel":
        rows = [{"text": " ".join(w), "label": [x for x in ("king", "night") if x in w]} for w in sentences(160, 7)]
    elif task == "sft":
        rows = [{"prompt": " ".join(w) + " =>", "response": " " + w[0]} for w in sentences(120, 11)]
    elif task == "dpo":  # prefer the sentiment of helpers' rule over the other one
        rows = [{"prompt": " ".join(w) + " =>", "chosen": " " + sentiment(w),
                 "rejected": " neg" if sentiment(w) == "pos" else " pos"} for w in sentences(160, 12)]
    else:
        return write_lines(tmp / "train.conll", conll_lines(160, 8)), write_lines(tmp / "dev.conll", conll_lines(40, 9))
    return write_lines(tmp / f"{task}.jsonl", [json.dumps(r) for r in rows]), None


def train_case(tmp: Path, name: str, bases: dict[str, Path]) -> Path:
    """The run directory of CASES[name] trained on the device in train.precision auto."""
    task, extra = CASES[name]
    run = tmp / "run"
    if task in ("clm", "mlm"):
        corpus = write_corpus(tmp, synthetic_text())
        over = tiny_overrides(tmp, corpus, **{"train.max_steps": 40, "train.lr": 1e-2,
                                              "train.batch_size": 16, "model.max_seq_len": 32})
        if task == "mlm":
            over.update({"task": "mlm", "data.tokenizer.special_tokens": "[CLS],[SEP],[MASK]", "mlm.nsp": "true",
                         "model.type_vocab_size": 2, "model.norm_position": "post", "model.pos": "learned"})
        assert main(["pretrain", *flag_args(over), *ON_DEVICE]) == 0
    elif task == "seq2seq":
        pairs = write_tsv(tmp / "train.tsv", number_pairs(600, 0))
        dev = write_tsv(tmp / "dev.tsv", number_pairs(30, 1))
        assert main(["train", "--task", "seq2seq", *SEQ2SEQ_TINY, "--seq2seq.train", str(pairs), "--seq2seq.dev",
                     str(dev), "--data.tokenizer.vocab_size", "300", "--seq2seq.max_tokens", "512",
                     "--train.lr", "3e-3", "--train.max_steps", "40",
                     "--train.warmup_steps", "4", "--seq2seq.eval_bleu", "false", "--seq2seq.samples", "0",
                     "--seq2seq.beam_size", "3", "--log.run_dir", str(run), *ON_DEVICE]) == 0
    elif task == "span":
        corpus = tmp / "mono"
        corpus.mkdir()
        write_corpus(corpus, synthetic_text(), "text.txt")
        assert main(["train", "--task", "span", *SEQ2SEQ_TINY, "--model.max_seq_len", "32", "--data.path", str(corpus),
                     "--data.cache_dir", str(tmp / "cache"), "--data.tokenizer.vocab_size", "200",
                     "--train.batch_size", "16", "--train.lr", "3e-3", "--train.max_steps", "40",
                     "--train.warmup_steps", "4", "--eval.batches", "2", "--log.run_dir", str(run), *ON_DEVICE]) == 0
    else:
        train_file, dev = finetune_data(tmp, task)
        base = bases["decoder" if task in ("sft", "dpo") else "encoder"]
        finetune(tmp, base, train_file, dev, task, "--finetune.epochs", FINETUNE_EPOCHS, *extra, *ON_DEVICE)
    exact_fp32()
    return run


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bases")
    return {"encoder": make_base(tmp / "encoder", "mlm"), "decoder": make_base(tmp / "decoder", "clm")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bases):
    """runs(name): CASES[name]'s run directory, trained once for the module."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            done[name] = train_case(tmp_path_factory.mktemp(name), name, bases)
        return done[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_every_task_trains_on_the_device_and_its_loss_falls(runs, bases, name):
    """The step losses fall; the best weights are written and load on the device; with PEFT the base's
    weights come back unchanged (frozen on the device too)."""
    run = runs(name)
    assert_loss_falls(losses(run))
    assert f"device: {DEV}" in (run / "config.yaml").read_text()
    assert (run / "model.safetensors").is_file()
    tuned, _, cfg = load_run(run, DEV)
    assert next(tuned.parameters()).device.type == torch.device(DEV).type
    if cfg.peft.method != "none":
        base, _, _ = load_run(bases["encoder"])
        frozen, after = base.state_dict(), tuned.state_dict()
        for key in ("tok_emb.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.down.weight"):
            assert torch.equal(after[key].cpu(), frozen[key]), key
        assert any(k not in frozen for k in after)  # the adapter's own weights are there


# -- inference on the device answers what the CPU answers ---------------------------------------------

def predict_input(run: Path) -> Path:
    """The training file of a fine-tuned run, as predict and evaluate input."""
    from lmforge.config import read_yaml

    return Path(read_yaml(run / "config.yaml")["finetune"]["train"])


def evaluation(capsys, run: Path, data: Path, device: str, out: Path) -> dict[str, float]:
    """`lmforge evaluate`'s RESULT metrics, unrounded (from the JSON report it writes to `out`)."""
    last = cli_out(capsys, "evaluate", "--checkpoint", str(run), "--data", str(data), "--device", device, "--out",
                   str(out)).strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    report = json.loads(out.read_text())
    return {key: report[key] for key in (kv.split("=")[0] for kv in last.split()[1:])}


@pytest.mark.parametrize("name", FINETUNED)
def test_predict_and_evaluate_on_the_device_equal_the_cpu(runs, name, tmp_path, capsys):
    """The records of `predict` (labels, tags, generated responses equal; probabilities and values within
    1e-4) and the metrics of `evaluate` (within 1e-4) on the device are the CPU's, for the runs of
    every fine-tuning task and of LoRA, adapters and prefix tuning."""
    run = runs(name)
    data = predict_input(run)
    on_dev, on_cpu = on_both(lambda dev: [json.loads(line) for line in cli_out(
        capsys, "predict", "--checkpoint", str(run), "--input", str(data), "--device", dev).splitlines()])
    assert len(on_cpu) > 10
    assert_same_records(on_dev, on_cpu)
    on_dev, on_cpu = on_both(lambda dev: evaluation(capsys, run, data, dev, tmp_path / "eval.json"))
    assert on_cpu and on_dev == pytest.approx(on_cpu, abs=1e-4)


@pytest.fixture(autouse=True)
def _ieee_fp32_matmuls():
    exact_fp32()  # whatever an earlier test left (a run with train.tf32 true turns TF32 on process-wide)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_on_the_device_equals_the_cpu(runs, capsys, use_cache):
    """`lmforge generate --temperature 0` (greedy) on the device prints the CPU's text."""
    run = runs("clm")
    on_dev, on_cpu = on_both(lambda dev: cli_out(
        capsys, "generate", "--checkpoint", str(run), "--prompt", "The king", "--max-new-tokens", "20",
        "--temperature", "0", "--device", dev, *([] if use_cache else ["--no-cache"])))
    assert on_dev == on_cpu
    assert len(on_cpu) > len("The king") + 15


def test_sampling_on_the_device_is_reproducible_by_seed(runs, capsys):
    """Sampling (temperature, top-k, top-p) on the device draws from a generator on the device: the same
    seed gives the same text, another seed another text. (The CPU's random stream differs, so the
    CPU is no oracle here.)"""
    run = runs("clm")

    def sample(seed: int) -> str:
        return cli_out(capsys, "generate", "--checkpoint", str(run), "--prompt", "The king", "--max-new-tokens", "24",
                       "--temperature", "1.5", "--top-k", "20", "--top-p", "0.95", "--seed", str(seed),
                       "--device", DEV)

    first = sample(1)
    assert sample(1) == first and len(first) > len("The king") + 15
    assert sample(2) != first


@pytest.mark.parametrize("beam", ["1", "3"])
def test_translate_on_the_device_equals_the_cpu(runs, tmp_path, capsys, beam):
    """`lmforge translate` on the device, greedy and with beam search, prints the CPU's translations."""
    run = runs("seq2seq")
    src = write_lines(tmp_path / "src.txt", [s for s, _ in number_pairs(12, 5)])
    on_dev, on_cpu = on_both(lambda dev: cli_out(capsys, "translate", "--checkpoint", str(run), "--input", str(src),
                                                 "--device", dev, "--beam", beam).splitlines())
    assert on_dev == on_cpu
    assert len(on_cpu) == 12 and sum(bool(line) for line in on_cpu) >= 10


def test_serve_on_the_device_answers_what_the_cpu_answers(runs, capsys):
    """Greedy answers, alone and batched with prompts of other lengths (left-padded), equal `generate`
    on the CPU."""
    import concurrent.futures

    run = runs("clm")
    prompts = ["The king", "Sweet", "What is this"]  # the model's context is 32 characters
    expected = {p: cli_out(capsys, "generate", "--checkpoint", str(run), "--prompt", p, "--max-new-tokens", "20",
                           "--temperature", "0", "--device", "cpu").removesuffix("\n").removeprefix(p) for p in prompts}
    with server(run, "--device", DEV) as (client, _):
        assert client.get("/metadata").json()["device"].startswith(DEV)
        ask = lambda i: client.post("/v1/generate", json={  # noqa: E731
            "prompt": prompts[i % 3], "max_new_tokens": 20, "temperature": 0}).json()["text"]
        assert ask(0) == expected[prompts[0]]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(ask, range(12)))
    assert texts == [expected[prompts[i % 3]] for i in range(12)]


# -- fp32 training steps on the device equal the CPU's ------------------------------------------------

# fp32 with TF32 off and no dropout (the devices' random streams differ). Adam's eps 1e-6 instead of 1e-8: an
# element whose gradient is near zero moves by about lr * g / (|g| + eps), so summation-order noise of 1e-10
# in g would move it by up to 1e-5 with eps 1e-8; with 1e-6 by 1e-7, and the weights compare at 1e-4.
EXACT = dict(train__precision="fp32", train__tf32=False, model__dropout=0.0, train__eps=1e-6)
FP32 = dict(**EXACT, train__max_steps=3, eval__every=3, train__warmup_steps=1)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_lora_preference_loss_and_gradients_on_the_device_equal_the_cpu(bases, tmp_path, monkeypatch, loss):
    """A LoRA DPO batch on the device (the reference: the adapters switched off; the answers' log-probs
    through 8-row chunks, recomputed in backward) gives the CPU's loss and LoRA gradients in fp32."""
    from lmforge import losses as lf
    from lmforge.config import load_config
    from lmforge.tasks import make_task

    monkeypatch.setattr(lf, "CHUNK_ELEMENTS", {"cpu": 1, "cuda": 1})
    monkeypatch.setattr(lf, "MIN_CHUNK_ROWS", 8)
    exact_fp32()
    train_file, _ = finetune_data(tmp_path, "dpo")
    cfg = load_config(base={"task": "dpo", "finetune": {"init_from": str(bases["decoder"]), "train": str(train_file)},
                            "peft": {"method": "lora"}, "loss": {"name": loss, "beta": 2.0 if loss == "simpo" else 0.1},
                            "train": {"warmup_steps": 0}})
    task = make_task(cfg)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model(pretrained=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):  # a trained-looking adapter: policy and reference differ
                p.normal_(std=0.05, generator=torch.Generator(device="cpu").manual_seed(len(name)))
    batch = task.collate(task.train_rows[:8], task.train_examples[:8])
    results = []
    for dev in (DEV, "cpu"):
        m = model.to(dev)
        m.zero_grad()
        value = task.loss(m, {k: v.to(dev) for k, v in batch.items()})
        value.backward()
        results.append((value.item(), {n: p.grad.cpu().clone() for n, p in m.named_parameters() if p.grad is not None}))
    (on_dev, g_dev), (on_cpu, g_cpu) = results
    assert on_dev == pytest.approx(on_cpu, abs=1e-4) and g_cpu and g_dev.keys() == g_cpu.keys()
    for name in g_cpu:
        torch.testing.assert_close(g_dev[name], g_cpu[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked-loss"])
def test_fp32_steps_on_the_device_equal_the_cpu(tmp_path, corpus, monkeypatch, chunked):
    """3 steps in fp32 with TF32 off: every step's loss and the final weights within 1e-4 of the CPU's.
    chunked: the fused linear + cross-entropy in 8-row chunks (compiled on CUDA) with label smoothing,
    z-loss and soft-capping."""
    from lmforge import losses as lf

    calls = []
    if chunked:
        real_apply = lf._LinearCrossEntropy.apply
        monkeypatch.setattr(lf._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real_apply(*a))
        monkeypatch.setattr(lf, "CHUNK_ELEMENTS", {"cpu": 1, "cuda": 1})
        monkeypatch.setattr(lf, "MIN_CHUNK_ROWS", 8)
    options = dict(loss__label_smoothing=0.1, loss__z_loss=1e-3, loss__softcap=5.0) if chunked else {}
    on_dev, on_cpu = (train(tiny_config(tmp_path / side, corpus, train__device=dev, **FP32, **options,
                                        log__run_dir=str(tmp_path / side / "run"))).run_dir
                      for dev, side in ((DEV, "device"), ("cpu", "cpu")))
    assert bool(calls) == chunked
    for split in ("train", "val"):
        assert losses(on_dev, split) == pytest.approx(losses(on_cpu, split), abs=1e-4)
    assert_close_states(load_checkpoint(ckpt(on_dev, 3))["model"], load_checkpoint(ckpt(on_cpu, 3))["model"],
                        atol=1e-4)


def test_compile_on_the_device_compiles_model_and_loss_without_falling_back(tmp_path, corpus, monkeypatch, recwarn):
    """train.compile true: each block compiled and the fused loss's chunk math compiled (on CUDA), with no
    fallback to eager anywhere, and the eager run's losses within 1e-4 (fp32, TF32 off)."""
    from lmforge import losses as lf

    monkeypatch.setattr(lf, "CHUNK_ELEMENTS", {"cpu": 1, "cuda": 1})
    monkeypatch.setattr(lf, "MIN_CHUNK_ROWS", 8)
    runs = {compiled: train(tiny_config(tmp_path / str(compiled), corpus, train__device=DEV, train__compile=compiled,
                                        **FP32, log__run_dir=str(tmp_path / str(compiled) / "run"))).run_dir
            for compiled in (True, False)}
    fallbacks = ("torch.compile failed", "compiling the chunk math failed")  # the loop's and the loss's warnings
    assert not [str(w.message) for w in recwarn if any(f in str(w.message) for f in fallbacks)]
    assert not lf.COMPILE_FAILED
    for split in ("train", "val"):
        assert losses(runs[True], split) == pytest.approx(losses(runs[False], split), abs=1e-4)


def test_class_weighted_translation_steps_on_the_device_equal_the_cpu(tmp_path):
    """A seq2seq run takes loss.class_weights (a weight per target token): 2 fp32 steps with uneven weights
    on the device give the CPU's losses and weights (the weights must reach the loss on its device)."""
    pairs = write_tsv(tmp_path / "pairs.tsv", number_pairs(100, 0))

    def run(name: str, dev: str, *extra: str) -> Path:
        argv = ["train", "--task", "seq2seq", *SEQ2SEQ_TINY, "--seq2seq.train", str(pairs), "--seq2seq.dev", str(pairs),
                "--data.tokenizer.vocab_size", "300", "--train.max_steps", "2", "--train.warmup_steps", "0",
                "--seq2seq.eval_bleu", "false", "--seq2seq.samples", "0", "--model.dropout", "0",
                "--train.precision", "fp32", "--train.tf32", "false", "--train.eps", "1e-6", "--log.every", "1",
                "--train.device", dev, "--log.run_dir", str(tmp_path / name), *extra]
        assert main(argv) == 0
        return tmp_path / name

    from lmforge.config import read_yaml

    vocab = read_yaml(run("plain", "cpu") / "config.yaml")["model"]["vocab_size"]
    weights = ["--loss.class_weights", ",".join(str(1 + i % 3 / 2) for i in range(vocab))]
    on_dev, on_cpu = run("device", DEV, *weights), run("cpu", "cpu", *weights)
    assert losses(on_dev) == pytest.approx(losses(on_cpu), abs=1e-4)
    assert losses(on_cpu) != pytest.approx(losses(tmp_path / "plain"), abs=1e-3)  # the weights count
    assert_close_states(load_checkpoint(ckpt(on_dev, 2))["model"], load_checkpoint(ckpt(on_cpu, 2))["model"],
                        atol=1e-4)


# -- decoding on the device gives the CPU's tokens ----------------------------------------------------

VOCAB = 50
GPT_SHAPES = {
    "learned": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "rope-gqa-rms-swiglu": dict(pos="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False,
                                tie_embeddings=False),
}


def on(model: torch.nn.Module, dev: str) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dev).eval()


def greedy_oracle(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the slow, obvious way: the whole sequence through the model for every token."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("shape", GPT_SHAPES)
def test_greedy_decoding_on_the_device_gives_the_cpu_tokens(shape):
    """Greedy decoding of a decoder on the device, with the KV cache and without: a batch of prompts of one
    length gives the CPU's tokens, and left-padded prompts of different lengths decoded together give
    each row the tokens the CPU's full-sequence oracle gives that prompt alone."""
    exact_fp32()
    torch.manual_seed(0)
    # a larger init std than training uses spreads the logits, so greedy choices are far from ties
    cpu = GPT(ModelConfig(vocab_size=VOCAB, max_seq_len=48, n_layer=2, n_head=4, d_model=32, init_std=0.2,
                          **GPT_SHAPES[shape])).eval()
    dev = on(cpu, DEV)
    g = torch.Generator(device="cpu").manual_seed(2)
    prompts = [torch.randint(VOCAB, (n,), generator=g, device="cpu").tolist() for n in (9, 3, 6)]
    alone = [greedy_oracle(cpu, torch.tensor([p], device="cpu"), 16)[0].tolist() for p in prompts]
    assert len({t for row in alone for t in row}) > 5  # not a degenerate constant output
    width = max(map(len, prompts))
    padded = torch.tensor([[7] * (width - len(p)) + p for p in prompts], device=DEV)
    pads = torch.tensor([width - len(p) for p in prompts], device=DEV)
    same_length = torch.tensor([p[:3] for p in prompts], device="cpu")
    for use_cache in (True, False):
        together = generate(dev, padded, 16, temperature=0.0, left_pad=pads, use_cache=use_cache)
        assert together.device == padded.device
        assert together.tolist() == alone, use_cache
        assert generate(dev, same_length.to(DEV), 16, temperature=0.0, use_cache=use_cache).tolist() == \
            generate(cpu, same_length, 16, temperature=0.0, use_cache=use_cache).tolist(), use_cache


def test_beam_search_on_the_device_gives_the_cpu_tokens():
    """Beam search (4 beams) and greedy decoding of an encoder-decoder on the device over a padded batch of
    sources of 1..12 tokens with per-row limits, with and without the KV cache: the CPU's hypotheses."""
    exact_fp32()
    torch.manual_seed(0)
    cpu = EncoderDecoder(ModelConfig(vocab_size=24, max_seq_len=32, n_layer=2, n_head=4, d_model=32,
                                     init_std=0.2)).eval()
    dev = on(cpu, DEV)
    pad, bos, eos = 0, 2, 3
    g = torch.Generator(device="cpu").manual_seed(7)
    lengths = torch.randint(1, 13, (8,), generator=g, device="cpu").tolist()
    src = torch.full((8, max(lengths) + 1), pad, dtype=torch.long, device="cpu")
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, 24, (n,), generator=g, device="cpu")
        src[i, n] = eos
    mask = src != pad
    limits = torch.tensor([3, 12, 7, 12, 1, 9, 12, 5], device="cpu")
    for decode, extra in ((beam_search, dict(beam_size=4)), (greedy_decode, {})):
        for use_cache in (True, False):
            want = decode(cpu, src, mask, bos, eos, limits, use_cache=use_cache, **extra)
            got = decode(dev, src.to(DEV), mask.to(DEV), bos, eos, limits.to(DEV), use_cache=use_cache, **extra)
            assert got == want, (decode.__name__, use_cache)
            assert len({t for h in want for t in h}) > 5 and len(set(map(len, want))) > 2


# -- fp16 with loss scaling resumes exactly -------------------------------------------------------------

@pytest.mark.skipif(not ON_CUDA, reason="train.precision fp16 runs on CUDA only (refused on a CPU by design)")
def test_fp16_with_loss_scaling_trains_and_resumes_exactly(tmp_path, corpus, capsys, monkeypatch):
    """fp16 autocast with a GradScaler that doubles its scale after every good step (and halves it, skipping
    the step, on an overflow), so its state changes at every step: the loss falls, the checkpoint holds
    the scaler's state, and a run resumed from it continues as the uninterrupted run, to the same final
    scale (a fresh scaler would end at another and skip other steps)."""
    from lmforge.train import precision

    init_scale = 2.0 ** 14
    monkeypatch.setattr(precision.Precision, "grad_scaler", lambda self: torch.amp.GradScaler(
        self.device.type, init_scale=init_scale, growth_interval=1) if self.name == "fp16" else None)
    n = 6
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(tmp_path, corpus, train__device=DEV, train__precision="fp16", model__dropout=0.0,
                      train__max_steps=2 * n, train__checkpoint_every=n, train__keep_checkpoints=10,
                      train__lr=1e-2, eval__every=n, log__run_dir=str(run_a)))
    state = load_checkpoint(ckpt(run_a, n))
    assert "scaler" in state and state["scaler"]["scale"] != init_scale
    rows = losses(run_a)
    assert_loss_falls(rows, tail=4)

    shutil.copytree(run_a, run_b)
    ckpt(run_b, 2 * n).unlink()
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run_b)]) == 0
    assert f"from step_{n:08d}.pt (step {n})" in capsys.readouterr().out
    assert losses(run_b)[n:] == pytest.approx(rows[n:], abs=1e-5)
    end_a, end_b = load_checkpoint(ckpt(run_a, 2 * n)), load_checkpoint(ckpt(run_b, 2 * n))
    assert end_b["scaler"]["scale"] == end_a["scaler"]["scale"]
    assert_close_states(end_b["model"], end_a["model"], atol=1e-5)


@pytest.mark.skipif(not ON_CUDA, reason="train.precision fp16 runs on CUDA only (refused on a CPU by design)")
def test_fp16_nan_loss_is_skipped_not_applied_and_the_scale_halves(tmp_path, corpus, capsys, monkeypatch):
    """Under fp16 the guard skips a NaN loss as it does in fp32 (train.skip_nonfinite), and the GradScaler
    treats it as an overflow: the step is not applied (AdamW counts one step less) and the scale halves
    there instead of growing; without the allowance the run stops with exit 3."""
    from lmforge.train import precision
    from test_guard import argv, nan_loss_at

    init_scale = 2.0 ** 14
    monkeypatch.setattr(precision.Precision, "grad_scaler", lambda self: torch.amp.GradScaler(
        self.device.type, init_scale=init_scale, growth_interval=1) if self.name == "fp16" else None)
    nan_loss_at(monkeypatch, {2})
    common = dict(train__device=DEV, train__precision="fp16", train__max_steps=3, train__checkpoint_every=1,
                  train__keep_checkpoints=5)
    assert main(argv(tmp_path, corpus, train__skip_nonfinite=1, **common)) == 0
    assert "step 2: loss nan; the step was skipped" in capsys.readouterr().out
    scales = [load_checkpoint(ckpt(tmp_path / "run", s))["scaler"]["scale"] for s in (1, 2, 3)]
    assert scales == [init_scale * 2, init_scale, init_scale * 2]
    state = load_checkpoint(ckpt(tmp_path / "run", 3))
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {2.0}
    nan_loss_at(monkeypatch, {2})
    assert main(argv(tmp_path, corpus, log__run_dir=str(tmp_path / "stopped"), **common)) == 3


# -- a checkpoint resumes on the other device -----------------------------------------------------------

RESUME_STEPS = 4


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Path:
    """2n steps on the CPU in fp32, a checkpoint every n: the oracle of the cross-device resumes."""
    tmp = tmp_path_factory.mktemp("cpu-run")
    return train(resume_config(tmp, write_corpus(tmp, synthetic_text()), "cpu")).run_dir


def resume_config(tmp: Path, corpus: Path, dev: str):
    """The resume tests' run: 2n steps on `dev` with a checkpoint (and an evaluation) every n."""
    return tiny_config(tmp, corpus, train__device=dev, **EXACT, train__max_steps=2 * RESUME_STEPS,
                       train__checkpoint_every=RESUME_STEPS, train__keep_checkpoints=10, train__warmup_steps=1,
                       eval__every=RESUME_STEPS, log__run_dir=str(tmp / "run"))


@pytest.mark.parametrize("first,then", [(DEV, "cpu"), ("cpu", DEV)], ids=["device-to-cpu", "cpu-to-device"])
def test_a_checkpoint_resumes_on_the_other_device(cpu_run, tmp_path, capsys, first, then):
    """Trained n steps on one device, resumed for n more on the other (fp32, TF32 off, no dropout):
    the whole history within 1e-4 of the run that trained all 2n steps on the CPU."""
    n = RESUME_STEPS
    if first == "cpu":
        source = cpu_run
    else:
        source = train(resume_config(tmp_path, cpu_run.parent / "corpus.txt", first)).run_dir
    run = tmp_path / "resumed"
    shutil.copytree(source, run)
    ckpt(run, 2 * n).unlink()
    capsys.readouterr()
    assert main(["pretrain", "--resume", "auto", "--log.run_dir", str(run), "--train.device", then]) == 0
    assert f"from step_{n:08d}.pt (step {n})" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 2 * n + 1))
    assert losses(run) == pytest.approx(losses(cpu_run), abs=1e-4)
    assert losses(run, "val") == pytest.approx(losses(cpu_run, "val"), abs=1e-4)
    assert_close_states(load_checkpoint(ckpt(run, 2 * n))["model"], load_checkpoint(ckpt(cpu_run, 2 * n))["model"],
                        atol=1e-4)
    assert f"device: {then}" in (run / "config.yaml").read_text()


# -- FSDP under torchrun ------------------------------------------------------------------------------


def torchrun(tmp: Path, nproc: int, over: dict) -> subprocess.CompletedProcess:
    """`lmforge pretrain` under torchrun with `nproc` processes (as tests/test_distributed.py starts it)."""
    cache = write_fixed_perf_cache(tmp / "perf")  # the workers measure nothing and write nothing under ~
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "LMFORGE_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "lmforge", "pretrain", *flag_args(over)]
    done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_fsdp_under_torchrun_trains_on_the_device_like_one_process(tmp_path, corpus):
    """FSDP2 on the device (NCCL on CUDA, gloo on the CPU) with the global batch split over the ranks (one
    process per GPU, so one on a one-GPU machine: FSDP over a group of one, as CPU offload uses it):
    sharded checkpoints, losses and weights within 1e-4 of the plain loop with the whole batch, and
    they fall."""
    ranks = min(2, torch.cuda.device_count()) if ON_CUDA else 2
    steps = 20
    common = dict(**EXACT, train__max_steps=steps,
                  train__checkpoint_every=steps // 2, train__keep_checkpoints=10, train__warmup_steps=1,
                  train__lr=1e-2, eval__every=steps // 2, model__n_layer=2)
    over = tiny_overrides(tmp_path / "fsdp", corpus, **{k.replace("__", "."): v for k, v in common.items()},
                          **{"train.device": DEV, "train.batch_size": 8 // ranks, "train.parallel": "fsdp"})
    done = torchrun(tmp_path, ranks, over)
    assert f"on {ranks} x {DEV}" in done.stdout and "(fsdp)" in done.stdout
    fsdp = Path(over["log.run_dir"])
    one = train(tiny_config(tmp_path / "one", corpus, train__device=DEV, train__batch_size=8,
                            log__run_dir=str(tmp_path / "one" / "run"), **common)).run_dir
    rows = losses(fsdp)
    assert [r["step"] for r in read_metrics(fsdp, "train")] == list(range(1, steps + 1))
    assert_loss_falls(rows)
    assert rows == pytest.approx(losses(one), abs=1e-4)
    assert losses(fsdp, "val") == pytest.approx(losses(one, "val"), abs=1e-4)
    last = fsdp / "checkpoints" / f"step_{steps:08d}"
    assert is_sharded(last)
    assert_close_states(sharded_model_state(last), load_checkpoint(ckpt(one, steps))["model"], atol=1e-4)
