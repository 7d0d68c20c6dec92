"""Layer and end-to-end benchmarks: L2BN vs ``nn.BatchNorm`` vs the naive composite.

``l2bn bench`` prints, per device, for each shape: fwd+bwd and eval-forward times of BN, the
naive composite (``BN(F.normalize(x))``) and L2BN (eager modules, then all three under
``torch.compile``), their ratios to BN, the bytes each saves for backward (measured with
``torch.autograd.graph.saved_tensors_hooks``), and the geometric-mean ratios on the last line;
then whole-model rows: a ResNet-56 training step (3×32×32) and a ResNet-8 training step and
inference forward (1×28×28, the main job's model), BN vs L2BN; and on the CPU the main job's own
loop (:mod:`~l2bn.bench.loop`: ``l2bn train``'s training and evaluation functions on
Fashion-MNIST, where it is installed).

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

The package: :mod:`~l2bn.bench.timing` (timers and summary statistics),
:mod:`~l2bn.bench.layers` (the layer benchmark), :mod:`~l2bn.bench.models` (the model rows),
:mod:`~l2bn.bench.tables` (markdown) and :func:`run` here, which ``l2bn bench`` calls.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from typing import Dict, Iterator, List, Optional

import torch

from ..io import BadInput, UsageError
from .layers import (
    BANDWIDTH_MIN_BYTES,
    DTYPES,
    GPU_SHAPES,
    SHAPES,
    TRAFFIC_PASSES,
    VARIANTS,
    Naive,
    Row,
    Shape,
    bench_layers,
    make_layer,
)
from .loop import bench_main_job
from .models import bench_model
from .tables import format_bandwidth, format_models, format_table
from .timing import interleaved_samples, quantile, ratio_summary, saved_bytes, summarize, time_call

__all__ = [
    "run",
    "bench_layers",
    "bench_model",
    "bench_main_job",
    "format_table",
    "format_bandwidth",
    "format_models",
    "make_layer",
    "Naive",
    "Row",
    "Shape",
    "SHAPES",
    "GPU_SHAPES",
    "VARIANTS",
    "DTYPES",
    "TRAFFIC_PASSES",
    "BANDWIDTH_MIN_BYTES",
    "interleaved_samples",
    "quantile",
    "ratio_summary",
    "saved_bytes",
    "summarize",
    "time_call",
]


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
    device: str = "cpu",
    threads: Optional[int] = None,
    reps: int = 20,
    compile: bool = True,
    resnet: bool = True,
    json_path: Optional[str] = None,
    quick: bool = False,
    rounds: Optional[int] = None,
    dtype: str = "float32",
    shapes: Optional[List[Shape]] = None,
    channels_last: bool = False,
    bandwidth: Optional[bool] = None,
    backend: Optional[str] = None,
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
        rows = bench_layers(
            device,
            DTYPES[dtype],
            reps=reps,
            compile=compile,
            shapes=shapes,
            progress=say,
            rounds=rounds,
            channels_last=channels_last,
            bandwidth=bandwidth,
        )
        dev_name = (
            torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads"
        )
        layout = ", channels_last" if channels_last else ""
        l2_backend = backend or os.environ.get("L2BN_BACKEND") or "auto"
        title = f"{dev_name}, {dtype}{layout}, torch {torch.__version__}, L2BN backend {l2_backend}"
        out = [
            format_table(rows, title),
            "",
            f"Ratios: median (25th-75th percentile) of {rounds} per-round ratios; each round "
            f"times all "
            f"variants interleaved, {reps} reps, per-round median. fwd+bwd = one training forward "
            f"and "
            "backward of the layer; eval = one inference forward.",
        ]
        result: Dict[str, object] = {
            "device": dev_name,
            "torch": torch.__version__,
            "dtype": dtype,
            "channels_last": channels_last,
            "backend": l2_backend,
            "rounds": rounds,
            "reps": reps,
            "traffic_passes": TRAFFIC_PASSES,
            "rows": [asdict(r) for r in rows],
        }
        bw = format_bandwidth(rows)
        if bw:
            out += [
                "",
                f"#### Achieved bandwidth, fwd+bwd ({TRAFFIC_PASSES} passes over the tensor, BN's "
                f"minimum "
                "traffic) vs y.copy_(x) (2 passes)",
                "",
                bw,
                "",
                "Target: L2BN/copy >= 0.80 (L2BN fwd+bwd at 80% of device-to-device copy "
                "bandwidth).",
            ]
        if resnet:
            batch, m_reps, warm = (16, 1, 1) if quick else (128, max(2, reps // 10), 2)
            r56 = bench_model(
                "resnet56", 3, 32, batch, m_reps, rounds, device, warmup=warm, progress=say
            )
            r8 = bench_model(
                "resnet8",
                1,
                28,
                batch,
                m_reps,
                rounds,
                device,
                infer=True,
                warmup=warm,
                progress=say,
            )
            result["resnet56_step"] = r56["train"]
            result["resnet8"] = r8
            model_rows = [
                ("ResNet-56 training step, 3x32x32", batch, r56["train"]),
                ("ResNet-8 training step, 1x28x28", batch, r8["train"]),
                ("ResNet-8 inference (eval, no_grad), 1x28x28", batch, r8["eval"]),
            ]
            notes = [
                f"Model rows (float32): {rounds} rounds of {m_reps} interleaved step(s) per norm; "
                "training step = forward, cross-entropy, backward, SGD update."
            ]
            if dev.type == "cpu":
                steps, evals, loop_rounds = (2, 1, 1) if quick else (20, 10, max(rounds, 10))
                try:
                    job = bench_main_job(loop_rounds, steps, evals, progress=say)
                except (UsageError, OSError) as e:  # Fashion-MNIST not installed
                    notes.append(f"Main job rows not measured: {e}")
                else:
                    result["main_job"] = job
                    model_rows += [
                        (f"main job: l2bn train loop, {steps} steps", 128, job["train"]),
                        (f"main job: evaluation pass, {evals * 256} images", 256, job["eval"]),
                    ]
                    notes.append(
                        f"Main job rows: `l2bn train`'s own train_one_epoch (loader, "
                        f"augmentation, loss, backward, SGD and schedule step) and evaluate, "
                        f"Fashion-MNIST, ResNet-8, the main job's recipe; {loop_rounds} rounds, "
                        "BN and L2BN back to back in alternating order (time ratios)."
                    )
            out += ["", format_models(model_rows), "", *notes]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return "\n".join(out)
