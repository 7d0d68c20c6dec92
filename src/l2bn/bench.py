"""Layer and end-to-end benchmarks: L2BN vs ``nn.BatchNorm`` vs the naive composite.

``l2bn bench`` prints, per device, for each shape: fwd+bwd and eval-forward times of BN, the
naive composite (``BN(F.normalize(x))``) and L2BN (eager modules, then all three under
``torch.compile``), their ratios to BN, the bytes each saves for backward (measured with
``torch.autograd.graph.saved_tensors_hooks``), and the geometric-mean ratios on the last line;
then whole-model rows: a ResNet-56 training step (3×32×32) and a ResNet-8 training step and
inference forward (1×28×28, the main job's model), BN vs L2BN.

How it measures. The run is split into ``rounds`` independent rounds; each round visits every
shape and times all variants *interleaved* (BN, naive, L2BN, BN, naive, L2BN, ...), ``reps``
times, keeping each variant's median. A ratio (say L2BN/BN) is computed within a round, so slow
drift of a noisy, shared machine hits numerator and denominator alike, and the table shows the
median of the per-round ratios with their spread, the 25th–75th percentile (IQR), across
rounds: ``1.23 (1.10-1.35)``. On CUDA each timing is bracketed by ``torch.cuda.synchronize``
and read from CUDA events, with enough back-to-back calls per sample (≤ 100) to amortise the
launch cost of small shapes. With ``bandwidth`` (the default on CUDA) the large shapes also get
an achieved-bandwidth table: L2BN's and BN's fwd+bwd as GB/s of BN's minimum traffic
(:data:`TRAFFIC_PASSES` passes over the tensor) against ``y.copy_(x)``. These numbers measure;
they assert nothing.

Why one file: the layer table, the model rows and the bandwidth table share one timing loop,
one summary statistic and one JSON; split, each part would be a few dozen lines importing the
rest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .io import BadInput
from .modules import l2_layer_for_dim

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


class Naive(nn.Module):
    """The authors' composite: ``BN(F.normalize(x.reshape(N, -1)).reshape(x.shape))``."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(F.normalize(x.reshape(x.shape[0], -1)).reshape(x.shape))


def _bn_cls(ndim: int) -> type:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def make_layer(variant: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``variant`` (``"bn"``, ``"naive"`` or ``"l2bn"``) for inputs of ``shape``."""
    c, ndim = shape[1], len(shape)
    if variant == "bn":
        return _bn_cls(ndim)(c, device=device, dtype=dtype)
    if variant == "naive":
        return Naive(_bn_cls(ndim)(c, device=device, dtype=dtype))
    dim = {2: 1, 3: 1, 4: 2, 5: 3}[ndim]
    return l2_layer_for_dim(dim)(c, device=device, dtype=dtype)


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``xs`` by linear interpolation (numpy's default method).

    Example:
        >>> quantile([4.0, 1.0, 3.0, 2.0], 0.5)
        2.5
    """
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: Sequence[float]) -> Dict[str, float]:
    """Median and interquartile range (25th and 75th percentile) of ``xs``.

    Example:
        >>> summarize([1.0, 2.0, 3.0, 4.0, 5.0])
        {'median': 3.0, 'q25': 2.0, 'q75': 4.0}
    """
    return {"median": quantile(xs, 0.5), "q25": quantile(xs, 0.25), "q75": quantile(xs, 0.75)}


