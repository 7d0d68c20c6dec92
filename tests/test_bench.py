"""``l2bn bench``: the per-round ratio statistics on known numbers, the bandwidth arithmetic, a
smoke run through the library and the CLI (new JSON keys), and ``benchmarks/gpu_check.sh``
refusing to run without a GPU."""

import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from l2bn import bench
from l2bn.bench import layers
from l2bn.cli import main

ROOT = Path(__file__).parent.parent
TINY = [("tiny", (8, 4, 6, 6))]


@pytest.fixture
def fused(monkeypatch):
    """The eager backend: automatic selection would compile kernels first (tens of seconds on a
    loaded 2-core machine); the full default path is run by
    test_cli_defaults.py::test_bench_quick."""
    monkeypatch.setenv("L2BN_BACKEND", "fused")


def test_quantile_and_summarize_known_numbers():
    assert bench.summarize([5.0, 1.0, 4.0, 2.0, 3.0]) == {"median": 3.0, "q25": 2.0, "q75": 4.0}
    # even count: linear interpolation, as numpy.percentile
    assert bench.summarize([1.0, 2.0, 3.0, 4.0]) == {"median": 2.5, "q25": 1.75, "q75": 3.25}
    assert bench.quantile([7.0], 0.25) == 7.0
    assert math.isnan(bench.quantile([], 0.5))


def test_ratios_are_per_round_not_ratio_of_medians():
    # per-round ratios 2, 1.5, 3 -> median 2; the ratio of the medians would be 3 / 2 = 1.5
    s = bench.ratio_summary([2.0, 3.0, 12.0], [1.0, 2.0, 4.0])
    assert s == {"median": 2.0, "q25": 1.75, "q75": 2.5}
    with pytest.raises(ValueError, match="2 numerators but 3 denominators"):
        bench.ratio_summary([1.0, 2.0], [1.0, 2.0, 3.0])


def test_finish_summarises_rounds_and_bandwidth():
    """Synthetic per-round times in, known medians, ratios and GB/s out."""
    row = bench.Row("synthetic", (1000, 250), nbytes=10**6)
    row.rounds_ms = {
        "train": {
            "bn": [1.0, 2.0, 4.0],
            "l2bn": [2.0, 2.0, 6.0],
            "naive": [3.0, 6.0, 12.0],
            "bn+compile": [1.0, 1.0, 1.0],
            "l2bn+compile": [1.0, 2.0, 3.0],
            "copy": [0.5, 0.5, 0.5],
        },
        "eval": {"bn": [1.0, 1.0, 1.0], "l2bn": [2.0, 4.0, 3.0], "naive": [1.0, 1.0, 1.0]},
    }
    case = layers._Case(row, [], {}, {})
    out = layers._finish(case)
    assert out.train_ms["bn"] == 2.0 and out.eval_ms["l2bn"] == 3.0
    assert "copy" not in out.train_ms and out.rounds_ms["copy"]["copy"] == [0.5, 0.5, 0.5]
    # l2bn/bn per round: 2, 1, 1.5
    assert (
        out.ratio_median["train"]["l2bn"],
        out.ratio_q25["train"]["l2bn"],
        out.ratio_q75["train"]["l2bn"],
    ) == (1.5, 1.25, 1.75)
    assert out.ratio_median["train"]["naive"] == 3.0
    # compiled variants are divided by compiled BN: 1, 2, 3
    assert out.ratio_median["train"]["l2bn+compile"] == 2.0
    assert out.ratio_median["eval"]["l2bn"] == 3.0 and out.ratio_q25["eval"]["l2bn"] == 2.5
    assert "bn" not in out.ratio_median["train"]
    # bandwidth: 8 passes of 1 MB in 2 ms = 4 GB/s; copy: 2 MB in 0.5 ms = 4 GB/s
    assert bench.TRAFFIC_PASSES == 8
    assert out.gbps["bn"] == pytest.approx(4.0) and out.gbps["copy"] == pytest.approx(4.0)
    # per round (8 MB / t) / (2 MB / 0.5 ms) = 2 / t: bn 2, 1, 0.5; l2bn 1, 1, 1/3
    assert out.ratio_median["bandwidth"]["bn"] == pytest.approx(1.0)
    assert out.ratio_q75["bandwidth"]["bn"] == pytest.approx(1.5)
    assert out.ratio_median["bandwidth"]["l2bn"] == pytest.approx(1.0)
    assert out.ratio_q25["bandwidth"]["l2bn"] == pytest.approx(2 / 3)


