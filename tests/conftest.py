import os

import pytest
import torch

# Under pytest-xdist (the README's test command runs ``-n auto``) each worker gets its share of
# the cores for torch's intra-op threads, so that the workers do not oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def composite(bn: torch.nn.Module, x: torch.Tensor, unit_rms: bool = False) -> torch.Tensor:
    """The paper's composite: BN(F.normalize(x.flatten(1)).view_as(x))."""
    u = torch.nn.functional.normalize(x.flatten(1), dim=1).view_as(x)
    if unit_rms:
        u = u * (x[0].numel() ** 0.5)
    return bn_step(bn, u)


def bn_step(bn: torch.nn.Module, u: torch.Tensor) -> torch.Tensor:
    """``bn(u)`` with L2BN's running-statistics rule, written out: the update factor of tracked
    batch k is m / (1 - (1 - m)^k) (BN's moving average without its prior's weight)."""
    m = bn.momentum
    if not (bn.training and bn.track_running_stats and m is not None and 0 < m < 1):
        return bn(u)
    k = int(bn.num_batches_tracked) + 1
    bn.momentum = m / (1 - (1 - m) ** k)
    try:
        return bn(u)
    finally:
        bn.momentum = m


# Under CI (CI=true) nothing the README promises may be missing: a skipped test is a failure
# that says what is missing, so the final line of a green CI run always shows 0 skipped.
_STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _fail_skip(rep) -> None:
    if _STRICT and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (
            f"skipped under CI=true, which must not happen (a dependency is missing?): {reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level ``pytest.importorskip`` skips at collection: the same rule applies."""
    outcome = yield
    _fail_skip(outcome.get_result())
