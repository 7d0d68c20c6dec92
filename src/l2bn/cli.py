"""``l2bn`` command line: thin argument parsing over the library.

l2bn train   --dataset fashion-mnist --model resnet20 --norm l2bn --epochs 10 --out runs/x
l2bn compare                      # the main job: BN vs L2BN on Fashion-MNIST, 3 seeds each
l2bn analyze RUN_DIR...           # norm spread, compactness, discrepancy -> analysis.json
l2bn report  RUN_DIR... -o DIR    # report.html + report.md
l2bn bench   [--device cpu] [--threads 2] [--json out.json]
l2bn eps-trap [--per-layer]       # eps's share of each norm layer's denominator (DCASE networks)

Why one file: the command line is one parser with one handler per command; each handler is a
few lines over the library, and keeping them beside the flags they read is what makes the CLI
readable top to bottom (the rules live in the library: plan_compare, TrainConfig's metadata).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional


def _add_config_flags(
    p: argparse.ArgumentParser,
    skip: tuple = (),
    defaults: Optional[Dict[str, Any]] = None,
    defaults_note: str = "",
) -> None:
    """One flag per :class:`l2bn.train.TrainConfig` field, its help from the field's metadata
    (what it does, the values it takes, the default that applies); unset flags stay unset
    (SUPPRESS). ``defaults`` replace the fields' defaults in the help (a preset's values)."""
    from .train.config import FIELDS, expected, field_type

    for name, f in FIELDS.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        base, _ = field_type(name)
        if defaults is not None and name in defaults:
            default = f"{defaults[name]}{defaults_note}"
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        what = expected(name)
        accepts = "" if base in (bool, str) and not what.startswith("one of") else f"; {what}"
        helptext = f"{f.metadata['help']}{accepts} (default: {default})".replace("%", "%%")
        if base is bool:
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=helptext,
            )
        elif base is list:
            p.add_argument(flag, type=float, nargs="+", default=argparse.SUPPRESS, help=helptext)
        else:
            p.add_argument(flag, type=base, default=argparse.SUPPRESS, help=helptext)


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The recipe fields given as flags (unset flags are absent: argparse.SUPPRESS)."""
    from .train.config import FIELDS

    return {k: v for k, v in vars(args).items() if k in FIELDS}


def _errors() -> tuple:
    """Exceptions that mean bad input (one clear line, exit 2), not a bug: the errors l2bn
    raises on purpose (:class:`l2bn.io.UsageError`) and a missing optional package. Every other
    exception — a shape error inside torch, out of memory, a bug of ours — keeps its traceback."""
    from .io import UsageError

    return (UsageError, ModuleNotFoundError)


#: OS errors that describe the machine or a path the user gave, not a bug: one line naming the file
_ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EEXIST,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
        errno.ENOENT,
    }
)


def _environment_error(e: OSError) -> bool:
    return e.errno in _ENVIRONMENT_ERRNOS


def _fail(cmd: str, e: BaseException) -> int:
    from .train import TrainingDiverged

    if isinstance(e, ModuleNotFoundError):  # a missing optional package, or a broken install
        if (e.name or "").split(".")[0] in ("l2bn", ""):
            raise e  # our own module missing: a broken install, keep the traceback
        print(
            f"l2bn {cmd}: error: this needs the optional package {e.name!r} "
            f"(pip install 'l2bn[dev]' installs every extra)",
            file=sys.stderr,
        )
        return 2
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        e = f"{e.filename}: {e.strerror}" if e.filename else e.strerror  # type: ignore[assignment]
    print(f"l2bn {cmd}: error: {e}", file=sys.stderr)
    return 3 if isinstance(e, TrainingDiverged) else 2


def _guarded(cmd: str, work) -> int:
    """Run ``work()``; bad input and environment errors become one line and exit 2 (3 when
    training diverged), anything else keeps its traceback."""
    try:
        return work()
    except _errors() as e:
        return _fail(cmd, e)
    except OSError as e:
        if not _environment_error(e):
            raise
        return _fail(cmd, e)


def _interrupted(cmd: str, out: str, again: str) -> int:
    """Ctrl-C: one line saying where the work stopped and the command that continues it."""
    done = 0
    try:
        with open(Path(out) / "metrics.jsonl") as f:
            done = sum(1 for line in f if line.strip())
    except OSError:
        pass
    print(
        f"l2bn {cmd}: interrupted ({done} epoch(s) of {out} saved); continue with: {again}",
        file=sys.stderr,
    )
    return 130


