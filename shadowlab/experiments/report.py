"""How a reproduced table is reported: the result type (``TableResult``), the tables' own Markdown (through the one
writer, ``shadowlab.tables.markdown_table``), the files a run writes (CSV, JSON, Markdown, figures, the 8-bit shadow
images), example images from the records, and the committed tables' report for lesson 06."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shadowlab.data import DATA_DIR
from shadowlab.experiments.controls import CONTROLS
from shadowlab.experiments.runs import ADDED_SETTINGS
from shadowlab.plots import plot_shadow_examples, plot_ssim_vs_l2
from shadowlab.tables import markdown_table

CONTROL_LABELS = {"natural": "natural image (delta = 0)", "init": "attack's initialisation alone",
                  "smooth_noise": "random smooth noise of the shadow's L2 size"}


@dataclass
class TableResult:
    """Rows of a reproduced table, per-image records, the claims checked, and where files were written."""

    name: str
    rows: list[dict[str, Any]]
    per_image: list[dict[str, Any]]
    claims: dict[str, Any]
    settings: dict[str, Any]
    markdown: str = ""
    files: dict[str, str] = field(default_factory=dict)
    examples: dict[str, Any] = field(default_factory=dict)
    shadows: list[np.ndarray] = field(default_factory=list)   # uint8 3 x H x W per per_image row, same order

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "rows": self.rows, "claims": self.claims,
                "per_image": self.per_image, "files": self.files}


def _verdict(value: bool | None) -> str:
    return "not checked (no controls)" if value is None else ("holds" if value else "fails")


CONTROL_COLUMNS = [(f"control: {CONTROL_LABELS[c].split(' (')[0]}", f"control_{c}_success", "pct") for c in CONTROLS]


def table1_markdown(result: TableResult) -> str:
    cols = [("sigma", "sigma", "2"), ("ch", "channels", "str"), ("natural cert. acc.", "natural_certified_accuracy",
                                                                 "pct"),
            ("natural mean radius", "natural_mean_radius", "3"), ("success (SSIM >= min)", "success", "pct"),
            ("spoof rate (any SSIM)", "spoof_rate", "pct"), ("spoofed radius (successes)", "spoofed_mean_radius", "3"),
            ("authors' natural mean", "authors_natural_mean_radius", "3"),
            ("authors' adversarial mean", "authors_adversarial_mean_radius", "3"), ("mean SSIM", "mean_ssim", "3"),
            ("mean L2", "mean_l2", "2"), ("mean Linf", "mean_linf", "2"),
            *CONTROL_COLUMNS]
    s, c = result.settings, result.claims
    return "\n".join([
        markdown_table(cols, result.rows), "",
        f"{s['n_images']} test images per sigma ({s['data']}), CERTIFY n0 = {s['n0']}, n = {s['n']}, "
        f"alpha = {s['alpha']}; attack: {s['steps']} steps, lr {s['lr']}, {s['noise_samples']} noise samples, "
        f"early stop at {s['early_stop_margin']} of the training-noise votes and SSIM >= {s['min_ssim']} (per "
        f"{s['early_stop_scope']}"
        + (f", or once its objective fell by less than {s['settle_tol']} over {s['settle_window']} steps"
           if s.get("settle_window") and s.get("early_stop_margin") is not None else "")
        + f"), {s['keep_targets'] or 'all'} target(s) kept after "
        f"{s.get('prune_step', ADDED_SETTINGS['prune_step'])} steps, target chosen by "
        f"CERTIFY with n = {s['n_select']}.",
        f"Success: the wrong label is certified AND SSIM(shadow, natural) >= {s['min_ssim']}; spoof rate counts "
        "certified wrong labels whatever the SSIM. Controls, judged the same way on the same images: "
        + "; ".join(f"{CONTROL_LABELS[k]}" for k in CONTROLS) + ". "
        f"Claim 'spoofed radius of successes >= {c['threshold']} x natural for every sigma': "
        f"{_verdict(c['comparable_for_every_sigma'])}; "
        f"'larger for some sigma': {_verdict(c['larger_for_some_sigma'])}; "
        f"'the attack's success is above every control's in every row': {_verdict(c['beats_controls_everywhere'])}.",
        "The authors' columns are their statistics (RandomizedSmoothing/certify.py): over the images whose natural "
        "certificate does not abstain, the mean natural radius whatever its label and the mean final radius of the "
        "shadow image whatever its label (failed attacks included). Claim 'larger for some sigma' with them: "
        f"{_verdict(c.get('larger_for_some_sigma_authors_statistics'))}."
        + (" Attack run in the authors' procedure (--faithful)." if s.get("faithful") else "")])


def table2_markdown(result: TableResult) -> str:
    cols = [("model", "model", "str"), ("eps", "eps_255", "str"), ("clean error", "clean_error", "pct"),
            ("verified error (natural)", "verified_error", "pct"), ("attack error (SSIM >= min)", "attack_error",
                                                                    "pct"),
            ("spoof error (any SSIM)", "spoof_error", "pct"), ("mean SSIM", "mean_ssim", "3"),
            ("mean L2", "mean_l2", "2"), ("mean Linf", "mean_linf", "2"), *CONTROL_COLUMNS]
    s, c = result.settings, result.claims
    cfg = s["config"]
    return "\n".join([
        markdown_table(cols, result.rows), "",
        f"{s['n_images']} test images per model ({s['data']}); attack: {cfg['steps']} steps, "
        f"{cfg['channels']}-channel, "
        f"lambda_tv {cfg['lambda_tv']:.3g}, L2 penalty {cfg['l2_penalty']:.3g}, "
        + (f"early stop at min margin {cfg['early_stop_margin']} and SSIM >= {s['min_ssim']}"
           if cfg.get("early_stop_margin") is not None else "no early stop")
        + (", the authors' procedure (--faithful: normalised-space perturbation, plain IBP on the unclipped box, "
           f"the last iterate, the loss averaged over a batch of {cfg.get('faithful_batch', s['chunk'])} images)"
           if cfg.get("faithful") else
           (", each candidate's best iterate" if cfg.get("keep_best", True) else ", the last iterate")
           + (f", recipe {s['recipe']!r} (ShadowConfig.{s['recipe']}_crown_ibp; lr {cfg['lr']:.3g}, "
              f"{cfg.get('loss_bound', 'crown-ibp')} bounds in the loss)" if s.get("recipe") else ""))
        + ". Attack error = 100% - share of images whose wrong "
        f"label gets a valid certificate (CROWN-IBP/IBP, or the authors' IBP with --faithful) on a shadow image "
        f"with SSIM >= {s['min_ssim']}; controls, judged by shadowlab's bounds "
        "on the same images (share counted as success): "
        + "; ".join(CONTROL_LABELS[k] for k in CONTROLS) + ". "
        f"Claim 'attack error < verified error for every model': {_verdict(c['holds_for_every_model'])}; "
        f"'the attack's success is above every control's for every model': "
        f"{_verdict(c['beats_controls_everywhere'])}."])


def write_outputs(result: TableResult, out_dir: Path) -> None:
    """The one writer of a table's files: CSV (per image), JSON (settings, rows, claims), Markdown, the 8-bit
    shadow images (``<name>_shadows.npz``: ``x_shadow`` uint8 N x 3 x H x W, one per CSV row, with the CSV's
    index column) and the figures (examples; SSIM against L2)."""
    import matplotlib.pyplot as plt  # start-up cost (matplotlib.pyplot)

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / f"{result.name}_per_image.csv", "json": out_dir / f"{result.name}.json",
             "markdown": out_dir / f"{result.name}.md", "figure": out_dir / f"{result.name}.png",
             "ssim_figure": out_dir / f"{result.name}_ssim_vs_l2.png",
             "shadows": out_dir / f"{result.name}_shadows.npz"}
    fields = list(dict.fromkeys(k for rec in result.per_image for k in rec))
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result.per_image)
    if result.shadows:
        np.savez_compressed(files["shadows"], x_shadow=np.stack(result.shadows),
                            index=np.array([r["index"] for r in result.per_image]))
    result.files = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    files["markdown"].write_text(result.markdown + "\n")
    for key, fig in (("figure", plot_shadow_examples(result)), ("ssim_figure", plot_ssim_vs_l2(ssim_points(result)))):
        fig.savefig(files[key], dpi=100, bbox_inches="tight")
        plt.close(fig)


def _group(result: TableResult, rec: dict[str, Any]) -> str:
    return f"sigma {rec['sigma']:.2f}, {rec['channels']}-channel" if result.name == "table1" else rec["model"]


def examples_from_records(result: TableResult, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The figures' inputs, per sigma / channel mode or model, rebuilt from the per-image records, the 8-bit
    shadows and the natural images x, y (indexed by each record's ``index``): what a table's files hold."""
    examples: dict[str, Any] = {}
    score_key, score_name = ("spoofed_radius", "r") if result.name == "table1" else ("margin", "margin")
    groups: dict[str, list[int]] = {}
    for k, rec in enumerate(result.per_image):
        groups.setdefault(_group(result, rec), []).append(k)
    for key, ks in groups.items():
        recs = [result.per_image[k] for k in ks]
        idx = torch.tensor([r["index"] for r in recs])

        def col(name: str, recs: list[dict[str, Any]] = recs) -> np.ndarray:
            return np.array([r[name] for r in recs])

        examples[key] = {
            "x": x.cpu()[idx], "y": y.cpu()[idx], "target": torch.tensor([r["target"] for r in recs]),
            "x_shadow": torch.from_numpy(np.stack([result.shadows[k] for k in ks])).float() / 255,
            "score": col(score_key), "score_name": score_name, "ssim": col("ssim"), "success": col("success"),
            "spoofed": col("spoofed"), "l2": col("l2"),
            "control_l2": {c: col(f"control_{c}_l2") for c in CONTROLS if c != "natural"
                           and f"control_{c}_l2" in recs[0]},
            "control_ssim": {c: col(f"control_{c}_ssim") for c in CONTROLS if c != "natural"
                             and f"control_{c}_ssim" in recs[0]}}
    return examples


