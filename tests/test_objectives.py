"""A third certificate through the Objective contract: a Lipschitz-margin bound on a linear model runs through the
Shadow Attack, its controls and a table's work (README, "Extending it: a defense")."""

import torch
from torch import nn

from shadowlab.experiments.table_images import table_work
from shadowlab.shadow.attack import shadow_attack
from shadowlab.shadow.config import ShadowConfig
from shadowlab.shadow.inputs import rgb
from shadowlab.shadow.judge import judge_by_score
from shadowlab.shadow.objectives import OBJECTIVES, Objective, register


@register
class LipschitzObjective(Objective):
    """z = W x + b is certified as t on the L2 ball of radius eps when z_t - z_j >= eps ||w_t - w_j|| for all j."""
    name, title, statistic, reached_at, score = "lipschitz", "Lipschitz margin", "margin", 0.0, "margin"

    def __init__(self, model: nn.Sequential, eps: float) -> None:
        self.model, self.eps, self.num_classes, self.batch_size = model, eps, 10, 64

    def margins(self, images, targets):   # the certified margin: >= 0 iff the target is certified
        w, z = self.model[1].weight, self.model(images)
        gap = z.gather(1, targets[:, None]) - z - self.eps * (w[targets][:, None] - w[None]).norm(dim=2)
        return gap.scatter(1, targets[:, None], float("inf")).amin(1)

    def class_step(self, cands, cfg):
        def step(delta, act):
            d = delta.detach().requires_grad_(True)
            loss = torch.relu(1 - (m := self.margins((cands.x_c[act] + rgb(d[act])).clamp(0, 1), cands.tgt[act])))
            return torch.autograd.grad(loss.sum(), d)[0], loss.detach(), m.detach()
        return step

    def certify_as_targets(self, images, targets, cfg):
        return (m := self.margins(images, targets).detach()) >= 0, m

    def judge(self, x, y, tg, x_cand, cfg, spoof_only=False):
        return judge_by_score(x, tg, x_cand, self.margins(x_cand, tg.reshape(-1)).detach(), cfg.min_ssim)

    def natural(self, x, y, cfg):
        return {"natural_margin": self.margins(x, y).detach()}

    def wrong_label(self, x, y, images, tg, cfg, seed):
        return self.judge(x, y, tg, images.repeat_interleave(tg.shape[1], dim=0), cfg)


def test_a_toy_certificate_runs_through_the_attack_the_controls_and_a_table():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)).eval()
    x, y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    cfg = ShadowConfig(steps=40, lr=0.05, init="zeros", lambda_tv=0.1, min_ssim=0.5)
    res = shadow_attack(OBJECTIVES["lipschitz"](model, 0.01), x, y, cfg, progress=False, certify_natural=True)
    assert res.method == "lipschitz" and res.success.all() and (res.target != y).all()
    assert (LipschitzObjective(model, 0.01).margins(res.x_shadow, res.target) >= 0).all()   # really certified
    work = table_work(LipschitzObjective(model, 0.01), x, y, {None: cfg}, lambda xb, yb: (
        [{"label": int(v)} for v in yb], None), lambda r, k: {"margin": float(r.margin[k])}, controls=True)
    recs = work([0, 1])
    assert [r["success"] for r in recs] == [True, True] and all("control_init_spoofed" in r for r in recs)