def _train(args: argparse.Namespace) -> int:
    from .train import train
    from .train.config import make_config

    if args.list_configs:
        from .recipes import list_recipes

        print("\n".join(list_recipes()))
        return 0
    cfg = None
    try:
        cfg = make_config(_overrides(args), args.config)
        train(cfg)
    except _errors() as e:
        return _fail("train", e)
    except OSError as e:
        if not _environment_error(e):
            raise
        return _fail("train", e)
    except KeyboardInterrupt:
        if cfg is None:
            return 130
        return _interrupted("train", cfg.out, f"l2bn train --out {cfg.out} --resume")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .experiment import compare, plan_compare

    try:
        plan = plan_compare(
            args.preset,
            args.config,
            _overrides(args),
            args.grid or [],
            models=args.models,
            norms=args.norms,
            seeds=args.seeds,
            dataset=args.dataset,
            out=args.out,
        )
        out = plan["out"]
        compare(
            out,
            plan["models"],
            plan["norms"],
            plan["seeds"],
            plan["dataset"],
            plan["train_kw"],
            grid=plan["grid"],
            data_dir=args.data_dir,
            note=plan["note"],
            analyze=plan["analyze"] if args.analyze is None else args.analyze,
        )
    except _errors() as e:
        return _fail("compare", e)
    except OSError as e:
        if not _environment_error(e):
            raise
        return _fail("compare", e)
    except KeyboardInterrupt:
        print(
            "l2bn compare: interrupted; finished runs are kept and a started run resumes from its "
            "last "
            "epoch: run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    print(Path(out, "report.md").read_text())
    print(f"report: {out}/report.html (and report.md)   summary: {out}/summary.json")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analysis.analyze import analyze_run

    def work() -> int:
        for d in args.runs:
            a = analyze_run(
                d, data_dir=args.data_dir, max_examples=args.max_examples, knn=not args.no_knn
            )
            cv = sum(s["cv"] for s in a["norm_spread"].values()) / len(a["norm_spread"])
            print(
                f"{d}: compactness {a['compactness']:.4f}  discrepancy "
                f"{a['discrepancy_mean_deg']:.2f} deg "
                f"(min {a['discrepancy_min_deg']:.2f})  fisher {a['fisher_ratio']:.3f}  "
                f"knn {a.get('knn_accuracy', float('nan')):.2f}%  mean norm CV {cv:.3f}  -> "
                f"{d}/analysis.json"
            )
        return 0

    return _guarded("analyze", work)


def _report(args: argparse.Namespace) -> int:
    from .report.build import build_report

    def work() -> int:
        paths = build_report(args.runs, args.output, title=args.title, note=args.note)
        print(f"wrote {paths['html']}, {paths['md']} and {paths['summary']}")
        return 0

    return _guarded("report", work)


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    def work() -> int:
        report = bench.run(
            device=args.device,
            threads=args.threads,
            reps=args.reps,
            compile=not args.no_compile,
            resnet=not args.no_resnet,
            json_path=args.json,
            quick=args.quick,
            rounds=args.rounds,
            dtype=args.dtype,
            shapes={"cpu": bench.SHAPES, "gpu": bench.GPU_SHAPES}.get(args.shapes),
            channels_last=args.channels_last,
            bandwidth=args.bandwidth,
            backend=args.backend,
        )
        print(report)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(report + "\n")
        return 0

    return _guarded("bench", work)


def _eps_trap(args: argparse.Namespace) -> int:
    from .analysis.eps_trap import eps_trap_report

    def work() -> int:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(eps_trap_report(args.models, args.norms, args.batch, args.frames, args.per_layer))
        return 0

    return _guarded("eps-trap", work)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="l2bn", description="L2 batch normalization: benchmarks, training and analysis"
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model (also under torchrun)")
    t.add_argument(
        "--config",
        default=None,
        help="YAML recipe: a file or a shipped recipe's name (--list-configs); flags override it",
    )
    t.add_argument("--list-configs", action="store_true", help="list the shipped recipes and exit")
    _add_config_flags(t)
    t.set_defaults(func=_train)

    from .experiment import COMPARE_SKIP, PRESETS

    c = sub.add_parser(
        "compare",
        help="BN vs L2BN over models x norms x seeds x any config axis, with a report (the main "
        "job)",
    )
    c.add_argument(
        "--preset",
        default="quick",
        choices=list(PRESETS),
        help="recipe and grid (default: quick, the main job)",
    )
    c.add_argument(
        "--grid",
        action="append",
        metavar="KEY=V1,V2,...",
        help="a config key as a grid axis (repeatable), e.g. --grid batch_size=16,32,64,128",
    )
    c.add_argument("--models", nargs="+", default=None, help="model names (default: the preset's)")
    c.add_argument("--norms", nargs="+", default=None, help="norm names (default: the preset's)")
    c.add_argument(
        "--seeds", nargs="+", type=int, default=None, help="seeds (default: the preset's)"
    )
    c.add_argument("--dataset", default=None)
    c.add_argument("--data-dir", default=None)
    c.add_argument(
        "--out",
        default=None,
        help="comparison directory (default: runs/compare-DATASET for quick, runs/PRESET-DATASET)",
    )
    c.add_argument(
        "--config",
        default=None,
        help="YAML recipe applied to every run: a file or a shipped recipe's name (l2bn train "
        "--list-configs)",
    )
    c.add_argument(
        "--analyze",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="probe every run (norm spread, compactness, discrepancy) and add it to the report "
        "(default: on, except with --preset lr)",
    )
    _add_config_flags(
        c,
        skip=COMPARE_SKIP,
        defaults=PRESETS["quick"]["train"],
        defaults_note=" with --preset quick; other presets set their own",
    )
    c.set_defaults(func=_compare)

    a = sub.add_parser(
        "analyze", help="probe trained runs: norm spread per layer, compactness, discrepancy"
    )
    a.add_argument("runs", nargs="+", help="run directories (with last.pt)")
    a.add_argument("--data-dir", default=None)
    a.add_argument("--max-examples", type=int, default=10000, help="test examples to probe")
    a.add_argument("--no-knn", action="store_true", help="skip the k-NN accuracy")
    a.set_defaults(func=_analyze)

    r = sub.add_parser(
        "report", help="HTML + markdown report of runs (accuracy with CIs, curves, analysis)"
    )
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument("-o", "--output", required=True, help="output directory")
    r.add_argument("--title", default="")
    r.add_argument(
        "--note",
        default="",
        help="a paragraph printed under the title (e.g. how the runs were made)",
    )
    r.set_defaults(func=_report)

    b = sub.add_parser("bench", help="benchmark L2BN against BatchNorm and the naive composite")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument(
        "--reps", type=int, default=20, help="timed repetitions per variant in each round"
    )
    b.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="independent rounds; ratios are the median and 25th-75th percentile of per-round "
        "ratios (default: 5, --quick 3)",
    )
    b.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="activation dtype",
    )
    b.add_argument(
        "--shapes",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="shape set (default: gpu on CUDA, else cpu)",
    )
    b.add_argument(
        "--channels-last", action="store_true", help="4-D inputs in channels_last (NHWC) layout"
    )
    b.add_argument(
        "--bandwidth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="achieved GB/s of large shapes vs y.copy_(x) (default: on for CUDA)",
    )
    b.add_argument(
        "--backend",
        default=None,
        help="L2BN backend for the layers (sets L2BN_BACKEND; default: auto)",
    )
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    b.add_argument(
        "--no-resnet", action="store_true", help="skip the ResNet-56 and ResNet-8 model rows"
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="two shapes, 3 rounds and small ResNet batches (smoke run)",
    )
    b.add_argument("--json", default=None, help="also write the measurements as JSON")
    b.add_argument("--markdown", default=None, help="also write the table as markdown")
    b.set_defaults(func=_bench)

    e = sub.add_parser(
        "eps-trap", help="how much of each norm layer's denominator is eps (the DCASE networks)"
    )
    e.add_argument(
        "--models",
        nargs="+",
        default=["dcase-resnet", "dcase-fcnn", "dcase-fsfcnn"],
        help="models to measure (default: the three DCASE networks)",
    )
    e.add_argument(
        "--norms",
        nargs="+",
        default=["bn", "l2bn", "l2bn-rms"],
        help="norms (default: bn l2bn l2bn-rms)",
    )
    e.add_argument(
        "--batch", type=int, default=8, help="synthetic scenes in the batch (default: 8)"
    )
    e.add_argument("--frames", type=int, default=400, help="frames per scene (default: 400)")
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    e.add_argument("--per-layer", action="store_true", help="also print every layer")
    e.set_defaults(func=_eps_trap)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .kernels.native import quiet_cpp_extension

    quiet_cpp_extension()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
