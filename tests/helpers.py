"""Shared test helpers: where the real data lives, small corpora and small configs, tiny fine-tuning
bases, a server process. Plain functions and constants, imported as `from helpers import ...`; the
pytest machinery that uses some of them (fixtures, hooks) stays in conftest.py.

Every config built here points its token cache and run directory under pytest's tmp_path, turns the
progress bar, the trackers (log.trackers: []) and end-of-run samples off, and uses a model small enough to train a few
steps on a shared 2-core CPU in well under a second.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import load_config, save_config
from lmforge.data.tokenizer import train_tokenizer
from lmforge.tasks import make_task
from lmforge.io import save_weights
from lmforge.runs import WEIGHTS
from lmforge.train.distributed import Dist, full_weights

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"

WORDS = ("the king and queen of rome shall speak to thee now my lord what is this good night "
         "sweet prince we are such stuff as dreams are made on and our little life is rounded").split()


def shakespeare_text(n_chars: int | None = None) -> str:
    """The first `n_chars` characters of Tiny Shakespeare; skips the test when the shared data is absent."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"real data not found at {SHAKESPEARE} (expected ../shared/data beside the checkout)")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return text if n_chars is None else text[:n_chars]


def synthetic_text(n_chars: int = 20_000, seed: int = 0) -> str:
    """Pseudo-English lines from a fixed word list: enough structure to learn, no external data."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))).capitalize() + ".\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)[:n_chars]


def write_corpus(tmp_path: Path, text: str, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def tiny_overrides(tmp_path: Path, corpus: Path, **extra) -> dict:
    """Dotted overrides for a tiny char-level run whose every output lies under tmp_path."""
    over = {
        "data.path": str(corpus),
        "data.tokenizer.kind": "char",
        "data.cache_dir": str(tmp_path / "cache"),
        "model.n_layer": 1, "model.n_head": 2, "model.d_model": 32, "model.max_seq_len": 16,
        "train.batch_size": 4, "train.max_steps": 4, "train.warmup_steps": 0, "train.lr": 1e-3,
        "train.min_lr": 1e-4, "train.checkpoint_every": 0, "train.device": "cpu", "train.precision": "fp32",
        "eval.every": 0, "eval.batches": 2, "eval.batch_size": 8,
        "log.out_dir": str(tmp_path / "runs"), "log.run_dir": str(tmp_path / "run"), "log.every": 1,
        "log.progress": False, "log.trackers": [], "log.samples": 0,
    }
    over.update(extra)
    return over


def tiny_config(tmp_path: Path, corpus: Path, **extra):
    """A validated Config for a tiny run; keyword keys are dotted paths with `__` for dots."""
    return load_config(overrides=tiny_overrides(tmp_path, corpus, **{k.replace("__", "."): v for k, v in extra.items()}))


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def write_fixed_perf_cache(folder: Path) -> Path:
    """A device-facts cache (train/perf.py) for every thread count this machine can use: a CPU peak of
    1e11 FLOP/s and a bf16 gain of 1.0, dated now (current for perf.MAX_AGE, a day), so `train.precision
    auto` is fp32 on every CPU and the numbers of a test do not depend on which CPU the machine has today.
    Returns the folder, for LMFORGE_CACHE."""
    import lmforge.train.perf as perf

    table = {}
    for threads in range(1, (os.cpu_count() or 1) + 1):
        table.update({perf.cache_key(str(torch.float32), threads): perf.cache_entry(1e11),
                      perf.cache_key(str(torch.bfloat16), threads): perf.cache_entry(1e11),
                      perf.cache_key("bf16_step_gain", threads): perf.cache_entry(1.0)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "peak_flops.json").write_text(json.dumps(table))
    return folder


# -- a server process for HTTP tests ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(run: Path, *options: str):
    """A running `lmforge serve RUN` process (on the CPU unless `options` say `--device`) and an HTTP
    client for it; stopped with SIGTERM, which must end it cleanly (exit 0)."""
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port), "--device", "cpu",
                             *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not answer /health within 60 s"
            time.sleep(0.2)
        yield client, proc
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert proc.returncode == 0, proc.stdout.read()


# -- tiny runs that several test modules build: fine-tuning bases and data, translation pairs -----------

TINY_MODEL = {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 32}


def make_base(run: Path, task: str, specials: list[str] | None = None, texts: list[str] | None = None,
              vocab: int = 300, sections: dict | None = None, noise: float = 0.0, **model) -> Path:
    """A pretrained-looking run directory (config.yaml, weights, tokenizer) with random weights; its tokenizer
    learnt from `texts` (default: synthetic lines) with `vocab` tokens; `sections`: more of its config (a
    fine-tuned run's finetune or peft section); `noise`: the std of Gaussian noise added to every weight, so
    that what starts at zero or one (biases, norm weights, LoRA's B) is checked too."""
    encoder = task == "mlm" or (sections or {}).get("finetune", {}).get("body") == "encoder"  # a BERT
    kind = "wordpiece" if encoder else "bpe"
    specials = specials or ([] if kind == "wordpiece" else ["<|endoftext|>", "<pad>"])
    tok = train_tokenizer(texts or synthetic_text(8000).splitlines(), kind, vocab, specials)
    extra = {"pos": "learned", "type_vocab_size": 2, "norm": "layernorm", "norm_position": "post", "mlp": "gelu",
             "bias": True} if encoder else {}  # BERT's layout
    cfg = load_config(base={"task": task, "model": {**TINY_MODEL, **extra, **model, "vocab_size": tok.get_vocab_size()},
                            "data": {"tokenizer": {"kind": kind}}, **(sections or {})})
    torch.manual_seed(0)
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    model = make_task(cfg).build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, device=p.device) * noise)
    save_weights(full_weights(Dist(), model), run / WEIGHTS, {"step": "0"})
    tok.save(str(run / "tokenizer.json"))
    return run


