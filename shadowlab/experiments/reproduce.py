"""The paper's Tables 1 and 2 at CPU size: natural certificates against spoofed ones (Ghiasi et al. 2020)."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from shadowlab import checkpoints, validate
from shadowlab.data import load_cifar10, resolve_source
from shadowlab.experiments.controls import CONTROLS
from shadowlab.experiments.report import (
    TableResult,
    examples_from_records,
    table1_markdown,
    table2_markdown,
    write_outputs,
)
from shadowlab.experiments.runs import DistContext, auto_chunk, rank_device, refuse_overwrite, run_images
from shadowlab.experiments.settings import MODEL_TEMPLATE, Table1Settings, Table2Settings
from shadowlab.experiments.table_images import table1_rows, table1_work, table2_rows, table2_work
from shadowlab.shadow.config import ShadowConfig

RADIUS_RATIO_CLAIM = 0.7  # spoofed mean radius >= 0.7 x natural mean radius for every sigma


SIGMA_RTOL = 1e-3   # a checkpoint's recorded sigma and the table's agree within this relative tolerance


def check_table_model(table: str, name: str, sigma: float | None = None) -> dict[str, Any]:
    """The sidecar of ``name``, refused (ValueError naming both values) when it is not the kind of model the table
    needs: Table 1 a Gaussian-noise-trained checkpoint (defense "gaussian") whose recorded sigma equals the table's
    ``sigma``; Table 2 a CROWN-IBP-trained one (defense "crown-ibp") with a recorded eps. Reads the sidecar only."""
    meta = checkpoints.read_metadata(name)
    defense = meta.get("defense")
    param = meta.get("defense_parameter") if isinstance(meta.get("defense_parameter"), dict) else {}
    if table == "table1":
        recorded = param.get("sigma")
        if defense != "gaussian" or not isinstance(recorded, (int, float)) or isinstance(recorded, bool):
            raise ValueError(f"table1 at sigma {sigma:g} needs a Gaussian-noise-trained checkpoint (defense "
                             f"'gaussian' with a sigma), but {name!r} records defense {defense!r}, defense_parameter "
                             f"{param}: choose another --model-template / --sigmas")
        if not math.isclose(float(recorded), float(sigma), rel_tol=SIGMA_RTOL):
            raise ValueError(f"table1 at sigma {sigma:g} refuses {name!r}, trained at sigma {float(recorded):g}: "
                             "the table's sigma and the checkpoint's must agree (--sigmas / --model-template)")
    else:
        eps = param.get("eps")
        if defense != "crown-ibp" or not isinstance(eps, (int, float)) or isinstance(eps, bool):
            raise ValueError(f"table2 needs CROWN-IBP-trained checkpoints (defense 'crown-ibp' with an eps), but "
                             f"{name!r} records defense {defense!r}, defense_parameter {param}: choose --models among "
                             "the crownibp-* checkpoints")
    return meta


def group_file(records: Path, name: str) -> Path:
    """The record file of one group (a checkpoint) inside ``records``: ``<name>.jsonl`` for a checkpoint name, and for
    a path (``/abs/path/ckpt``) its last part plus a short hash of the whole path, so that every file stays under
    ``records`` whatever the checkpoint argument looks like."""
    base = Path(name).name
    if base.endswith((".safetensors", ".json")):
        base = base.rsplit(".", 1)[0]
    if base != name or not base or base in (".", ".."):
        base = f"{base.strip('.') or 'checkpoint'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return records / f"{base}.jsonl"


def _controls_beaten(row: dict[str, Any]) -> bool | None:
    """The attack adds over its controls: its success rate is above every control's (None without controls)."""
    values = [row.get(f"control_{name}_success") for name in CONTROLS]
    if any(v is None for v in values):
        return None
    return row["success"] > max(values)


