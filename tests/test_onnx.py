"""Export of models with L2BN layers: ONNX (run in onnxruntime) and ``torch.export``.

* ``torch.onnx.export(..., dynamo=True)`` (PyTorch's default exporter since 2.9) of a model with
  every layer (1d on (N, C) and (N, C, L), 2d, 3d, ``unit_rms``, SyncL2BatchNorm, layers made by
  ``l2bn.convert``) in eval mode: standard ONNX ops only, a symbolic batch dimension, outputs
  equal to PyTorch at two batch sizes other than the one traced.
* the legacy TorchScript exporter (``dynamo=False``) with ``dynamic_axes``: the same checks.
* ``torch.export.export`` with a dynamic batch, eval and train mode (running statistics and
  input gradients included).

With ``CI=true`` a missing onnx / onnxscript / onnxruntime is an error, not a skip.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import l2bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter's translator

STANDARD_DOMAINS = {"", "ai.onnx"}
BATCH_SIZES = (1, 5)  # traced with 3


class AllLayers(nn.Module):
    """Every L2BN layer once: 3d -> 2d (unit_rms) -> 1d on (N, C, L) -> 1d on (N, C);
    SyncL2BatchNorm (outside a process group) on the 2d map; and a conv head written with
    nn.BatchNorm2d/1d and converted by :func:`l2bn.convert`."""

    def __init__(self) -> None:
        super().__init__()
        self.bn3 = l2bn.L2BatchNorm3d(2)
        self.bn2 = l2bn.L2BatchNorm2d(6, unit_rms=True)
        self.bn1l = l2bn.L2BatchNorm1d(6)
        self.bn1 = l2bn.L2BatchNorm1d(6, eps=1e-3)
        self.sync = l2bn.SyncL2BatchNorm(6)
        head = nn.Sequential(
            nn.Conv2d(6, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
            nn.BatchNorm1d(3),
        )
        self.head = l2bn.convert(head)

    def forward(self, x: torch.Tensor):
        a = self.bn3(x)  # (N, 2, 3, 4, 4)
        b = self.bn2(a.flatten(1, 2))  # (N, 6, 4, 4)
        c = self.bn1l(b.flatten(2))  # (N, 6, 16)
        d = self.bn1(c.mean(-1))  # (N, 6)
        e = self.sync(b)  # (N, 6, 4, 4)
        f = self.head(b)  # (N, 3)
        return a, b, c, d, e, f


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics (at the l2-normalized scale)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(
                m,
                (l2bn.L2BatchNorm1d, l2bn.L2BatchNorm2d, l2bn.L2BatchNorm3d, l2bn.SyncL2BatchNorm),
            ):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.01)
                m.running_var.copy_((torch.rand(c, generator=g) + 0.5) * 1e-2)
    return model


def _input(n: int) -> torch.Tensor:
    x = torch.randn(n, 2, 3, 4, 4)
    return x * torch.logspace(-1, 1, n).view(-1, 1, 1, 1, 1)  # very different sample norms


def _check_onnx_file(path) -> None:
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    domains = {n.domain for n in model.graph.node} | {f.domain for f in model.functions}
    assert domains <= STANDARD_DOMAINS, f"non-standard ONNX domains: {domains - STANDARD_DOMAINS}"
    for inp in model.graph.input:
        dim0 = inp.type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), (
            f"batch dimension of input {inp.name!r} is not dynamic: {dim0}"
        )


def _check_runs_like_torch(path, model: nn.Module) -> None:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for n in BATCH_SIZES:
        x = _input(n)
        got = sess.run(None, {name: x.numpy()})
        with torch.no_grad():
            want = model(x)
        want = want if isinstance(want, tuple) else (want,)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)


def test_onnx_dynamo_export_all_layers(tmp_path):
    """The default (torch.export-based) exporter, as in the README."""
    model = _randomize(AllLayers()).eval()
    assert isinstance(model.head[1], l2bn.L2BatchNorm2d)
    assert isinstance(model.head[6], l2bn.L2BatchNorm1d)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(model, (_input(3),), dynamic_shapes=({0: batch},), dynamo=True)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    _check_onnx_file(path)
    _check_runs_like_torch(path, model)


def test_onnx_legacy_export_all_layers(tmp_path):
    """The legacy TorchScript exporter (``dynamo=False``) with a dynamic batch axis."""
    model = _randomize(AllLayers()).eval()
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
        torch.onnx.export(
            model,
            (_input(3),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=list("abcdef"),
            dynamic_axes={k: {0: "batch"} for k in ["x", *"abcdef"]},
        )
    _check_onnx_file(path)
    _check_runs_like_torch(path, model)


def test_torch_export_eval():
    model = _randomize(AllLayers()).eval()
    ep = torch.export.export(model, (_input(3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = ep.module()
    for n in BATCH_SIZES:
        x = _input(n)
        with torch.no_grad():
            for g, w in zip(exported(x), model(x)):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_torch_export_train():
    """Training mode: batch statistics, running-statistics updates and gradients match eager."""
    model = _randomize(AllLayers()).train()
    eager = copy.deepcopy(model)
    ep = torch.export.export(model, (_input(3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = ep.module()
    for n in (5, 8):
        x = _input(n)
        xe, xx = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_e, out_x = eager(xe), exported(xx)
        for g, w in zip(out_x, out_e):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        g = torch.Generator().manual_seed(n)  # random weights: sum(BN output) has zero gradient
        weights = [torch.randn(o.shape, generator=g) for o in out_e]
        sum((o * w).sum() for o, w in zip(out_e, weights)).backward()
        sum((o * w).sum() for o, w in zip(out_x, weights)).backward()
        scale = float(xe.grad.abs().max())  # float32 fused (eager) vs composite (exported)
        torch.testing.assert_close(xx.grad, xe.grad, rtol=1e-3, atol=1e-5 * scale)
    for key, want in eager.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], want, rtol=1e-5, atol=1e-7, msg=key)
    assert int(exported.state_dict()["bn2.num_batches_tracked"]) == 2
