"""The per-image work of Tables 1 and 2, one JSON record per image, so that ``runs.run_images`` can shard it over
torchrun ranks, write it as it goes, resume it and gather it (Ghiasi et al. 2020, Tables 1 and 2).

``table_work`` returns the ``fn`` of ``run_images`` for one group (a sigma, a model) and one certificate
(``shadow.objectives``), and ``table1_work`` and ``table2_work`` build it for the two tables: it maps a
list of image indices to one record per image holding everything the table reads of that image: the natural
certificate or bounds, per channel mode the shadow's verdict, SSIM and sizes, the controls' verdicts and the 8-bit
shadow image itself (``encode_image``). Every random draw is seeded by the image's index (``image_ids``), and CERTIFY
shares its noise across the images of a call, so an image's record does not depend on the rank that computes it.
``table1_rows`` and ``table2_rows`` turn the gathered records back into the table's rows, per-image rows and
shadows, in the layout ``experiments.report.write_outputs`` writes.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from shadowlab.certify.smoothing import ABSTAIN, Certificate, Smooth, summarize
from shadowlab.certify.verify import certified
from shadowlab.experiments.controls import CONTROLS
from shadowlab.experiments.controls import controls as run_controls
from shadowlab.experiments.settings import Table1Settings
from shadowlab.shadow.attack import shadow_attack
from shadowlab.shadow.config import ShadowConfig
from shadowlab.shadow.objectives import BoundObjective, Objective, SmoothingObjective

Record = dict[str, Any]
Work = Callable[[list[int]], list[Record]]


def encode_image(image: torch.Tensor) -> str:
    """An image in [0, 1] (C x H x W) as the base64 text of its 8-bit pixels (rounded, clamped)."""
    pixels = torch.round(image.detach().cpu().clamp(0, 1) * 255).to(torch.uint8).numpy()
    return base64.b64encode(pixels.tobytes()).decode("ascii")


def decode_image(text: str, shape: Sequence[int]) -> np.ndarray:
    """The uint8 C x H x W array ``encode_image`` wrote (shape: its C, H, W)."""
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(tuple(shape)).copy()


def _control_fields(ctrl: dict[str, dict[str, torch.Tensor]] | None, i: int) -> Record:
    """Image i's control columns: success, spoofed, SSIM and L2 of each control (nothing without controls)."""
    out: Record = {}
    for name in CONTROLS if ctrl else ():
        out[f"control_{name}_success"] = bool(ctrl[name]["success"][i])
        out[f"control_{name}_spoofed"] = bool(ctrl[name]["spoofed"][i])
        out[f"control_{name}_ssim"] = float(ctrl[name]["ssim"][i])
        out[f"control_{name}_l2"] = float(ctrl[name]["l2"][i])
    return out


def _shadow_fields(res: Any, i: int) -> Record:
    """Image i's attack columns of a ShadowResult: target, verdicts, SSIM and sizes."""
    return {"target": int(res.target[i]), "spoofed": bool(res.spoofed[i]), "ssim": float(res.ssim[i]),
            "success": bool(res.success[i]), "l2": float(res.l2[i]), "linf": float(res.linf[i]),
            "tv": float(res.tv[i])}


# natural(x, y) -> (one record per image with the natural image's columns, the natural verdicts for the controls)
Natural = Callable[[torch.Tensor, torch.Tensor], tuple[list[Record], Any]]
# fields(result, i) -> image i's certificate-specific columns of a ShadowResult
Fields = Callable[[Any, int], Record]


def table_work(objective: Objective, x: torch.Tensor, y: torch.Tensor, configs: dict[str | None, ShadowConfig],
               natural: Natural, fields: Fields, controls: bool, progress: bool = False) -> Work:
    """A table's work for one group on the certificate ``objective``: the natural images' columns (``natural``),
    then per attack mode of ``configs`` (key: the record's sub-dict, e.g. "ch1", or None for the record itself) the
    Shadow Attack (``shadow.attack.shadow_attack``), its columns (``_shadow_fields`` + ``fields``, "steps_run" of
    its call), the controls (``experiments.controls.controls``) and "shadow" (encode_image), of the images x[ids],
    y[ids]; "seconds" is each image's share of the call."""

    def work(ids: list[int]) -> list[Record]:
        t0 = time.perf_counter()
        pos = torch.tensor(ids, device=x.device)
        xb, yb = x[pos], y[pos]
        out, nat = natural(xb, yb)
        for key, cfg in configs.items():
            res = shadow_attack(objective, xb, yb, cfg, device=x.device, progress=progress,
                                image_ids=torch.tensor(ids))
            ctrl = run_controls(objective, xb, yb, res, torch.tensor(ids), nat) if controls else None
            for k, rec in enumerate(out):
                cols = {**_shadow_fields(res, k), **fields(res, k), "steps_run": res.steps_run,
                        **_control_fields(ctrl, k), "shadow": encode_image(res.x_shadow[k])}
                rec.update({key: cols} if key is not None else cols)
        seconds = (time.perf_counter() - t0) / len(ids)
        return [{**rec, "seconds": seconds} for rec in out]

    return work


