"""The layers' small API surface, pinned exactly: repr, constructor checks and their messages,
argument forwarding (device, bias, l2_eps), the 1d/2d/3d lookup, track_running_stats flipped
after construction (as BN allows), and SyncL2BatchNorm in a one-process group."""

import pytest
import torch
import torch.distributed as dist

import l2bn
from l2bn import L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d, SyncL2BatchNorm
from l2bn.modules import l2_layer_for_dim


def test_repr_matches_batchnorm_plus_l2_options():
    assert repr(L2BatchNorm2d(4)) == repr(torch.nn.BatchNorm2d(4)).replace(
        "BatchNorm2d", "L2BatchNorm2d"
    )
    r = repr(L2BatchNorm1d(3, unit_rms=True, l2_eps=1e-6))
    assert (
        r
        == repr(torch.nn.BatchNorm1d(3)).replace("BatchNorm1d", "L2BatchNorm1d")[:-1]
        + ", unit_rms=True, l2_eps=1e-06)"
    )
    assert repr(L2BatchNorm1d(3, l2_eps=1e-6)).endswith("track_running_stats=True, l2_eps=1e-06)")


def test_constructor_checks_name_the_class_and_argument():
    with pytest.raises(TypeError, match="^L2BatchNorm2d: eps must be a float, got str"):
        L2BatchNorm2d(4, eps="1e-5")
    with pytest.raises(TypeError, match="^L2BatchNorm3d: l2_eps must be a float, got str"):
        L2BatchNorm3d(
            4, momentum=None, l2_eps="x"
        )  # momentum None is allowed; l2_eps still checked
    with pytest.raises(ValueError, match="l2_eps"):
        L2BatchNorm2d(4, momentum=None, l2_eps=0.0)


def test_input_checks_name_the_class():
    with pytest.raises(ValueError, match=r"^L2BatchNorm2d\(4\) expected 4 channels in dim 1"):
        L2BatchNorm2d(4)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"^expected 4D input \(got 3D input\)"):
        L2BatchNorm2d(4)(torch.randn(2, 4, 5))


@pytest.mark.parametrize("cls", [L2BatchNorm2d, SyncL2BatchNorm])
def test_arguments_are_forwarded(cls):
    m = cls(4, device="meta", dtype=torch.float64)
    assert (
        m.weight.device.type == "meta"
        and m.running_var.device.type == "meta"
        and m.weight.dtype == torch.float64
    )
    nb = cls(4, bias=False)
    assert nb.bias is None and nb.weight is not None and "bias" not in dict(nb.named_parameters())
    assert cls(4).l2_eps == 1e-12 and cls(4, l2_eps=1e-6).l2_eps == 1e-6
    assert cls(4, unit_rms=True).unit_rms is True
    x = torch.randn(6, 4, 3, 3)
    ref = L2BatchNorm2d(4)
    with torch.no_grad():
        ref.bias.zero_()
    torch.testing.assert_close(nb(x), ref(x))


def test_layer_for_dim():
    assert [l2_layer_for_dim(d) for d in (1, 2, 3)] == [L2BatchNorm1d, L2BatchNorm2d, L2BatchNorm3d]
    with pytest.raises(ValueError, match="^no L2BatchNorm4d; expected dim 1, 2 or 3$"):
        l2_layer_for_dim(4)


@pytest.mark.parametrize("training", [True, False])
def test_l2_eps_reaches_the_computation(training):
    """A non-default l2_eps (here above every sample norm, so it decides the scale) is used."""
    x = torch.randn(6, 3, 2, 2) * 0.01
    m = L2BatchNorm2d(3, l2_eps=10.0).train(training)
    ref = l2bn.functional.l2_batch_norm(
        x, m.running_mean.clone(), m.running_var.clone(), m.weight, m.bias, training, l2_eps=10.0
    )
    default = l2bn.functional.l2_batch_norm(
        x, m.running_mean.clone(), m.running_var.clone(), m.weight, m.bias, training
    )
    y = m(x)
    torch.testing.assert_close(y, ref)
    assert not torch.allclose(y, default, atol=1e-3)


def test_track_running_stats_switched_off_after_construction():
    """As nn.BatchNorm: with the flag cleared, training no longer updates the buffers, and
    evaluation normalizes with batch statistics only if the buffers are gone."""
    torch.manual_seed(0)
    ours, bn = L2BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    ours.track_running_stats = bn.track_running_stats = False
    x = torch.randn(8, 3, 4, 4)
    ours(x), bn(x)
    assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(
        ours.running_var, torch.ones(3)
    )
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 0
    ours.eval()
    expect = l2bn.functional.l2_batch_norm(
        x, ours.running_mean, ours.running_var, ours.weight, ours.bias, False
    )
    torch.testing.assert_close(ours(x), expect)


def test_sync_in_a_one_process_group_does_not_communicate(tmp_path, monkeypatch):
    """World size 1: SyncL2BatchNorm is plain L2BN and calls no collective."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:

        def refuse(*a, **k):
            raise AssertionError("a collective was called in a one-process group")

        monkeypatch.setattr(dist, "all_gather", refuse)
        monkeypatch.setattr(dist, "all_reduce", refuse)
        torch.manual_seed(0)
        sync, plain = SyncL2BatchNorm(3), L2BatchNorm2d(3)
        x = torch.randn(6, 3, 4, 4, requires_grad=True)
        y = sync(x)
        y.sum().backward()
        torch.testing.assert_close(y, plain(x))
        torch.testing.assert_close(sync.running_var, plain.running_var)
    finally:
        dist.destroy_process_group()