def table1(settings: Table1Settings | None = None, *, device: str | torch.device | None = None,
           out_dir: str | Path | None = "outputs/table1", progress: bool = True, chunk: int | None = None,
           resume: bool = False, ctx: DistContext | None = None, overwrite: bool = True,
           **changes: Any) -> TableResult:
    """Table 1 analogue: natural certified accuracy and radius against the Shadow Attack's spoofed certificates.

    For every sigma and channel mode: the share of images whose shadow image gets its wrong label certified AND is
    imperceptible (SSIM >= min_ssim; perception.shadow_success), the plain spoof rate, the mean spoofed radius over
    successes, the shadows' SSIM / L2 / TV, and (controls=True) the same judgement of the three controls of
    shadowlab.experiments.controls on the same images. One row per (sigma, channels); per-image records and the
    8-bit shadow images (``shadows``, one per record) are kept, and written with ``write_outputs`` when out_dir is
    given.

    Args:
        settings: the experiment (``Table1Settings``; None: its CPU-size defaults, ``Table1Settings.paper()`` the
            authors'); ``changes`` are applied on top (``table1(n_images=10, steps=100)``), ValueError for an
            unknown one.
        device: where to run (None: CUDA when available, else CPU).
        out_dir: where the table, per-image records, figures and shadow images go (None: nothing written).
        progress: tqdm bars.
        chunk: images run together (None: ``work_chunk`` from the device's memory).
        resume: continue an interrupted run with the same settings from ``out_dir/records/``.
        overwrite: without resume, replace this run's groups' finished records in ``out_dir/records/``; False
            refuses (RunFileError, before any work) when one exists, as the CLI does without --overwrite. Records
            of groups (sigmas, models) outside this run are never touched.
        ctx: torchrun context (``runs.init_distributed``): the ranks share the images and rank 0 gathers and writes
            the files of a single process; other ranks return a TableResult without rows.
    """
    s = (settings or Table1Settings()).replace(**changes)
    names = {sigma: s.model_name(sigma) for sigma in s.sigmas}
    if len(set(names.values())) < len(names):
        raise ValueError(f"model_template={s.model_template!r} names one checkpoint for several sigmas "
                         f"{list(s.sigmas)}: give it a {{sigma}} field, e.g. " + repr(MODEL_TEMPLATE))
    for sigma, name in names.items():
        check_table_model("table1", name, sigma)
    _check_fresh(out_dir, resume, overwrite, names.values())
    if chunk is not None:
        validate.count(chunk, "chunk")
    ctx = ctx or DistContext()
    device = rank_device(ctx, device)
    x, y, _ = load_cifar10("test", n=s.n_images, source=s.source)
    x, y = x.to(device), y.to(device)
    if chunk is None:
        chunk = work_chunk("table1", device, [checkpoints.load(n, device="cpu")[0] for n in names.values()],
                           x.shape[1:], noise_samples=s.noise_samples, channels=len(s.channels))
    settings_out = {**s.to_dict(), "data": resolve_source("test", s.source), "device": str(device), "chunk": chunk,
                    "models": [names[sigma] for sigma in s.sigmas]}
    for ch in s.channels:   # the attack's settings are checked before any work
        s.shadow_config(ch)
    result = TableResult("table1", [], [], {}, settings_out)
    t0 = time.time()
    with _records_dir(out_dir, resume) as records:
        for sigma in tqdm(s.sigmas, desc="Table 1 (sigma)", disable=not progress or not ctx.is_main):
            name = names[sigma]
            model, meta = checkpoints.load(name, device=device)
            work = table1_work(model, sigma, x, y, s)
            recs = run_images(range(s.n_images), work, group_file(records, name),
                              _group_settings(settings_out, device, model=name, model_sha256=meta["sha256"]),
                              resume=resume, chunk=chunk, ctx=ctx, progress=progress, desc=f"Table 1, {name}",
                              overwrite=overwrite)
            if ctx.is_main:
                rows, per_image, shadows = table1_rows(sigma, name, s.channels, recs, x.shape[1:])
                result.rows += rows
                result.per_image += per_image
                result.shadows += shadows
    return _finish(result, ctx, t0, x, y, table1_claims, table1_markdown, out_dir)


