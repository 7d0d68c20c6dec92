"""Shared comparison helpers for the L2BN tests (not a test module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def composite_fn(
    x,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum=0.1,
    eps=1e-5,
    unit_rms=False,
    l2_eps=1e-12,
):
    """The paper's composite, functional: ``F.batch_norm(F.normalize(x.flatten(1)).view_as(x))``."""
    u = F.normalize(x.flatten(1), dim=1, eps=l2_eps).view_as(x)
    if unit_rms:
        u = u * (x[0].numel() ** 0.5)
    return F.batch_norm(u, running_mean, running_var, weight, bias, training, momentum, eps)


def per_sample_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """max |actual - expected| of each sample divided by that sample's max |expected|."""
    a = actual.detach().double().reshape(actual.shape[0], -1)
    e = expected.detach().double().reshape(expected.shape[0], -1)
    scale = e.abs().amax(1).clamp_min(torch.finfo(torch.float64).tiny)
    return (a - e).abs().amax(1) / scale


def assert_close_per_sample(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = ""
) -> None:
    """Every sample agrees to ``rtol`` relative to its own largest expected entry."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = per_sample_rel_err(actual, expected)
    assert bool((err <= rtol).all()), f"{name}: per-sample relative error {err.tolist()} > {rtol}"
