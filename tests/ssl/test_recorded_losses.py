"""Every shipped pre-training config gives, bit for bit, the losses it gave before the method registry.

The values below were recorded with the code of the flat ``ssl`` format (``ssl.method: decon_ml``,
``ssl.num_prototypes``, ...) from the shipped configs of that time and the same settings written in that format;
the test runs today's shipped configs (``ssl.method`` + ``ssl.<method>`` + ``ssl.decoder``) with the settings in the
current keys. Setting: resnet18, 64 px, small heads, batch 4, seed 0, CPU, ``train.amp=none``, synthetic ISIC /
REFUGE images (12 each, so one epoch is the 3 steps), through the engine's own step (:class:`_Run`) without writing
checkpoints.

The REFUGE twins of the ISIC configs (``*_refuge``) differ from them in the data only once the test's settings are
applied (checked here, cheaply), so by default only the 9 distinct configs run (about 1.5 s of CPU each); set
``DECON_MED_ALL_RECORDED=1`` to run the twins' steps too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from decon_med.config import PretrainConfig, flatten, load_config, to_dict
from decon_med.data.datasets import build_dataset
from decon_med.engine import pretrain as engine
from decon_med.ssl import build_method

CONFIGS = Path(__file__).resolve().parents[2] / "decon_med" / "configs" / "pretrain"

#: Losses of the first 3 optimiser steps of each shipped config (as ``metrics.csv`` writes them), recorded with
#: the flat-format code.
RECORDED: dict[str, list[float]] = {
    "decon_ml": [5.273329257965088, 5.4707441329956055, 5.4723615646362305],
    "decon_ml_densecl": [0.20689602196216583, 1.650367021560669, 2.3158881664276123],
    "decon_ml_refuge": [5.427451133728027, 5.329245090484619, 5.256664752960205],
    "decon_sl": [4.612074851989746, 4.835962295532227, 4.9826812744140625],
    "decon_sl_densecl": [0.16933244466781616, 1.6852304935455322, 2.356571674346924],
    "decon_sl_fcn": [4.953829765319824, 5.110192775726318, 5.0146484375],
    "decon_sl_fcn_refuge": [5.140798091888428, 5.010784149169922, 5.198426246643066],
    "decon_sl_refuge": [5.013097763061523, 4.932165145874023, 4.515079498291016],
    "densecl": [0.1909436583518982, 1.8177002668380737, 2.6804099082946777],
    "mim": [0.9497025012969971, 0.9693592190742493, 0.9491279721260071],
    "slotcon": [4.009082317352295, 4.23218297958374, 4.709665298461914],
    "slotcon_fcn": [4.591923236846924, 4.735352516174316, 4.675230026245117],
    "slotcon_fcn_refuge": [4.699465751647949, 4.852377891540527, 4.678938865661621],
    "slotcon_refuge": [4.831201076507568, 4.536524772644043, 3.8801236152648926],
}

#: Small heads per method (the recording's ``ssl.dim_hidden=64 ssl.dim_out=32 ssl.num_prototypes=16
#: ssl.num_prototypes_dec=24`` / ``ssl.queue_size=16 ssl.dense_warmup_steps=1``).
SMALL_HEADS = {
    "slotcon": ["ssl.dim_hidden=64", "ssl.dim_out=32", "ssl.slotcon.num_prototypes=16"],
    "densecl": [
        "ssl.dim_hidden=64",
        "ssl.dim_out=32",
        "ssl.densecl.queue_size=16",
        "ssl.densecl.dense_warmup_steps=1",
    ],
    "mim": [],
}


#: REFUGE twin -> the ISIC config it equals apart from the data.
TWINS = {name: name.removesuffix("_refuge") for name in RECORDED if name.endswith("_refuge")}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    from decon_med.data.synthetic import make_isic, make_refuge

    root = tmp_path_factory.mktemp("recorded")
    make_isic(root / "isic", n=12, seed=0)
    make_refuge(root / "refuge", n=12, seed=0)
    return {"isic2017": root / "isic", "refuge": root / "refuge"}


def three_step_losses(cfg: PretrainConfig) -> list[float]:
    """The losses of the first 3 optimiser steps, as :func:`decon_med.engine.pretrain.pretrain` computes them."""
    dataset = build_dataset(cfg, "train", "pretrain")
    plan = engine.make_plan(cfg, len(dataset), max_steps=3)
    engine.seed_everything(cfg.seed)
    run = engine._Run(cfg, engine.RunPaths(Path(cfg.out_dir)), plan, dataset, build_method(cfg), None)
    batches = run._micro_batches()
    try:
        return [float(run._optimizer_step(batches)[0]["loss"]) for _ in range(3)]
    finally:
        batches.close()


def recorded_config(name: str, roots: dict[str, Path], out: Path) -> PretrainConfig:
    """The shipped config ``name`` with the recording's settings, in the current keys."""
    path = CONFIGS / f"{name}.yaml"
    shipped = load_config(path, [], schema=PretrainConfig)
    heads = list(SMALL_HEADS[shipped.ssl.method])
    if shipped.ssl.method == "slotcon" and shipped.ssl.decoder.levels:
        heads.append("ssl.slotcon.num_prototypes_dec=24")
    return load_config(
        path,
        [
            "model.encoder=resnet18",
            "data.image_size=64",
            "data.num_workers=0",
            f"data.root={roots[shipped.data.name]}",
            "train.batch_size=4",
            "train.epochs=1",
            "train.amp=none",
            "train.sync_bn=false",
            "train.log_every=1",
            "train.loggers=[csv]",
            "seed=0",
            f"out_dir={out}",
            *heads,
        ],
        schema=PretrainConfig,
    )


@pytest.mark.parametrize("name", sorted(set(RECORDED) - set(TWINS)))
def test_shipped_config_gives_the_recorded_losses(name, roots, tmp_path, capsys):
    cfg = recorded_config(name, roots, tmp_path / "run")
    assert "note:" not in capsys.readouterr().err  # the shipped configs use the current keys
    assert three_step_losses(cfg) == RECORDED[name]


@pytest.mark.parametrize("twin", sorted(TWINS))
def test_refuge_twin_differs_from_its_isic_config_in_the_data_only(twin, roots, tmp_path):
    a = flatten(to_dict(recorded_config(twin, roots, tmp_path)))
    b = flatten(to_dict(recorded_config(TWINS[twin], roots, tmp_path)))
    assert sorted(k for k in a if a[k] != b[k]) == ["data.name", "data.root"]
    if os.environ.get("DECON_MED_ALL_RECORDED") == "1":
        assert three_step_losses(recorded_config(twin, roots, tmp_path / "run")) == RECORDED[twin]
