"""LoRA SFT on a quantised frozen base (peft.base_dtype): SmolLM2-135M-Instruct with its base in fp32, int8 and
nf4, the same data, settings and steps, each variant in a fresh process: peak memory, tokens/s and dev loss.

The model is scripts/smollm2_to_hf.py's float32 folder (--smollm DIR reuses one), the data the chat set of
scripts/chat_data.py, the recipe lmforge's chat SFT (docs/chat.md): LoRA rank --rank on every Linear of the
blocks (`*.attn.qkv`, `*.attn.proj`, `*.mlp.up`, `*.mlp.down`), packed rows of up to --max-length tokens in a
plain random order, AdamW, --steps steps of --batch conversations, in --precision (fp32 by default: the
three variants then differ only in how the base is held), with activation checkpointing (as the QLoRA paper
trains; --no-checkpointing turns it off in every variant), one evaluation of the whole dev set at the end.

Each variant runs in a process of its own (this script with --variant), so none inherits another's heap.
Measured there:
  - peak memory: the process's resident-memory high-water mark (Linux VmHWM) above its resident size right
    before the run starts, i.e. before the model is loaded (libraries imported already: torch, lmforge and
    torchao, in every variant), up to the final evaluation: loading the model, the set-up and the
    training steps. So loading counts: a loader that held a second full-precision copy would show here.
    Printed also in two parts: the load (and set-up) peak, and the training steps' peak (VmHWM reset when
    the steps start), with the resident size after loading (the model as held);
  - tokens/s: the conversations' real tokens (no padding) of the --steps batches / seconds in training steps
    (lmforge's train_seconds: evaluation and checkpoints left out);
  - dev loss: the mean cross-entropy over the answer tokens of every dev conversation, by the run's own final
    evaluation, of the model as it computes (a quantised variant: LoRA on its quantised base). The run's
    final report (greedy answers to every dev conversation) is skipped: it measures nothing compared here.

Goals (issue): int8 peak memory <= 0.5x the fp32 base's; int8 dev loss within 3% of the fp32 base's.

What decides the memory ratio (measured on this 2-core CPU, SmolLM2-135M): importing the fp32 base peaks at
1,573 MiB above the baseline (the plain import holds the checkpoint, its fused tensors and the model at once)
and leaves 550 MiB resident; the streamed int8 import peaks at 259 MiB (210 MiB of parameters: 102 MiB of
int8 block weights, the 108 MiB fp32 embedding that is also the head, the norms), nf4 at 330 MiB. The
training steps then add the activations, the same for every variant: with checkpointing the blocks keep
their inputs only. Each variant runs with glibc's mmap threshold fixed (MMAP_THRESHOLD): with glibc's
default the heap keeps 1-1.5 GB of freed activations resident after a few steps in every variant, and the
steps' peak says more about the allocator than about the base (int8 1.02x of fp32 in the first full run).
Last line: RESULT mem_ratio_int8=... loss_ratio_int8=... tok_s_ratio_int8=... (mem_ratio_nf4=... loss_ratio_nf4=...
tok_s_ratio_nf4=... where nf4 ran); each ratio is the variant's over the fp32 base's.

--smoke runs 2 steps on a tiny random Llama-layout model that lmforge writes (a BPE tokenizer trained on the
chat set, ChatML), to check the benchmark's logic in seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

MiB = 1 << 20
VARIANTS = ("fp32", "int8", "nf4")
TARGETS = ["*.attn.qkv", "*.attn.proj", "*.mlp.up", "*.mlp.down"]  # configs/chat-smollm2.yaml's
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # the smoke model's (SmolLM2's ids 0-2)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """VmHWM back to the current resident size (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


# -- the parent: data, model, one process per variant ---------------------------------------------------------


def tiny_model(folder: Path, train_file: Path) -> Path:
    """A random 2-layer Llama-layout model (tied embeddings, as SmolLM2) with a 400-token BPE trained on the chat
    set and the ChatML tokens at ids 0-2, as a Hugging Face folder written by lmforge's export."""
    import torch

    from lmforge.config import load_config, save_config
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.hf.export import export_hf
    from lmforge.io import save_weights
    from lmforge.model.build import build_model
    from lmforge.train.distributed import Dist, full_weights

    texts = [m["content"] for line in train_file.read_text(encoding="utf-8").splitlines()
             for m in json.loads(line)["messages"]]
    tok = train_tokenizer(texts + ["system user assistant"], "bpe", 400, SPECIALS)
    cfg = load_config(base={"task": "clm", "model": {
        "vocab_size": tok.get_vocab_size(), "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64, "d_ff": 128,
        "max_seq_len": 512, "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": True}})
    torch.manual_seed(0)
    run = folder.parent / "tiny-run"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    save_weights(full_weights(Dist(), build_model(cfg)), run / "model.safetensors", {"step": "0"})
    tok.save(str(run / "tokenizer.json"))
    export_hf(run, folder)
    return folder


# glibc's malloc serves a large block from its heap once a block that size has been freed (its mmap threshold
# rises up to 32 MiB), and keeps freed heap memory resident: after a few steps the process holds 1-1.5 GB it
# does not use, the same in every variant, which hid the base's share (steps peak 2,059 MiB for the fp32 base
# in 2 steps; 807 MiB with the threshold fixed). Every variant runs with the threshold fixed at 64 KiB, so a
# large tensor is returned to the system when freed and the high-water mark is what the run needs (tokens/s
# pays for the page faults in every variant alike). --glibc-default measures the process as it runs by default.
MMAP_THRESHOLD = "65536"


def run_variant(variant: str, spec: Path, out: Path, threads: int, glibc_default: bool = False) -> dict:
    """This script with --variant in a fresh process; its measurements from the JSON file it writes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--spec", str(spec), "--out", str(out),
           "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"qlora_memory: the {variant} variant failed (exit {done.returncode}):\n"
                 f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(out.read_text(encoding="utf-8"))


# -- a child: one variant ---------------------------------------------------------------------------------------


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
    from lmforge import quant
    from lmforge.cli import finetune_base
    from lmforge.config import load_config
    from lmforge.train import loop
    from sft_vs_hf import lmforge_tokens

    base_dtype = "none" if args.variant == "fp32" else args.variant
    cfg = load_config(base=finetune_base({
        "task": "sft",
        "finetune": {"init_from": spec["model"], "train": spec["train"], "dev": spec["dev"], "max_length": spec["max_length"],
                     "epochs": 0, "evals_per_epoch": 0, "pack": True, "chat_template": spec["chat_template"]},
        "train": {"batch_size": spec["batch"], "max_steps": spec["steps"], "lr": spec["lr"], "min_lr": 0.0,
                  "warmup_steps": spec["warmup"], "schedule": "cosine", "weight_decay": 0.0, "grad_clip": 1.0,
                  "seed": spec["seed"], "device": "cpu", "precision": spec["precision"], "checkpoint_every": 0,
                  "activation_checkpointing": spec["checkpointing"]},
        "peft": {"method": "lora", "lora_rank": spec["rank"], "lora_alpha": spec["alpha"], "lora_dropout": 0.0,
                 "lora_targets": TARGETS, "base_dtype": base_dtype},
        "eval": {"every": 0, "batch_size": 16},  # one evaluation of the whole dev set, after the last step
        "log": {"progress": False, "trackers": [], "run_dir": spec["run_dir"] + "-" + args.variant},
    }))
    # the same before the baseline in every variant, the fp32 one too: torchao imported (its import initialises
    # parts of torch that a run would otherwise set up inside the measured window, tens of MiB) and the NF4
    # check's tiny forward and backward pass (autograd's first use)
    quant.check("nf4", torch.device("cpu"))

    marks = {}
    steps, evaluate = loop.Trainer.train, loop.Trainer.evaluate

    def timed_steps(self):  # the model is loaded and the run set up: the load peak, then the steps' own
        marks["load_hwm"], marks["loaded_rss"] = status_bytes("VmHWM"), status_bytes("VmRSS")
        marks["rows"] = self.task.train_rows  # for the replay of the batches' real tokens
        reset_peak()
        return steps(self)

    def probed(self):  # the steps are done: their peak (read only; the evaluation is lmforge's own)
        marks.setdefault("train_hwm", status_bytes("VmHWM"))
        return evaluate(self)

    loop.Trainer.train, loop.Trainer.evaluate = timed_steps, probed
    loop.Trainer.finish = lambda self: ""  # the final report's greedy answers: not compared here
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    reset_peak()
    before = status_bytes("VmRSS")
    run = loop.train(cfg)
    real, _ = lmforge_tokens(cfg, marks.pop("rows"))
    load, steps_peak = marks["load_hwm"] - before, marks["train_hwm"] - before
    result = {"variant": args.variant, "peak": max(load, steps_peak), "load_peak": load, "train_peak": steps_peak,
              "loaded": marks["loaded_rss"] - before, "tok_s": real / run.train_seconds, "train_s": run.train_seconds,
              "real": real, "steps": run.step, "loss": run.last_val["loss"], "threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps(result), encoding="utf-8")


# -- the run ----------------------------------------------------------------------------------------------------


def main() -> None:
    from sft_vs_hf import lora_sft_options, smollm_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lora_sft_options(ap)
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32", help="train.precision of every variant")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="train.activation_checkpointing in every variant (default on, as QLoRA trains: each block keeps "
                         "its input only, so the weights, not the activations, decide the peak; --no-checkpointing: "
                         "the activations of a batch of 16 then outweigh the whole base)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of fp32 (always run), int8, nf4")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each variant (default: torch's)")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's mmap threshold as it is (see MMAP_THRESHOLD)")
    ap.add_argument("--train", type=int, default=None, metavar="N", help="use the first N training conversations")
    ap.add_argument("--dev", type=int, default=None, metavar="N", help="evaluate the first N dev conversations")
    ap.add_argument("--data-seed", type=int, default=0, help="scripts/chat_data.py's --seed")
    ap.add_argument("--smollm", default=None, metavar="DIR", help="a SmolLM2 folder made by scripts/smollm2_to_hf.py "
                    "(default: convert one into a temporary folder, about a minute)")
    ap.add_argument("--smoke", action="store_true", help="2 steps on a tiny random model: checks the logic only")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process's own variant
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        child(args)
        return
    if args.smoke:
        args.steps, args.batch, args.warmup = 2, 4, 1
        args.train, args.dev = args.train or 24, args.dev or 8
        args.threads = args.threads or 1  # a tiny model on a shared machine: one thread
    args.warmup = max(1, args.steps // 10) if args.warmup is None else args.warmup
    variants = ["fp32"] + [v for v in args.variants.split(",") if v and v != "fp32"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"qlora_memory: --variants {args.variants}: {unknown[0]} is none of {', '.join(VARIANTS)}")
    if importlib.util.find_spec("torchao") is None:
        sys.exit("qlora_memory: the quantised variants need torchao (pip install 'lmforge[quant]')")
    chat_data = load_script("chat_data")
    gone = chat_data.missing()
    if gone:
        print(f"qlora_memory: {gone[0]} is missing (the chat set is built from the shared data sets beside the "
              "repository: scripts/chat_data.py)", file=sys.stderr)
        sys.exit(1)
    import torch

    threads = args.threads or torch.get_num_threads()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sets = chat_data.build(args.data_seed, args.train or 2400, args.dev or 200)
        train_file, dev_file = tmp / "train.jsonl", tmp / "dev.jsonl"
        train_file.write_text(chat_data.jsonl(sets["train"]), encoding="utf-8")
        dev_file.write_text(chat_data.jsonl(sets["dev"]), encoding="utf-8")
        model_dir = tiny_model(tmp / "tiny", train_file) if args.smoke else smollm_folder(args, tmp, "qlora_memory")
        spec = {"model": str(model_dir), "train": str(train_file), "dev": str(dev_file), "max_length": args.max_length,
                "batch": args.batch, "steps": args.steps, "lr": args.lr, "warmup": args.warmup, "seed": args.seed,
                "rank": args.rank, "alpha": args.alpha, "precision": args.precision, "checkpointing": args.checkpointing,
                "chat_template": "chatml" if args.smoke else "auto", "run_dir": str(tmp / "run")}
        (tmp / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        print(f"LoRA chat SFT of {'a tiny random Llama (--smoke)' if args.smoke else 'SmolLM2-135M-Instruct'} with its "
              f"frozen base in {', '.join(variants)}; torch {torch.__version__}, CPU, {threads} threads, {args.precision}"
              f"{', activation checkpointing' if args.checkpointing else ''}, glibc mmap threshold "
              f"{'as glibc sets it' if args.glibc_default else MMAP_THRESHOLD + ' bytes (MMAP_THRESHOLD)'}")
        print(f"settings (every variant, each in a fresh process): {len(sets['train'])} train and {len(sets['dev'])} dev "
              f"conversations, {args.steps} steps of {args.batch}, packed rows of {args.max_length}, LoRA r {args.rank} "
              f"alpha {args.alpha:g} on qkv, proj, up, down, AdamW lr {args.lr:g} (warmup {args.warmup}, cosine to 0), "
              f"seed {args.seed}", flush=True)
        res = {}
        for variant in variants:
            load = os.getloadavg()[0]
            res[variant] = run_variant(variant, tmp / "spec.json", tmp / f"{variant}.json", threads, args.glibc_default)
            print(f"{variant} done: {res[variant]['train_s']:.1f} s in training steps (load average {load:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after)", flush=True)
    wall = time.perf_counter() - wall

    base = res["fp32"]
    for name, r in res.items():
        print(f"{name:5s} peak {r['peak'] / MiB:7.1f} MiB (load {r['load_peak'] / MiB:.1f}, steps {r['train_peak'] / MiB:.1f}; "
              f"{r['loaded'] / MiB:.1f} resident after loading)   {r['tok_s']:8.1f} tok/s ({r['real']:,} real tokens in "
              f"{r['train_s']:.1f} s of {r['steps']} steps)   dev loss {r['loss']:.6f}")
    ratios = {}
    for name in (v for v in variants if v != "fp32"):
        r = res[name]
        ratios[name] = {"mem": r["peak"] / base["peak"], "loss": r["loss"] / base["loss"], "tok_s": r["tok_s"] / base["tok_s"],
                        "steps_mem": r["train_peak"] / base["train_peak"]}
        q = ratios[name]
        goals = "" if name != "int8" else f" (goals: memory <= 0.5x: {'met' if q['mem'] <= 0.5 else 'missed'}; " \
            f"dev loss within 3%: {'met' if abs(q['loss'] - 1) <= 0.03 else 'missed'})"
        print(f"{name} against the fp32 base: peak memory {q['mem']:.2f}x (training steps alone {q['steps_mem']:.2f}x), "
              f"dev loss {q['loss']:.4f}x, tokens/s {q['tok_s']:.2f}x{goals}")
    print(f"{wall:.0f} s wall in all")
    print("RESULT " + " ".join(f"mem_ratio_{n}={q['mem']:.2f} loss_ratio_{n}={q['loss']:.4f} tok_s_ratio_{n}={q['tok_s']:.2f}"
                               for n, q in ratios.items()))


if __name__ == "__main__":
    main()
