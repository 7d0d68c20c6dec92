"""Running statistics on the scale of the l2-normalized input (l2bn.running): the
bias-corrected moving average from the first step, its traced (compile / meta) form, the eps
warning, convert/revert resetting x-scale statistics, and l2bn.update_bn."""

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2bn
from l2bn.running import running_factor, warmup_steps


def _u(x):
    return F.normalize(x.flatten(1), dim=1).view_as(x)


def _batch_stats(x):
    u = _u(x)
    dims = [0] + list(range(2, x.dim()))
    return u.mean(dims), u.var(dims, unbiased=True)


def test_running_statistics_are_the_normalised_weighted_mean_of_the_batches():
    """After k steps each running statistic is sum_j w_j b_j / sum_j w_j with w_j = (1-m)^(k-j):
    BN's moving average without the prior's weight (step 1 copies the first batch)."""
    torch.manual_seed(0)
    m = 0.1
    layer = l2bn.L2BatchNorm2d(3, momentum=m, dtype=torch.float64)
    means, vars_ = [], []
    for k in range(1, 8):
        x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * k + k
        layer(x)
        bm, bv = _batch_stats(x)
        means.append(bm)
        vars_.append(bv)
        w = torch.tensor([(1 - m) ** (k - j) for j in range(1, k + 1)], dtype=torch.float64)
        want_m = (torch.stack(means) * w[:, None]).sum(0) / w.sum()
        want_v = (torch.stack(vars_) * w[:, None]).sum(0) / w.sum()
        torch.testing.assert_close(layer.running_mean, want_m, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(layer.running_var, want_v, rtol=1e-12, atol=1e-15)
    assert int(layer.num_batches_tracked) == 7


def test_after_the_warmup_the_update_is_bns_bit_for_bit():
    """From warmup_steps(m) on (356 for 0.1) the factor is momentum exactly: a layer loaded from
    a trained state updates exactly as BN does, and evaluates identically after loading."""
    assert (
        warmup_steps(0.1) == 356
        and running_factor(0.1, 356) == 0.1
        and running_factor(0.1, 355) != 0.1
    )
    assert (
        running_factor(None, 4) == 0.25
        and running_factor(0.0, 3) == 0.0
        and running_factor(1.0, 1) == 1.0
    )
    torch.manual_seed(1)
    old = l2bn.L2BatchNorm2d(3)
    state = old.state_dict()
    state["running_mean"].uniform_(-0.1, 0.1)
    state["running_var"].uniform_(0.01, 0.02)
    state["num_batches_tracked"].fill_(5000)
    layer = l2bn.L2BatchNorm2d(3)
    layer.load_state_dict(state)
    x = torch.randn(4, 3, 5, 5)
    rm, rv = state["running_mean"].clone(), state["running_var"].clone()
    assert torch.equal(
        layer.eval()(x), l2bn.functional.l2_batch_norm(x, rm, rv, layer.weight, layer.bias)
    )
    layer.train()(x)
    l2bn.functional.l2_batch_norm(
        x, rm, rv, layer.weight, layer.bias, True, 0.1
    )  # BN's update rule
    assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv)