def test_time_call_measures_wall_time_per_call():
    t = bench.time_call(lambda: time.sleep(0.02), torch.device("cpu"), number=5)
    assert 0.018 <= t < 0.06  # per call, not the total of 0.1 s


def _check_row(row: dict, rounds: int) -> None:
    for stat in ("ratio_median", "ratio_q25", "ratio_q75"):
        for phase in ("train", "eval"):
            assert set(row[stat][phase]) == {"naive", "l2bn"}, (stat, phase, row[stat])
    for phase in ("train", "eval"):
        for k in ("naive", "l2bn"):
            lo, mid, hi = (row[s][phase][k] for s in ("ratio_q25", "ratio_median", "ratio_q75"))
            assert 0 < lo <= mid <= hi < float("inf")
        assert {k: len(v) for k, v in row["rounds_ms"][phase].items()} == {
            "bn": rounds,
            "naive": rounds,
            "l2bn": rounds,
        }
    assert row["saved"]["naive"] > 2 * row["saved"]["bn"]


def test_run_quick_returns_the_new_keys(tmp_path, fused):
    path = tmp_path / "b.json"
    text = bench.run(quick=True, reps=2, rounds=2, compile=False, resnet=False, json_path=str(path))
    res = json.loads(path.read_text())
    assert res["rounds"] == 2 and res["reps"] == 2
    assert [r["name"] for r in res["rows"]] == [bench.SHAPES[0][0], bench.SHAPES[-1][0]]
    for row in res["rows"]:
        _check_row(row, rounds=2)
    assert "L2BN/BN" in text and "geomean of medians" in text and "2 per-round ratios" in text
    assert "Achieved bandwidth" not in text  # off on CPU by default
    # a ratio cell shows the median and the IQR
    row = res["rows"][0]
    med, q25, q75 = (row[k]["train"]["l2bn"] for k in ("ratio_median", "ratio_q25", "ratio_q75"))
    cell = f"{med:.2f} ({q25:.2f}-{q75:.2f})"
    assert cell in text


def test_bandwidth_table_when_asked(tmp_path, monkeypatch, fused):
    monkeypatch.setattr(
        bench.layers, "BANDWIDTH_MIN_BYTES", 0
    )  # where the layer benchmark reads it
    path = tmp_path / "b.json"
    text = bench.run(
        shapes=TINY,
        reps=2,
        rounds=2,
        compile=False,
        resnet=False,
        bandwidth=True,
        json_path=str(path),
    )
    row = json.loads(path.read_text())["rows"][0]
    assert set(row["gbps"]) == {"bn", "naive", "l2bn", "copy"} and all(
        v > 0 for v in row["gbps"].values()
    )
    assert len(row["rounds_ms"]["copy"]["copy"]) == 2
    assert set(row["ratio_median"]["bandwidth"]) == {"bn", "naive", "l2bn"}
    assert "Achieved bandwidth" in text and "L2BN/copy" in text


def test_channels_last_and_backend_reach_the_layers(tmp_path, monkeypatch):
    monkeypatch.delenv("L2BN_BACKEND", raising=False)
    path = tmp_path / "b.json"
    text = bench.run(
        shapes=TINY,
        reps=1,
        rounds=1,
        compile=False,
        resnet=False,
        channels_last=True,
        backend="reference",
        json_path=str(path),
    )
    res = json.loads(path.read_text())
    assert res["backend"] == "reference" and res["channels_last"] is True
    assert "channels_last" in text and "L2BN backend reference" in text
    assert "L2BN_BACKEND" not in os.environ  # restored
    # the reference composite saves a second full-size tensor (the fast backends only x)
    row = res["rows"][0]
    assert row["saved"]["l2bn"] > 1.5 * row["saved"]["bn"]


