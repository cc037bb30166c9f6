"""The experiment trackers a run feeds besides metrics.jsonl (log.trackers): TensorBoard, Weights & Biases and
MLflow. Each is a small class behind one interface: it starts in its constructor (the run directory exists by
then), `log(step, metrics)` takes what the run logs (keys `split/name`: train/loss, val/loss, ...), `finish`
uploads the run's files and closes it, `where` is the line that tells the user where to look. `check` runs
before the run directory is created, so a missing library or an MLflow store that cannot be reached is one line
and nothing written. The libraries are imported here only when a run uses them: `import lmforge` imports neither
wandb nor mlflow."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from lmforge.config import Config, TRACKERS, leaves, to_dict
from lmforge.errors import UserError, one_line
from lmforge.io import writing
from lmforge.rundir import WEIGHTS

TB_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_FILES = "lmforge"  # the run's files inside a W&B run's files/
MLFLOW_STORE = "mlruns"  # under log.out_dir, beside the runs it compares, when log.mlflow_uri is empty
# the module each tracker needs, and the package that installs it
MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
           "mlflow": ("mlflow", "mlflow-skinny")}
ARTIFACTS = ("config.yaml", "metrics.jsonl", "curves.png", "report.html")
REACH_TIMEOUT = 3.0  # seconds to wait for an MLflow server before the run starts


def params(cfg: Config) -> dict:
    """The resolved config as flat dotted keys (model.d_model: 256), as the trackers show parameters."""
    tree, flat = to_dict(cfg), {}
    for path, _, _ in leaves():
        node = tree
        for key in path.split("."):
            node = node[key]
        flat[path] = node
    return flat


# -- before the run directory exists -----------------------------------------------------------------


def check(cfg: Config) -> None:
    """Every tracker of log.trackers can start: its library imports, MLflow's store can be reached or written,
    W&B online has credentials. One UserError naming the key and the fix otherwise."""
    lc = cfg.log
    for name in lc.trackers:
        module, package = MODULES[name]
        # found, not imported: mlflow takes seconds to import, paid when the run starts and not for a refusal
        installed = sys.modules[module] is not None if module in sys.modules else importlib.util.find_spec(module)
        if not installed:
            raise UserError(f"config: log.trackers has {name}, but the {module} package is not installed: "
                            f"pip install {package} (or pip install 'lmforge[trackers]')")
    if "mlflow" in lc.trackers:
        check_mlflow_uri(mlflow_uri(lc), lc.mlflow_uri)
    if "wandb" in lc.trackers and lc.wandb_mode == "online":
        _check_wandb_login()


def _import(name: str):
    """The tracker's library, at its start; one that is installed but does not import (a dependency's version,
    say) is one line too."""
    module, package = MODULES[name]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"log.trackers: {name}: the {module} package does not import ({one_line(e, 120)}): "
                        f"pip install -U {package}") from None


def mlflow_uri(lc) -> str:
    """log.mlflow_uri, else $MLFLOW_TRACKING_URI, else a file store at OUT_DIR/mlruns; a plain folder becomes a
    file: URI (MLflow reads a bare path as one too, but relative to where it runs)."""
    uri = lc.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or str(Path(lc.out_dir) / MLFLOW_STORE)
    if not urlparse(uri).scheme or len(urlparse(uri).scheme) == 1:  # a path (C: on Windows is a drive, not a scheme)
        return Path(uri).resolve().as_uri()
    return uri


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db
        return Path(unquote(uri[len("sqlite:///"):]))
    return Path(url2pathname(parsed.path))


def check_mlflow_uri(uri: str, given: str) -> None:
    key = f"log.mlflow_uri = {given}" if given else f"log.mlflow_uri (empty: {uri})"
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_reachable(uri, key)
    elif scheme == "sqlite":
        absent = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if absent:
            raise UserError(f"config: {key}: an SQLite store needs {' and '.join(absent)}, which mlflow-skinny leaves "
                            "out: pip install mlflow (or sqlalchemy alembic), or give a folder (a file store)")
        _check_writable(_local_path(uri), key, folder=False)
    elif scheme == "file":
        _check_writable(_local_path(uri), key, folder=True)


def _check_reachable(uri: str, key: str) -> None:
    # a TCP connection with a short timeout: MLflow's own client would retry for minutes before failing
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=REACH_TIMEOUT).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"config: {key}: cannot reach {parsed.hostname}:{port} ({reason}); start the MLflow server "
                        "or set log.mlflow_uri to a folder") from None


def _check_writable(path: Path, key: str, folder: bool) -> None:
    path = path.absolute()
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"config: {key}: {path} is a {'file' if folder else 'folder'}; expected a "
                        f"{'folder (a file store)' if folder else 'database file'}")
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"config: {key}: cannot write to {parent}; expected a folder this user can write")


def _check_wandb_login() -> None:
    # wandb's own lookup (WANDB_API_KEY, `wandb login`'s netrc), asked not to prompt: a run never waits on stdin
    import wandb
    from wandb.sdk.lib.wbauth import authenticate

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        auth = authenticate.authenticate_session(host=host, source="lmforge", prompt=False, update_session=False)
    except wandb.Error as e:
        raise UserError(f"config: log.wandb_mode = online: {one_line(e, 120)}") from None
    if auth is None:
        raise UserError("config: log.wandb_mode = online needs W&B credentials: run `wandb login` or set "
                        "WANDB_API_KEY (or use log.wandb_mode = offline and `wandb sync` later)")


# -- the trackers ------------------------------------------------------------------------------------


class TensorBoard:
    def __init__(self, run_dir: Path, cfg: Config, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = run_dir / TB_DIR
        with writing(self.folder):  # a full or read-only disk is one line naming the folder
            # a resumed run drops the events a crashed session wrote after its checkpoint
            self.writer = SummaryWriter(str(self.folder), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with writing(self.folder):
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def finish(self, files: list[Path], ok: bool) -> None:
        with writing(self.folder):
            self.writer.close()

    def where(self) -> str:
        return f"tensorboard --logdir {self.folder}"


class WandB:
    """A W&B run in RUN/wandb (offline by default: `wandb sync RUN/wandb/offline-run-*` uploads it later)."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int):
        wandb = _import("wandb")
        lc = cfg.log
        self.run_dir, self.mode = run_dir, lc.wandb_mode
        folder = run_dir / WANDB_DIR
        with writing(folder):
            folder.mkdir(exist_ok=True)
        # console off: the run's stdout stays the progress bar's, not captured into W&B; silent: no banner;
        # git and code saving off: a run directory needs no repository around it
        settings = wandb.Settings(console="off", silent=True, show_warnings=False, disable_git=True,
                                  save_code=False)
        try:
            self.run = wandb.init(project=lc.wandb_project, name=run_dir.name, dir=str(run_dir), mode=lc.wandb_mode,
                                  config=params(cfg), settings=settings, reinit="create_new",
                                  tags=["resumed"] if start_step else None)
        except wandb.Error as e:
            raise UserError(f"log.trackers: wandb: {one_line(e, 160)}") from None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, files: list[Path], ok: bool) -> None:
        files_dir = Path(self.run.dir)
        (files_dir / WANDB_FILES).mkdir(exist_ok=True)
        for path in files:
            # placed in the run's files/lmforge/ ourselves (a hard link, else a copy: the run's own file may be
            # replaced later, as report.html is) and saved from there: wandb's own linking warns on the console
            # per file. Not files/ itself: wandb writes its own config.yaml there
            target = files_dir / WANDB_FILES / path.name
            target.unlink(missing_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
            self.run.save(str(target), base_path=str(files_dir), policy="now", glob=False)
        self.run.finish(exit_code=0 if ok else 1)

    def where(self) -> str:
        if self.mode == "offline":
            return f"wandb sync {Path(self.run.dir).parent}"
        return self.run.url or "W&B disabled (log.wandb_mode = disabled)"


class MLflow:
    """An MLflow run in log.mlflow_experiment, named after the run directory, through MlflowClient (no global
    active run: several runs in one process stay apart)."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int):
        lc = cfg.log
        self.uri = mlflow_uri(lc)
        if urlparse(self.uri).scheme == "file":
            # MLflow 3.7+ refuses its file store unless asked (it wants SQLAlchemy's, which mlflow-skinny lacks);
            # lmforge asks for it where the user chose a folder. setdefault: a user's explicit false stays
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # never network by default
        _import("mlflow")
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient(self.uri)
        try:
            experiment = self.client.get_experiment_by_name(lc.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(lc.mlflow_experiment))
            tags = {"lmforge.run_dir": str(run_dir.resolve()), "lmforge.task": cfg.task}
            if start_step:
                tags["lmforge.resumed_at_step"] = str(start_step)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params(cfg).items()])
        except MlflowException as e:
            raise UserError(f"log.trackers: mlflow at {self.uri}: {one_line(e, 160)}") from None
        self.experiment = lc.mlflow_experiment

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, files: list[Path], ok: bool) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def where(self) -> str:
        return f"run {self.run_id} of experiment {self.experiment} in {self.uri}"


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
assert tuple(KINDS) == TRACKERS  # config.TRACKERS names them for validation, without importing this module


def start(run_dir: Path, cfg: Config, start_step: int) -> dict:
    """The trackers of log.trackers, started, by name."""
    return {name: KINDS[name](run_dir, cfg, start_step) for name in cfg.log.trackers}


def files_to_upload(run_dir: Path, log_weights: bool) -> list[Path]:
    names = ARTIFACTS + ((WEIGHTS,) if log_weights else ())
    return [run_dir / n for n in names if (run_dir / n).is_file()]