def sentences(n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(4, 9))] for _ in range(n)]


def sentiment(words: list[str]) -> str:
    """A rule the model has to learn from the words: positive iff one of five words occurs (about half)."""
    return "pos" if {"good", "sweet", "king", "dreams", "night"} & set(words) else "neg"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def classify_files(tmp_path: Path) -> tuple[Path, Path]:
    train = write_lines(tmp_path / "train.tsv", ["text\tlabel"] + [f"{' '.join(w)}\t{sentiment(w)}" for w in sentences(160, 1)])
    dev = write_lines(tmp_path / "dev.tsv", ["text\tlabel"] + [f"{' '.join(w)}\t{sentiment(w)}" for w in sentences(40, 2)])
    return train, dev


def finetune(tmp_path: Path, base: Path, train: Path, dev: Path | None, task: str, *extra: str, run: str = "run") -> Path:
    argv = ["finetune", "--task", task, "--finetune.init_from", str(base), "--finetune.train", str(train),
            "--train.device", "cpu", "--train.lr", "3e-3", "--train.batch_size", "16", "--finetune.epochs", "12",
            "--finetune.evals_per_epoch", "0", "--eval.every", "20", "--log.run_dir", str(tmp_path / run),
            "--log.progress", "false", "--log.trackers", "[]", "--finetune.classifier_dropout", "0"]
    if dev is not None:
        argv += ["--finetune.dev", str(dev)]
    assert main(argv + list(extra)) == 0
    return tmp_path / run


def conll_lines(n: int, seed: int) -> list[str]:
    """Sentences where 'king'/'queen' are PER and 'rome' LOC (B- and I- when two follow each other)."""
    types = {"king": "PER", "queen": "PER", "rome": "LOC"}
    lines = ["-DOCSTART- -X- -X- O", ""]
    for words in sentences(n, seed):
        prev = None
        for w in words:
            t = types.get(w)
            tag = "O" if t is None else ("I-" if prev == t else "B-") + t
            lines.append(f"{w} NN O {tag}")
            prev = t
        lines.append("")
    return lines