def table1_work(model: nn.Module, sigma: float, x: torch.Tensor, y: torch.Tensor, settings: Table1Settings,
                num_classes: int = 10, progress: bool = False) -> Work:
    """Table 1's work for one sigma (``table_work``): natural CERTIFY(n0, n, alpha) of the smoothed ``model``, then
    per channel mode of ``settings`` the Shadow Attack (``settings.shadow_config``), its final CERTIFY and the
    controls (``settings.controls``).

    Record per image: "label", "natural" (Certificate.to_dict), "seconds", and per channel mode under "ch1" / "ch3":
    the attack's fields, "shadow_prediction", "spoofed_radius", "shadow_radius", "steps_run" (of its call), the
    control fields and "shadow" (encode_image)."""
    s = settings
    # the natural certificates in the attack's precision: both sides of the table are the same smoothed classifier
    smooth = Smooth(model, num_classes, sigma, device=x.device, precision=s.precision)
    objective = SmoothingObjective(smooth, s.n0, s.n_select, s.n, s.alpha)

    def natural(xb: torch.Tensor, yb: torch.Tensor) -> tuple[list[Record], Any]:
        certs = smooth.certify(xb, n0=s.n0, n=s.n, alpha=s.alpha, seed=s.seed, progress=False)
        return [{"label": int(yb[k]), "natural": certs[k].to_dict()} for k in range(len(certs))], certs

    def fields(res: Any, k: int) -> Record:
        return {"shadow_prediction": int(res.prediction[k]), "spoofed_radius": float(res.radius[k]),
                "shadow_radius": float(res.certificate_radius[k])}

    configs: dict[str | None, ShadowConfig] = {f"ch{ch}": s.shadow_config(ch) for ch in s.channels}
    return table_work(objective, x, y, configs, natural, fields, s.controls, progress)


def table2_work(model: nn.Module, eps: float, x: torch.Tensor, y: torch.Tensor, cfg: ShadowConfig, controls: bool,
                progress: bool = False) -> Work:
    """Table 2's work for one certifiably trained ``model`` at ``eps`` (``table_work``): the natural image's
    prediction and verification (IBP or CROWN-IBP, the tightest sound certificate), the Shadow Attack judged by the
    same bounds, and the controls, of the images x[ids], y[ids].

    Record per image: "label", "prediction", "verified", the attack's fields, "margin", "steps_run" (of its call),
    the control fields, "shadow" (encode_image) and "seconds"."""

    def natural(xb: torch.Tensor, yb: torch.Tensor) -> tuple[list[Record], Any]:
        with torch.no_grad():
            pred = model(xb).argmax(1)
        ok = certified(model, xb, yb, eps, "ibp", device=x.device) | certified(model, xb, yb, eps, "crown-ibp",
                                                                                device=x.device)
        verified = (ok & (pred == yb)).cpu()
        return [{"label": int(yb[k]), "prediction": int(pred[k]), "verified": bool(verified[k])}
                for k in range(len(yb))], None

    return table_work(BoundObjective(model, eps), x, y, {None: cfg}, natural,
                      lambda res, k: {"margin": float(res.margin[k])}, controls, progress)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _summary_columns(recs: list[Record]) -> Record:
    """The row columns every table shares, from per-image attack records: rates, mean sizes, steps, seconds,
    and each control's success and spoof rate (None without controls)."""
    row: Record = {
        "success": _mean([r["success"] for r in recs]), "spoof_rate": _mean([r["spoofed"] for r in recs]),
        "mean_ssim": _mean([r["ssim"] for r in recs]), "mean_l2": _mean([r["l2"] for r in recs]),
        "mean_linf": _mean([r["linf"] for r in recs]), "mean_tv": _mean([r["tv"] for r in recs]),
        "steps_run": max(r["steps_run"] for r in recs), "seconds": round(sum(r["seconds"] for r in recs), 1)}
    for name in CONTROLS:
        has = f"control_{name}_success" in recs[0]
        row[f"control_{name}_success"] = _mean([r[f"control_{name}_success"] for r in recs]) if has else None
        row[f"control_{name}_spoof"] = _mean([r[f"control_{name}_spoofed"] for r in recs]) if has else None
    return row


