"""Command line: ``python -m shadowlab {train,evaluate,data,...}``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from fractions import Fraction
from pathlib import Path

import torch

from . import checkpoints
from .data import DATA_DIR, DataError, build_subset, load_cifar10, resolve_source
from .models import default_device

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
    """The command that produced a result, for provenance."""
    return "python -m shadowlab " + " ".join(shlex.quote(a) for a in args.argv)


def default_name(arch: str, defense: str, sigma: float, eps: float) -> str:
    if defense == "gaussian":
        return f"smooth-sigma{sigma:.2f}"
    if defense == "crown-ibp":
        return f"crownibp-{arch}-eps{round(eps * 255)}"
    return f"{arch}-undefended"


def cmd_train(args: argparse.Namespace) -> int:
    from .models import build
    from .train import TrainConfig, accuracy, train

    arch_kwargs = json.loads(args.arch_kwargs) if args.arch_kwargs else {}
    cfg = TrainConfig(arch=args.arch, arch_kwargs=arch_kwargs, defense=args.defense, sigma=args.sigma,
                      eps=args.eps, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                      lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, init=args.init,
                      max_steps=args.max_steps, kappa_end=args.kappa_end,
                      train_eps_factor=args.train_eps_factor)
    device = torch.device(args.device) if args.device else default_device()
    x_train, y_train, _ = load_cifar10("train", n=args.n_train, source=args.source, jpeg=args.jpeg)
    x_test, y_test, _ = load_cifar10("test", n=args.n_test, source=args.source, jpeg=args.jpeg)
    torch.manual_seed(args.seed)
    model = build(args.arch, **arch_kwargs)
    if args.init:
        init_model, _ = checkpoints.load(args.init)
        model.load_state_dict(init_model.state_dict())
    summary = train(model, x_train, y_train, cfg, device=device)
    metrics: dict[str, float] = {"clean_accuracy": accuracy(model, x_test, y_test, device=device)}
    if cfg.defense == "gaussian":
        metrics["noisy_accuracy"] = accuracy(model, x_test, y_test, sigma=cfg.sigma, seed=args.seed, device=device)
    if cfg.defense == "crown-ibp":
        from .bounds import error_table
        metrics.update(error_table(model, x_test[:args.n_verify], y_test[:args.n_verify], cfg.eps, device=device))
    name = args.name or default_name(args.arch, cfg.defense, cfg.sigma, cfg.eps)
    out = Path(args.out_dir) / name if args.out_dir else name
    path = checkpoints.save(
        model, out, arch=args.arch, arch_kwargs=arch_kwargs, defense=cfg.defense,
        defense_parameter={"sigma": cfg.sigma} if cfg.defense == "gaussian" else
        ({"eps": cfg.eps} if cfg.defense == "crown-ibp" else {}),
        recipe=summary["config"], seed=args.seed, steps=summary["steps"], train_seconds=summary["seconds"],
        epoch_losses=[round(v, 4) for v in summary["epoch_losses"]],
        data_source={"train": resolve_source("train", args.source, jpeg=args.jpeg), "n_train": len(x_train),
                     "test": resolve_source("test", args.source, jpeg=args.jpeg), "n_test": len(x_test)},
        metrics={k: round(v, 4) for k, v in metrics.items()},
        command=command_line(args),
    )
    print(json.dumps({"checkpoint": str(path), **metrics}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import zoo_table

    rows = zoo_table(n=args.n_images, source=args.source, jpeg=args.jpeg, device=args.device,
                     out=Path(args.out) if args.out else RESULTS_DIR / "zoo.json")
    return 0 if rows else 1


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "build-subset":
        meta = build_subset(args.source_path)
        print(json.dumps(meta, indent=2))
    return 0


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="auto", choices=["auto", "torchvision", "jpeg", "subset"],
                   help="CIFAR-10 source (auto: official, then JPEG copy, then committed subset)")
    p.add_argument("--jpeg", default=None, help="JPEG archive or folder (else $SHADOWLAB_CIFAR10_JPEG)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shadowlab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a model and write a checkpoint with its metrics")
    t.add_argument("--arch", default="cnn")
    t.add_argument("--arch-kwargs", default=None, help='JSON, e.g. \'{"width": 2}\'')
    t.add_argument("--defense", default="none", choices=["none", "gaussian", "crown-ibp"])
    t.add_argument("--sigma", type=float, default=0.0)
    t.add_argument("--eps", type=parse_eps, default=0.0, help="L-inf radius for crown-ibp, e.g. 2/255")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    t.add_argument("--lr", type=float, default=0.2)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--kappa-end", type=float, default=0.0, help="final natural-loss weight (crown-ibp)")
    t.add_argument("--train-eps-factor", type=float, default=1.0, help="train at eps times this (crown-ibp)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", default=None, help="checkpoint to initialise from")
    t.add_argument("--name", default=None, help="checkpoint name (default from arch/defense)")
    t.add_argument("--out-dir", default=None, help="folder for the checkpoint (default data/models)")
    t.add_argument("--n-train", type=int, default=None)
    t.add_argument("--n-test", type=int, default=None)
    t.add_argument("--n-verify", type=int, default=1000, help="test images for verified error (crown-ibp)")
    t.add_argument("--max-steps", type=int, default=None)
    add_data_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="model-zoo table: clean and noisy accuracy of every committed model")
    e.add_argument("--n-images", type=int, default=None, help="test images (default: all available)")
    e.add_argument("--out", default=None)
    add_data_args(e)
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    b = dsub.add_parser("build-subset", help="rebuild data/cifar10_test_subset.npz from the JPEG copy")
    b.add_argument("--from", dest="source_path", required=True)
    d.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (DataError, checkpoints.CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
