"""What the commands share: argument types, the data options, provenance and loading a defended checkpoint."""

from __future__ import annotations

import argparse
import os
import shlex
from fractions import Fraction

import torch

from shadowlab import checkpoints
from shadowlab.data import DATA_DIR

RESULTS_DIR = DATA_DIR / "results"


def parse_eps(text: str) -> float:
    """Accept '2/255', '0.0078' or '8/255'."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps={text!r} is not a number or fraction like 2/255") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"eps={text!r} must be >= 0")
    return value


def command_line(args: argparse.Namespace) -> str:
    """The command that produced a result, for provenance: under torchrun (WORLD_SIZE > 1 in the environment) its
    launcher and ranks per node, and OMP_NUM_THREADS when set, since both decide the timings."""
    tail = " ".join(shlex.quote(a) for a in args.argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return "python -m shadowlab " + tail
    threads = os.environ.get("OMP_NUM_THREADS")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = "--standalone" if per_node == world else f"--nnodes {world // per_node}"
    return ((f"OMP_NUM_THREADS={shlex.quote(threads)} " if threads else "")
            + f"torchrun {nodes} --nproc_per_node {per_node} -m shadowlab -- " + tail)


def load_defended(args: argparse.Namespace, parameter: str, device: torch.device) -> tuple:
    """(model, metadata, value): the checkpoint --model and its defense parameter, --<parameter> overriding."""
    model, meta = checkpoints.load(args.model, device=device)
    value = getattr(args, parameter)
    if value is None:
        value = (meta.get("defense_parameter") or {}).get(parameter)
        if value is None:
            raise ValueError(f"checkpoint {args.model!r} has no defense_parameter.{parameter}; pass --{parameter}")
    return model, meta, float(value)


def default_name(arch: str, defense: str, sigma: float, eps: float) -> str:
    """The checkpoint name `train` gives a model unless --name is set."""
    if defense == "gaussian":
        return f"smooth-sigma{sigma:.2f}"
    if defense == "crown-ibp":
        return f"crownibp-{arch}-eps{round(eps * 255)}"
    return f"{arch}-undefended"


def data_kwargs(args: argparse.Namespace) -> dict:
    """load_cifar10 keyword arguments from the shared data options."""
    source = "torchvision" if args.download and args.source == "auto" else args.source
    return {"source": source, "jpeg": args.jpeg, "download": args.download}


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--source, --jpeg, --download and --device: where the CIFAR-10 images come from and what runs on them."""
    p.add_argument("--source", default="auto", choices=["auto", "torchvision", "jpeg", "subset"],
                   help="CIFAR-10 source (auto: official, then JPEG copy, then committed subset)")
    p.add_argument("--jpeg", default=None, help="JPEG archive or folder (else $SHADOWLAB_CIFAR10_JPEG)")
    p.add_argument("--download", action="store_true", help="download official CIFAR-10 into data/cifar10 first")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_resume_args(p: argparse.ArgumentParser, *, records: str = "OUT/records*.jsonl",
                    finished: str = "OUT holds finished records (they are replaced)") -> None:
    """--resume and --overwrite: what a run does with the records an earlier run left in its output folder.

    ``records`` names where --resume reads them, ``finished`` when --overwrite is needed and what it replaces
    (the defaults are the certify commands'). main.check_common refuses the two together."""
    p.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run from {records} (same settings) instead of starting over")
    p.add_argument("--overwrite", action="store_true",
                   help=f"start over even when {finished}; without it such a run refuses")


def parse_run(text: str) -> tuple[float | None, int | None, str]:
    """'MARGIN,KEEP[,NOISE]' for `bench --run`, e.g. 'none,1', 'none,1,fixed' or '1.0,none'."""
    parts = [p.strip().lower() for p in text.split(",")]
    if len(parts) == 2:
        parts.append("fresh")
    if len(parts) != 3 or parts[2] not in ("fresh", "fixed"):
        raise argparse.ArgumentTypeError(f"--run {text!r}: expected MARGIN,KEEP[,NOISE] with NOISE fresh or fixed, "
                                         "e.g. none,1 or none,1,fixed or 1.0,none")
    m, k, noise = parts
    try:
        return (None if m == "none" else float(m)), (None if k == "none" else int(k)), noise
    except ValueError:
        raise argparse.ArgumentTypeError(f"--run {text!r}: MARGIN must be a number or none, KEEP an integer or "
                                         "none") from None