def _finish(result: TableResult, ctx: DistContext, t0: float, x: torch.Tensor, y: torch.Tensor,
            claims: Callable[[list[dict[str, Any]]], dict[str, Any]], markdown: Callable[[TableResult], str],
            out_dir: str | Path | None) -> TableResult:
    """The tail both tables share: on rank 0, whether each row beats its controls, the run's seconds, example
    images, the claims, the Markdown table and (with out_dir) the files; other ranks return their empty result."""
    if not ctx.is_main:
        return result
    for row in result.rows:
        row["attack_beats_controls"] = _controls_beaten(row)
    result.settings["seconds"] = round(time.time() - t0, 1)
    result.examples = examples_from_records(result, x, y)
    result.claims = claims(result.rows)
    result.markdown = markdown(result)
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    return result


def activation_elements(model: nn.Module, shape: Sequence[int]) -> int:
    """Elements of every leaf layer's output for one input of ``shape`` (C x H x W): the size of a forward pass."""
    total = 0

    def count(_module: nn.Module, _inputs: Any, out: Any) -> None:
        nonlocal total
        total += out.numel() if isinstance(out, torch.Tensor) else 0

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    finally:
        for h in hooks:
            h.remove()
    return total


def work_chunk(table: str, device: torch.device, models: Sequence[nn.Module], shape: Sequence[int],
               noise_samples: int = 1, channels: int = 1, targets: int = 9) -> int:
    """Images per call of a table's work on ``device`` (``runs.auto_chunk``), from an estimate of one image's peak
    memory with the largest of ``models``: Table 2 bounds targets x (K - 1) margins with CROWN-IBP, about 16 bytes
    (box, coefficients, gradient) per activation and margin; Table 1 holds noise_samples Gaussian copies and
    inputs per image (its forward batches are bounded by the attack's batch_size, not by the chunk)."""
    validate.choice(table, "table", ("table1", "table2"))
    if table == "table2":
        per_image = max(activation_elements(m, shape) for m in models) * targets * targets * 16
        return auto_chunk(device, per_image, cap=512)
    per_image = 2 * 4 * noise_samples * math.prod(shape) * targets * channels
    return auto_chunk(device, per_image, cap=64)


@contextmanager
def _records_dir(out_dir: str | Path | None, resume: bool) -> Iterator[Path]:
    """Where a table's per-image records go: ``out_dir/records``, or a temporary folder without out_dir."""
    if out_dir is not None:
        yield Path(out_dir) / "records"
        return
    if resume:
        raise ValueError("resume=True needs out_dir (the folder whose records/ the run continues from)")
    with tempfile.TemporaryDirectory(prefix="shadowlab-records-") as tmp:
        yield Path(tmp)


def _check_fresh(out_dir: str | Path | None, resume: bool, overwrite: bool, names: Any) -> None:
    """A fresh run (no resume, no overwrite) refuses, before any work, when a group's records are in out_dir."""
    if out_dir is not None and not resume and not overwrite:
        records = Path(out_dir) / "records"
        refuse_overwrite([group_file(records, n) for n in names])


