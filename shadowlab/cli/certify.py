"""The ``certify`` commands: certificates of test images, sharded over torchrun ranks and resumable
(``runs.run_images``), written as a per-image CSV, a summary JSON and Markdown.

``certify_smoothing``: CERTIFY of Cohen et al. (2019) on a smoothed classifier. ``certify_crown_ibp``: verified error
of a certifiably trained network (IBP, CROWN-IBP, CROWN, alpha-CROWN) with its PGD error. Both take the parsed
arguments of ``python -m shadowlab certify ...`` (see ``cli/main.py``) and return the exit status.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from shadowlab import validate
from shadowlab.certify.smoothing import Certificate, Smooth, summarize
from shadowlab.certify.verify import certified, pgd_wrong
from shadowlab.cli.args import command_line, data_kwargs, load_defended
from shadowlab.data import load_cifar10, resolve_source
from shadowlab.experiments import runs
from shadowlab.tables import markdown_table


def _outputs(args: argparse.Namespace) -> tuple[str, Path]:
    """(the model's name, the output folder, created): --out-dir, else outputs/certify/<model>."""
    p = Path(args.model)
    name = p.stem if p.suffix in (".safetensors", ".json") else p.name
    out_dir = Path(args.out_dir) if args.out_dir else Path("outputs") / "certify" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    return name, out_dir


def _write(out_dir: Path, names: tuple[str, str, str], header: list[str], lines: list[list[Any]],
           summary: dict[str, Any], text: list[str]) -> None:
    """The command's three outputs in out_dir: the per-image CSV (``header``, ``lines``), the summary JSON and the
    Markdown (``text``, then the command that made it), which is also printed."""
    csv_path, json_path, md_path = (out_dir / n for n in names)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(lines)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    md = "\n".join([*text, "", "```", summary["command"], "```", ""])
    md_path.write_text(md)
    print(md)
    print(f"wrote {csv_path}, {json_path}, {md_path}")


def certify_smoothing(args: argparse.Namespace) -> int:
    """CERTIFY of Cohen et al. on test images: per-image CSV, summary JSON and Markdown."""
    for name in ("n_images", "skip", "chunk", "n", "n0", "batch_size"):
        if getattr(args, name) is not None:
            validate.count(getattr(args, name), f"--{name.replace('_', '-')}")
    validate.alpha(args.alpha, "--alpha")   # before any work, not inside the first call
    if args.sigma is not None:
        validate.sigma(args.sigma, "--sigma")
    ctx = runs.init_distributed()  # torchrun: every rank certifies a share of the images, rank 0 writes the files
    device = runs.rank_device(ctx, args.device)
    model, meta, sigma = load_defended(args, "sigma", device)
    source = resolve_source("test", data_kwargs(args)["source"], jpeg=args.jpeg)
    if source != "torchvision" and math.gcd(args.skip, 10) != 1:
        raise ValueError(f"--skip={args.skip} on the {source!r} test order, which interleaves the 10 classes, would "
                         "certify only some classes; use --skip 1 (the first N images hold N/10 per class) or a "
                         "skip coprime with 10 (Cohen et al.'s every-20th image needs the official order)")
    n_load = None if args.n_images is None else (args.n_images - 1) * args.skip + 1
    x, y, classes = load_cifar10("test", n=n_load, **data_kwargs(args))
    idx = torch.arange(0, len(x), args.skip)
    x, y = x[idx], y[idx]
    smooth = Smooth(model, len(classes), sigma, device=device)
    model_name, out_dir = _outputs(args)
    position = {int(i): p for p, i in enumerate(idx.tolist())}
    start = time.perf_counter()

    def certify_images(ids: list[int]) -> list[dict]:
        t0 = time.perf_counter()
        # the same seed for every call: noise is shared across images, so a certificate depends neither on --chunk
        # nor on the rank that computes it (on the CPU; see smoothing.py)
        certs = smooth.certify(x[[position[i] for i in ids]], n0=args.n0, n=args.n, alpha=args.alpha,
                               batch_size=args.batch_size, seed=args.seed)
        per_image = (time.perf_counter() - t0) / len(certs)
        return [{**c.to_dict(), "label": int(y[position[i]]), "seconds": per_image} for i, c in zip(ids, certs)]

    # everything a certificate depends on; --resume refuses a records file written with other values
    settings = {"command": "certify smoothing", "model_sha256": meta["sha256"], "sigma": sigma, "n0": args.n0,
                "n": args.n, "alpha": args.alpha, "seed": args.seed, "skip": args.skip, "n_images": len(x),
                "data_source": source, "device_type": device.type,
                **({"batch_size": args.batch_size} if device.type != "cpu" else {})}
    rows = runs.run_images(idx.tolist(), certify_images, out_dir / "records.jsonl", settings, resume=args.resume,
                           chunk=args.chunk, ctx=ctx, desc=f"certify {model_name}", overwrite=args.overwrite)
    runs.finish_distributed(ctx)
    if not ctx.is_main:
        return 0
    records = [Certificate(r["prediction"], r["radius"], r["pA_lower"], r["counts"]) for r in rows]
    seconds = [r["seconds"] for r in rows]
    summary = {"model": args.model, "sigma": sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha,
               "batch_size": args.batch_size, "seed": args.seed, "skip": args.skip,
               "data_source": source,
               "device": str(device), "world_size": ctx.world_size, **summarize(records, y),
               "seconds_per_image": sum(seconds) / len(seconds), "seconds_total": time.perf_counter() - start,
               "command": command_line(args)}
    acc = summary["certified_accuracy"]
    cols = [(f"cert. acc. r={r}", f"acc_{r}", "pct") for r in acc] + [
        ("mean radius (correct)", "mean_radius_correct", "3"), ("abstain", "abstain_rate", "pct"),
        ("s/image", "seconds_per_image", "2")]
    table = markdown_table(cols, [{**summary, **{f"acc_{r}": a for r, a in acc.items()}}])
    _write(out_dir, ("certify.csv", "summary.json", "summary.md"),
           ["idx", "label", "predict", "radius", "pA_lower", "correct", "seconds"],
           [[r["idx"], r["label"], r["prediction"], f"{r['radius']:.6f}", f"{r['pA_lower']:.6f}",
             int(r["prediction"] == r["label"]), f"{r['seconds']:.3f}"] for r in rows], summary,
           [f"# Randomized smoothing certificates: {model_name}", "",
            f"CERTIFY (Cohen et al. 2019): sigma = {sigma:g}, n0 = {args.n0}, n = {args.n}, alpha = {args.alpha:g}, "
            f"{summary['n_images']} test images (every {args.skip}th), seed {args.seed}, device {device}.", "", table])
    return 0


def certify_crown_ibp(args: argparse.Namespace) -> int:
    """Verified error of a CROWN-IBP model at its eps (Zhang et al. 2020): per-image CSV, summary JSON, Markdown."""
    for name in ("n_images", "batch_size", "chunk"):
        validate.count(getattr(args, name), f"--{name.replace('_', '-')}")
    validate.count(args.pgd_steps, "--pgd-steps", minimum=0)
    ctx = runs.init_distributed()  # torchrun: every rank verifies a share of the images, rank 0 writes the files
    device = runs.rank_device(ctx, args.device)
    model, meta, eps = load_defended(args, "eps", device)
    source = resolve_source(args.split, data_kwargs(args)["source"], jpeg=args.jpeg)
    x, y, _ = load_cifar10(args.split, n=args.n_images, **data_kwargs(args))
    methods = list(dict.fromkeys(args.methods))
    backends = {m: "auto_lirpa" if m == "alpha-crown" else args.backend for m in methods}  # alpha-CROWN: auto_LiRPA
    model_name, out_dir = _outputs(args)
    start = time.perf_counter()

    def verify_images(ids: list[int]) -> list[dict]:
        xb, yb = x[ids].to(device), y[ids].to(device)
        with torch.no_grad():
            pred = model(xb).argmax(1)
        correct = (pred == yb).cpu()
        recs = [{"label": int(yb[k]), "prediction": int(pred[k])} for k in range(len(ids))]
        for m in methods:
            t0 = time.perf_counter()
            ok = certified(model, xb, yb, eps, m, args.batch_size, device, backend=backends[m]).cpu() & correct
            share = (time.perf_counter() - t0) / len(ids)
            for rec, v in zip(recs, ok.tolist()):
                rec[f"verified_{m}"], rec[f"seconds_{m}"] = v, share
        if args.pgd_steps:   # seeded by the chunk's first image: the same chunks whatever the ranks (runs.py)
            wrong = pgd_wrong(model, xb, yb, eps, steps=args.pgd_steps, seed=ids[0], batch_size=args.batch_size,
                              device=device)
            for rec, v in zip(recs, wrong.tolist()):
                rec["pgd_wrong"] = v
        return recs

    # everything a verdict depends on; --resume refuses a records file written with other values
    settings = {"command": "certify crown-ibp", "model_sha256": meta["sha256"], "eps": eps, "split": args.split,
                "methods": methods, "backends": backends, "pgd_steps": args.pgd_steps, "n_images": len(x),
                "data_source": source, "device_type": device.type, "chunk": args.chunk,
                "batch_size": args.batch_size}
    try:
        rows = runs.run_images(range(len(x)), verify_images, out_dir / "records.jsonl", settings,
                               resume=args.resume, chunk=args.chunk, ctx=ctx, desc=f"verify {model_name}",
                               overwrite=args.overwrite)
    except ImportError as err:  # lirpa.LirpaUnavailableError: names `make lirpa`
        print(f"error: --methods {', '.join(methods)} / --backend {args.backend}: {err}", file=sys.stderr)
        return 2
    finally:
        runs.finish_distributed(ctx)
    if not ctx.is_main:
        return 0

    def share(pred) -> float:
        return sum(map(pred, rows)) / len(rows)

    errors = {f"{m.replace('-', '_')}_verified_error": share(lambda r, m=m: not r[f"verified_{m}"]) for m in methods}
    summary = {"model": args.model, "arch": meta.get("arch"), "eps": eps, "eps_255": eps * 255,
               "split": args.split, "n_images": len(x), "data_source": source, "device": str(device),
               "world_size": ctx.world_size, "clean_error": share(lambda r: r["prediction"] != r["label"]), **errors,
               "verified_error": share(lambda r: not any(r[f"verified_{m}"] for m in methods)),
               "seconds_per_method": {m: round(sum(r[f"seconds_{m}"] for r in rows), 2) for m in methods}}
    if args.pgd_steps:
        summary["pgd_error"] = share(lambda r: r["pgd_wrong"])
    summary["seconds_total"] = time.perf_counter() - start
    summary["command"] = command_line(args)
    cols = ["clean_error", *(["pgd_error"] if args.pgd_steps else []), *errors, "verified_error"]
    _write(out_dir, ("verify.csv", "verify_summary.json", "verify.md"),
           ["idx", "label", "predict", "correct", *(f"verified_{m}" for m in methods)],
           [[r["idx"], r["label"], r["prediction"], int(r["prediction"] == r["label"]),
             *(int(r[f"verified_{m}"]) for m in methods)] for r in rows], summary,
           [f"# Verified error of {model_name} at eps = {eps * 255:.3g}/255", "",
            f"{len(x)} {args.split} images ({source}), bounds: {', '.join(methods)}; verified error counts an image "
            "as verified when it is classified correctly and some method certifies every margin (lower bound >= 0).",
            "", markdown_table([(c.replace("_", " "), c, "pct") for c in cols], [summary])])
    return 0