def ssim_points(result: TableResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(L2 sizes, SSIMs) per kind of perturbation in a table: the shadow images and the controls' perturbations."""
    points: dict[str, tuple[list, list]] = {}
    for ex in result.examples.values():
        for label, l2, sim in [("shadow images", ex["l2"], ex["ssim"])] + [
                (CONTROL_LABELS[k], ex["control_l2"][k], ex["control_ssim"][k]) for k in ex["control_l2"]]:
            p = points.setdefault(label, ([], []))
            p[0].extend(np.asarray(l2).tolist())
            p[1].extend(np.asarray(sim).tolist())
    return {k: (np.array(a), np.array(b)) for k, (a, b) in points.items()}


def committed_report(results_dir: str | Path | None = None) -> str:
    """Markdown of the committed Tables 1 and 2 (``data/results/table1|table2``): each table as written, its claims,
    and its independent re-judgement (``rejudge.json``) where present; a line saying so where a table is missing."""
    root = Path(results_dir) if results_dir is not None else DATA_DIR / "results"
    parts = []
    for name in ("table1", "table2"):
        folder = root / name
        if not (folder / f"{name}.md").exists():
            parts.append(f"### Committed {name}\n\nno committed run in `{folder}`.")
            continue
        claims = json.loads((folder / f"{name}.json").read_text())["claims"]
        verdicts = ", ".join(f"{k}: {_verdict(v)}" for k, v in claims.items() if isinstance(v, bool) or v is None)
        text = [f"### Committed {name}", "", (folder / f"{name}.md").read_text().strip(), "", f"Claims: {verdicts}."]
        if (folder / "rejudge.json").exists():
            rj = json.loads((folder / "rejudge.json").read_text())
            text.append(f"Re-judged from the files: success {100 * rj['rejudged_success_rate']:.1f}% (committed "
                        f"{100 * rj['committed_success_rate']:.1f}%), spoof agreement "
                        f"{100 * rj['spoofed_agreement']:.1f}%, largest SSIM difference "
                        f"{rj['max_abs_ssim_difference']:.1e}, successes below min_ssim: "
                        f"{rj['success_rows_below_min_ssim']}.")
        parts.append("\n".join(text))
    return "\n\n".join(parts)


def committed_figures(results_dir: str | Path | None = None) -> list[Path]:
    """The committed tables' figures that exist: examples (``table1.png``, ``table2.png``) and SSIM against L2."""
    root = Path(results_dir) if results_dir is not None else DATA_DIR / "results"
    return [p for name in ("table1", "table2") for p in (root / name / f"{name}.png", root / name /
                                                         f"{name}_ssim_vs_l2.png") if p.exists()]

