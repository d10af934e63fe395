"""The per-image cost fit and the wall-time arithmetic of `python -m shadowlab cost`."""

import math

import pytest
import torch

from shadowlab import cost
from shadowlab.cli import main
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
    """The fit solves three timed points exactly; with a fake clock linear in (steps, n) it returns its terms."""
    torch.manual_seed(0)
    model = build("cnn-2layer", width=1, linear_size=16).eval()
    x, y = torch.rand(1, 3, 32, 32), torch.tensor([3])
    timings = iter([0.0, 4 + 1 * 0.5 + 100 * 0.01, 4 + 3 * 0.5 + 100 * 0.01, 4 + 1 * 0.5 + 300 * 0.01])
    monkeypatch.setattr(cost, "_timed", lambda fn, device, repeat: (fn(), next(timings))[1])
    monkeypatch.setattr(cost, "PAPER_TABLE1", {**cost.PAPER_TABLE1, "noise_samples": 2, "n0": 8})
    c = cost.table1_image_cost(model, 0.25, x, y, steps=(1, 3), n=(100, 300), channels=(1,))
    assert (c.fixed, c.per_step, c.per_sample) == pytest.approx((4.0, 0.5, 0.01))
    assert c.seconds == pytest.approx(4 + 300 * 0.5 + 100_000 * 0.01) and len(c.points) == 3
    with pytest.raises(ValueError, match="two increasing"):
        cost.table1_image_cost(model, 0.25, x, y, steps=(3, 1))
    with pytest.raises(ValueError, match="one image"):
        cost.table1_image_cost(model, 0.25, torch.rand(2, 3, 32, 32), torch.tensor([1, 2]))


def test_cost_cli_table2_on_a_random_architecture(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cost, "table2_image_cost", lambda *a, **k: cost.ImageCost(
        "table2", 1.0, 0.5, 0.0, 300, 0, [{"steps": 5, "n": 0, "seconds": 3.5}], "cpu"))
    out = tmp_path / "cost.json"
    assert main(["cost", "table2", "--arch", "cnn-2layer", "--arch-kwargs", '{"width": 1, "linear_size": 16}',
                 "--eps", "2/255", "--devices", "1", "4", "--source", "subset", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "151 s" in text and "| 4 | 21.0 h |" in text   # 4 models x 125 images x 151 s
    assert main(["cost", "table2", "--arch", "cnn-2layer", "--source", "subset"]) == 2
    assert "--eps" in capsys.readouterr().err
