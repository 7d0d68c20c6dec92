"""Layer and end-to-end benchmarks: L2BN vs ``nn.BatchNorm`` vs the naive composite.

``l2bn bench`` prints, per device, for each shape: fwd+bwd and eval-forward times of BN, the
naive composite (``BN(F.normalize(x))``) and L2BN (eager modules, then all three under
``torch.compile``), their ratios to BN, the bytes each saves for backward (measured with
``torch.autograd.graph.saved_tensors_hooks``), and the geometric-mean ratios on the last line.
Timings are medians over interleaved repetitions in one process; they measure, they assert
nothing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import l2_layer_for_dim

# name, shape (N, C, *S)
SHAPES: List[Tuple[str, Tuple[int, ...]]] = [
    ("resnet-cifar s1", (128, 16, 32, 32)),
    ("resnet-cifar s2", (128, 32, 16, 16)),
    ("resnet-cifar s3", (128, 64, 8, 8)),
    ("resnet50 c2", (32, 64, 56, 56)),
    ("resnet50 c3", (32, 256, 28, 28)),
    ("resnet50 c4", (32, 1024, 7, 7)),
    ("audio 1-D", (32, 128, 431)),
    ("mlp", (256, 1024)),
]
VARIANTS = ("bn", "naive", "l2bn")


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
    c, ndim = shape[1], len(shape)
    if variant == "bn":
        return _bn_cls(ndim)(c, device=device, dtype=dtype)
    if variant == "naive":
        return Naive(_bn_cls(ndim)(c, device=device, dtype=dtype))
    dim = {2: 1, 3: 1, 4: 2, 5: 3}[ndim]
    return l2_layer_for_dim(dim)(c, device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(fns: Dict[str, Callable[[], None]], device: torch.device, reps: int, warmup: int = 3) -> Dict[str, float]:
    """Median seconds per call of each function, repetitions interleaved across functions."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


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


@dataclass
class Row:
    name: str
    shape: Tuple[int, ...]
    train_ms: Dict[str, float] = field(default_factory=dict)
    eval_ms: Dict[str, float] = field(default_factory=dict)
    saved: Dict[str, int] = field(default_factory=dict)


def bench_layers(
    device: str = "cpu", dtype: torch.dtype = torch.float32, reps: int = 20,
    compile: bool = True, shapes: Optional[List[Tuple[str, Tuple[int, ...]]]] = None,
    progress: Callable[[str], None] = lambda s: None,
) -> List[Row]:
    dev = torch.device(device)
    rows = []
    for name, shape in shapes or SHAPES:
        progress(f"{name} {shape}")
        row = Row(name, tuple(shape))
        x = torch.randn(shape, device=dev, dtype=dtype)
        g = torch.randn_like(x)
        xg = x.clone().requires_grad_()
        layers = {v: make_layer(v, shape, dev, dtype) for v in VARIANTS}
        for v, layer in layers.items():
            layer.train()
            row.saved[v] = saved_bytes(layer, xg)
        variants: Dict[str, nn.Module] = dict(layers)
        if compile:
            for v in VARIANTS:
                variants[f"{v}+compile"] = torch.compile(make_layer(v, shape, dev, dtype))

        def train_fn(m: nn.Module, xg: Tensor = xg, g: Tensor = g) -> Callable[[], None]:
            def f() -> None:
                xg.grad = None
                m(xg).backward(g)
            return f

        def eval_fn(m: nn.Module, x: Tensor = x) -> Callable[[], None]:
            def f() -> None:
                with torch.no_grad():
                    m(x)
            return f

        for m in variants.values():
            m.train()
        row.train_ms = {k: 1e3 * t for k, t in median_times({k: train_fn(m) for k, m in variants.items()}, dev, reps).items()}
        for m in variants.values():
            m.eval()
        row.eval_ms = {k: 1e3 * t for k, t in median_times({k: eval_fn(m) for k, m in variants.items()}, dev, reps).items()}
        rows.append(row)
    return rows


def _gmean(xs: List[float]) -> float:
    return math.exp(sum(math.log(v) for v in xs) / len(xs)) if xs else float("nan")


