"""The config tree: YAML plus dotted overrides, presets, one-line errors, --help text."""

from __future__ import annotations

import re

import pytest

from lmforge.cli import main
from lmforge.config import Config, ConfigError, TrainConfig, leaves, load_config, read_yaml
from lmforge.errors import UserError


def write(tmp_path, text, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_yaml_plus_dotted_overrides(tmp_path):
    recipe = write(tmp_path, """
model:
  preset: char-tiny
  n_layer: 3
train:
  lr: 3e-4          # YAML reads this as a string; it is accepted as a number
  batch_size: 8
  max_steps: 50
  warmup_steps: 5
log:
  trackers: [wandb]
data:
  tokenizer:
    special_tokens: ["<s>", "</s>"]
""")
    cfg = load_config(recipe, {"train.batch_size": "32", "model.d_model": "64", "log.progress": "false",
                               "train.max_steps": "1e3", "data.path": "null", "log.run_dir": "somewhere",
                               "data.tokenizer.special_tokens": "<a>,<b>"})
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 32  # the command line wins over the file
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.n_layer == 3 and cfg.model.d_model == 64
    assert cfg.log.trackers == ["wandb"] and cfg.log.progress is False
    assert cfg.data.path is None and cfg.log.run_dir == "somewhere"
    assert cfg.data.tokenizer.special_tokens == ["<a>", "<b>"]
    assert cfg.train.weight_decay == TrainConfig().weight_decay  # untouched keys keep their defaults


def test_preset_supplies_defaults_and_explicit_keys_win(tmp_path):
    cfg = load_config(overrides={"model.preset": "char-tiny"}).model
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.max_seq_len) == (4, 4, 128, 64)
    recipe = write(tmp_path, "model:\n  preset: gpt2-small\n  n_layer: 2\n  max_seq_len: 128\n")
    cfg = load_config(recipe, {"model.max_seq_len": "256"}).model
    assert cfg.n_layer == 2 and cfg.max_seq_len == 256  # file and command line beat the preset
    assert (cfg.d_model, cfg.vocab_size, cfg.mlp) == (768, 50257, "gelu_tanh")  # the rest is the preset's
    with pytest.raises(ConfigError, match="model.preset = 'gpt5'.*char-tiny"):
        load_config(overrides={"model.preset": "gpt5"})


def test_derived_model_defaults():
    assert load_config(overrides={"model.d_model": 96, "model.n_head": 4, "model.mlp": "gelu"}).model.d_ff == 384
    swiglu = load_config(overrides={"model.d_model": 96, "model.n_head": 4, "model.mlp": "swiglu"}).model
    assert swiglu.d_ff == 256  # 8/3 * 96 = 256, a multiple of 64
    assert swiglu.n_kv_head == 4


def error_of(tmp_path, yaml_text=None, overrides=None) -> str:
    path = write(tmp_path, yaml_text) if yaml_text is not None else None
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_suggests_the_close_match(tmp_path):
    assert error_of(tmp_path, "train:\n  lrr: 0.1\n") == "config: unknown key 'train.lrr'; did you mean 'train.lr'?"
    assert "did you mean 'model.n_head'" in error_of(tmp_path, overrides={"model.n_heads": "4"})
    assert "did you mean 'eval.patience'" in error_of(tmp_path, "eval:\n  patiense: 3\n")
    msg = error_of(tmp_path, "zzz: 1\n")
    assert "unknown key 'zzz'" in msg and "known keys here: data, eval, finetune, log, loss, mlm, model, peft, robust, seq2seq, span, task, train" in msg
    assert "'lr' is a value, not a section" in error_of(tmp_path, "train:\n  lr: 0.1\n", {"train.lr.x": "1"})


@pytest.mark.parametrize("text, expected", [
    ("train:\n  batch_size: abc\n", "config: train.batch_size = 'abc': expected an integer"),
    ("train:\n  batch_size: 2.5\n", "config: train.batch_size = 2.5: expected an integer"),
    ("train:\n  lr: fast\n", "config: train.lr = 'fast': expected a number"),
    ("train:\n  lr: [1]\n", "config: train.lr = [1]: expected a number"),
    ("log:\n  progress: 3\n", "config: log.progress = 3: expected true or false"),
    ("train:\n  max_steps: true\n", "config: train.max_steps = True: expected an integer"),
    ("data:\n  tokenizer:\n    special_tokens: 5\n", "config: data.tokenizer.special_tokens = 5: expected a list of strings"),
    ("train: 5\n", "config: train: expected a mapping of keys, got 5"),
])
def test_wrong_type(tmp_path, text, expected):
    assert error_of(tmp_path, text) == expected


def test_wrong_type_from_the_command_line(tmp_path):
    assert error_of(tmp_path, overrides={"train.batch_size": "many"}) == \
        "config: train.batch_size = 'many': expected an integer"
    assert error_of(tmp_path, overrides={"log.progress": "maybe"}) == "config: log.progress = 'maybe': expected true or false"


