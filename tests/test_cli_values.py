"""Bad values and refused paths, each one line: every numeric option out of its range, a config.json value of
the wrong type or range, a size no machine can hold, an empty run config, an output path that is a file where
a folder belongs (or the reverse), a read-only or a full disk. Each case checks the exit status, exactly one
line on stderr that names the option, file:line or key and what was expected, and that nothing was left
behind: no run directory, no output file, no temp file, no folder made for the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import (classify_files, in_small_mounts, make_base, number_pairs, one_line_error, synthetic_text,
                     tiny_overrides, write_corpus, write_lines)
from lmforge.cli import main
from lmforge.data.tokenizer import SEQ2SEQ_SPECIALS
from lmforge.hf.export import export_hf
from lmforge.io import TEMP_TAG


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Untrained runs of each kind a command takes (random weights: fast), an HF folder, and their inputs."""
    root = tmp_path_factory.mktemp("values")
    found = {
        "clm": make_base(root / "clm", "clm"),
        "s2s": make_base(root / "s2s", "seq2seq", specials=list(SEQ2SEQ_SPECIALS)),
        "cls": make_base(root / "cls", "classify", sections={"finetune": {"labels": ["neg", "pos"], "body": "decoder",
                                                                          "pooling": "last"}}),
        "corpus": write_corpus(root, synthetic_text(3000)),
        "dev": classify_files(root)[1],
        "src": write_lines(root / "src.txt", [s for s, _ in number_pairs(3, 0)]),
    }
    export_hf(found["clm"], root / "hf")
    # the token cache of the pretrain cases, which any run may fill, away from the folders a refusal must leave alone
    return {**found, "hf": root / "hf", "root": root, "cache": tmp_path_factory.mktemp("cache")}


def listing(*folders: Path) -> list[str]:
    """Every path under the folders: what a refused command must leave as it was."""
    return sorted(str(p) for folder in folders for p in folder.rglob("*"))


def refused(capsys, argv: list[str], *expected: str, runs: dict, tmp: Path) -> str:
    """one_line_error, and nothing written under the runs or this test's folder."""
    before = listing(runs["root"], tmp)
    line = one_line_error(capsys, argv, *expected)
    assert listing(runs["root"], tmp) == before
    return line


def filled(template: list[str], runs: dict, tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, **runs) for a in template]


def pretrain(tmp: Path, runs: dict, corpus: Path | None = None, **extra) -> list[str]:
    """`lmforge pretrain` of a tiny char model (on runs' corpus) whose outputs lie under tmp and whose token cache
    is runs' (keyword keys: dotted, `__` for dots)."""
    over = tiny_overrides(tmp, corpus or runs["corpus"], **{"data.cache_dir": str(runs["cache"]),
                                                             **{k.replace("__", "."): v for k, v in extra.items()}})
    return ["pretrain", *[a for k, v in over.items() for a in (f"--{k}", str(v))]]


# -- every numeric option of every command declares its range ----------------------------------------------

GEN = ["generate", "--checkpoint", "{clm}", "--device", "cpu", "--max-new-tokens", "2"]
TRANSLATE = ["translate", "--checkpoint", "{s2s}", "--input", "{src}", "--device", "cpu"]
TOKENIZER = ["tokenizer", "train", "--input", "{corpus}", "--out", "{tmp}/tok"]

