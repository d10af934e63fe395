"""Benchmarks: settings are validated, the baselines compute the same thing as shadowlab, outputs are complete.
No test asserts a time."""

import json
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from shadowlab import checkpoints
from shadowlab.bench.art import art_shadow_candidates, headline, paired_difference
from shadowlab.bench.run import (
    README_END,
    README_START,
    bench_attack_step,
    bench_bounds,
    bench_certify,
    markdown_table,
    reference_counts,
    update_readme,
)
from shadowlab.bench.settings import BenchSettings
from shadowlab.certify.smoothing import Smooth
from shadowlab.cli.main import main
from shadowlab.models import build
from shadowlab.shadow.config import ShadowConfig
from shadowlab.timing import timed_call, timed_interleaved
from tests.conftest import tiny_normalized_net

CPU = torch.device("cpu")


class Constant(nn.Module):
    """Always predicts one class, whatever the input."""

    def __init__(self, k: int = 3):
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), 10) + 0 * self.w
        out[:, self.k] = 1.0
        return out


@pytest.mark.parametrize("field,value", [("n_images", 0), ("steps", -1), ("noise_samples", 1.5), ("lr", 0.0),
                                         ("lambda_tv", -0.1), ("alpha", 1.0), ("certify_n", 0),
                                         ("runs", ((1.5, None, "fresh"),)), ("runs", ()),
                                         ("runs", ((None, 0, "fresh"),)), ("runs", ((None, 1),)),
                                         ("runs", ((None, 1, "stale"),)), ("prune_step", 0)])
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        BenchSettings(**{field: value})


def test_reference_loop_counts_like_smooth_certify():
    x = torch.rand(3, 3, 32, 32)
    counts = reference_counts(Constant(3), x, num=250, sigma=0.25, batch_size=100)
    assert counts.shape == (3, 10) and (counts[:, 3] == 250).all() and counts.sum() == 750
    ours = Smooth(Constant(3), 10, 0.25, device="cpu").sample_counts(x, 250, batch_size=100)
    assert np.array_equal(ours.numpy(), counts)
    # a real network: same prediction distribution up to sampling noise
    net = tiny_normalized_net().eval()
    ref = reference_counts(net, x[:1], 2000, 0.25, 500)[0] / 2000
    sm = Smooth(net, 10, 0.25, device="cpu").sample_counts(x[:1], 2000, 500)[0].numpy() / 2000
    assert np.abs(ref - sm).max() < 0.06


def test_attack_step_and_certify_report_every_figure():
    net, x, y = tiny_normalized_net().eval(), torch.rand(1, 3, 32, 32), torch.tensor([2])
    cfg = ShadowConfig.paper_smoothing(channels=3, noise_samples=4)
    step = bench_attack_step(net, 0.25, x, y, cfg, CPU, extra_steps=1)
    assert step["candidates"] == 9 and step["batch"] == 36
    assert step["step_seconds"] > 0 and step["bare_seconds"] > 0 and step["fraction_of_limit"] > 0
    cert = bench_certify(net, 0.25, torch.rand(2, 3, 32, 32), n0=10, n=50, alpha=0.001, device=CPU)
    assert cert["samples"] == 2 * 60
    for key in ("smooth_per_s", "numpy_loop_per_s", "bare_forward_per_s", "speedup_over_loop", "fraction_of_limit"):
        assert np.isfinite(cert[key]) and cert[key] > 0


def test_bounds_timed_for_each_model(models_tmp):
    model = build("cnn-2layer", width=1, linear_size=16)
    checkpoints.save(model, "crownibp-tiny", arch="cnn-2layer", arch_kwargs={"width": 1, "linear_size": 16},
                     defense="crown-ibp", defense_parameter={"eps": 2 / 255})
    rows = bench_bounds(["crownibp-tiny"], torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2]), CPU, chunk=2)
    assert len(rows) == 1 and rows[0]["images"] == 3 and rows[0]["eps"] == pytest.approx(2 / 255)
    assert all(rows[0][f"{m}_seconds"] > 0 for m in ("ibp", "crown-ibp", "crown"))