@pytest.mark.parametrize("key, value, expected", [
    ("train.lr", "0", "config: train.lr = 0.0: must be > 0"),
    ("train.batch_size", "-1", "config: train.batch_size = -1: must be > 0"),
    ("data.val_fraction", "1", "config: data.val_fraction = 1.0: must be in (0, 1)"),
    ("model.dropout", "1.5", "config: model.dropout = 1.5: must be in [0, 0.99]"),
    ("train.max_time", "-5", "config: train.max_time = -5.0: must be >= 0"),
    ("train.device", "gpu", "config: train.device = 'gpu': must be auto, cpu, mps, cuda or cuda:N"),
    ("train.device", "cuda:x", "config: train.device = 'cuda:x': must be auto, cpu, mps, cuda or cuda:N"),
])
def test_out_of_range(tmp_path, key, value, expected):
    assert error_of(tmp_path, overrides={key: value}) == expected


def test_choices(tmp_path):
    assert error_of(tmp_path, overrides={"model.pos": "alibi"}) == \
        "config: model.pos = 'alibi': expected one of learned, rope"
    assert error_of(tmp_path, "data:\n  tokenizer:\n    kind: sentencepiece\n") == \
        "config: data.tokenizer.kind = 'sentencepiece': expected one of char, bpe, wordpiece"


@pytest.mark.parametrize("overrides, expected", [
    ({"model.d_model": "100", "model.n_head": "3"}, "model.d_model = 100 must be divisible by model.n_head = 3"),
    ({"model.d_model": "384", "model.n_head": "6", "model.n_kv_head": "4"}, "model.n_head = 6 must be a multiple of model.n_kv_head = 4"),
    ({"model.pos": "rope", "model.d_model": "60", "model.n_head": "4"}, "model.pos = rope needs an even head size, got 15"),
    ({"model.pos": "rope", "model.head_dim": "15"}, "model.pos = rope needs an even head size, got 15"),
    ({"model.rope_scaling": "llama3", "model.pos": "learned"}, "model.rope_scaling = llama3 needs model.pos = rope (it is learned)"),
    ({"model.rope_factor": "4"}, "model.rope_factor = 4.0 applies to model.rope_scaling = llama3 only (it is none)"),
    ({"model.rope_scaling": "llama3", "model.rope_high_freq_factor": "1"},
     "model.rope_high_freq_factor = 1.0 must be > model.rope_low_freq_factor = 1.0"),
    ({"train.lr": "1e-4", "train.min_lr": "1e-3"}, "train.min_lr = 0.001 must be <= train.lr = 0.0001"),
    ({"train.warmup_steps": "-1"}, "train.warmup_steps = -1: must be >= 0"),  # one as long as the run is clamped
    ({"train.schedule_restarts": "[[5, 3]]"}, "train.schedule_restarts: [5, 3]: expected [step, horizon] pairs, the "
                                              "steps increasing from 1 and each below its horizon"),
])
def test_cross_field_checks(tmp_path, overrides, expected):
    assert error_of(tmp_path, overrides=overrides) == f"config: {expected}"


def test_head_dim_defaults_to_d_model_over_n_head_and_may_be_given():
    assert load_config(overrides={"model.d_model": "96", "model.n_head": "4"}).model.head_dim == 24
    # given, d_model need not divide by n_head (the heads are projected back to d_model)
    given = load_config(overrides={"model.d_model": "100", "model.n_head": "3", "model.head_dim": "32"}).model
    assert (given.d_model, given.n_head, given.head_dim) == (100, 3, 32)


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_yaml(tmp_path / "missing.yaml")
    bad = write(tmp_path, "train:\n  lr: 1\n  batch_size: [1, 2\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        read_yaml(bad)
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(write(tmp_path, "- a\n- b\n", "list.yaml"))
    (tmp_path / "latin1.yaml").write_bytes(b"task: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_yaml(tmp_path / "latin1.yaml")
    assert read_yaml(write(tmp_path, "# nothing\n", "empty.yaml")) == {}
    assert isinstance(ConfigError("x"), UserError)


def test_pretrain_help_all_shows_every_field_doc(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help", "all"])
    assert e.value.code == 0
    squashed = re.sub(r"\s+", "", capsys.readouterr().out)  # help text is wrapped at any space or hyphen
    for path, _, field in leaves(Config):
        assert f"--{path}" in squashed
        assert re.sub(r"\s+", "", field.metadata["doc"]) in squashed, path
    assert "{learned,rope}" in squashed and "[default:0.1]" in squashed and "(>0)" in squashed


def test_every_recipe_in_configs_loads():
    """The shipped recipes stay valid as options are added or renamed (fine-tuning recipes read on top
    of the fine-tuning defaults, as `lmforge finetune` reads them)."""
    from pathlib import Path

    import yaml

    from lmforge.cli import finetune_base
    from lmforge.tasks import registry

    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        mapping = yaml.safe_load(recipe.read_text())
        if mapping.get("task") in registry.names("finetune"):
            load_config(None, base=finetune_base(mapping))
        else:
            load_config(recipe)