EN = "zero one two three four five six seven eight nine ten eleven twelve".split()
DE = "null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf".split()


def number_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """A toy translation: sequences of English number words -> the German words, same order."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        idx = [rng.randrange(len(EN)) for _ in range(rng.randint(2, 7))]
        pairs.append((" ".join(EN[i] for i in idx).capitalize() + ".", " ".join(DE[i] for i in idx).capitalize() + "."))
    return pairs


def write_tsv(path: Path, pairs) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


SEQ2SEQ_TINY = ["--model.n_layer", "2", "--model.n_head", "4", "--model.d_model", "64", "--model.max_seq_len", "48",
        "--log.progress", "false", "--log.trackers", "[]", "--train.device", "cpu"]


# The GPU tier's device: cuda, or what LMFORGE_GPU_TEST_DEVICE names (cpu: a dry run of the tier's own
# logic on a machine without a GPU; its CUDA-versus-CPU comparisons then compare the CPU with itself).
GPU_TEST_DEVICE = os.environ.get("LMFORGE_GPU_TEST_DEVICE", "cuda")


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    """`lmforge ARGV` fails as a user error should: exit 2, one line on stderr naming each of `expected`."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: "), err
    for text in expected:
        assert text in err[0], err[0]
    return err[0]


# -- commands on a read-only or a full disk -------------------------------------------------------------

FILLER = "filler"  # the file that fills the full mount

# Runs in the namespace: `lmforge ARGV` in-process for each argv read from standard input (one Python, one
# torch import for all), then what the command left in the mounts, which are emptied for the next command.
_MOUNT_DRIVER = """
import contextlib, io, json, shutil, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from lmforge.cli import main
argvs, mounts = json.load(sys.stdin)
results = []
for argv in argvs:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException as e:
            code = f"{type(e).__name__}: {e}"
    left = sorted(str(p) for m in mounts for p in Path(m).rglob("*") if p.name != "%s")
    results.append({"code": code, "err": err.getvalue(), "left": left})
    for m in mounts:
        for p in Path(m).iterdir():
            if p.name != "%s":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
print(json.dumps(results))
""" % (FILLER, FILLER)


def in_small_mounts(argvs: list[list[str]], read_only: Path, full: Path, cwd: Path) -> list[dict]:
    """`lmforge ARGV` for each argv, in one Python inside a new user and mount namespace where `read_only` is a
    read-only tmpfs and `full` a 64 KiB tmpfs filled up (as root, chmod cannot make a folder read-only); for
    each command {"code": its exit status (or the exception that escaped), "err": its stderr, "left": the paths
    it left in either mount}. Skips the test where user namespaces or tmpfs mounts are not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a read-only and a full file system")
    read_only.mkdir(parents=True, exist_ok=True)
    full.mkdir(parents=True, exist_ok=True)
    script = ('mount -t tmpfs -o ro,size=64k tmpfs "$1" && mount -t tmpfs -o size=64k tmpfs "$2" || exit 97; '
              f'head -c 1048576 /dev/zero > "$2/{FILLER}" 2>/dev/null; exec "$3" -c "$4"')
    # the lmforge under test, wherever the command runs (a relative PYTHONPATH=src would miss it from cwd)
    source = str(Path(lmforge.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(read_only), str(full),
               sys.executable, _MOUNT_DRIVER]
    proc = subprocess.run(command, input=json.dumps([argvs, [str(read_only), str(full)]]), capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)
    if proc.returncode == 97 or (proc.returncode and proc.stderr.startswith("unshare:")):
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class FixedBatches:
    """A train_batches() stand-in: the given batches, in order, forever."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return {k: v.clone() for k, v in b.items()}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]