def _fake_results():
    side = {"seconds": 10.0, "seconds_per_image": 2.0, "success_rate": 0.8, "mean_spoofed_radius": 0.3,
            "mean_l2": 5.0, "mean_linf": 0.3}
    fast = {**side, "seconds": 2.0, "early_stop_margin": None, "keep_targets": 2, "noise": "fresh", "steps_run": 50,
            "time_ratio_art_over_this": 5.5, "no_worse_than_art": True}
    slow = {**side, "seconds": 8.0, "early_stop_margin": 1.0, "keep_targets": None, "steps_run": 50,
            "time_ratio_art_over_this": 1.4, "no_worse_than_art": True}
    return {"machine": {"cpu": "test cpu", "cores": 2, "torch": "x", "torch_threads": 1, "device": "cpu",
                        "art": "1.20.1"},
            "settings": BenchSettings().__dict__, "sigma": 0.25,
            "shadow_vs_art": {"shadowlab_runs": [fast, slow], "shadowlab": fast, "art_mean": side, "art_sum": side,
                              "art_peer": "art_sum", "time_ratio_art_over_shadowlab": 5.5},
            "attack_step": {"candidates": 18, "noise_samples": 64, "batch": 1152, "step_seconds": 1.0,
                            "bare_seconds": 0.9, "fraction_of_limit": 0.9},
            "certify": {"images": 20, "samples": 42000, "smooth_per_s": 900.0, "bare_forward_per_s": 1000.0,
                        "numpy_loop_per_s": 500.0, "speedup_over_loop": 1.8, "fraction_of_limit": 0.9},
            "bounds": [{"model": "crownibp-x", "eps": 2 / 255, "images": 100, "ibp_seconds": 0.1,
                        "crown-ibp_seconds": 0.2, "crown_seconds": 9.0}]}


def test_timed_interleaved_runs_each_in_turn_and_keeps_the_best():
    calls = []
    out = timed_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, CPU, repeat=3,
                            warmup=1)
    assert calls == ["a", "b"] * 4 and set(out) == {"a", "b"} and all(0 <= v < 1 for v in out.values())


def test_timed_call_returns_the_calls_value_with_its_time():
    seconds, out = timed_call(lambda: [1, 2], CPU)
    assert out == [1, 2] and 0 <= seconds < 1


def test_headline_is_the_fastest_run_that_holds_success_and_radius():
    peer = {"seconds": 100.0, "success_rate": 0.8, "mean_spoofed_radius": 0.40}
    runs = [{"seconds": 50.0, "success_rate": 0.9, "mean_spoofed_radius": 0.45},
            {"seconds": 20.0, "success_rate": 0.8, "mean_spoofed_radius": 0.41},
            {"seconds": 10.0, "success_rate": 0.8, "mean_spoofed_radius": 0.30}]
    best = headline(runs, peer)
    assert best is runs[1] and best["time_ratio_art_over_this"] == pytest.approx(5.0)
    assert [r["no_worse_than_art"] for r in runs] == [True, True, False]
    # none holds: the best by success then radius, not the fastest
    assert headline(runs[2:], {**peer, "success_rate": 1.0}) is runs[2]
    assert headline([runs[2], {**runs[1], "success_rate": 0.5}], {**peer, "success_rate": 1.0}) is runs[2]


def test_paired_radius_difference_against_art():
    mean, se = paired_difference([0.5, 0.4, 0.0, 0.3], [0.4, 0.4, 0.2, 0.1])   # differences 0.1, 0, -0.2, 0.2
    assert mean == pytest.approx(0.025)
    assert se == pytest.approx(statistics.stdev([0.1, 0.0, -0.2, 0.2]) / 2)
    peer = {"seconds": 100.0, "success_rate": 1.0, "mean_spoofed_radius": 0.3, "radii": [0.3, 0.3]}
    run = {"seconds": 10.0, "seconds_per_image": 1.0, "success_rate": 1.0, "mean_spoofed_radius": 0.35,
           "mean_l2": 1.0, "mean_linf": 0.1, "early_stop_margin": None, "keep_targets": 1, "steps_run": 5,
           "radii": [0.3, 0.4]}
    headline([run], peer)
    assert run["radius_minus_art"] == pytest.approx(0.05) and run["radius_minus_art_se"] == pytest.approx(0.05)
    assert "+0.050 ± 0.050" in markdown_table({**_fake_results(), "shadow_vs_art": {
        "shadowlab_runs": [run], "shadowlab": run,
        "art_sum": {**peer, "seconds_per_image": 10.0, "mean_l2": 1.0, "mean_linf": 0.1},
        "art_peer": "art_sum", "time_ratio_art_over_shadowlab": 10.0}})
    with pytest.raises(ValueError, match="same length"):
        paired_difference([0.1, 0.2], [0.1])


def test_markdown_table_has_every_row():
    md = markdown_table(_fake_results())
    for text in ("then the best 2 per image, no early stop, fresh noise every step, 50 steps run",
                 "all targets in one batch, stop an image at target votes >= 1.0, one noise draw for all steps",
                 "1.4x", "reduction='mean'", "reduction='sum'",
                 "5.5x", "no worse than ART", "attack step",
                 "certification", "crownibp-x", "2/255", "test cpu"):
        assert text in md


