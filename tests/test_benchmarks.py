"""The benchmark scripts run end to end on CPU with a tiny model (correctness only, no timing asserts)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_throughput_runs_on_cpu(tmp_path, capsys):
    bench = _load("pretrain_throughput")
    out = tmp_path / "bench.json"
    result = bench.main(
        [
            "--device",
            "cpu",
            "--encoder",
            "resnet18",
            "--size",
            "64",
            "--batch-sizes",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--dim-hidden",
            "64",
            "--loader-images",
            "8",
            "--json",
            str(out),
        ]
    )
    assert [r["method"] for r in result["methods"]] == ["slotcon", "decon_sl", "decon_ml"]
    assert all(r["img_per_s"] > 0 and r["batch_size"] == 4 for r in result["methods"])
    assert result["loader"]["images"] == 8 and result["loader"]["img_per_s"] > 0
    assert json.loads(out.read_text())["methods"][0]["method"] == "slotcon"
    assert "decon_ml" in capsys.readouterr().out