def test_reset_and_load_restart_the_correction():
    layer = l2bn.L2BatchNorm1d(4)
    for _ in range(400):
        layer(torch.randn(8, 4))
    y = torch.randn(8, 4)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    layer(y)  # past the warm-up: BN's factor
    l2bn.functional.l2_batch_norm(y, rm, rv, layer.weight, layer.bias, True, 0.1)
    assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv)
    layer.reset_running_stats()
    x = torch.randn(8, 4, dtype=torch.float32)
    layer(x)
    torch.testing.assert_close(layer.running_var, _batch_stats(x)[1])
    fresh = l2bn.L2BatchNorm1d(4)
    for _ in range(400):
        fresh(torch.randn(8, 4))
    fresh.load_state_dict(l2bn.L2BatchNorm1d(4).state_dict())  # a fresh state: count 0
    fresh(x)
    torch.testing.assert_close(fresh.running_var, _batch_stats(x)[1])


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_compiled_and_meta_layers_apply_the_same_correction(momentum):
    """Under torch.compile(fullgraph=True) no tensor may be read on the host: the correction is
    applied with tensor ops and equals eager over several steps; on the meta device too."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), l2bn.L2BatchNorm2d(4, momentum=momentum)
    ).double()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(4):
        x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
        compiled(x)
        ref(x)
        torch.testing.assert_close(
            model[1].running_mean, ref[1].running_mean, rtol=1e-10, atol=1e-15
        )
        torch.testing.assert_close(model[1].running_var, ref[1].running_var, rtol=1e-10, atol=1e-15)
    meta = l2bn.L2BatchNorm2d(4, device="meta")
    assert meta(torch.randn(2, 4, 3, 3, device="meta")).device.type == "meta"


def _untrained_first_step_warnings(layer, x):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        layer(x)
        layer(x)  # the second step never warns
    return [str(a.message) for a in w if issubclass(a.category, l2bn.EpsDominanceWarning)]


def test_eps_domination_warns_once_per_layer_and_only_when_it_dominates():
    torch.manual_seed(0)
    big = torch.randn(2, 64, 56, 56)  # D = 200,704: Var[u] ~ 5e-6 < eps = 1e-5
    msgs = _untrained_first_step_warnings(l2bn.L2BatchNorm2d(64), big)
    assert len(msgs) == 1 and "L2BatchNorm2d(64)" in msgs[0] and "64·56·56 = 200,704" in msgs[0]
    assert "unit_rms=True" in msgs[0]
    # healthy layers: unit_rms, a small map, a smaller eps
    assert _untrained_first_step_warnings(l2bn.L2BatchNorm2d(64, unit_rms=True), big) == []
    assert _untrained_first_step_warnings(l2bn.L2BatchNorm2d(16), torch.randn(8, 16, 28, 28)) == []
    assert _untrained_first_step_warnings(l2bn.L2BatchNorm2d(64, eps=1e-8), big) == []
    with warnings.catch_warnings():
        warnings.filterwarnings("error")
        warnings.filterwarnings("ignore", category=l2bn.EpsDominanceWarning)
        l2bn.L2BatchNorm2d(64)(big)  # silenced the usual way


def test_convert_resets_x_scale_statistics_and_says_so():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    torch.optim.swa_utils.update_bn(batches, model)  # BN statistics accumulated on data
    with pytest.warns(
        UserWarning,
        match=r"reset the running statistics of 20 layer\(s\) \(bn1, layer1.0.bn1.*update_bn",
    ):
        conv = l2bn.convert(copy.deepcopy(model))
    assert all(
        int(m.num_batches_tracked) == 0 and bool((m.running_var == 1).all())
        for m in conv.modules()
        if isinstance(m, l2bn.L2_NORM_CLASSES)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh model has nothing to lose: no warning
        l2bn.convert(tv.models.resnet18(num_classes=10))
        kept = l2bn.convert(copy.deepcopy(model), running_stats="keep")
    assert torch.equal(kept.bn1.running_var, model.bn1.running_var)
    with pytest.warns(UserWarning, match="l2bn.revert: reset the running statistics of 20"):
        back = l2bn.revert(kept)
    assert bool((back.bn1.running_var == 1).all())
    with pytest.raises(ValueError, match="'reset' or 'keep'"):
        l2bn.convert(model, running_stats="rescale")


@pytest.mark.parametrize("unit_rms", [False, True])
def test_converted_model_recalibrated_with_update_bn_evaluates_as_it_trains(unit_rms):
    """A BN-trained model converted and recalibrated on one batch: eval outputs equal
    train-mode outputs on that batch up to the unbiased/biased variance factor (every layer
    normalizes over >= 2,048 values here, so the relative difference is < 1e-3)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16 * 16, 16),
        nn.BatchNorm1d(16),
    )
    data = torch.randn(2048, 3, 16, 16) * 2 + 1
    torch.optim.swa_utils.update_bn([data[:256]], model)
    with pytest.warns(UserWarning, match="reset the running statistics"):
        conv = l2bn.convert(copy.deepcopy(model), unit_rms=unit_rms)
    batch = data[:2048]

    def gap(m):
        m = copy.deepcopy(m)
        with torch.no_grad():
            y_eval = m.eval()(batch)
            for mod in m.modules():
                if isinstance(mod, l2bn.L2_NORM_CLASSES):
                    mod.momentum = 0.0  # train-mode outputs without touching the statistics
            y_train = m.train()(batch)
        return float((y_eval - y_train).abs().max() / y_train.abs().max())

    assert gap(conv) > 0.5  # without recalibration the converted model is far off
    l2bn.update_bn([batch], conv)
    assert gap(conv) < 1e-3


