"""Analysis metrics (known answers), probes (no side effects) and the report page."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from browser import dump_dom

from l2bn.analysis import (
    FeatureProbe,
    NormInputProbe,
    compactness,
    discrepancy,
    feature_metrics,
    fisher_ratio,
    knn_accuracy,
)
from l2bn.analysis.analyze import probe_model
from l2bn.models import create_model


def test_compactness_identical_features_is_one():
    f = torch.tensor([[1.0, 2.0, 3.0]] * 5 + [[-3.0, 0.5, 1.0]] * 5)
    y = torch.tensor([0] * 5 + [1] * 5)
    c = compactness(f, y)
    assert c["compactness"] == pytest.approx(1.0, abs=1e-12)
    assert c["intra_class_angle_deg"] == pytest.approx(0.0, abs=1e-4)


def test_discrepancy_orthogonal_means_is_90():
    torch.manual_seed(0)
    means = torch.eye(4) * 10
    y = torch.arange(4).repeat_interleave(50)
    f = means[y] + 0.01 * torch.randn(200, 4)
    d = discrepancy(f, y)
    assert d["discrepancy_mean_deg"] == pytest.approx(90.0, abs=0.5)
    assert d["discrepancy_min_deg"] == pytest.approx(90.0, abs=1.0)
    # two classes pointing the same way: 0 degrees
    d2 = discrepancy(torch.tensor([[1.0, 0], [2.0, 0]]), torch.tensor([0, 1]))
    assert d2["discrepancy_min_deg"] == pytest.approx(0.0, abs=1e-5)


def test_random_labels_control():
    torch.manual_seed(0)
    d = 64
    y_true = torch.arange(10).repeat_interleave(100)
    f = torch.randn(10, d)[y_true] * 3 + torch.randn(1000, d)  # well-clustered features
    good = feature_metrics(f, y_true)
    y_rand = y_true[torch.randperm(1000)]
    bad = feature_metrics(f, y_rand)
    assert good["compactness"] > 0.9 and good["knn_accuracy"] > 95 and good["fisher_ratio"] > 5
    # random labels: centroids collapse towards the global mean, cosines are small, kNN at chance
    assert bad["compactness"] < 0.35
    assert bad["knn_accuracy"] < 20
    assert bad["fisher_ratio"] < 0.05
    # Fisher ratio known answer: 2 classes at +-1 on one axis, within-class spread 0 -> inf; with
    # spread s -> 1/s^2
    f2 = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    assert math.isinf(fisher_ratio(f2, torch.tensor([0, 0, 1, 1])))
    f3 = torch.tensor([[1.5], [0.5], [-0.5], [-1.5]])
    assert fisher_ratio(f3, torch.tensor([0, 0, 1, 1])) == pytest.approx(4.0)
    assert knn_accuracy(f, y_true, k=3) > 95


@pytest.mark.parametrize("norm", ["bn", "l2bn"])
def test_probes_have_no_side_effects(norm):
    torch.manual_seed(0)
    net = create_model("resnet8", 10, 1, norm)
    net.train()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        net(x)  # populate running stats
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    ref = net(x)
    net.train()
    summary, feats, labels, acc = probe_model(net, [(x, torch.zeros(16, dtype=torch.long))])
    assert net.training  # mode restored
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k  # running stats untouched (eval mode during probing)
    assert all(len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0 for m in net.modules())
    net.eval()
    torch.testing.assert_close(net(x), ref)
    from torch.nn.modules.batchnorm import _NormBase

    norm_names = [n for n, m in net.named_modules() if isinstance(m, _NormBase)]
    assert feats.shape == (16, 64) and list(summary) == norm_names and len(norm_names) == 9
    # the probe measures each layer's input: the stem norm sees conv1's output
    with torch.no_grad():
        first_in = net.conv1(x) if hasattr(net, "conv1") else None
    if first_in is not None:
        n = first_in.flatten(1).norm(dim=1)
        assert summary[norm_names[0]]["mean"] == pytest.approx(float(n.mean()), rel=1e-4)
    first = next(iter(summary.values()))
    assert first["count"] == 16 and first["mean"] > 0 and len(first["hist_log10"]) == 80


def test_norm_probe_values():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(2)
            self.fc = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(self.bn(x))

    net = Two().eval()
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])  # norms 5, 1, 10
    with NormInputProbe(net) as p, FeatureProbe(net) as fp:
        net(x)
    s = p.summary()["bn"]
    assert (
        s["mean"] == pytest.approx(16 / 3)
        and s["min"] == 1
        and s["max"] == 10
        and s["max_min_ratio"] == 10
    )
    assert s["std"] == pytest.approx(torch.tensor([5.0, 1.0, 10.0]).std().item())
    assert fp.features().shape == (3, 2)
    with pytest.raises(ValueError, match="no normalization layers"):
        NormInputProbe(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny finished digits runs (BN and L2BN), analysed."""
    import os

    from l2bn.analysis.analyze import analyze_run
    from l2bn.train import TrainConfig, train

    os.environ["L2BN_BACKEND"] = "fused"
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for norm in ("bn", "l2bn"):
        for seed in (0, 1):
            d = root / f"{norm}-{seed}"
            train(
                TrainConfig(
                    dataset="digits",
                    model="resnet8",
                    norm=norm,
                    seed=seed,
                    epochs=1,
                    batch_size=64,
                    lr=0.05,
                    out=str(d),
                    progress=False,
                    tensorboard=False,
                    threads=1,
                )
            )
            analyze_run(str(d))
            dirs.append(str(d))
    os.environ.pop("L2BN_BACKEND")
    return dirs