def test_cli_rejects_bad_arguments(capsys):
    assert main(["bench", "--n-images", "0", "--skip-art", "--out", ""]) == 2
    assert "n_images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--run", "0.9", "--skip-art", "--out", ""])
    assert "MARGIN,KEEP" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--run", "none,1,stale", "--skip-art", "--out", ""])
    assert "NOISE fresh or fixed" in capsys.readouterr().err


def test_art_shadow_attack_runs_on_our_models():
    pytest.importorskip("art")
    net, x = tiny_normalized_net().eval(), torch.rand(1, 3, 32, 32)
    cfg = ShadowConfig.paper_smoothing(channels=3, steps=2, noise_samples=4)
    out = art_shadow_candidates(net, 0.25, x, torch.tensor([[1, 5]]), cfg, "sum", CPU, progress=False)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="reduction"):
        art_shadow_candidates(net, 0.25, x, torch.tensor([[1]]), cfg, "max", CPU, progress=False)


def test_bench_json_written_by_the_cli(tmp_path, monkeypatch):
    # the smallest complete run on the committed subset, without ART
    out, readme = tmp_path / "bench", tmp_path / "README.md"
    readme.write_text(f"# intro\n{README_START}\nold table\n{README_END}\n## after\n")
    code = main(["bench", "--skip-art", "--n-images", "1", "--steps", "1", "--noise-samples", "2", "--n", "20",
                 "--n-select", "10", "--n0", "10", "--certify-images", "1", "--certify-n", "20",
                 "--bound-images", "1", "--source", "subset", "--run", "none,none", "--run", "0.5,1,fixed",
                 "--out", str(out), "--readme", str(readme)])
    assert code == 0
    res = json.loads((out / "bench.json").read_text())
    assert {"machine", "settings", "attack_step", "certify", "bounds", "shadow_vs_art", "markdown"} <= set(res)
    assert "art_sum" not in res["shadow_vs_art"] and (out / "bench.md").exists()
    assert [(r["early_stop_margin"], r["keep_targets"], r["noise"]) for r in res["shadow_vs_art"]["shadowlab_runs"]
            ] == [(None, None, "fresh"), (0.5, 1, "fixed")]
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# intro\n") and text.endswith(f"{README_END}\n## after\n")
    assert res["markdown"] in text and "Command: `python -m shadowlab bench --skip-art" in text


def test_bench_changes_no_readme_unless_asked(monkeypatch):
    from shadowlab.bench import run as bench
    from shadowlab.cli.main import build_parser

    assert build_parser().parse_args(["bench"]).readme is None
    touched = []
    monkeypatch.setattr(bench, "readme_block", lambda path: touched.append(path))
    monkeypatch.setattr(bench, "update_readme", lambda path, markdown: touched.append(path))
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: {"markdown": "| table |"})
    assert main(["bench", "--skip-art", "--out", ""]) == 0
    assert touched == []
    assert main(["bench", "--skip-art", "--out", "", "--readme", "x.md"]) == 0
    assert touched == ["x.md", "x.md"]


def test_update_readme_needs_the_bench_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# no block here\n{README_END}\n{README_START}\n")
    with pytest.raises(ValueError, match="readme=.*no block"):
        update_readme(readme, "| table |")
    with pytest.raises(ValueError, match="is not a file"):
        update_readme(tmp_path / "missing.md", "| table |")
    # the CLI checks the block before it runs anything (a full run would take an hour)
    assert main(["bench", "--skip-art", "--out", "", "--readme", str(readme)]) == 2
    assert "no block" in capsys.readouterr().err


def test_final_counts_only_imperceptible_successes():
    from shadowlab.bench.art import _final
    from shadowlab.bench.settings import BenchSettings
    from shadowlab.certify.smoothing import Smooth
    from shadowlab.perception import quantize
    from tests.conftest import predicted, random_images, tiny_conv

    model = tiny_conv()
    x = quantize(random_images(4) * 0.5 + 0.25)                       # 8-bit, as the shadows are
    smooth = Smooth(model, 10, 0.12, device="cpu")
    s = BenchSettings(n0=16, n=64, art=False)
    same = _final(smooth, x, x, predicted(model, x), s, 1.0)         # SSIM 1: success is the spoof rate
    assert same["mean_ssim"] == pytest.approx(1.0, abs=1e-6) and same["success_rate"] == same["spoof_rate"]
    noise = random_images(4, seed=9)                                  # unrelated images: visible
    other = _final(smooth, x, noise, predicted(model, noise), s, 1.0)
    assert max(other["ssim"]) < s.min_ssim and other["success_rate"] == 0.0 and other["mean_spoofed_radius"] == 0.0
    with pytest.raises(ValueError, match="min_ssim"):
        BenchSettings(min_ssim=0.0)