def ratio_summary(num: Sequence[float], den: Sequence[float]) -> Dict[str, float]:
    """:func:`summarize` of the per-round ratios ``num[i] / den[i]`` (same round, same index).

    Example:
        >>> ratio_summary([2.0, 3.0, 12.0], [1.0, 2.0, 4.0])
        {'median': 2.0, 'q25': 1.75, 'q75': 2.5}
    """
    if len(num) != len(den):
        raise ValueError(f"ratio_summary: {len(num)} numerators but {len(den)} denominators")
    return summarize([a / b for a, b in zip(num, den)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device, number: int = 1) -> float:
    """Seconds per call of ``fn``, over ``number`` back-to-back calls.

    CUDA: after ``torch.cuda.synchronize``, between two CUDA events (so queued work from before
    does not count and the kernels' own time does); elsewhere: ``time.perf_counter``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / number
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def _pick_number(fn: Callable[[], None], device: torch.device) -> int:
    """Calls per sample: 1 on CPU; on CUDA enough to make a sample last ~1 ms (at most 100)."""
    if device.type != "cuda":
        return 1
    return max(1, min(100, int(1e-3 / max(time_call(fn, device), 1e-6))))


def interleaved_samples(
    fns: Dict[str, Callable[[], None]], device: torch.device, reps: int, number: int = 1, warmup: int = 0,
) -> Dict[str, List[float]]:
    """Seconds per call of each function, ``reps`` samples each, interleaved across functions."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            samples[k].append(time_call(fn, device, number))
    return samples


def median_times(fns: Dict[str, Callable[[], None]], device: torch.device, reps: int, warmup: int = 3) -> Dict[str, float]:
    """Median seconds per call of each function, repetitions interleaved across functions."""
    return {k: quantile(v, 0.5) for k, v in interleaved_samples(fns, device, reps, warmup=warmup).items()}


def saved_bytes(layer: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors the autograd graph saves for backward in one training forward."""
    seen: Dict[Tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


Summary = Dict[str, Dict[str, float]]  # phase ("train", "eval", "bandwidth") -> variant -> value


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


def _setup(name: str, shape: Tuple[int, ...], dev: torch.device, dtype: torch.dtype, compile: bool,
           channels_last: bool, bandwidth: bool) -> _Case:
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
    device: str = "cpu", dtype: torch.dtype = torch.float32, reps: int = 20,
    compile: bool = True, shapes: Optional[List[Shape]] = None,
    progress: Callable[[str], None] = lambda s: None, rounds: int = 5,
    channels_last: bool = False, bandwidth: Optional[bool] = None,
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


def _gmean(xs: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in xs) / len(xs)) if xs else float("nan")


def _cell(row: Row, phase: str, key: str) -> str:
    m, lo, hi = (getattr(row, f"ratio_{s}")[phase][key] for s in ("median", "q25", "q75"))
    return f"{m:.2f} ({lo:.2f}-{hi:.2f})"


def format_table(rows: List[Row], title: str) -> str:
    """A markdown table: times in ms, ratios to BN (compiled ones to compiled BN) as the median
    and 25th-75th percentile over rounds; the last line the geometric mean of the medians."""
    has_c = any("bn+compile" in r.train_ms for r in rows)
    cols = [("train", "naive", "naive/BN"), ("train", "l2bn", "L2BN/BN")]
    if has_c:
        cols += [("train", "naive+compile", "naive_c/BNc"), ("train", "l2bn+compile", "L2BN_c/BNc")]
    cols += [("eval", "naive", "naive/BN eval"), ("eval", "l2bn", "L2BN/BN eval")]
    head = ["shape", "BN fwd+bwd ms"] + [c[2] for c in cols[:2]]
    if has_c:
        head += ["BNc ms"] + [c[2] for c in cols[2:4]]
    head += ["BN eval ms"] + [c[2] for c in cols[-2:]] + ["saved L2BN/BN", "saved naive/BN"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r.name} {'x'.join(map(str, r.shape))}", f"{r.train_ms['bn']:.2f}"] + [_cell(r, *c[:2]) for c in cols[:2]]
        if has_c:
            cells += [f"{r.train_ms['bn+compile']:.2f}"] + [_cell(r, *c[:2]) for c in cols[2:4]]
        cells += [f"{r.eval_ms['bn']:.3f}"] + [_cell(r, *c[:2]) for c in cols[-2:]]
        cells += [f"{r.saved['l2bn'] / r.saved['bn']:.2f}", f"{r.saved['naive'] / r.saved['bn']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")

    def gm(phase: str, key: str) -> str:
        return f"**{_gmean([r.ratio_median[phase][key] for r in rows]):.2f}**"

    foot = ["**geomean of medians**", ""] + [gm(*c[:2]) for c in cols[:2]]
    if has_c:
        foot += [""] + [gm(*c[:2]) for c in cols[2:4]]
    foot += [""] + [gm(*c[:2]) for c in cols[-2:]]
    foot += [f"**{_gmean([r.saved[v] / r.saved['bn'] for r in rows]):.3f}**" for v in ("l2bn", "naive")]
    lines.append("| " + " | ".join(foot) + " |")
    return "\n".join(lines)


def format_bandwidth(rows: List[Row]) -> str:
    """Achieved bandwidth of fwd+bwd (BN's minimum traffic / time) against ``y.copy_(x)``."""
    rows = [r for r in rows if r.gbps]
    if not rows:
        return ""
    lines = [
        "| shape | MB | copy GB/s | BN GB/s | L2BN GB/s | BN/copy | L2BN/copy |", "|" + "---|" * 7,
    ]
    for r in rows:
        lines.append(
            f"| {r.name} {'x'.join(map(str, r.shape))} | {r.nbytes / 1e6:.0f} | {r.gbps['copy']:.0f} | {r.gbps['bn']:.0f} | "
            f"{r.gbps['l2bn']:.0f} | {_cell(r, 'bandwidth', 'bn')} | {_cell(r, 'bandwidth', 'l2bn')} |"
        )
    return "\n".join(lines)


def bench_model(
    model_name: str, in_channels: int, size: int, batch: int, reps: int, rounds: int, device: str = "cpu",
    infer: bool = False, warmup: int = 2, progress: Callable[[str], None] = lambda s: None,
) -> Dict[str, Dict[str, object]]:
    """BN vs L2BN in a whole model: an SGD training step (forward, cross-entropy, backward,
    update) and, with ``infer``, an eval-mode ``no_grad`` forward; interleaved, per-round ratios.

    Returns ``{"train": ..., "eval": ...}``, each with ``bn_s``, ``l2bn_s`` (medians, seconds),
    ``ratio`` (= ``ratio_median``), ``ratio_q25``, ``ratio_q75`` and ``rounds_s``.
    """
    from .models import create_model

    dev = torch.device(device)
    x = torch.randn(batch, in_channels, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    models: Dict[str, nn.Module] = {}
    phases: Dict[str, Dict[str, Callable[[], None]]] = {"train": {}, "eval": {}} if infer else {"train": {}}
    for norm in ("bn", "l2bn"):
        torch.manual_seed(0)
        model = models[norm] = create_model(model_name, 10, in_channels, norm).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def forward(model: nn.Module = model) -> None:
            with torch.no_grad():
                model(x)

        phases["train"][norm] = step
        if infer:
            phases["eval"][norm] = forward
    progress(f"{model_name} (batch {batch}, {in_channels}x{size}x{size})")
    per_round: Dict[str, Dict[str, List[float]]] = {p: {"bn": [], "l2bn": []} for p in phases}
    for r in range(rounds):
        for phase, fns in phases.items():
            for m in models.values():
                m.train(phase == "train")
            for k, v in interleaved_samples(fns, dev, reps, warmup=warmup if r == 0 else 0).items():
                per_round[phase][k].append(quantile(v, 0.5))
    out: Dict[str, Dict[str, object]] = {}
    for phase, t in per_round.items():
        s = ratio_summary(t["l2bn"], t["bn"])
        out[phase] = {"bn_s": quantile(t["bn"], 0.5), "l2bn_s": quantile(t["l2bn"], 0.5), "ratio": s["median"],
                      "ratio_median": s["median"], "ratio_q25": s["q25"], "ratio_q75": s["q75"], "rounds_s": t}
    return out


def format_models(results: List[Tuple[str, int, Dict[str, object]]]) -> str:
    """Rows ``(label, batch, phase result)`` as a markdown table."""
    lines = ["| model | batch | BN ms | L2BN ms | L2BN/BN (25th-75th pct) |", "|---|---|---|---|---|"]
    for label, batch, r in results:
        lines.append(f"| {label} | {batch} | {r['bn_s'] * 1e3:.1f} | {r['l2bn_s'] * 1e3:.1f} | "  # type: ignore[operator]
                     f"**{r['ratio_median']:.3f}** ({r['ratio_q25']:.3f}-{r['ratio_q75']:.3f}) |")
    return "\n".join(lines)


@contextlib.contextmanager
def _backend_env(backend: Optional[str]) -> Iterator[None]:
    """Set ``L2BN_BACKEND`` (how every L2BN layer picks its backend) for the duration."""
    old = os.environ.get("L2BN_BACKEND")
    if backend is not None:
        os.environ["L2BN_BACKEND"] = backend
    try:
        yield
    finally:
        if backend is not None:
            if old is None:
                os.environ.pop("L2BN_BACKEND", None)
            else:
                os.environ["L2BN_BACKEND"] = old


def run(
    device: str = "cpu", threads: Optional[int] = None, reps: int = 20, compile: bool = True,
    resnet: bool = True, json_path: Optional[str] = None, quick: bool = False, rounds: Optional[int] = None,
    dtype: str = "float32", shapes: Optional[List[Shape]] = None, channels_last: bool = False,
    bandwidth: Optional[bool] = None, backend: Optional[str] = None,
) -> str:
    """Run the benchmarks and return the markdown report (also written as JSON if asked).

    ``rounds`` defaults to 5 (3 with ``quick``); ``shapes`` to :data:`GPU_SHAPES` on CUDA and
    :data:`SHAPES` elsewhere (``quick``: its first and last); ``backend`` sets ``L2BN_BACKEND``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"device {device!r} asked for, but torch.cuda.is_available() is False")
        if dev.index is not None:
            torch.cuda.set_device(dev)
    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    rounds = rounds if rounds is not None else (3 if quick else 5)
    shapes = shapes or (GPU_SHAPES if dev.type == "cuda" else SHAPES)
    shapes = shapes[:1] + shapes[-1:] if quick else shapes
    say = lambda s: print(f"  ... {s}", flush=True)  # noqa: E731
    with _backend_env(backend):
        rows = bench_layers(device, DTYPES[dtype], reps=reps, compile=compile, shapes=shapes, progress=say,
                            rounds=rounds, channels_last=channels_last, bandwidth=bandwidth)
        dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        layout = ", channels_last" if channels_last else ""
        l2_backend = backend or os.environ.get("L2BN_BACKEND") or "auto"
        title = f"{dev_name}, {dtype}{layout}, torch {torch.__version__}, L2BN backend {l2_backend}"
        out = [format_table(rows, title), "",
               f"Ratios: median (25th-75th percentile) of {rounds} per-round ratios; each round times all "
               f"variants interleaved, {reps} reps, per-round median. fwd+bwd = one training forward and "
               "backward of the layer; eval = one inference forward."]
        result: Dict[str, object] = {
            "device": dev_name, "torch": torch.__version__, "dtype": dtype, "channels_last": channels_last,
            "backend": l2_backend, "rounds": rounds, "reps": reps, "traffic_passes": TRAFFIC_PASSES,
            "rows": [asdict(r) for r in rows],
        }
        bw = format_bandwidth(rows)
        if bw:
            out += ["", f"#### Achieved bandwidth, fwd+bwd ({TRAFFIC_PASSES} passes over the tensor, BN's minimum "
                    "traffic) vs y.copy_(x) (2 passes)", "", bw, "",
                    "Target: L2BN/copy >= 0.80 (L2BN fwd+bwd at 80% of device-to-device copy bandwidth)."]
        if resnet:
            batch, m_reps, warm = (16, 1, 1) if quick else (128, max(2, reps // 10), 2)
            r56 = bench_model("resnet56", 3, 32, batch, m_reps, rounds, device, warmup=warm, progress=say)
            r8 = bench_model("resnet8", 1, 28, batch, m_reps, rounds, device, infer=True, warmup=warm, progress=say)
            result["resnet56_step"] = r56["train"]
            result["resnet8"] = r8
            out += ["", format_models([("ResNet-56 training step, 3x32x32", batch, r56["train"]),
                                       ("ResNet-8 training step, 1x28x28", batch, r8["train"]),
                                       ("ResNet-8 inference (eval, no_grad), 1x28x28", batch, r8["eval"])]),
                    "", f"Model rows (float32): {rounds} rounds of {m_reps} interleaved step(s) per norm; training step = "
                    "forward, cross-entropy, backward, SGD update."]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return "\n".join(out)