def test_analysis_json_keys(two_runs):
    a = json.loads(open(f"{two_runs[0]}/analysis.json").read())
    for k in (
        "compactness",
        "intra_class_angle_deg",
        "discrepancy_mean_deg",
        "discrepancy_min_deg",
        "fisher_ratio",
        "knn_accuracy",
        "norm_spread",
    ):
        assert k in a
    first = next(iter(a["norm_spread"].values()))
    assert {"mean", "std", "cv", "max_min_ratio", "hist_log10"} <= set(first)
    r = json.loads(open(f"{two_runs[0]}/result.json").read())
    assert a["test_acc_recomputed"] == pytest.approx(r["test_acc"], abs=1e-6)


def test_analyze_errors(tmp_path, two_runs):
    from l2bn.analysis.analyze import analyze_run
    from l2bn.train.checkpoint import CheckpointError

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        analyze_run(str(tmp_path / "empty"))
    # a checkpoint of another model: swap the config's model name
    bad = tmp_path / "bad"
    shutil.copytree(two_runs[0], bad)
    state = torch.load(bad / "last.pt", weights_only=True)
    state["config"]["model"] = "resnet14"
    torch.save(state, bad / "last.pt")
    with pytest.raises(CheckpointError, match="does not fit the model: .* missing keys"):
        analyze_run(str(bad))


def test_report_renders_in_chromium(tmp_path, two_runs):
    out = tmp_path / "report"
    r = subprocess.run(
        [sys.executable, "-m", "l2bn", "report", *two_runs, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    md = (out / "report.md").read_text()
    for fig in ("curves.png", "norm_cv.png", "norm_hist.png", "metrics.png", "pca.png"):
        assert (out / fig).is_file() and f"]({fig})" in md
    assert "95% CI" in md and "compactness" in md.lower() and "Look for" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5
    assert "<script" not in html  # the shipped page carries no test hook
    s = json.loads((out / "summary.json").read_text())
    assert "mechanism" in s and s["differences"]["resnet8/l2bn-bn"]["n"] == 2
    assert "p (paired t)" in md and "seeds to detect 0.5 pp" in md
    # the test adds its own probe script to a copy of the page
    hook = (
        "<script>window.__errors=[];window.addEventListener('error',e=>window.__errors.push(String(e.message||e)),true);"
        "window.addEventListener('load',()=>{const im=[...document.images];"
        "document.body.dataset.images=im.length;document.body.dataset.imagesOk=im.filter(i=>i.complete&&i.naturalWidth>0).length;"
        "document.body.dataset.errors=window.__errors.length;});</script>"
    )
    probe = out / "probe.html"
    probe.write_text(html.replace("</head>", hook + "</head>", 1))
    dom = dump_dom(probe, tmp_path)
    assert 'data-images="5"' in dom and 'data-images-ok="5"' in dom and 'data-errors="0"' in dom, (
        dom[:500]
    )


def test_report_errors(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "l2bn", "report", str(tmp_path), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no result.json" in r.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written
    (tmp_path / "result.json").write_text('{"status": "complete", "test_acc": ')
    r = subprocess.run(
        [sys.executable, "-m", "l2bn", "report", str(tmp_path), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "result.json: corrupt run result" in r.stderr and not (tmp_path / "o").exists()