def test_bench_model_rows(fused):
    r = bench.bench_model("resnet8", 1, 28, batch=4, reps=1, rounds=2, infer=True, warmup=1)
    assert set(r) == {"train", "eval"}
    for phase in r.values():
        assert len(phase["rounds_s"]["bn"]) == len(phase["rounds_s"]["l2bn"]) == 2
        assert phase["ratio"] == phase["ratio_median"]
        assert 0 < phase["ratio_q25"] <= phase["ratio_median"] <= phase["ratio_q75"]
        assert phase["bn_s"] > 0 and phase["l2bn_s"] > 0
    assert "eval" not in bench.bench_model("resnet8", 1, 28, batch=2, reps=1, rounds=1, warmup=0)


def test_main_job_rows_run_the_trainers_loop(monkeypatch):
    """The main-job rows time l2bn train's own train_one_epoch and evaluate (counted here) on
    Fashion-MNIST with the main job's recipe, BN and L2BN in every round."""
    from l2bn.train import loop

    calls = {"train": [], "eval": 0}
    real_train, real_eval = loop.train_one_epoch, loop.evaluate

    def train(net, loader, opt, *a):
        calls["train"].append((len(loader), type(opt).__name__))
        return real_train(net, loader, opt, *a)

    def evaluate(*a, **k):
        calls["eval"] += 1
        return real_eval(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", train)
    monkeypatch.setattr(loop, "evaluate", evaluate)
    r = bench.bench_main_job(rounds=2, steps=2, eval_batches=1)
    assert calls["train"] == [(2, "SGD")] * 6 and calls["eval"] == 6  # warm-up round + 2, x2
    for phase in ("train", "eval"):
        assert len(r[phase]["rounds_s"]["bn"]) == len(r[phase]["rounds_s"]["l2bn"]) == 2
        assert 0 < r[phase]["ratio_q25"] <= r[phase]["ratio_median"] <= r[phase]["ratio_q75"]


def test_bench_says_when_the_main_job_rows_are_missing(monkeypatch, tmp_path):
    from l2bn.io import MissingFile

    def missing(*a, **k):
        raise MissingFile("Fashion-MNIST not found in /nowhere (apt-get install ...)")

    fake = {
        k: {"bn_s": 1.0, "l2bn_s": 1.0, "ratio_median": 1.0, "ratio_q25": 1.0, "ratio_q75": 1.0}
        for k in ("train", "eval")
    }
    monkeypatch.setattr(bench, "bench_main_job", missing)
    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: fake)
    monkeypatch.setattr(bench, "bench_layers", lambda *a, **k: [])
    monkeypatch.setattr(bench, "format_table", lambda rows, title: title)
    text = bench.run(quick=True, reps=1, rounds=1, compile=False)
    assert "Main job rows not measured: Fashion-MNIST not found in /nowhere" in text


def test_cli_bench_json(tmp_path, capsys, fused):
    out = tmp_path / "out.json"
    md = tmp_path / "out.md"
    assert (
        main(
            [
                "bench",
                "--quick",
                "--rounds",
                "2",
                "--reps",
                "2",
                "--no-compile",
                "--no-resnet",
                "--json",
                str(out),
                "--markdown",
                str(md),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["rounds"] == 2 and len(res["rows"]) == 2
    for row in res["rows"]:
        _check_row(row, rounds=2)
    assert "L2BN/BN" in stdout and "L2BN/BN" in md.read_text()


def test_cli_bench_bad_input_is_one_line(capsys):
    assert main(["bench", "--rounds", "0", "--no-resnet", "--no-compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rounds and reps must be at least 1" in err[0]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has a GPU: gpu_check.sh would run in full"
)
def test_gpu_check_refuses_without_gpu(tmp_path):
    out = tmp_path / "o"
    t0 = time.perf_counter()
    import os
    import sys

    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no CUDA GPU available" in r.stderr and "torch.cuda.is_available() is False" in r.stderr
    assert not out.exists()  # stopped before doing anything
    assert time.perf_counter() - t0 < 60
