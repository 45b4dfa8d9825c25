"""Optional experiment tracking next to ``metrics.csv``: the ``train.loggers`` key.

``csv`` (``metrics.csv``) is always on; ``tensorboard`` writes ``tb/``; ``mlflow`` mirrors the run into an MLflow
tracking store through a :class:`Tracker`, the small interface
:class:`~decon_med.engine.pretrain.MetricsLogger` calls: ``log_params`` once, ``log_metrics(row, step)`` for every
row it writes (and every validation / probe score), ``log_artifacts`` and ``close`` at the end of a session.

MLflow (``pip install 'decon-med[mlflow]'``, the ``mlflow-skinny`` client) is imported only when asked for:

* store: ``MLFLOW_TRACKING_URI`` when set, else the local file store ``./mlruns`` under the current directory
  (MLflow's own former default; the file store is allowed with ``MLFLOW_ALLOW_FILE_STORE=true`` unless that is
  set otherwise);
* experiment: ``train.mlflow_experiment``, else the name of the folder holding the run folder;
* run name: the run folder's name; its id is kept in the run folder (``mlflow.json``), so ``--resume``
  continues the same MLflow run;
* params: the flattened resolved config (those of the first session: MLflow never changes a logged param);
* metrics: every ``metrics.csv`` row (health signals included) at its step, fine-tuning's ``val.csv`` rows as
  ``val/<column>``, the online probe as ``probe/<key>``, the test scores as ``test/<key>``;
* artifacts: ``config.yaml``, ``metrics.csv``, ``val.csv``, ``probe.csv``, ``results.json``, ``done.json``.

Only rank 0 logs. Rows a resumed run writes again (past its checkpoint) are appended to the metric history.

Example:
    >>> check_loggers(cfg.train)                  # before any work: a missing mlflow is one line
    >>> tracker = open_tracker(cfg, Path(cfg.out_dir), resumed=False)
    >>> tracker.log_metrics({"step": 10, "loss": 0.5}, step=10); tracker.close()
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from decon_med.config import flatten, to_dict
from decon_med.errors import ConfigError, DeconError
from decon_med.folders import atomic_write

#: The run folder's record of its MLflow run (run id, experiment id, tracking URI).
RUN_FILE = "mlflow.json"
#: Files of a run folder logged as artifacts at the end of a session (those that exist).
ARTIFACTS = ("config.yaml", "metrics.csv", "val.csv", "probe.csv", "results.json", "done.json")
MISSING = "train.loggers: mlflow is not installed; pip install 'decon-med[mlflow]'"


class Tracker(Protocol):
    """What :class:`~decon_med.engine.pretrain.MetricsLogger` calls besides its CSV and TensorBoard files."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, row: dict[str, float], step: int) -> None: ...

    def log_artifacts(self, paths: list[Path]) -> None: ...

    def close(self) -> None: ...


def check_loggers(train: Any) -> None:
    """Raise a one-line ConfigError when ``train.loggers`` asks for MLflow and it cannot be imported."""
    if "mlflow" in train.loggers:
        _import_mlflow()


def _import_mlflow() -> Any:
    try:
        return importlib.import_module("mlflow")
    except ImportError as exc:
        raise ConfigError(MISSING) from exc


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the file store ``./mlruns`` of the current directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else (Path.cwd() / "mlruns").as_uri()


def experiment_name(cfg: Any) -> str:
    """``train.mlflow_experiment``, else the name of the folder holding the run folder."""
    return cfg.train.mlflow_experiment or Path(os.path.abspath(cfg.out_dir)).parent.name or "Default"


def open_tracker(cfg: Any, root: Path, resumed: bool) -> Tracker | None:
    """The tracker ``train.loggers`` asks for (None without ``mlflow``); ``resumed`` continues the run recorded
    in ``root`` (a new one when none is)."""
    if cfg is None or "mlflow" not in cfg.train.loggers:
        return None
    return MlflowTracker(cfg, root, resumed)


def finish_run(cfg: Any, root: Path, metrics: dict[str, float], step: int) -> None:
    """At the very end of a run (after ``done.json``): log ``metrics`` (e.g. ``test/mIoU``) and the final
    artifacts, and mark the MLflow run finished. Nothing without ``mlflow`` in ``train.loggers``."""
    tracker = open_tracker(cfg, root, resumed=True)
    if tracker is not None:
        log_config_params(tracker, cfg)  # a no-op unless the run is new
        tracker.log_metrics(metrics, step)
        tracker.close()


def flat_scores(prefix: str, scores: dict[str, Any]) -> dict[str, float]:
    """Scores as metrics: ``{"mIoU": m, "IoU": {"lesion": l}}`` -> ``{"<prefix>/mIoU": m,
    "<prefix>/IoU_lesion": l}`` (other values left out)."""
    flat: dict[str, float] = {}
    for key, value in scores.items():
        if isinstance(value, dict):
            for name, item in value.items():
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    flat[f"{prefix}/{key}_{name}"] = float(item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = float(value)
    return flat


_UNSAFE = re.compile(r"[^\w\-. /]")


def metric_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in a key (all but letters, digits, ``_-. /``) as ``_``."""
    return _UNSAFE.sub("_", name)


class MlflowTracker:
    """One MLflow run per run folder, through ``MlflowClient`` (no global active run)."""

    def __init__(self, cfg: Any, root: Path, resumed: bool):
        _import_mlflow()
        from mlflow.tracking import MlflowClient

        self.root = Path(root)
        self.uri = tracking_uri()
        if self.uri.startswith("file:") or "://" not in self.uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for an opt-in
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._continue() if resumed else None
            if self.run_id is None:
                self.run_id = self._create(cfg)
            else:
                self.client.update_run(self.run_id, status="RUNNING")
        except ImportError:
            raise
        except Exception as exc:
            raise DeconError(f"train.loggers: mlflow at {self.uri}: {_first_line(exc)}") from exc

    def _continue(self) -> str | None:
        path = self.root / RUN_FILE
        if not path.is_file():
            return None
        return json.loads(path.read_text())["run_id"]

    def _create(self, cfg: Any) -> str:
        name = experiment_name(cfg)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=self.root.name)
        record = {"run_id": run.info.run_id, "experiment_id": experiment_id, "tracking_uri": self.uri}
        atomic_write(self.root / RUN_FILE, json.dumps(record, indent=1) + "\n")
        return run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """The params the run does not hold yet (a resumed run keeps its first session's values)."""
        from mlflow.entities import Param

        held = self.client.get_run(self.run_id).data.params
        new = [Param(key, str(value)) for key, value in params.items() if key not in held]
        for start in range(0, len(new), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_metrics(self, row: dict[str, float], step: int) -> None:
        """Every value of ``row`` but ``step`` as a metric at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(metric_key(key), float(value), now, int(step))
            for key, value in row.items()
            if key != "step" and value is not None and value != ""
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        """Log the run folder's key files and end the run: FAILED / KILLED while an exception is on its way out
        (an error / an interrupt), else FINISHED (a resume sets it running again)."""
        error = sys.exc_info()[0]
        status = "FINISHED"
        if error is not None:
            status = "FAILED" if issubclass(error, Exception) else "KILLED"
        self.log_artifacts([self.root / name for name in ARTIFACTS])
        self.client.set_terminated(self.run_id, status=status)


def log_config_params(tracker: Tracker, cfg: Any) -> None:
    """``log_params`` with the flattened resolved config."""
    tracker.log_params(flatten(to_dict(cfg)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class NullWriter:
    """Stands in for TensorBoard's ``SummaryWriter`` when ``tensorboard`` is not in ``train.loggers``."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
