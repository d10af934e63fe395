"""The per-image cost fit and the wall-time arithmetic of `python -m shadowlab cost`."""

import math

import pytest
import torch

from shadowlab.cli.main import main
from shadowlab.experiments import cost
from shadowlab.experiments.settings import Table1Settings
from shadowlab.models import build


def _cost(seconds_fixed=10.0, per_step=2.0, per_sample=0.001):
    return cost.ImageCost("table1", seconds_fixed, per_step, per_sample, 300, 100_000, [], "cpu")


def test_paper_seconds_and_wall_hours():
    c = _cost()
    assert c.seconds == pytest.approx(10 + 600 + 100)
    assert cost.wall_hours(c, 500, 4, 1) == pytest.approx(4 * 500 * 710 / 3600)
    assert cost.wall_hours(c, 500, 4, 8) == pytest.approx(4 * 63 * 710 / 3600)   # ceil(500 / 8) images per rank
    assert cost.wall_hours(c, 500, 1, 3, chunk=4) == pytest.approx(math.ceil(125 / 3) * 4 * 710 / 3600)
    with pytest.raises(ValueError, match="devices=0"):
        cost.wall_hours(c, 500, 4, 0)


def test_fit_on_the_real_work_of_a_tiny_model(monkeypatch):
    """The fit solves three timed points exactly; with a fake clock linear in (steps, n) it returns its terms, per
    image of the timed chunk."""
    torch.manual_seed(0)
    model = build("cnn-2layer", width=1, linear_size=16).eval()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 5])
    clock = lambda s, n: 2 * (4 + 0.5 * s + 0.01 * n)          # the chunk of 2 images: twice one image's time
    # warm-up, (1, 100), (3, 100), then without the controls (1, 100) and n doubling from 200 until it adds at
    # least half of that point (5.5 s)
    timings = iter([0.0, clock(1, 100), clock(3, 100), clock(1, 100), clock(1, 200), clock(1, 400)])
    monkeypatch.setattr(cost, "_timed", lambda fn, device, repeat: (fn(), next(timings))[1])
    settings = Table1Settings.paper(noise_samples=2, n0=8, channels=(1,))
    c = cost.table1_image_cost(model, 0.25, x, y, settings, n_start=100)
    assert (c.fixed, c.per_step, c.per_sample) == pytest.approx((4.0, 0.5, 0.01)) and c.chunk == 2
    assert c.seconds == pytest.approx(4 + 300 * 0.5 + 100_000 * 0.01) and len(c.points) == 4
    assert [(p["steps"], p["n"], p.get("controls", True)) for p in c.points] == [
        (1, 100, True), (3, 100, True), (1, 100, False), (1, 400, False)]
    with pytest.raises(ValueError, match="a chunk of images"):
        cost.table1_image_cost(model, 0.25, torch.rand(2, 3, 32, 32), torch.tensor([1]))


def test_a_pruned_search_is_timed_past_its_prune_step(monkeypatch):
    """With keep_targets a step costs less after prune_step: the timed points start there, so the fit's steps term
    is the pruned step's cost and the first steps' extra lands in the fixed term."""
    model = build("cnn-2layer", width=1, linear_size=16).eval()
    x, y = torch.rand(1, 3, 32, 32), torch.tensor([3])
    seen = []
    monkeypatch.setattr(cost, "table1_work", lambda model, sigma, x, y, s, **k: lambda ids: (
        seen.append((s.steps, s.keep_targets, s.n)), s.steps, s.n)[1:])
    full, pruned, prune_step = 9.0, 1.0, 5
    true = lambda s, n: 3 + full * min(s, prune_step) + pruned * max(0, s - prune_step) + 0.001 * n
    monkeypatch.setattr(cost, "_timed", lambda fn, device, repeat: true(*fn()))
    c = cost.table1_image_cost(model, 0.25, x, y, Table1Settings.paper(keep_targets=1, channels=(1,)),
                               n_start=1000, check=True)
    assert [p["steps"] for p in c.points] == [5, 15, 5, 5, 30] and all(k == 1 for _, k, _ in seen)
    assert c.per_step == pytest.approx(pruned) and c.fixed == pytest.approx(3 + (full - pruned) * prune_step)
    assert c.points[4]["predicted"] == pytest.approx(c.points[4]["seconds"])
    assert c.seconds == pytest.approx(true(300, 100_000))