# (id, arguments, what the line names); each was a traceback, or accepted, before its range was declared
BAD_VALUES = [
    ("max-new-tokens-negative", GEN + ["--max-new-tokens", "-5"], ["generate: argument --max-new-tokens: -5", "> 0"]),
    ("stop-empty", GEN + ["--stop", ""], ["argument --stop: ''", "a non-empty string"]),
    ("seed-beyond-torch", GEN + ["--seed", str(2**64)],
     ["argument --seed: 18446744073709551616", "[0, 9223372036854775807]"]),
    ("seed-negative", GEN + ["--seed", "-1"], ["argument --seed: -1", "[0, 9223372036854775807]"]),
    ("temperature-negative", GEN + ["--temperature", "-1"], ["argument --temperature: -1", "0 (greedy) or 0.001 to 100"]),
    ("temperature-tiny", GEN + ["--temperature", "1e-300"], ["argument --temperature: 1e-300", "0 (greedy) or 0.001"]),
    ("top-p-tiny", GEN + ["--top-p", "1e-50"], ["argument --top-p: 1e-50", "in [1e-06, 1]"]),
    ("temperature-nan", GEN + ["--temperature", "nan"], ["argument --temperature: nan", "a finite number"]),
    ("num-samples-negative", GEN + ["--num-samples", "-1"], ["argument --num-samples: -1", "> 0"]),
    ("num-samples-zero", GEN + ["--num-samples", "0"], ["argument --num-samples: 0", "> 0"]),
    ("batch-size-zero", TRANSLATE + ["--batch-size", "0"], ["translate: argument --batch-size: 0", "> 0"]),
    ("beam-zero", TRANSLATE + ["--beam", "0"], ["argument --beam: 0", "> 0"]),
    ("length-penalty-negative", TRANSLATE + ["--length-penalty", "-1"], ["argument --length-penalty: -1", ">= 0"]),
    ("max-length-ratio-negative", TRANSLATE + ["--max-length-ratio", "-1"], ["argument --max-length-ratio: -1", "> 0"]),
    ("max-length-ratio-zero", TRANSLATE + ["--max-length-ratio", "0"], ["argument --max-length-ratio: 0", "> 0"]),
    ("vocab-size-negative", TOKENIZER + ["--vocab-size", "-5"], ["--vocab-size = -5", "at least 257", "256 bytes"]),
    ("vocab-size-zero", TOKENIZER + ["--vocab-size", "0"], ["--vocab-size = 0", "at least 257"]),
    ("vocab-size-below-bytes", TOKENIZER + ["--vocab-size", "100"], ["--vocab-size = 100", "expected 257 or more"]),
    ("vocab-size-char", TOKENIZER + ["--vocab-size", "2", "--kind", "char", "--special-tokens", "<s>,</s>"],
     ["--vocab-size = 2", "a char tokenizer", "at least 4"]),
    ("port-out-of-range", ["serve", "{clm}", "--port", "70000"], ["serve: argument --port: 70000", "in [1, 65535]"]),
    ("train-seed-beyond-torch", ["pretrain", "--train.seed", str(2**64)],
     ["train.seed = 18446744073709551616", "[0, 9223372036854775807]"]),
]


@pytest.mark.parametrize("template, expected", [pytest.param(*c[1:], id=c[0]) for c in BAD_VALUES])
def test_a_value_out_of_range_is_one_line(runs, tmp_path, capsys, template, expected):
    refused(capsys, filled(template, runs, tmp_path), *expected, runs=runs, tmp=tmp_path)


def test_a_wordpiece_vocabulary_below_the_corpus_alphabet_is_refused_after_training(runs, tmp_path, capsys):
    line = refused(capsys, filled(TOKENIZER + ["--kind", "wordpiece", "--vocab-size", "10"], runs, tmp_path),
                   "--vocab-size = 10", "the corpus's characters", runs=runs, tmp=tmp_path)
    minimum = int(line.split("at least ")[1].split()[0])
    assert main(filled(TOKENIZER + ["--kind", "wordpiece", "--vocab-size", str(minimum)], runs, tmp_path)) == 0


# -- config.json: every value hf/ reads, by its type and the range of the field it sets ----------------------

# (id, changes to config.json, what the line names); each was a traceback, accepted, or named lmforge's key
CONFIG_JSON = [
    ("hidden-size-string", {"hidden_size": "abc"}, ['config.json hidden_size = "abc"', "an integer > 0", "model.d_model"]),
    ("layers-fraction", {"num_hidden_layers": 2.5}, ["config.json num_hidden_layers = 2.5", "an integer > 0"]),
    ("context-negative", {"max_position_embeddings": -3}, ["config.json max_position_embeddings = -3", "> 0"]),
    ("eps-negative", {"rms_norm_eps": -1}, ["config.json rms_norm_eps = -1", "a number > 0"]),
    ("tie-string", {"tie_word_embeddings": "yes"}, ['config.json tie_word_embeddings = "yes"', "true or false"]),
    ("architectures-string", {"architectures": "LlamaForCausalLM"},
     ['config.json architectures = "LlamaForCausalLM"', "a list of class names"]),
    ("model-type-list", {"architectures": None, "model_type": ["llama"]}, ['config.json model_type = ["llama"]']),
    ("rope-scaling-string", {"rope_scaling": "llama3"}, ['config.json rope_scaling = "llama3"', "an object or null"]),
    ("rope-factor-string", {"rope_parameters": {"rope_type": "llama3", "factor": "x", "low_freq_factor": 1,
                                                "high_freq_factor": 4, "original_max_position_embeddings": 8}},
     ['config.json rope_parameters.factor = "x"', "a number > 0"]),
    ("sliding-window-string", {"sliding_window": "abc"}, ['config.json sliding_window = "abc"', "an integer > 0"]),
    ("sliding-switch-string", {"use_sliding_window": "no"}, ['config.json use_sliding_window = "no"', "true or false"]),
    ("vocab-beyond-memory", {"vocab_size": 2**40},
     ["config.json: vocab_size = 1099511627776", "TiB in float32", "of memory available here"]),
]