def _per_image(head: Record, rec: Record, keys: Sequence[str]) -> Record:
    controls = {k: v for k, v in rec.items() if k.startswith("control_")}
    return {**head, **{k: rec[k] for k in keys}, **controls}


def authors_means(natural: Sequence[Certificate], shadows: Sequence[Record]) -> Record:
    """Table 1's two mean radii as the authors' ``RandomizedSmoothing/certify.py`` prints them: over the images whose
    natural certificate does not abstain, the natural radius whatever its label (certified misclassifications
    included) and the shadow image's final radius whatever its label (a failed attack's true-label radius
    included, an abstention 0). None where a record lacks the shadow's radius (tables written before it was kept).
    """
    kept = [(c, a) for c, a in zip(natural, shadows) if c.prediction != ABSTAIN]
    if any("shadow_radius" not in a for _, a in kept):
        return {"authors_natural_mean_radius": None, "authors_adversarial_mean_radius": None}
    return {"authors_natural_mean_radius": _mean([c.radius for c, _ in kept]),
            "authors_adversarial_mean_radius": _mean([a["shadow_radius"] if a["shadow_prediction"] != ABSTAIN else 0.0
                                                      for _, a in kept])}


def table1_rows(sigma: float, model_name: str, channels: Sequence[int], records: list[Record],
                shape: Sequence[int]) -> tuple[list[Record], list[Record], list[np.ndarray]]:
    """Table 1's rows (one per channel mode), per-image rows and uint8 shadows of one sigma, from the records of
    ``table1_work`` (idx = the image's index), in channel then image order."""
    certs = [Certificate(**r["natural"]) for r in records]
    labels = [r["label"] for r in records]
    nat = summarize(certs, labels)
    rows, per_image, shadows = [], [], []
    for ch in channels:
        recs = [r[f"ch{ch}"] for r in records]
        spoofed_radius = [a["spoofed_radius"] for a in recs if a["success"]]
        rows.append({"sigma": sigma, "channels": ch, "model": model_name,
                     "natural_certified_accuracy": nat["certified_accuracy"]["0"],
                     "natural_mean_radius": nat["mean_radius_correct"],
                     "spoofed_mean_radius": _mean(spoofed_radius), **authors_means(certs, recs), **_summary_columns(
                         [{**a, "seconds": r["seconds"] / len(channels)} for a, r in zip(recs, records)])})
        for r, c, a in zip(records, certs, recs):
            head = {"sigma": sigma, "channels": ch, "index": r["idx"], "label": r["label"],
                    "natural_prediction": c.prediction, "natural_radius": c.radius}
            per_image.append(_per_image(head, a, ("target", "shadow_prediction", "spoofed", "ssim", "success",
                                                  "spoofed_radius", "l2", "linf", "tv")))
            shadows.append(decode_image(a["shadow"], shape))
    return rows, per_image, shadows


def table2_rows(model_name: str, meta: Record, eps: float, records: list[Record], shape: Sequence[int]
                ) -> tuple[Record, list[Record], list[np.ndarray]]:
    """Table 2's row, per-image rows and uint8 shadows of one model (checkpoint metadata ``meta``) from the records
    of ``table2_work``, in image order."""
    summary = _summary_columns(records)
    row = {"model": model_name, "arch": meta["arch"], "eps": eps, "eps_255": f"{round(eps * 255)}/255",
           "clean_error": _mean([r["prediction"] != r["label"] for r in records]),
           "verified_error": 1.0 - _mean([r["verified"] for r in records]),
           "attack_error": 1.0 - summary["success"], "spoof_error": 1.0 - summary["spoof_rate"], **summary}
    per_image = [_per_image({"model": model_name, "index": r["idx"]}, r,
                            ("label", "prediction", "verified", "target", "spoofed", "ssim", "success", "margin", "l2",
                             "linf", "tv")) for r in records]
    return row, per_image, [decode_image(r["shadow"], shape) for r in records]


__all__ = ["authors_means", "decode_image", "encode_image", "table1_rows", "table1_work", "table2_rows", "table2_work",
           "table_work"]
