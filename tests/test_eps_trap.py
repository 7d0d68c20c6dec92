"""The eps trap (l2bn.analysis.eps_trap and ``l2bn eps-trap``): eps's share of each norm layer's
denominator after the l2 step."""

import subprocess
import sys

import pytest
import torch

from l2bn.analysis.eps_trap import measure_norm_layers, synthetic_scenes
from l2bn.models import create_model

pytestmark = pytest.mark.filterwarnings(
    "ignore::l2bn.EpsDominanceWarning"
)  # the trap is what is measured


def test_l2_normalized_channel_variance_is_at_most_one_over_d():
    """Why the trap cannot be trained away: the channel variances of an l2-normalized batch
    average to at most 1/D, so the mean eps share is at least 1 / (1 + 1 / (D * eps))."""
    torch.manual_seed(0)
    for shape in [(8, 48, 64, 200), (4, 3, 64, 400), (16, 10, 8, 25)]:
        x = (
            torch.randn(shape).exp() * torch.rand(shape[0], 1, 1, 1) * 100
        )  # any scale, non-zero mean
        u = x / torch.linalg.vector_norm(x.flatten(1), dim=1).view(-1, 1, 1, 1)
        var = u.transpose(0, 1).flatten(1).var(dim=1, unbiased=False)
        d = x[0].numel()
        assert float(var.mean()) <= 1.0 / d
        assert float((1e-3 / (var + 1e-3)).mean()) >= 1.0 / (1.0 + 1.0 / (d * 1e-3)) - 1e-6


def test_eps_trap_measured_on_the_resnet(monkeypatch):
    """Keras eps = 1e-3 against channel variances of ~1/D: the paper's formula is eps-dominated,
    unit RMS is not (the numbers in docs/acoustic.md, on a smaller input)."""
    monkeypatch.setenv("L2BN_BACKEND", "fused")
    x = synthetic_scenes(2, 48)
    share, out_std = {}, {}
    for norm in ("l2bn", "l2bn-rms"):
        torch.manual_seed(0)
        net = create_model("dcase-resnet", 10, 3, norm)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        rows = [r for r in measure_norm_layers(net, x) if r["layer"] != "final_bn"]
        assert len(rows) == 36 and all(
            torch.equal(before[k], v) for k, v in net.state_dict().items()
        )
        share[norm] = sorted(r["eps_share"] for r in rows)[18]
        out_std[norm] = sorted(r["out_std"] for r in rows)[18]
    assert share["l2bn"] > 0.95 and out_std["l2bn"] < 0.15
    assert (
        share["l2bn-rms"] < 0.01 and 0.9 < out_std["l2bn-rms"] < 1.1
    )  # as plain BN (docs/acoustic.md)


def test_eps_trap_command():
    """``l2bn eps-trap`` prints the parameter counts against Keras's and one row per model and
    norm; the eps share of the literal formula is high, that of unit RMS low."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "l2bn",
            "eps-trap",
            "--models",
            "dcase-fcnn",
            "--norms",
            "l2bn",
            "l2bn-rms",
            "--batch",
            "2",
            "--frames",
            "48",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| dcase-fcnn | 11,780,329 / 11,780,329 | 6,382 / 6,382 |" in r.stdout, r.stdout
    rows = {
        line.split("|")[2].strip(): line
        for line in r.stdout.splitlines()
        if line.startswith("| dcase-fcnn | l2bn")
    }
    share = {k: float(v.split("|")[6].split()[0]) for k, v in rows.items()}
    assert share["l2bn"] > 0.9 and share["l2bn-rms"] < 0.05, r.stdout


def test_eps_trap_command_with_its_default_flags():
    """``l2bn eps-trap`` as a user first runs it: the three DCASE networks, bn, l2bn and
    l2bn-rms, a batch of 8 scenes of 400 frames; one row per model and norm, the literal formula
    eps-dominated in each network, unit RMS and BN not."""
    r = subprocess.run(
        [sys.executable, "-m", "l2bn", "eps-trap"], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-2000:]
    share = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if (
            len(cells) > 6
            and cells[1].startswith("dcase-")
            and cells[2] in ("bn", "l2bn", "l2bn-rms")
        ):
            share[(cells[1], cells[2])] = float(cells[6].split()[0])
    models = ("dcase-resnet", "dcase-fcnn", "dcase-fsfcnn")
    assert set(share) == {(m, n) for m in models for n in ("bn", "l2bn", "l2bn-rms")}, r.stdout
    for m in models:
        assert share[(m, "l2bn")] > 0.9 and share[(m, "l2bn-rms")] < 0.05, r.stdout
        assert share[(m, "bn")] < 0.05, r.stdout
