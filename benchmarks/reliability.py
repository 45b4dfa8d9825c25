"""The slow half of the reliability battery: kill -9 and resume, and two processes on one folder.

The fast probes (bad inputs, outputs over inputs, manifests) are tests (``tests/test_reliability.py``,
``tests/test_data_safety.py``, ``tests/test_errors.py``). This script runs what needs real processes and seconds:

- **kill -9**: each scenario runs a tiny run uninterrupted, then the same run killed with SIGKILL (after a
  checkpoint, before the first checkpoint, or twice), resumed with ``--resume`` until it finishes; the final
  ``last.ckpt`` network weights must equal the uninterrupted run's bit for bit;
- **one writer**: a second ``pretrain`` / ``finetune`` / ``--overwrite`` / ``evaluate --save-predictions`` on a
  folder another process is writing must exit 2 with one line naming the holder, and leave the first run to finish;
- **stale lock**: after the writer is killed, the next command takes the folder over with one line.

Every process runs with one thread (``OMP_NUM_THREADS=1``) so results are deterministic and timings do not
interfere. Prints a table and writes JSON.

Usage:
    python benchmarks/reliability.py --json benchmarks/results/reliability.json
    python benchmarks/reliability.py --only kill9_pretrain_slotcon      # one scenario
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

TINY = ["model.encoder=resnet18", "data.image_size=64", "data.num_workers=0", "train.amp=none"]
PRETRAIN = [
    *TINY,
    "train.batch_size=4",
    "train.epochs=3",
    "train.warmup_epochs=0",
    "train.ckpt_every=2",
    "train.log_every=1",
    "train.keep_checkpoints=null",
]
#: method -> its overrides (small heads so that a step takes well under a second on one core).
METHODS = {
    "slotcon": ["ssl.num_prototypes=8", "ssl.dim_hidden=32", "ssl.dim_out=16"],
    "decon_ml": ["ssl.num_prototypes=8", "ssl.dim_hidden=32", "ssl.dim_out=16"],
    "densecl": ["ssl.dim_hidden=32", "ssl.dim_out=16", "ssl.queue_size=64"],
    "mim": [],
}
FINETUNE = [
    *TINY,
    "train.batch_size=2",
    "train.iters=12",
    "train.val_every=4",
    "train.ckpt_every=2",
    "train.log_every=1",
    "train.optimizer=sgd",
    "train.lr=0.01",
    "train.keep_checkpoints=null",
]


def decon(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``decon-med ARGS`` in a fresh process (``--quiet`` added where the command has it)."""
    quiet = [] if args[0] == "synth" else ["--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "decon_med", *args, *quiet],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        **kw,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"decon-med {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "decon_med", *args, "--quiet"],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 300) -> bool:
    """Poll until ``predicate()`` or the process ends; True when the predicate held while it still ran."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return proc.poll() is None
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    tree = state.get("network") or state.get("method")
    return {k: v for k, v in _flatten(tree).items() if isinstance(v, torch.Tensor)}


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoints(run: Path) -> int:
    folder = run / "checkpoints"
    return len(list(folder.glob("step_*.ckpt"))) if folder.is_dir() else 0


class Battery:
    def __init__(self, work: Path):
        self.work = work
        self.data = work / "isic"
        decon("synth", "--kind", "isic", "--out", str(self.data), "--n", "16")
        self.results: list[dict] = []

    def pretrain_args(self, method: str, out: Path) -> list[str]:
        return [
            "pretrain",
            str(ROOT / "configs/pretrain" / f"{method}.yaml"),
            f"data.root={self.data}",
            f"out_dir={out}",
            *PRETRAIN,
            *METHODS[method],
        ]

    def finetune_args(self, out: Path) -> list[str]:
        return [
            "finetune",
            str(ROOT / "configs/finetune/isic.yaml"),
            f"data.root={self.data}",
            f"out_dir={out}",
            *FINETUNE,
        ]

    def record(self, name: str, ok: bool, detail: str, seconds: float) -> None:
        self.results.append(
            {"scenario": name, "ok": bool(ok), "detail": detail, "seconds": round(seconds, 1)}
        )
        print(f"{'ok  ' if ok else 'FAIL'} {name:38s} {seconds:6.1f} s  {detail}", flush=True)

    # -- kill -9 ---------------------------------------------------------------------------------------------
    def kill9(self, name: str, args: Callable[[Path], list[str]], kills: list[int]) -> None:
        """Kill the run with SIGKILL once it has written ``k`` numbered checkpoints, for each ``k`` in ``kills``
        (0: as soon as the run folder is marked, before any checkpoint), then resume it to the end."""
        t0 = time.monotonic()
        reference, killed = self.work / f"{name}_ref", self.work / f"{name}_killed"
        decon(*args(reference))
        for index, k in enumerate(kills):
            run_args = args(killed) + (["--resume"] if index else [])
            proc = start(*run_args)
            ready = (
                (lambda: (killed / ".decon-run").is_file())
                if k == 0
                else (lambda k=k: checkpoints(killed) >= k)
            )
            alive = wait_for(ready, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if not alive:
                self.record(
                    name, False, f"the run ended before kill {index + 1} could land", time.monotonic() - t0
                )
                return
        decon(*args(killed), "--resume")
        ok = same(weights(reference), weights(killed))
        self.record(
            name,
            ok,
            f"killed at {kills} checkpoints, resumed: final weights {'bit-identical' if ok else 'DIFFER'}",
            time.monotonic() - t0,
        )

    # -- one writer --------------------------------------------------------------------------------------------
    def second_writer(self, name: str, first: list[str], second: list[str], folder: Path) -> None:
        """Start ``first``; once it holds the lock, run ``second``: it must exit 2 naming the first's PID, and the
        first must still finish."""
        t0 = time.monotonic()
        proc = start(*first)
        locked = wait_for(
            lambda: (folder / ".decon-lock").is_file() and (folder / "config.yaml").is_file(), proc
        )
        other = decon(*second, check=False)
        out, err = proc.communicate()
        errors = [line for line in other.stderr.splitlines() if line.startswith("error: ")]
        ok = (
            locked
            and other.returncode == 2
            and len(errors) == 1
            and f"pid {proc.pid}" in errors[0]
            and proc.returncode == 0
            and (folder / "done.json").is_file()
        )
        detail = errors[0][:110] if errors else f"second exited {other.returncode}"
        self.record(name, ok, detail, time.monotonic() - t0)

    def stale_lock(self) -> None:
        t0 = time.monotonic()
        run = self.work / "stale"
        proc = start(*self.finetune_args(run))
        wait_for(lambda: (run / ".decon-lock").is_file() and (run / "config.yaml").is_file(), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = (run / ".decon-lock").is_file()
        resumed = decon(*self.finetune_args(run), "--resume", check=False)
        ok = (
            left
            and resumed.returncode == 0
            and f"pid {proc.pid}" in resumed.stderr
            and "taking over" in resumed.stderr
        )
        self.record(
            "stale_lock_taken_over",
            ok,
            "lock left by kill -9 taken over with one line" if ok else resumed.stderr[-200:],
            time.monotonic() - t0,
        )

    def scenarios(self) -> dict[str, Callable[[], None]]:
        out: dict[str, Callable[[], None]] = {}
        for method in METHODS:
            out[f"kill9_pretrain_{method}"] = lambda m=method: self.kill9(
                f"kill9_pretrain_{m}", lambda o, m=m: self.pretrain_args(m, o), [1]
            )
        out["kill9_pretrain_before_first_checkpoint"] = lambda: self.kill9(
            "kill9_pretrain_before_first_checkpoint", lambda o: self.pretrain_args("slotcon", o), [0]
        )
        out["kill9_pretrain_twice"] = lambda: self.kill9(
            "kill9_pretrain_twice", lambda o: self.pretrain_args("decon_ml", o), [1, 3]
        )
        out["kill9_finetune"] = lambda: self.kill9("kill9_finetune", self.finetune_args, [2])
        slow = ["train.epochs=6"]
        out["second_pretrain_refused"] = lambda: self.second_writer(
            "second_pretrain_refused",
            [*self.pretrain_args("slotcon", self.work / "busy_pt"), *slow],
            [*self.pretrain_args("slotcon", self.work / "busy_pt"), *slow, "--resume"],
            self.work / "busy_pt",
        )
        out["overwrite_while_running_refused"] = lambda: self.second_writer(
            "overwrite_while_running_refused",
            [*self.finetune_args(self.work / "busy_ft"), "train.iters=40"],
            [*self.finetune_args(self.work / "busy_ft"), "train.iters=40", "--overwrite"],
            self.work / "busy_ft",
        )
        out["evaluate_while_finetuning_refused"] = lambda: self.second_writer(
            "evaluate_while_finetuning_refused",
            [*self.finetune_args(self.work / "busy_ev"), "train.iters=40"],
            ["evaluate", str(self.work / "busy_ev" / "last.ckpt"), "--split", "val", "--save-predictions"],
            self.work / "busy_ev",
        )
        out["stale_lock_taken_over"] = self.stale_lock
        return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", nargs="*", help="run only these scenarios")
    args = parser.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="decon-reliability-") as tmp:
        battery = Battery(Path(tmp))
        scenarios = battery.scenarios()
        for name, run in scenarios.items():
            if args.only and name not in args.only:
                continue
            try:
                run()
            except Exception as exc:  # a scenario that crashes is a failure, recorded; the others still run
                battery.record(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}", 0.0)
    passed = sum(r["ok"] for r in battery.results)
    print(f"\n{passed} of {len(battery.results)} scenarios passed in {time.monotonic() - t0:.0f} s")
    if args.json:
        record = {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "threads_per_process": 1,
            "passed": passed,
            "total": len(battery.results),
            "seconds": round(time.monotonic() - t0, 1),
            "scenarios": battery.results,
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0 if passed == len(battery.results) else 1


if __name__ == "__main__":
    sys.exit(main())
