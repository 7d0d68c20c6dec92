import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def composite(bn: torch.nn.Module, x: torch.Tensor, unit_rms: bool = False) -> torch.Tensor:
    """The paper's composite: BN(F.normalize(x.flatten(1)).view_as(x))."""
    u = torch.nn.functional.normalize(x.flatten(1), dim=1).view_as(x)
    if unit_rms:
        u = u * (x[0].numel() ** 0.5)
    return bn(u)


# Under CI (CI=true) nothing the README promises may be missing: a skipped test is a failure
# that says what is missing, so the final line of a green CI run always shows 0 skipped.
_STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _fail_skip(rep) -> None:
    if _STRICT and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped under CI=true, which must not happen (a dependency is missing?): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level ``pytest.importorskip`` skips at collection: the same rule applies."""
    outcome = yield
    _fail_skip(outcome.get_result())
