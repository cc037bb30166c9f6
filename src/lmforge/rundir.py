"""A run directory's names and the records read from it without the model: what `lmforge runs`, `report` and
the commands' first checks need, kept free of torch so that they answer in a fraction of a second (runs.py,
which loads models, imports torch: seconds on a cold start)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.config import ConfigError, legacy_log_keys, load_config, read_yaml
from lmforge.errors import UserError
from lmforge.io import atomic_write, read_json
from lmforge.tasks import registry

WEIGHTS = "model.safetensors"  # the best (or final) weights, for inference and export
CKPT_DIR = "checkpoints"  # step_XXXXXXXX.pt files (one process) or step_XXXXXXXX/ folders (DCP shards)
LABELS_FILE = "labels.json"  # a fine-tuned run's label set, in the order of its head's outputs
SELECTION_FILE = "selection.json"  # the metric that picked WEIGHTS, its direction, the final report's file
# A PEFT run's weights and checkpoints name the model their frozen weights are (weights metadata, the
# checkpoint's "base"): its absolute path, and a fingerprint of those weights to tell when it has changed.
BASE_MODEL, BASE_FINGERPRINT = "base_model", "base_fingerprint"


def write_selection(run_dir: Path, metric: str, higher_is_better: bool, final_report: str | None) -> None:
    """What picked the run's best weights, so that `lmforge runs` and `report` rank and show a run without
    knowing its task: the val metric, its direction, and the file its final report on those weights is in."""
    record = {"metric": metric, "higher_is_better": higher_is_better, "final_report": final_report}
    atomic_write(run_dir / SELECTION_FILE, lambda tmp: tmp.write_text(json.dumps(record) + "\n", encoding="utf-8"))


def read_selection(run_dir: Path) -> dict:
    """write_selection's record; a run written before there was one is ranked by its val loss."""
    path = run_dir / SELECTION_FILE
    if not path.is_file():
        return {"metric": "loss", "higher_is_better": False, "final_report": None}
    return read_json(path, str(run_dir))


def read_run_config(run_dir: Path) -> dict:
    """A run directory's config.yaml as its run wrote it (resolved: the vocabulary size is set). An empty or
    cut-short one is refused naming the file, rather than read as lmforge's defaults and failing later."""
    path = run_dir / "config.yaml"
    tree = read_yaml(path)
    if not tree:
        raise UserError(f"{path}: empty; expected the resolved config the run wrote (a run directory's config.yaml "
                        "holds every section)")
    model = tree.get("model")
    if not isinstance(model, dict) or not model.get("vocab_size"):
        raise UserError(f"{path}: no model.vocab_size; expected the resolved config the run wrote (a run directory's "
                        "config.yaml holds the model's vocabulary size)")
    train = tree.get("train")
    if isinstance(train, dict) and not train.get("schedule_steps") and train.get("max_steps"):
        # a run written before the schedule's horizon was recorded ran to its max_steps: a resume that extends
        # max_steps then keeps that schedule, as for a newer run
        train["schedule_steps"] = train["max_steps"]
    legacy_log_keys(tree)  # a run written before log.trackers: its log.tensorboard, quietly (not the user's to edit)
    return tree


def _run_folder(path: str | Path) -> Path | None:
    """The run directory of what `path` names (the directory, a weights file beside its config.yaml, or a
    checkpoint in its checkpoints/); None for a Hugging Face folder (config.json) or no run at all."""
    p = Path(path)
    if p.is_dir() and (p / "config.yaml").is_file():
        return p
    if p.is_file() and (p.parent / "config.yaml").is_file():
        return p.parent
    if p.exists() and p.parent.name == CKPT_DIR:  # a checkpoint: a file, or a sharded one's folder
        return p.parent.parent
    return None


def _saved_tree(path: str | Path) -> dict | None:
    """read_run_config of the run `path` names; None where there is none or it cannot be read (load_run's to
    report)."""
    folder = _run_folder(path)
    try:
        return read_run_config(folder) if folder else None
    except (UserError, OSError):
        return None


def task_before_loading(path: str | Path) -> str | None:
    """The task of the run `path` names, read from its config.yaml alone, so that a command refuses a run of the
    wrong kind before it loads torch and the model. None where only loading tells (a Hugging Face folder has no
    config.yaml) or where the config cannot say: then runs.load_run reads the run and names what is wrong."""
    task = (_saved_tree(path) or {}).get("task")
    return task if task in registry.names() else None


def config_before_loading(path: str | Path):
    """The whole Config of the run `path` names, from its config.yaml, for checks that need more than the task
    (`lmforge export`: the model's layout, the PEFT method); None wherever task_before_loading says None, or
    the config does not load (load_run then names what is wrong)."""
    tree = _saved_tree(path)
    if not tree or tree.get("task") not in registry.names():
        return None
    try:
        return load_config(base=tree, validate=False)
    except ConfigError:
        return None


def check_serves(run: str | Path, task: str | None) -> None:
    """Refuse to serve a run whose task answers no requests (the registry's endpoint); task None: not known
    before loading (a Hugging Face folder), checked again once loaded."""
    if task is None or registry.spec(task).endpoint is not None:
        return
    served = [name for name, s in registry.TASKS.items() if s.endpoint]
    raise UserError(f"serve: {run} holds a {task} model, which answers no requests; expected a run "
                    f"of task {', '.join(served)} (fine-tune it first: lmforge finetune)")
