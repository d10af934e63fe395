"""The drivers of ``python -m shadowlab`` commands, one ``cmd_*`` per command (the parser is ``cli.main``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from shadowlab import checkpoints, importers, validate
from shadowlab.bench.settings import BenchSettings
from shadowlab.certify.verify import error_table
from shadowlab.cli.args import RESULTS_DIR, command_line, data_kwargs, default_name, load_defended
from shadowlab.data import build_subset, load_cifar10, resolve_source
from shadowlab.defenses.train import TrainConfig, accuracy, train
from shadowlab.experiments import runs
from shadowlab.experiments.settings import Table1Settings, Table2Settings
from shadowlab.models import build, default_device


def cmd_train(args: argparse.Namespace) -> int:
    try:
        arch_kwargs = json.loads(args.arch_kwargs) if args.arch_kwargs else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--arch-kwargs={args.arch_kwargs!r} is not valid JSON ({err})") from None
    if not isinstance(arch_kwargs, dict):
        raise ValueError(f"--arch-kwargs={args.arch_kwargs!r} must be a JSON object, e.g. '{{\"width\": 2}}'")
    # the name and the destination first: a clash is refused before hours of training, not after
    name = validate.checkpoint_name(args.name or default_name(args.arch, args.defense, args.sigma, args.eps),
                                    "--name")
    out = Path(args.out_dir) / name if args.out_dir else name
    checkpoints.refuse_existing(out, args.force)
    cfg = TrainConfig(arch=args.arch, arch_kwargs=arch_kwargs, defense=args.defense, sigma=args.sigma,
                      eps=args.eps, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                      lr=args.lr, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay, seed=args.seed,
                      init=args.init, init_scheme=args.init_scheme, max_steps=args.max_steps, kappa_end=args.kappa_end,
                      beta_start=args.beta_start, beta_end=args.beta_end,
                      train_eps_factor=args.train_eps_factor, warmup_reg=args.warmup_reg, warmup_frac=args.warmup_frac,
                      ramp_frac=args.ramp_frac, beta_frac=args.beta_frac, augment=not args.no_augment)
    device = torch.device(args.device) if args.device else default_device()
    x_train, y_train, _ = load_cifar10("train", n=args.n_train, **data_kwargs(args))
    x_test, y_test, _ = load_cifar10("test", n=args.n_test, **data_kwargs(args))
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
        metrics.update(error_table(model, x_test[:args.n_verify], y_test[:args.n_verify], cfg.eps, device=device))
    path = checkpoints.save(
        model, out, arch=args.arch, arch_kwargs=arch_kwargs, defense=cfg.defense,
        defense_parameter={"sigma": cfg.sigma} if cfg.defense == "gaussian" else
        ({"eps": cfg.eps} if cfg.defense in ("pgd", "crown-ibp") else {}),
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
    # start-up cost (scipy, statsmodels): only this command needs them
    from shadowlab.defenses.evaluate import zoo_table

    rows = zoo_table(n=args.n_images, **data_kwargs(args), device=args.device, certify_images=args.certify_images,
                     certify_n=args.certify_n, verify_images=args.verify_images,
                     out=Path(args.out) if args.out else RESULTS_DIR / "zoo.json")
    return 0 if rows else 1


def reproduce_settings(args: argparse.Namespace) -> tuple[Table1Settings, Table2Settings]:
    """The two tables' settings from ``reproduce``'s options: the CPU-size defaults, or with --paper the authors',
    and on top of them every option the user gave (an option left unset is None here; --paper keeps what was set)."""
    channels = None if args.channels is None else ((1, 3) if args.channels == "both" else (int(args.channels),))
    given = {"n_images": args.n_images, "n": args.n, "n0": args.n0, "alpha": args.alpha, "steps": args.steps,
             "noise_samples": args.noise_samples, "early_stop_margin": args.early_stop_margin,
             "keep_targets": args.keep_targets, "sigmas": None if args.sigmas is None else tuple(args.sigmas),
             "channels": channels, "early_stop_scope": args.early_stop_scope, "model_template": args.model_template,
             "min_ssim": args.min_ssim, "seed": args.seed, "source": args.source, "precision": args.precision,
             "faithful": True if args.faithful else None, "faithful_batch": args.faithful_batch,
             "recipe": args.recipe,
             "controls": False if args.no_controls else None,
             "models": None if args.models is None else tuple(args.models)}
    given = {k: v for k, v in given.items() if v is not None}
    if args.no_early_stop:
        given["early_stop_margin"] = None
    if given.get("keep_targets") == 0:
        given["keep_targets"] = None
    if args.pruned and not args.paper:
        raise ValueError("--pruned is table1's search at the paper's settings: give it with --paper")
    out = []
    for cls in (Table1Settings, Table2Settings):
        names = {f.name for f in dataclasses.fields(cls)}
        base = (Table1Settings.paper_pruned() if args.pruned and cls is Table1Settings else
                cls.paper() if args.paper else cls())
        out.append(base.replace(**{k: v for k, v in given.items() if k in names}))
    return out[0], out[1]


def cmd_reproduce(args: argparse.Namespace) -> int:
    # start-up cost (torchvision, scipy): only this command needs them
    from shadowlab.experiments import reproduce

    if args.chunk is not None:
        validate.count(args.chunk, "--chunk")
    t1, t2 = reproduce_settings(args)
    ctx = runs.init_distributed()  # torchrun: the ranks share every table's images, rank 0 writes the files
    out = Path(args.out_dir)
    run = {"chunk": args.chunk, "resume": args.resume, "ctx": ctx, "device": args.device, "progress": ctx.is_main,
           "overwrite": args.overwrite}
    tables = []
    if args.table in ("table1", "all"):
        tables.append(("Table 1 (randomized smoothing)", reproduce.table1(t1, out_dir=out / "table1", **run)))
    if args.table in ("table2", "all"):
        tables.append(("Table 2 (CROWN-IBP)", reproduce.table2(t2, out_dir=out / "table2", **run)))
    runs.finish_distributed(ctx)
    for title, res in tables if ctx.is_main else ():
        res.settings["command"] = command_line(args)
        res.settings["world_size"] = ctx.world_size
        (out / res.name / f"{res.name}.json").write_text(json.dumps(res.to_dict(), indent=2) + "\n")
        print(f"\n{title}\n\n" + res.markdown + f"\n\nwritten: {out / res.name}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    """Measured per-image cost of a table at the paper's settings and the paper-scale wall time on K devices."""
    # start-up cost (torchvision, scipy): only this command needs them
    from shadowlab.experiments import cost

    # under torchrun every rank times the same points side by side (cost module docstring)
    ctx = runs.init_distributed()
    device = runs.rank_device(ctx, args.device)
    parameter = "sigma" if args.table == "table1" else "eps"
    if args.arch:   # the architecture with random weights: the cost does not depend on them (no early stop)
        model = build(args.arch, **json.loads(args.arch_kwargs)).to(device).eval()
        value = getattr(args, parameter)
        if value is None:
            raise ValueError(f"--arch {args.arch} needs --{parameter}")
    else:
        if args.model is None:
            crown = sorted(m for m in checkpoints.available() if m.startswith("crownibp-"))
            args.model = "smooth-sigma0.25" if args.table == "table1" else (crown or ["crownibp-"])[0]
        model, _, value = load_defended(args, parameter, device)
    if args.chunk is None:   # the chunk the table would run with on this device
        # start-up cost (torchvision, scipy): only this command needs them
        from shadowlab.experiments.reproduce import work_chunk

        args.chunk = work_chunk(args.table, device, [model], (3, 32, 32),
                                noise_samples=Table1Settings.paper().noise_samples, channels=2)
    validate.count(args.chunk, "--chunk")
    x, y, _ = load_cifar10("test", n=args.chunk, **data_kwargs(args))
    settings = (Table1Settings.paper_pruned() if args.pruned else Table1Settings.paper())
    if args.keep_targets is not None:
        settings = settings.replace(keep_targets=args.keep_targets or None)
    # ranks on one CPU share its cores; ranks on GPUs each have their own device
    shared = ctx.world_size if device.type == "cpu" else 1
    res = cost.report(args.table, model, value, x.to(device), y.to(device), args.n_images, args.groups or 4,
                      tuple(args.devices), check=args.check, repeat=args.repeat, settings=settings,
                      agree=lambda t: runs.mean_over_ranks(ctx, t), ranks=shared)
    runs.finish_distributed(ctx)
    if not ctx.is_main:
        return 0
    res.update(model=args.arch or args.model, command=command_line(args))
    print(res["markdown"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({k: v for k, v in res.items() if k != "markdown"}, indent=2) + "\n")
        print(f"\nwritten: {args.out}")
    return 0


def cmd_rejudge(args: argparse.Namespace) -> int:
    # start-up cost (torchvision, scipy): only this command needs them
    from shadowlab.experiments.rejudge import rejudge, ssim_figure

    report = rejudge(args.table_dir, n=args.n, seed=args.seed, device=args.device)
    print(json.dumps({k: v for k, v in report.items() if k != "per_group"}, indent=2))
    for group, v in report["per_group"].items():
        print(f"{group}: success {100 * v['committed_success']:.1f}% committed, {100 * v['rejudged_success']:.1f}% "
              f"re-judged; spoof {100 * v['committed_spoof']:.1f}% / {100 * v['rejudged_spoof']:.1f}%")
    if args.figure:
        ssim_figure(args.table_dir, device=args.device)
        print(f"figure written: {args.table_dir}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # start-up cost (scipy): only this command needs it
    from shadowlab.bench.run import readme_block, run_bench, update_readme

    settings = BenchSettings(model=args.model, n_images=args.n_images, steps=args.steps, lr=args.lr,
                             noise_samples=args.noise_samples, n0=args.n0, n_select=args.n_select, n=args.n,
                             alpha=args.alpha, certify_images=args.certify_images, certify_n=args.certify_n,
                             bound_images=args.bound_images, seed=args.seed, art=not args.skip_art,
                             runs=tuple(args.run or BenchSettings.runs), prune_step=args.prune_step,
                             early_stop_scope=args.early_stop_scope, min_ssim=args.min_ssim,
                             precision=args.precision)
    if args.readme:   # a README without the block fails now (ValueError, reported by main), not after the run
        readme_block(args.readme)
    try:
        res = run_bench(settings, device=args.device, out_dir=args.out or None, command=command_line(args),
                        **data_kwargs(args))
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(res["markdown"] + (f"\n\nwritten: {Path(args.out) / 'bench.json'}" if args.out else ""))
    if args.readme:
        update_readme(args.readme, res["markdown"])
        print(f"tables written into {args.readme}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "build-subset":
        meta = build_subset(args.source_path)
        print(json.dumps(meta, indent=2))
    return 0


def cmd_certify_smoothing(args: argparse.Namespace) -> int:
    # start-up cost (scipy, statsmodels): only the certify commands need them
    from shadowlab.cli.certify import certify_smoothing
    return certify_smoothing(args)


def cmd_certify_crown_ibp(args: argparse.Namespace) -> int:
    # start-up cost (scipy, statsmodels): only the certify commands need them
    from shadowlab.cli.certify import certify_crown_ibp
    return certify_crown_ibp(args)


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    """Convert an authors' checkpoint (importers.py) and print where it went and how to use it."""
    if args.import_cmd == "cohen":
        path = importers.import_cohen(args.path, args.sigma, args.name, args.out_dir, command=command_line(args),
                                      force=args.force)
    else:
        try:
            arch_kwargs = json.loads(args.arch_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"--arch-kwargs={args.arch_kwargs!r} is not valid JSON ({err})") from None
        path = importers.import_crown_ibp(args.path, args.arch, arch_kwargs, args.eps, args.name, args.out_dir,
                                          command=command_line(args), force=args.force)
    meta = checkpoints.read_metadata(path)
    print(json.dumps({"checkpoint": str(path), "arch": meta["arch"], "arch_kwargs": meta["arch_kwargs"],
                      "defense_parameter": meta["defense_parameter"], "source": meta["source"]}, indent=2))
    return 0

