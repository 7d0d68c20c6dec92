"""The layer benchmark: BN, the naive composite and L2BN on each shape, fwd+bwd and eval, timed
interleaved in rounds (eager, then under ``torch.compile``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import BadInput
from ..modules import l2_layer_for_dim
from .timing import _pick_number, interleaved_samples, quantile, ratio_summary, saved_bytes

Shape = Tuple[str, Tuple[int, ...]]


# name, shape (N, C, *S): the CPU set (also the default for any non-CUDA device)
SHAPES: List[Shape] = [
    ("resnet-cifar s1", (128, 16, 32, 32)),
    ("resnet-cifar s2", (128, 32, 16, 16)),
    ("resnet-cifar s3", (128, 64, 8, 8)),
    ("resnet50 c2", (32, 64, 56, 56)),
    ("resnet50 c3", (32, 256, 28, 28)),
    ("resnet50 c4", (32, 1024, 7, 7)),
    ("audio 1-D", (32, 128, 431)),
    ("tiny", (4, 8, 2, 2)),  # per-call overhead: the kernel is negligible
    ("batch-1", (1, 64, 56, 56)),  # single-image inference: one sample over all threads
    ("mlp", (256, 1024)),
]


# the CUDA set: small launch-bound maps, then ImageNet batches of 100-200 MB (float32), well
# above an H100/H200's 50-60 MB L2, for the bandwidth table
GPU_SHAPES: List[Shape] = [
    ("resnet-cifar s1", (128, 16, 32, 32)),
    ("resnet-cifar s3", (128, 64, 8, 8)),
    ("resnet50 c2", (256, 64, 56, 56)),
    ("resnet50 c3", (256, 256, 28, 28)),
    ("resnet50 c4", (256, 1024, 14, 14)),
    ("resnet50 c5", (256, 2048, 7, 7)),
    ("audio 1-D", (256, 128, 431)),
    ("mlp", (4096, 4096)),
]


VARIANTS = ("bn", "naive", "l2bn")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: BN's minimum memory traffic for fwd+bwd, in passes over the tensor: the forward reads x for
#: the statistics, then reads x and writes y; the backward reads g and x for its sums, then
#: reads g and x and writes dx (a tensor larger than the cache cannot be kept between passes)
TRAFFIC_PASSES = 8


#: tensors at least this large get a row in the bandwidth table
BANDWIDTH_MIN_BYTES = 64 * 2**20


Summary = Dict[str, Dict[str, float]]  # phase ("train", "eval", "bandwidth") -> variant -> value


class Naive(nn.Module):
    """The authors' composite: ``BN(F.normalize(x.reshape(N, -1)).reshape(x.shape))``."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(F.normalize(x.reshape(x.shape[0], -1)).reshape(x.shape))


def _bn_cls(ndim: int) -> type:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def make_layer(
    variant: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """``variant`` (``"bn"``, ``"naive"`` or ``"l2bn"``) for inputs of ``shape``."""
    c, ndim = shape[1], len(shape)
    if variant == "bn":
        return _bn_cls(ndim)(c, device=device, dtype=dtype)
    if variant == "naive":
        return Naive(_bn_cls(ndim)(c, device=device, dtype=dtype))
    dim = {2: 1, 3: 1, 4: 2, 5: 3}[ndim]
    return l2_layer_for_dim(dim)(c, device=device, dtype=dtype)


@dataclass
class Row:
    """One shape's results. Times are medians over rounds of each round's median (ms); the
    ``ratio_*`` fields summarise the per-round ratios to BN (compiled variants: to compiled BN)
    for ``"train"`` (fwd+bwd) and ``"eval"``, and, with bandwidth, each variant's achieved
    bandwidth over the copy's (``"bandwidth"``)."""

    name: str
    shape: Tuple[int, ...]
    train_ms: Dict[str, float] = field(default_factory=dict)
    eval_ms: Dict[str, float] = field(default_factory=dict)
    saved: Dict[str, int] = field(default_factory=dict)
    ratio_median: Summary = field(default_factory=dict)
    ratio_q25: Summary = field(default_factory=dict)
    ratio_q75: Summary = field(default_factory=dict)
    nbytes: int = 0
    gbps: Dict[str, float] = field(default_factory=dict)
    rounds_ms: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)


@dataclass
class _Case:
    """A shape set up once and timed in every round."""

    row: Row
    modules: List[nn.Module]
    train: Dict[str, Callable[[], None]]
    eval: Dict[str, Callable[[], None]]
    number: Dict[str, int] = field(default_factory=dict)