def test_an_early_stopped_search_is_checked_on_a_whole_paper_image(monkeypatch):
    """With an early stop the steps an image runs depend on it: the fit's points run every step (early stop off),
    and the check times the table's own work at the paper's steps and n, predicted from the steps it ran."""
    model = build("cnn-2layer", width=1, linear_size=16).eval()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 4])
    seen = []
    ran = {0: (12, 40), 1: (30, 18)}   # steps run per image, ch1 and ch3: 25 on average

    def work(model, sigma, x, y, s, **k):
        seen.append((s.steps, s.n, s.early_stop_margin, s.controls))
        return lambda ids: [{"ch1": {"steps_run": ran[i][0]}, "ch3": {"steps_run": ran[i][1]}} for i in ids]

    monkeypatch.setattr(cost, "table1_work", work)
    per_step, per_sample = 0.5, 0.001
    line = lambda s, n: 2 * (3 + per_step * s + per_sample * n)   # a chunk of 2 images
    calls = []
    monkeypatch.setattr(cost, "_timed", lambda fn, device, repeat: (fn(), line(*seen[-1][:2]))[1])
    monkeypatch.setattr(cost, "_timed_records", lambda fn, device: (calls.append(1), (line(25, 100_000), fn()))[1])
    s = Table1Settings.paper_pruned(channels=(1, 3))
    c = cost.table1_image_cost(model, 0.25, x, y, s, n_start=1000, check=True)
    assert all(m is None for _, _, m, _ in seen[:-1])                      # the fit: every step
    assert [ctl for *_, ctl in seen[1:4]] == [True, True, False]           # the n term without the controls
    assert seen[-1] == (300, 100_000, s.early_stop_margin, True) and calls == [1]
    assert c.steps_run == pytest.approx(25) and c.points[-1]["steps_run"] == pytest.approx(25)
    assert c.points[-1]["predicted"] == pytest.approx(c.points[-1]["seconds"])
    assert c.seconds == pytest.approx(3 + 25 * per_step + 100_000 * per_sample)
    assert c.to_dict()["steps_run"] == pytest.approx(25)
    no_check = cost.table1_image_cost(model, 0.25, x, y, s, n_start=1000)
    assert no_check.steps_run is None and no_check.seconds == pytest.approx(3 + 300 * per_step + 100)


def test_timed_points_grow_until_they_take_a_second(monkeypatch):
    """A device that runs a step in milliseconds is timed on enough steps to measure: the steps double until the
    first point takes min_seconds, the second has three times as many, the check point twice that."""
    model = build("cnn-2layer", width=1, linear_size=16).eval()
    x, y = torch.rand(1, 3, 32, 32), torch.tensor([0])
    seen = []

    def fake(k):
        seen.append(k)
        return 0.05 + 0.1 * k                                          # 0.1 s per step

    monkeypatch.setattr(cost, "table2_work", lambda model, eps, x, y, cfg, controls: lambda ids: cfg.steps)
    monkeypatch.setattr(cost, "_timed", lambda fn, device, repeat: fake(fn()))
    c = cost.table2_image_cost(model, 2 / 255, x, y, check=True)
    assert seen == [1, 1, 2, 4, 8, 16, 48, 96]    # warm-up; 1, 2, 4, 8 (0.85 s), 16 (1.65 s); 3 x 16; check 2 x 48
    assert c.points[0]["steps"] == 16 and c.points[1]["steps"] == 48 and c.points[2]["steps"] == 96
    assert c.per_step == pytest.approx(0.1) and c.fixed == pytest.approx(0.05)
    assert c.points[2]["predicted"] == pytest.approx(c.points[2]["seconds"])


def test_cost_cli_table2_on_a_random_architecture(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cost, "table2_image_cost", lambda *a, **k: cost.ImageCost(
        "table2", 1.0, 0.5, 0.0, 300, 0, [{"steps": 5, "n": 0, "seconds": 3.5}], "cpu", 1))
    out = tmp_path / "cost.json"
    assert main(["cost", "table2", "--arch", "cnn-2layer", "--arch-kwargs", '{"width": 1, "linear_size": 16}',
                 "--eps", "2/255", "--devices", "1", "4", "--source", "subset", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "151.0 s" in text and "| 4 | 21.0 h |" in text   # 4 models x 125 images x 151 s
    assert main(["cost", "table2", "--arch", "cnn-2layer", "--source", "subset"]) == 2
    assert "--eps" in capsys.readouterr().err