def _group_settings(settings: dict[str, Any], device: torch.device, **group: Any) -> dict[str, Any]:
    """What one group's records (a sigma, a model) depend on, checked by --resume: the table's settings, the
    device type (not the rank's GPU index) and the group's checkpoint."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if k in ("device", "sigmas", "models", "seconds", "command"):
            continue
        if isinstance(v, dict):   # one entry per field, so that a refusal names the field ("config.steps")
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return {**out, "device_type": device.type, **group}


def table1_claims(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's claims, with imperceptibility: the mean radius of *successful* (certified and imperceptible)
    shadow images is comparable to the natural one (>= 0.7 x for every sigma, in its better channel mode) and larger
    for some sigma; and the attack's success rate is above each control's on the same images."""
    ratios = {}
    for r in rows:
        spoof, nat = r.get("spoofed_mean_radius"), r["natural_mean_radius"]
        ratios[f"sigma {r['sigma']:.2f}, {r['channels']}-channel"] = (spoof / nat) if spoof is not None and nat \
            else None
    by_sigma: dict[float, list[float]] = {}
    for r, v in zip(rows, ratios.values()):
        by_sigma.setdefault(r["sigma"], []).append(v or 0.0)
    beats = {k: r.get("attack_beats_controls") for k, r in zip(ratios, rows)}
    # the same claim with the authors' statistics (table_images.authors_means): every non-abstaining image counted
    authors = {k: (r["authors_adversarial_mean_radius"] / r["authors_natural_mean_radius"])
               if r.get("authors_adversarial_mean_radius") is not None and r.get("authors_natural_mean_radius")
               else None for k, r in zip(ratios, rows)}
    return {
        "authors_adversarial_over_natural_radius": authors,
        "larger_for_some_sigma_authors_statistics": (None if all(v is None for v in authors.values())
                                                     else any(v is not None and v > 1.0 for v in authors.values())),
        "spoofed_over_natural_radius": ratios,
        "comparable_for_every_sigma": bool(by_sigma) and all(max(v) >= RADIUS_RATIO_CLAIM for v in by_sigma.values()),
        "larger_for_some_sigma": any(v is not None and v > 1.0 for v in ratios.values()),
        "attack_beats_controls": beats,
        "beats_controls_everywhere": None if any(v is None for v in beats.values()) else all(beats.values()),
        "threshold": RADIUS_RATIO_CLAIM,
    }


def table2(settings: Table2Settings | None = None, *, cfg: ShadowConfig | None = None,
           device: str | torch.device | None = None, out_dir: str | Path | None = "outputs/table2",
           progress: bool = True, chunk: int | None = None, resume: bool = False, ctx: DistContext | None = None,
           overwrite: bool = True, **changes: Any) -> TableResult:
    """Table 2 analogue: verified error of CROWN-IBP models on natural images against the Shadow Attack's error.

    Attack error = 100% - share of images whose shadow image gets a valid CROWN-IBP / IBP certificate for a wrong
    label AND is imperceptible (SSIM >= min_ssim); the plain spoof error and the three controls of
    shadowlab.experiments.controls (same images, same judgement) are reported beside it.

    Args:
        settings: the experiment (``Table2Settings``; None: its CPU-size defaults, ``Table2Settings.paper()`` the
            authors'); ``changes`` on top, as in ``table1``.
        cfg: the attack's settings in full, instead of ``settings.shadow_config()`` (an ablation).
        device, out_dir, progress, chunk, resume, ctx, overwrite: as in ``table1``.
    """
    s = (settings or Table2Settings()).replace(**changes)
    if chunk is not None:
        validate.count(chunk, "chunk")
    names = list(s.models or [m for m in checkpoints.available() if m.startswith("crownibp-")])
    if not names:
        raise ValueError("no CROWN-IBP checkpoints (crownibp-*) found; train them with "
                         "`python -m shadowlab train --defense crown-ibp ...`")
    for name in names:
        check_table_model("table2", name)
    _check_fresh(out_dir, resume, overwrite, names)
    ctx = ctx or DistContext()
    device = rank_device(ctx, device)
    cfg = cfg or s.shadow_config()
    x, y, _ = load_cifar10("test", n=s.n_images, source=s.source)
    x, y = x.to(device), y.to(device)
    if chunk is None:
        chunk = work_chunk("table2", device, [checkpoints.load(n, device="cpu")[0] for n in names], x.shape[1:])
    settings_out = {"models": names, "n_images": s.n_images, "config": cfg.to_dict(), "min_ssim": cfg.min_ssim,
                    "faithful": cfg.faithful, "recipe": "authors' procedure" if cfg.faithful else s.recipe,
                    "controls": s.controls, "data": resolve_source("test", s.source), "device": str(device),
                    "chunk": chunk}
    result = TableResult("table2", [], [], {}, settings_out)
    t0 = time.time()
    with _records_dir(out_dir, resume) as records:
        for name in tqdm(names, desc="Table 2 (models)", disable=not progress or not ctx.is_main):
            model, meta = checkpoints.load(name, device=device)
            eps = float(meta["defense_parameter"]["eps"])
            recs = run_images(range(s.n_images), table2_work(model, eps, x, y, cfg, s.controls),
                              group_file(records, name),
                              _group_settings(settings_out, device, model=name, model_sha256=meta["sha256"]),
                              resume=resume, chunk=chunk, ctx=ctx, progress=progress, desc=f"Table 2, {name}",
                              overwrite=overwrite)
            if ctx.is_main:
                row, per_image, shadows = table2_rows(name, meta, eps, recs, x.shape[1:])
                result.rows.append(row)
                result.per_image += per_image
                result.shadows += shadows
    return _finish(result, ctx, t0, x, y, table2_claims, table2_markdown, out_dir)


