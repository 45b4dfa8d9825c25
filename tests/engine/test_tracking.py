"""``train.loggers``: the MLflow mirror of a run folder (params, every metrics row, val / test scores, artifacts,
resume into the same run), the one-line error without mlflow, and no mlflow import by default."""

import json
import sys
from pathlib import Path

import pytest
import torch

from decon_med.config import flatten, load_config, to_dict
from decon_med.data.synthetic import make_isic
from decon_med.engine.finetune import finetune
from decon_med.engine.pretrain import pretrain
from decon_med.errors import ConfigError
from tests.engine.test_finetune import make_cfg as finetune_cfg
from tests.engine.test_finetune import read_csv
from tests.engine.test_pretrain import TinyMethod, make_cfg, read_metrics

ALL = ["csv", "tensorboard", "mlflow"]


class HealthyTinyMethod(TinyMethod):
    """TinyMethod with one health signal, so ``metrics.csv`` has a health column."""

    def health(self) -> dict[str, torch.Tensor]:
        return {"enc0_z_std": torch.tensor(0.25 + 0.01 * self.next_step)}


def tiny() -> HealthyTinyMethod:
    torch.manual_seed(0)
    return HealthyTinyMethod()


@pytest.fixture(scope="module")
def isic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracking_data") / "isic"
    make_isic(root, n=8, seed=0)  # 8 train, 2 val, 2 test: 2 pre-training steps per epoch at batch 4
    return root


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh MLflow file store; its client."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the engine's opt-in is undone afterwards
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifacts(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def test_pretraining_is_mirrored_and_resume_continues_the_run(isic, tmp_path, store):
    out = tmp_path / "group" / "run_a"
    cfg = make_cfg(isic, out, epochs=2, log_every=1, ckpt_every=100, loggers=ALL)
    pretrain(cfg, method=tiny(), progress=False, max_steps=2)
    run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    assert "mlflow.json" in (out / ".decon-manifest").read_text()  # written through atomic_write
    assert store.get_run(run_id).info.status == "FINISHED"  # the session ended cleanly (resumable)

    pretrain(cfg, method=tiny(), progress=False, resume=True)
    assert json.loads((out / "mlflow.json").read_text())["run_id"] == run_id
    runs = store.search_runs([store.get_experiment_by_name("group").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run: the resume did not start another
    run = store.get_run(run_id)
    assert run.info.run_name == "run_a" and run.info.status == "FINISHED"

    expected = {key: str(value) for key, value in flatten(to_dict(cfg)).items()}
    assert run.data.params == expected
    assert run.data.params["train.loggers"] == str(ALL)

    rows = read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert "enc0_z_std" in rows[0]  # the health signal is a column, so it is a metric too
    columns = [c for c in rows[0] if c != "step"]
    assert set(run.data.metrics) == set(columns)
    for column in columns:
        assert history(store, run_id, column) == [(int(r["step"]), float(r[column])) for r in rows], column
    assert artifacts(store, run_id) == {"config.yaml", "metrics.csv", "done.json"}
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_finetuning_logs_val_rows_and_test_scores(isic, tmp_path, store):
    data = isic.parent  # make_cfg of the fine-tuning tests reads <data>/isic
    cfg = finetune_cfg(data, tmp_path / "ft" / "s0", train={"loggers": ALL, "mlflow_experiment": "grid"})
    run_dir = finetune(cfg, progress=False)
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    run = store.get_run(run_id)
    assert store.get_experiment(run.info.experiment_id).name == "grid"
    assert run.info.status == "FINISHED"

    val_rows = read_csv(run_dir / "val.csv")
    assert [int(r["iter"]) for r in val_rows] == [3, 6]
    for column in [c for c in val_rows[0] if c != "iter"]:
        expected = [(int(r["iter"]), float(r[column])) for r in val_rows]
        assert history(store, run_id, f"val/{column}") == expected, column
    rows = read_csv(run_dir / "metrics.csv")
    assert history(store, run_id, "loss") == [(int(r["step"]), float(r["loss"])) for r in rows]

    test = json.loads((run_dir / "results.json").read_text())["test"]
    assert history(store, run_id, "test/mIoU") == [(6, test["mIoU"])]
    assert run.data.metrics["test/mDice"] == test["mDice"]
    for name, value in test["IoU"].items():
        assert run.data.metrics[f"test/IoU_{name}"] == value
    assert {"config.yaml", "metrics.csv", "val.csv", "results.json", "done.json"} <= artifacts(store, run_id)


def test_tensorboard_can_be_left_out(isic, tmp_path, store):
    out = tmp_path / "runs" / "no_tb"
    pretrain(make_cfg(isic, out, epochs=1, loggers=["csv", "mlflow"]), method=tiny(), progress=False)
    assert not (out / "tb").exists()
    assert [int(r["step"]) for r in read_metrics(out)] == [1, 2]


def test_missing_mlflow_is_one_line_before_any_work(isic, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    out = tmp_path / "runs" / "x"
    with pytest.raises(ConfigError) as info:
        pretrain(make_cfg(isic, out, loggers=ALL), method=tiny(), progress=False)
    assert str(info.value) == "train.loggers: mlflow is not installed; pip install 'decon-med[mlflow]'"
    assert not out.exists()
    data = isic.parent
    with pytest.raises(ConfigError, match="^train.loggers: mlflow is not installed"):
        finetune(finetune_cfg(data, tmp_path / "ft", train={"loggers": ALL}), progress=False)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize(
    "loggers, fragment",
    [
        ("[tensorboard]", "config key 'train.loggers': must include csv"),
        ("[csv, wandb]", "config key 'train.loggers[1]': 'wandb' is not one of"),
    ],
)
def test_bad_loggers_name_the_key(loggers, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"train.loggers={loggers}"])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_default_never_imports_mlflow(isic, tmp_path, monkeypatch):
    """decon-med itself never imports mlflow without ``mlflow`` in ``train.loggers``: with every mlflow module
    blocked (``import mlflow`` raises), default pre-training and fine-tuning runs go through. (MONAI imports mlflow
    on its own when it is installed, so ``sys.modules`` alone cannot tell.)"""
    assert load_config(None, []).train.loggers == ["csv", "tensorboard"]
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")] + ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import mlflow  # noqa: F401
    out = pretrain(make_cfg(isic, tmp_path / "pre", epochs=1), method=tiny(), progress=False)
    ft = finetune(finetune_cfg(isic.parent, tmp_path / "ft", train={"iters": 3}), progress=False)
    for run_dir in (out, ft):
        assert (run_dir / "done.json").is_file() and (run_dir / "tb").is_dir()
        assert not (run_dir / "mlflow.json").exists()
    assert sys.modules["mlflow"] is None  # nothing replaced the block