def format_table(rows: List[Row], title: str) -> str:
    """A markdown table: times in ms, ratios to BN (compiled ones to compiled BN)."""
    has_c = any("bn+compile" in r.train_ms for r in rows)
    head = ["shape", "BN fwd+bwd ms", "naive/BN", "L2BN/BN"]
    if has_c:
        head += ["BNc ms", "naive_c/BNc", "L2BN_c/BNc"]
    head += ["BN eval ms", "naive/BN eval", "L2BN/BN eval", "saved L2BN/BN", "saved naive/BN"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios: Dict[str, List[float]] = {}

    def add(key: str, v: float) -> str:
        ratios.setdefault(key, []).append(v)
        return f"{v:.2f}"

    for r in rows:
        t, e, s = r.train_ms, r.eval_ms, r.saved
        cells = [f"{r.name} {'x'.join(map(str, r.shape))}", f"{t['bn']:.2f}", add("n", t["naive"] / t["bn"]), add("l", t["l2bn"] / t["bn"])]
        if has_c:
            cells += [f"{t['bn+compile']:.2f}", add("nc", t["naive+compile"] / t["bn+compile"]), add("lc", t["l2bn+compile"] / t["bn+compile"])]
        cells += [f"{e['bn']:.3f}", add("ne", e["naive"] / e["bn"]), add("le", e["l2bn"] / e["bn"]),
                  add("sl", s["l2bn"] / s["bn"]), add("sn", s["naive"] / s["bn"])]
        lines.append("| " + " | ".join(cells) + " |")
    gm = ["**geomean**", "", f"**{_gmean(ratios['n']):.2f}**", f"**{_gmean(ratios['l']):.2f}**"]
    if has_c:
        gm += ["", f"**{_gmean(ratios['nc']):.2f}**", f"**{_gmean(ratios['lc']):.2f}**"]
    gm += ["", f"**{_gmean(ratios['ne']):.2f}**", f"**{_gmean(ratios['le']):.2f}**",
           f"**{_gmean(ratios['sl']):.3f}**", f"**{_gmean(ratios['sn']):.2f}**"]
    lines.append("| " + " | ".join(gm) + " |")
    return "\n".join(lines)


def bench_resnet_step(
    model_name: str = "resnet56", batch: int = 128, reps: int = 10, device: str = "cpu",
    progress: Callable[[str], None] = lambda s: None,
) -> Dict[str, float]:
    """Median seconds of one SGD training step (fwd+bwd+update) with BN and with L2BN."""
    from .models import create_model

    dev = torch.device(device)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    fns = {}
    for norm in ("bn", "l2bn"):
        torch.manual_seed(0)
        model = create_model(model_name, 10, 3, norm).to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        fns[norm] = step
    progress(f"{model_name} training step, batch {batch}")
    times = median_times(fns, dev, reps, warmup=2)
    return {"bn_s": times["bn"], "l2bn_s": times["l2bn"], "ratio": times["l2bn"] / times["bn"]}


def run(
    device: str = "cpu", threads: Optional[int] = None, reps: int = 20, compile: bool = True,
    resnet: bool = True, json_path: Optional[str] = None, quick: bool = False,
) -> str:
    """Run the benchmarks and return the markdown report (also written as JSON if asked)."""
    if threads:
        torch.set_num_threads(threads)
    shapes = SHAPES[:1] + SHAPES[-1:] if quick else SHAPES
    say = lambda s: print(f"  ... {s}", flush=True)  # noqa: E731
    rows = bench_layers(device, reps=reps, compile=compile, shapes=shapes, progress=say)
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    title = f"{dev_name}, float32, torch {torch.__version__}"
    out = [format_table(rows, title)]
    result: Dict[str, object] = {"device": dev_name, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}
    if resnet:
        step = bench_resnet_step(batch=32 if quick else 128, reps=3 if quick else 10, device=device, progress=say)
        result["resnet56_step"] = step
        out.append(
            f"\nResNet-56 training step (batch {32 if quick else 128}, 32x32): BN {step['bn_s'] * 1e3:.1f} ms, "
            f"L2BN {step['l2bn_s'] * 1e3:.1f} ms, ratio **{step['ratio']:.3f}**"
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return "\n".join(out)