def table2_claims(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's claim, with imperceptibility: the attack error (no imperceptible certified wrong label) is below
    the verified error on natural images for every model; and the attack's success is above each control's."""
    below = {r["model"]: r["attack_error"] < r["verified_error"] for r in rows}
    beats = {r["model"]: r["attack_beats_controls"] for r in rows}
    return {"attack_error_below_verified_error": below, "holds_for_every_model": all(below.values()),
            "attack_beats_controls": beats,
            "beats_controls_everywhere": None if any(v is None for v in beats.values()) else all(beats.values())}


def merge_tables(table_dirs: list[str | Path], out_dir: str | Path) -> TableResult:
    """One table from several runs of the same table on disjoint parts (other sigmas, models or images), read from
    their files (JSON with per-image records, the shadows npz): rows and records concatenated in the given order,
    claims, Markdown and figures recomputed, and every file written again to out_dir by ``write_outputs``."""
    parts = []
    for d in map(Path, table_dirs):
        found = sorted(d.glob("table[12].json"))
        if not found:
            raise ValueError(f"table_dirs entry {str(d)!r} holds no table1.json or table2.json")
        parts.append((d, json.loads(found[0].read_text())))
    names = {rec["name"] for _, rec in parts}
    if len(names) != 1:
        raise ValueError(f"table_dirs mix tables {sorted(names)}; merge runs of one table")
    name = names.pop()
    first = parts[0][1]["settings"]
    settings = {**first, "seconds": round(sum(rec["settings"].get("seconds", 0.0) for _, rec in parts), 1),
                "merged_from": [rec["settings"].get("command", str(d)) for d, rec in parts]}
    if name == "table1":
        settings["sigmas"] = [s for _, rec in parts for s in rec["settings"]["sigmas"]]
        if all("models" in rec["settings"] for _, rec in parts):
            settings["models"] = [m for _, rec in parts for m in rec["settings"]["models"]]
    else:
        settings["models"] = [m for _, rec in parts for m in rec["settings"]["models"]]
    result = TableResult(name, [r for _, rec in parts for r in rec["rows"]],
                         [r for _, rec in parts for r in rec["per_image"]], {}, settings)
    result.shadows = [img for d, _ in parts for img in np.load(d / f"{name}_shadows.npz")["x_shadow"]]
    if name == "table1":   # rows and records in sigma, channel and image order, whatever the parts' order
        result.rows.sort(key=lambda r: (r["sigma"], r["channels"]))
        order = sorted(range(len(result.per_image)), key=lambda k: (
            result.per_image[k]["sigma"], result.per_image[k]["channels"], result.per_image[k]["index"]))
        result.per_image = [result.per_image[k] for k in order]
        result.shadows = [result.shadows[k] for k in order]
    n = max(r["index"] for r in result.per_image) + 1
    x, y, _ = load_cifar10("test", n=n, source=first["data"])
    result.examples = examples_from_records(result, x, y)
    if name == "table1":
        result.claims = table1_claims(result.rows)
        result.markdown = table1_markdown(result)
    else:
        result.claims = table2_claims(result.rows)
        result.markdown = table2_markdown(result)
    write_outputs(result, Path(out_dir))
    return result