def test_update_bn_covers_bn_l2bn_and_sync_and_matches_torch_for_bn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3),
        l2bn.L2BatchNorm2d(4),
        l2bn.SyncL2BatchNorm(4),
        nn.Flatten(),
        nn.Linear(64, 5),
        l2bn.L2BatchNorm1d(5),
    )
    batches = [(torch.randn(8, 3, 6, 6), torch.zeros(8)) for _ in range(3)]
    with torch.no_grad():  # stale statistics, e.g. from before SWA or pruning
        model[2].running_var.fill_(5.0)
        model[2].num_batches_tracked.fill_(1000)
    ref = copy.deepcopy(model)
    model.eval()
    l2bn.update_bn(batches, model)
    torch.optim.swa_utils.update_bn(batches, ref)
    assert not model.training and model[1].momentum == 0.3 and model[2].momentum == 0.1
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)  # BN: as torch's
    # torch's update_bn does not reset the L2BN layers (they are not _BatchNorm): the stale
    # values keep 0.9^3 of their weight ...
    assert int(ref[2].num_batches_tracked) == 1003 and bool((ref[2].running_var > 3.6).all())
    # ... l2bn's averages their statistics over the batches, on u's scale
    with torch.no_grad():  # the L2BN layer's inputs during the pass: BN in training mode
        ins = [
            F.batch_norm(model[0](b[0]), None, None, model[1].weight, model[1].bias, True)
            for b in batches
        ]
    torch.testing.assert_close(
        model[2].running_var,
        torch.stack([_batch_stats(h)[1] for h in ins]).mean(0),
        rtol=1e-5,
        atol=1e-9,
    )
    for i in (2, 3, 6):
        assert int(model[i].num_batches_tracked) == 3


def test_update_bn_on_an_averaged_model():
    """SWA with L2BN: AveragedModel averages the parameters; l2bn.update_bn then recomputes the
    averaged model's L2BN statistics (torch's update_bn would leave them at the prior)."""
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), l2bn.L2BatchNorm2d(4), nn.ReLU())
    swa = AveragedModel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    for b in batches:
        opt.zero_grad()
        model(b).square().mean().backward()
        opt.step()
        swa.update_parameters(model)
    l2bn.update_bn(batches, swa)
    with torch.no_grad():
        stats = [_batch_stats(swa.module[0](b))[0] for b in batches]
    torch.testing.assert_close(
        swa.module[1].running_mean, torch.stack(stats).mean(0), rtol=1e-5, atol=1e-9
    )
    assert int(swa.module[1].num_batches_tracked) == 3


ENV = dict(os.environ, OMP_NUM_THREADS="2")


def _train(tmp_path, norm):
    out = tmp_path / norm
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "l2bn",
            "train",
            "--dataset",
            "fashion-mnist",
            "--model",
            "resnet8",
            "--norm",
            norm,
            "--epochs",
            "1",
            "--train-subset",
            "3000",
            "--seed",
            "0",
            "--out",
            str(out),
            "--no-progress",
            "--no-tensorboard",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "result.json").read_text())["test_acc"]


def test_short_training_evaluates_like_bn(tmp_path):
    """One epoch of 23 steps (the case that collapsed to chance, 9.85 % against BN's 50.3 %,
    while the running variance still held BN's prior): L2BN's test accuracy is within 5 points
    of BN's on Fashion-MNIST."""
    bn, l2 = _train(tmp_path, "bn"), _train(tmp_path, "l2bn")
    assert bn > 30
    assert l2 > bn - 5, (l2, bn)


def test_traced_first_step_is_exact_in_half_precision():
    """Under torch.compile the correction cannot read the count on the host: the kernel updates
    zero copies (m b exactly) and lerp writes b at step 1. Recovering b from the difference with
    the prior (about 1/D against 1) gave a negative half-precision variance and NaN in eval."""
    torch.manual_seed(0)
    layer = l2bn.L2BatchNorm2d(8).half()
    ref = copy.deepcopy(layer)
    x = torch.randn(4, 8, 40, 40).half()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    ref(x)
    assert bool((layer.running_var > 0).all())
    torch.testing.assert_close(
        layer.running_var.float(), ref.running_var.float(), rtol=5e-3, atol=3e-7
    )  # half ulps
    torch.testing.assert_close(
        layer.running_mean.float(), ref.running_mean.float(), rtol=2e-3, atol=1e-6
    )


def test_convert_a_meta_model_and_load_an_older_pickle():
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        net = tv.models.resnet18()
    conv = l2bn.convert(net)  # no values to lose: no warning, no error
    assert conv.bn1.running_var.is_meta
    layer = l2bn.L2BatchNorm2d(3)
    del layer.__dict__["_stats_warmup"]  # as unpickled from a version without the flag
    layer(torch.randn(4, 3, 2, 2))
    assert int(layer.num_batches_tracked) == 1