def edited_hf(runs: dict, tmp: Path, changes: dict) -> Path:
    folder = Path(shutil.copytree(runs["hf"], tmp / "hf"))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


@pytest.mark.parametrize("changes, expected", [pytest.param(*c[1:], id=c[0]) for c in CONFIG_JSON])
def test_a_config_json_value_is_checked_by_its_key(runs, tmp_path, capsys, changes, expected):
    folder = edited_hf(runs, tmp_path, changes)
    refused(capsys, ["import", str(folder), str(tmp_path / "out")], str(folder), *expected, runs=runs, tmp=tmp_path)
    refused(capsys, GEN[:2] + [str(folder)] + GEN[3:], *expected, runs=runs, tmp=tmp_path)


def test_a_fine_tuning_base_folder_is_checked_the_same_way(runs, tmp_path, capsys):
    folder = edited_hf(runs, tmp_path, {"hidden_size": "abc"})
    train, _ = classify_files(tmp_path)
    refused(capsys, ["finetune", "--finetune.init_from", str(folder), "--finetune.train", str(train), "--log.run_dir",
                     str(tmp_path / "run"), "--log.progress", "false", "--train.device", "cpu"],
            'config.json hidden_size = "abc"', runs=runs, tmp=tmp_path)


def sharded(runs: dict, tmp: Path, shard_name) -> Path:
    """The HF folder with its weights in one shard that its index names as shard_name(folder, outside file)."""
    folder = Path(shutil.copytree(runs["hf"], tmp / "hf"))
    outside = tmp / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    (folder / "model.safetensors").rename(outside)
    with safe_open(str(outside), "pt") as f:
        keys = list(f.keys())
    name = shard_name(folder, outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
    return folder


def _link(folder: Path, outside: Path) -> str:
    (folder / "shard.safetensors").symlink_to(outside)
    return "shard.safetensors"


@pytest.mark.parametrize("shard_name", [lambda folder, outside: "../elsewhere/x.safetensors",
                                        lambda folder, outside: str(outside), _link], ids=["dotdot", "absolute", "link"])
def test_a_shard_outside_the_folder_is_refused(runs, tmp_path, capsys, shard_name):
    folder = sharded(runs, tmp_path, shard_name)
    refused(capsys, ["import", str(folder), str(tmp_path / "out")], "model.safetensors.index.json names shard",
            "outside the folder", runs=runs, tmp=tmp_path)


# -- a size no machine here can hold -----------------------------------------------------------------------


def test_a_vocabulary_beyond_memory_is_refused_before_allocating(runs, tmp_path, capsys):
    refused(capsys, pretrain(tmp_path, runs, model__vocab_size="1e11"),
            "config: model.vocab_size = 100000000000", "model.d_model = 32", "of memory available here",
            runs=runs, tmp=tmp_path)


# -- a run directory whose config.yaml is empty -------------------------------------------------------------


def emptied(run: Path, tmp: Path) -> Path:
    copy = Path(shutil.copytree(run, tmp / run.name))
    (copy / "config.yaml").write_text("")
    return copy


@pytest.mark.parametrize("kind, template", [
    ("clm", ["generate", "--checkpoint", "{run}", "--device", "cpu"]),
    ("cls", ["evaluate", "--checkpoint", "{run}", "--data", "{dev}", "--out", "{tmp}/eval.json", "--device", "cpu"]),
    ("clm", ["export", "{run}", "{tmp}/out"]),
], ids=["generate", "evaluate", "export"])
def test_an_empty_run_config_is_one_line_naming_it(runs, tmp_path, capsys, kind, template):
    run = emptied(runs[kind], tmp_path)
    argv = [a.format(run=run, tmp=tmp_path, **runs) for a in template]
    refused(capsys, argv, f"{run / 'config.yaml'}: empty", runs=runs, tmp=tmp_path)


def test_resuming_a_run_whose_config_is_empty_is_one_line(runs, tmp_path, capsys):
    run = emptied(runs["clm"], tmp_path)
    (run / "checkpoints").mkdir()
    torch.save({"step": 1}, run / "checkpoints" / "step_00000001.pt")  # what --resume finds first
    refused(capsys, ["pretrain", "--resume", str(run)], f"{run / 'config.yaml'}: empty", runs=runs, tmp=tmp_path)


# -- wording ------------------------------------------------------------------------------------------------


def test_an_unterminated_json_string_is_worded_once(runs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "cut')  # the file ends inside the string
    line = refused(capsys, pretrain(tmp_path, runs, bad), f"{bad}:2: not valid JSON", "Unterminated string starting at "
                   "column", runs=runs, tmp=tmp_path)
    assert "at at" not in line


def test_a_seq2seq_export_says_what_bart_needs(runs, tmp_path, capsys):
    refused(capsys, ["export", str(runs["s2s"]), str(tmp_path / "out")], "exports as BART",
            "model.pos = learned (it has rope)", "--model.preset bart-tiny", runs=runs, tmp=tmp_path)


@pytest.mark.parametrize("rows, expected", [
    (['"two', 'lines",maybe'], ["bad.csv:3: unknown label 'maybe'"]),
    (['"two', 'lines",pos,extra'], ["bad.csv:3: 3 columns; expected 2"]),
], ids=["label", "columns"])
def test_a_csv_error_names_the_line_of_the_bad_field(runs, tmp_path, capsys, rows, expected):
    bad = write_lines(tmp_path / "bad.csv", ["text,label", *rows])
    refused(capsys, ["evaluate", "--checkpoint", str(runs["cls"]), "--data", str(bad), "--out", str(tmp_path / "e.json"),
                     "--device", "cpu"], *expected, runs=runs, tmp=tmp_path)


def test_weights_of_another_shape_name_the_key(runs, tmp_path, capsys):
    run = Path(shutil.copytree(runs["clm"], tmp_path / "run"))
    other = make_base(tmp_path / "wide", "clm", d_model=64)
    shutil.copy(other / "model.safetensors", run / "model.safetensors")
    refused(capsys, ["generate", "--checkpoint", str(run), "--device", "cpu"], "size mismatch for blocks.0.",
            "torch.Size([64])", runs=runs, tmp=tmp_path)


# -- an output path that is a file where a folder belongs, or a folder where a file belongs -------------------

# (id, arguments with {file}: an existing file, {dir}: an existing folder; what the line names)
PATHS = [
    ("run-dir-is-a-file", None, ["{file}: is a file; expected a folder"]),
    ("cache-dir-is-a-file", None, ["cannot be written: {file} is a file; expected a folder"]),
    ("tokenizer-out-is-a-file", TOKENIZER[:-1] + ["{file}"], ["cannot be written: {file} is a file"]),
    ("evaluate-out-under-a-file", ["evaluate", "--checkpoint", "{cls}", "--data", "{dev}", "--out", "{file}/e.json"],
     ["{file}/e.json: cannot be written: {file} is a file"]),
    ("predict-output-under-a-file", ["predict", "--checkpoint", "{cls}", "--input", "{dev}", "--output", "{file}/p.jsonl"],
     ["{file}/p.jsonl: cannot be written: {file} is a file"]),
    ("translate-output-under-a-file", TRANSLATE + ["--output", "{file}/t.txt"],
     ["{file}/t.txt: cannot be written: {file} is a file"]),
    ("import-out-under-a-file", ["import", "{hf}", "{file}/run"], ["{file}/run: cannot be written: {file} is a file"]),
    ("export-out-under-a-file", ["export", "{clm}", "{file}/hf"], ["{file}/hf: cannot be written: {file} is a file"]),
    ("evaluate-out-is-a-folder", ["evaluate", "--checkpoint", "{cls}", "--data", "{dev}", "--out", "{dir}"],
     ["{dir}: is a folder; expected the path of a file"]),
    ("predict-output-is-a-folder", ["predict", "--checkpoint", "{cls}", "--input", "{dev}", "--output", "{dir}"],
     ["{dir}: is a folder; expected the path of a file"]),
    ("translate-output-is-a-folder", TRANSLATE + ["--output", "{dir}"],
     ["{dir}: is a folder; expected the path of a file"]),
]


@pytest.mark.parametrize("template, expected", [pytest.param(*c[1:], id=c[0]) for c in PATHS])
def test_an_output_path_in_the_way_is_one_line(runs, tmp_path, capsys, request, template, expected):
    file, folder = write_lines(tmp_path / "a_file", ["mine"]), tmp_path / "a_dir"
    folder.mkdir()
    if template is None:  # pretrain: the run directory, or the token cache
        key = "log.run_dir" if request.node.callspec.id.startswith("run-dir") else "data.cache_dir"
        argv = pretrain(tmp_path / "work", runs, **{key.replace(".", "__"): str(file)})
    else:
        argv = [a.format(file=file, dir=folder, tmp=tmp_path, **runs) for a in template]
    refused(capsys, argv, *[e.format(file=file, dir=folder) for e in expected], runs=runs, tmp=tmp_path)
    assert file.read_text() == "mine\n" and not any(folder.iterdir())


# -- a read-only or a full disk: exit 1, one line naming the path (and the free space), nothing left ----------

# what each command writes, given the folder to write it in
WRITERS = {
    "pretrain-run-dir": lambda runs, tmp, at: pretrain(tmp, runs, log__run_dir=str(at / "run")),
    "pretrain-cache": lambda runs, tmp, at: pretrain(tmp, runs, data__cache_dir=str(at / "cache")),
    "tokenizer": lambda runs, tmp, at: filled(TOKENIZER[:-1], runs, tmp) + [str(at)],  # the tokenizers library's own write
    "evaluate": lambda runs, tmp, at: ["evaluate", "--checkpoint", str(runs["cls"]), "--data", str(runs["dev"]),
                                       "--out", str(at / "eval" / "e.json"), "--device", "cpu", "--confusion"],
    "predict": lambda runs, tmp, at: ["predict", "--checkpoint", str(runs["cls"]), "--input", str(runs["dev"]),
                                      "--output", str(at / "p.jsonl"), "--device", "cpu"],
    "translate": lambda runs, tmp, at: filled(TRANSLATE, runs, tmp) + ["--output", str(at / "t.txt")],
    "import": lambda runs, tmp, at: ["import", str(runs["hf"]), str(at / "imported")],
    "export": lambda runs, tmp, at: ["export", str(runs["clm"]), str(at / "exported")],
}
DISKS = {"read-only": "the file system is read-only", "full": "the disk is full (0.0 KiB free)"}


@pytest.fixture(scope="module")
def refused_writes(runs, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """(writer, disk) -> what the command did, all commands run in one namespace (one torch import)."""
    tmp = tmp_path_factory.mktemp("mounts")
    mounts = {"read-only": tmp / "ro", "full": tmp / "full"}
    cases = [(w, d) for w in WRITERS for d in DISKS]
    argvs = [WRITERS[w](runs, tmp / f"{w}-{d}", mounts[d]) for w, d in cases]
    return dict(zip(cases, in_small_mounts(argvs, mounts["read-only"], mounts["full"], cwd=tmp)))


@pytest.mark.slow  # one subprocess for all: torch's import, four runs' set-up, sklearn and matplotlib, ~20 s here
@pytest.mark.parametrize("disk", DISKS)
@pytest.mark.parametrize("writer", WRITERS)
def test_a_refused_write_is_one_line_and_leaves_nothing(refused_writes, writer, disk):
    done = refused_writes[(writer, disk)]
    lines = done["err"].strip().splitlines()
    assert done["code"] == 1, done
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), done["err"]
    assert f"/{'ro' if disk == 'read-only' else 'full'}/" in lines[0] and DISKS[disk] in lines[0], lines[0]
    assert TEMP_TAG not in lines[0], lines[0]  # the path the user gave, not the temporary one written first
    assert done["left"] == [], done["left"]