def _setup(
    name: str,
    shape: Tuple[int, ...],
    dev: torch.device,
    dtype: torch.dtype,
    compile: bool,
    channels_last: bool,
    bandwidth: bool,
) -> _Case:
    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    x = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    row = Row(name, tuple(shape), nbytes=x.numel() * x.element_size())
    variants: Dict[str, nn.Module] = {v: make_layer(v, shape, dev, dtype) for v in VARIANTS}
    for v, layer in variants.items():
        row.saved[v] = saved_bytes(layer.train(), xg)
    if compile:
        for v in VARIANTS:
            variants[f"{v}+compile"] = torch.compile(make_layer(v, shape, dev, dtype))

    def train_fn(m: nn.Module) -> Callable[[], None]:
        def f() -> None:
            xg.grad = None
            m(xg).backward(g)

        return f

    def eval_fn(m: nn.Module) -> Callable[[], None]:
        def f() -> None:
            with torch.no_grad():
                m(x)

        return f

    train = {k: train_fn(m) for k, m in variants.items()}
    if bandwidth and row.nbytes >= BANDWIDTH_MIN_BYTES:
        y = torch.empty_like(x)

        def copy() -> None:
            y.copy_(x)

        train["copy"] = copy
    return _Case(row, list(variants.values()), train, {k: eval_fn(m) for k, m in variants.items()})


def _time_round(case: _Case, dev: torch.device, reps: int, first: bool) -> None:
    """Time one round of ``case``: fwd+bwd of all variants interleaved, then eval likewise."""
    for phase, fns in (("train", case.train), ("eval", case.eval)):
        for m in case.modules:
            m.train(phase == "train")
        if phase not in case.number:  # first round: compile/autotune, then pick calls per sample
            interleaved_samples(fns, dev, 0, warmup=3)
            case.number[phase] = _pick_number(fns["bn"], dev)
        samples = interleaved_samples(fns, dev, reps, case.number[phase], warmup=0 if first else 1)
        per_round = case.row.rounds_ms.setdefault(phase, {})
        for k, v in samples.items():
            per_round.setdefault(k, []).append(1e3 * quantile(v, 0.5))


def _finish(case: _Case) -> Row:
    row = case.row
    copy_ms = row.rounds_ms["train"].pop("copy", None)
    if copy_ms is not None:
        row.rounds_ms["copy"] = {"copy": copy_ms}
    for phase in ("train", "eval"):
        per_round = row.rounds_ms[phase]
        setattr(row, f"{phase}_ms", {k: quantile(v, 0.5) for k, v in per_round.items()})
        for k, v in per_round.items():
            if k in ("bn", "bn+compile"):
                continue
            s = ratio_summary(v, per_round["bn+compile" if k.endswith("+compile") else "bn"])
            for stat in ("median", "q25", "q75"):
                getattr(row, f"ratio_{stat}").setdefault(phase, {})[k] = s[stat]
    if copy_ms is not None:
        traffic = TRAFFIC_PASSES * row.nbytes
        row.gbps = {k: traffic / (t * 1e6) for k, t in row.train_ms.items()}
        row.gbps["copy"] = 2 * row.nbytes / (quantile(copy_ms, 0.5) * 1e6)
        for k, v in row.rounds_ms["train"].items():
            # (traffic / t_k) / (2 nbytes / t_copy), per round
            s = ratio_summary([TRAFFIC_PASSES / 2 * c for c in copy_ms], v)
            for stat in ("median", "q25", "q75"):
                getattr(row, f"ratio_{stat}").setdefault("bandwidth", {})[k] = s[stat]
    return row


def bench_layers(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    reps: int = 20,
    compile: bool = True,
    shapes: Optional[List[Shape]] = None,
    progress: Callable[[str], None] = lambda s: None,
    rounds: int = 5,
    channels_last: bool = False,
    bandwidth: Optional[bool] = None,
) -> List[Row]:
    """Time every shape in ``rounds`` rounds of ``reps`` interleaved repetitions (module doc).

    ``bandwidth`` (default: on for CUDA) adds ``y.copy_(x)`` to the fwd+bwd set of shapes of at
    least :data:`BANDWIDTH_MIN_BYTES`; ``channels_last`` lays 4-D inputs out as NHWC.
    """
    if rounds < 1 or reps < 1:
        raise BadInput(f"rounds and reps must be at least 1, got rounds={rounds}, reps={reps}")
    dev = torch.device(device)
    bandwidth = dev.type == "cuda" if bandwidth is None else bandwidth
    cases = []
    for name, shape in shapes or SHAPES:
        progress(f"set up {name} {shape}")
        cases.append(_setup(name, tuple(shape), dev, dtype, compile, channels_last, bandwidth))
    for r in range(rounds):
        progress(f"round {r + 1}/{rounds}")
        for case in cases:
            _time_round(case, dev, reps, first=r == 0)
    return [_finish(c) for c in cases]
