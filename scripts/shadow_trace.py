"""Trace the Shadow Attack step by step on the first test images: TV, L2, SSIM, the certificate statistic.

    python scripts/shadow_trace.py crownibp-cnn-2layer-eps2 --images 8 --steps 40 [--early-stop-margin 0]
    python scripts/shadow_trace.py crownibp-cnn-2layer-eps2 --images 12 --steps 300 [--last-iterate | --faithful]
    python scripts/shadow_trace.py smooth-sigma0.25 --images 8 --steps 40 [--early-stop-margin 0.95]

Prints the mean over candidates at a few steps, the share of candidates that have reached their target at that
step (CROWN-IBP: min certified margin >= 0; smoothing: more than half of the training noise on the target) and the
final judgement (spoof rate, success = certified and SSIM >= min_ssim, mean SSIM, L2, TV per value, steps run,
seconds), from shadowlab's own attack functions. --last-iterate judges the last iterate only (keep_best=False),
--faithful runs the authors' procedure (ShadowConfig.faithful).
"""

from __future__ import annotations

import argparse
import time

import torch

from shadowlab import checkpoints
from shadowlab.data import load_cifar10
from shadowlab.shadow.attack import attack_crown_ibp, attack_smoothing
from shadowlab.shadow.config import ShadowConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--early-stop-margin", type=float, default=None)
    p.add_argument("--noise-samples", type=int, default=32)
    p.add_argument("--keep-targets", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--last-iterate", action="store_true", help="judge the last iterate (keep_best=False)")
    p.add_argument("--faithful", action="store_true", help="the authors' procedure (ShadowConfig.faithful)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, meta = checkpoints.load(a.model)
    x, y, _ = load_cifar10("test", n=a.images, source="subset")
    t0 = time.time()
    if a.model.startswith("crownibp-"):
        eps = float(meta["defense_parameter"]["eps"])
        cfg = ShadowConfig.paper_crown_ibp(steps=a.steps, early_stop_margin=a.early_stop_margin,
                                           keep_best=not a.last_iterate, faithful=a.faithful)
        res = attack_crown_ibp(model, eps, x, y, cfg, progress=False)
        stat, reached_at = "min_margin", 0.0
    else:
        sigma = float(meta["defense_parameter"]["sigma"])
        cfg = ShadowConfig.paper_smoothing(steps=a.steps, noise_samples=a.noise_samples,
                                           early_stop_margin=a.early_stop_margin, early_stop_scope="image",
                                           keep_targets=a.keep_targets, keep_best=not a.last_iterate,
                                           faithful=a.faithful)
        res = attack_smoothing(model, sigma, x, y, cfg, n=1000, progress=False)
        stat, reached_at = "target_fraction", 0.5
    h = res.history
    reached = (h["per_candidate"][stat] >= reached_at).float().flatten(1).mean(1)   # share per step
    last = len(h["tv"]) - 1
    print(f"{a.model}: {a.images} images x {res.candidate_targets.shape[1]} targets, lr {cfg.lr:.4g}, "
          f"lambda_tv {cfg.lambda_tv:.4g}, L2 penalty {cfg.l2_penalty:.4g}, early stop {cfg.early_stop_margin}")
    print("step | TV (sum) | ||delta||_2 | SSIM | " + stat + " | reached")
    for k in sorted({0, 1, 5, 10, 20, 30, 50, 100, 150, 200, 250, last}):
        if k <= last:
            print(f"{k:4d} | {h['tv'][k]:8.2f} | {h['l2'][k]:11.2f} | {h['ssim'][k]:.3f} | {h[stat][k]:+.3f} | "
                  f"{reached[k]:.3f}")
    print(f"final: spoof rate {res.spoof_rate:.3f}, success {res.success_rate:.3f}, mean SSIM {res.ssim.mean():.3f}, "
          f"mean L2 {res.l2.mean():.2f}, TV per value {res.tv.mean():.5f}, steps run {res.steps_run}, "
          f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
