"""The per-image cost fit and the wall-time arithmetic of `python -m shadowlab cost`."""

import json
import math
import os
import subprocess
import sys

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
    # warm-up, (1, 100); the steps from 3, doubling until they add at least that point's time (11 s): 3, 6, 12;
    # then without the controls (1, 100) and n doubling from 200 until it adds as much: 200, 400, 800
    timings = iter([0.0, clock(1, 100), clock(3, 100), clock(6, 100), clock(12, 100), clock(1, 100), clock(1, 200),
                    clock(1, 400), clock(1, 800)])
    monkeypatch.setattr(cost, "_timed", lambda fn, device, repeat: (fn(), next(timings))[1])
    settings = Table1Settings.paper(noise_samples=2, n0=8, channels=(1,))
    c = cost.table1_image_cost(model, 0.25, x, y, settings, n_start=100)
    assert (c.fixed, c.per_step, c.per_sample) == pytest.approx((4.0, 0.5, 0.01)) and c.chunk == 2
    assert c.seconds == pytest.approx(4 + 300 * 0.5 + 100_000 * 0.01) and len(c.points) == 4
    # per_sample counts the natural image's and the shadow's CERTIFY (one channel mode); the controls' init and
    # smooth-noise CERTIFY may add two more runs of n, as costly each
    assert (c.runs, c.control_runs) == (2, 2)
    assert c.seconds_all_controls == pytest.approx(c.seconds + 2 * 100_000 * 0.01 / 2)
    assert [(p["steps"], p["n"], p.get("controls", True)) for p in c.points] == [
        (1, 100, True), (12, 100, True), (1, 100, False), (1, 800, False)]
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
    assert [p["steps"] for p in c.points] == [5, 60, 5, 5, 120] and all(k == 1 for _, k, _ in seen)
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
    monkeypatch.setattr(cost, "timed_call", lambda fn, device: (calls.append(1), (line(25, 100_000), fn()))[1])
    s = Table1Settings.paper_pruned(channels=(1, 3))
    c = cost.table1_image_cost(model, 0.25, x, y, s, n_start=1000, check=True)
    assert all(m is None for _, _, m, _ in seen[:-1])                      # the fit: every step
    # the step term with the controls (2, 6, 12 steps: 12 adds 2's time), the n term without them
    assert [(st, ctl) for st, _, _, ctl in seen[1:6]] == [(2, True), (6, True), (12, True), (2, False), (2, False)]
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


def test_ranks_sharing_a_device_divide_the_table_time_and_agree_on_every_timing(monkeypatch):
    """Two ranks side by side on one CPU: each image takes ``seconds`` on its rank, the table advances one image
    every seconds / 2 and its wall time is that of twice the devices; every timing goes through ``agree``."""
    c2 = cost.ImageCost("table1", 10.0, 2.0, 0.001, 300, 100_000, [], "cpu", ranks=2)
    assert c2.seconds == pytest.approx(710) and c2.table_seconds == pytest.approx(355)
    assert cost.wall_hours(c2, 500, 4, 1) == pytest.approx(cost.wall_hours(_cost(), 500, 4, 2))
    assert c2.to_dict()["seconds_per_image"] == pytest.approx(355)
    model = build("cnn-2layer", width=1, linear_size=16).eval()
    x, y = torch.rand(1, 3, 32, 32), torch.tensor([3])
    monkeypatch.setattr(cost, "table2_work", lambda model, eps, x, y, cfg, controls: lambda ids: cfg.steps)
    monkeypatch.setattr(cost, "_timed", lambda fn, device, repeat: 0.1 * fn())    # this rank: 0.1 s per step
    agreed = []
    other = lambda t: (agreed.append(t), (t + 3 * t) / 2)[1]                      # the other rank: 0.3 s per step
    c = cost.table2_image_cost(model, 2 / 255, x, y, agree=other, ranks=2)
    # warm-up, then 1, 2, 4, 8 steps (1.6 s agreed) and 3 x 8: every timing went through agree
    assert agreed == pytest.approx([0.1, 0.1, 0.2, 0.4, 0.8, 2.4]) and c.per_step == pytest.approx(0.2)
    assert c.ranks == 2 and c.points[0]["seconds"] == pytest.approx(1.6)
    with pytest.raises(ValueError, match="ranks=0"):
        cost.table2_image_cost(model, 2 / 255, x, y, ranks=0)


@pytest.mark.slow
def test_cost_under_torchrun_times_the_ranks_side_by_side(tmp_path):
    """Two gloo ranks time the same points together: rank 0 alone writes the figures, with ranks = 2 and the
    torchrun command; the table's seconds per image are the rank's over 2."""
    out = tmp_path / "cost.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "shadowlab", "--", "cost", "table2", "--arch", "cnn-2layer", "--arch-kwargs",
                           '{"width": 1, "linear_size": 16}', "--eps", "2/255", "--source", "subset", "--device",
                           "cpu", "--check", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Per-image cost of table2") == 1
    assert "2 ranks side by side (1 thread(s) each)" in proc.stdout
    res = json.loads(out.read_text())
    assert res["ranks"] == 2 and res["threads"] == 1
    assert res["seconds_per_image"] == pytest.approx(res["seconds_per_image_per_rank"] / 2)
    assert res["command"].startswith("OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m shadowlab -- cost")
