"""ShadowLab driven headless (no browser): sliders feed the attack, plots update during the run; lesson helpers."""

import math

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from shadowlab import checkpoints, plots  # noqa: E402
from shadowlab.certify.bounds import certified_margins, margin_spec
from shadowlab.checkpoints import resolve as resolve_checkpoint
from shadowlab.data import load_test_images
from shadowlab.defenses.evaluate import accuracy_vs_eps
from shadowlab.lab.adapters import Defense
from shadowlab.lab.notebook import LiveLossPlot, most_likely_wrong, sweep
from shadowlab.lab.widgets import ShadowLab
from shadowlab.shadow.config import ShadowConfig, ShadowResult  # noqa: E402
from tests.conftest import TINY_CROWN, predicted, tiny_crown_cnn  # noqa: E402


@pytest.fixture
def lab() -> ShadowLab:
    """A fresh lab per test (tests move its sliders and switch its defense)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=gen)
    y = torch.tensor([0, 1, 2])
    defenses = [Defense("smooth-tiny", "smoothing", tiny_crown_cnn(0), sigma=0.25),
                Defense("crown-tiny", "crown-ibp", tiny_crown_cnn(1), eps=2 / 255)]
    return ShadowLab(x, y, defenses, steps=4, noise_samples=4, plot_every=2, certify_every=2, certify_n0=8,
                     certify_n=16, device="cpu", dpi=30)


def test_constructed_lab_shows_sliders_and_an_initial_figure(lab):
    assert lab.w_defense.value == "smooth-tiny"
    assert lab.w_target.value != int(lab.y[lab.w_image.value])          # a wrong class is preselected
    assert int(lab.y[0]) not in [v for _, v in lab.w_target.options]
    assert lab.w_figure.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert lab.w_lambda_s.disabled                                         # 1 channel: Dissim is 0 anyway
    assert lab.widget.children                                             # displayable VBox


def test_sliders_drive_the_attack_and_the_plots_update_during_the_run(lab):
    lab.run(defense="smooth-tiny", channels=1, image=0, steps=4)
    before = lab.w_figure.value
    lab.w_lambda_tv.value = 0.2                 # what a student does with the mouse
    lab.w_lambda_c.value = 0.01
    updates = []                                # (number of steps recorded when the PNG changed)
    def record(change):
        updates.append(len(lab.history.get("total", [])))

    lab.w_figure.observe(record, names="value")
    try:
        result = lab.run(steps=6)
    finally:
        lab.w_figure.unobserve(record, names="value")
    assert isinstance(result, ShadowResult)
    assert result.config.lambda_tv == pytest.approx(0.2) and result.config.lambda_c == pytest.approx(0.01)
    assert result.config.steps == 6 and result.config.noise_samples == 4
    assert len(lab.history["total"]) == 6 and all(math.isfinite(v) for v in lab.history["total"])
    for term in ("classification", "color", "tv", "dissim"):
        assert len(lab.history[term]) == 6
    assert any(n < 6 for n in updates), f"figure only redrawn after the attack: {updates}"
    assert lab.w_figure.value != before
    assert lab.certificate and all("spoofed_radius" in c and c["spoofed_radius"] >= 0 for c in lab.certificate)
    assert lab.certificate[-1]["step"] == 5
    # the lab judges with the one definition: certified as the target AND SSIM >= the min SSIM slider
    assert result.config.min_ssim == pytest.approx(lab.w_min_ssim.value)
    for c in lab.certificate:
        assert c["success"] == (c["certified"] and c["ssim"] >= result.config.min_ssim)
    assert "SSIM" in lab.w_status.value
    assert "done" in lab.w_status.value and "λ_tv=0.2" in lab.w_status.value
    assert not lab.w_run.disabled and lab.w_run.description == "Run"


def test_run_button_takes_the_same_path(lab):
    runs = lab.runs
    lab.w_steps.value = 2
    lab.w_run.click()
    assert lab.runs == runs + 1
    assert len(lab.history["total"]) == 2


def test_three_channels_use_lambda_s(lab):
    result = lab.run(channels=3, lambda_s=5.0, steps=2)
    assert not lab.w_lambda_s.disabled
    assert result.config.channels == 3 and result.config.lambda_s == pytest.approx(5.0)
    assert lab.history["dissim"][-1] > 0
    result = lab.run(channels=1, steps=2)
    assert result.config.lambda_s == 0.0 and max(lab.history["dissim"]) == 0.0


def test_crown_ibp_defense_loads_paper_settings_and_plots_margin_bounds(lab):
    result = lab.run(defense="crown-tiny", image=1, target=7, steps=3)
    paper = ShadowConfig.paper_crown_ibp()
    assert result.method == "crown-ibp" and int(result.target[0]) == 7
    assert result.config.lambda_c == 0.0                                    # slider at its minimum means "off"
    assert result.config.lambda_tv == pytest.approx(paper.lambda_tv) and result.config.l2_penalty == paper.l2_penalty
    assert lab.certificate and all(len(c["margins"]) == 9 for c in lab.certificate)
    assert "certified" in lab.w_status.value
    lab.run(defense="smooth-tiny", image=0, steps=2)                       # back to smoothing defaults
    assert lab.config().lambda_c == pytest.approx(1.0)


def test_bad_settings_raise_value_errors_naming_them(lab):
    with pytest.raises(ValueError, match="bogus"):
        lab.run(bogus=1)
    with pytest.raises(ValueError, match="lambda_tv"):
        lab.run(lambda_tv=-1.0)
    with pytest.raises(ValueError, match="steps"):
        lab.run(steps=10_000)
    with pytest.raises(ValueError, match="steps"):
        lab.run(steps=2.5)
    with pytest.raises(ValueError, match="target"):
        lab.run(image=0, target=int(lab.y[0]))
    with pytest.raises(ValueError, match="defense"):
        lab.run(defense="nope")


def test_from_checkpoints_and_defense_metadata(models_tmp):
    checkpoints.save(tiny_crown_cnn(0), "smooth-sigma0.50", arch="cnn-2layer", arch_kwargs=TINY_CROWN,
                     defense="gaussian", defense_parameter={"sigma": 0.5})
    checkpoints.save(tiny_crown_cnn(1), "crownibp-tiny-eps8", arch="cnn-2layer", arch_kwargs=TINY_CROWN,
                     defense="crown-ibp", defense_parameter={"eps": 8 / 255})
    assert resolve_checkpoint("crownibp-*-eps8") == "crownibp-tiny-eps8"
    with pytest.raises(ValueError, match="no checkpoint matches"):
        resolve_checkpoint("crownibp-*-eps2")
    lab = ShadowLab.from_checkpoints(n_images=2, source="subset", device="cpu", steps=2, noise_samples=2,
                                     certify_n0=4, certify_n=8, dpi=30)
    assert [d.kind for d in lab.defenses.values()] == ["smoothing", "crown-ibp"]
    assert lab.defense.sigma == 0.5 and lab.defenses["crownibp-tiny-eps8"].eps == pytest.approx(8 / 255)


def test_live_loss_plot_collects_records_without_a_notebook():
    live = LiveLossPlot(["loss", "tv"], every=1, display=False)
    for step in range(3):
        live(step, {"loss": 3.0 - step, "tv": 0.5, "ignored": 1.0})
    assert live.history == {"loss": [3.0, 2.0, 1.0], "tv": [0.5, 0.5, 0.5]}
    live.finish()
    assert live.renders == 1
    with pytest.raises(ValueError, match="every"):
        LiveLossPlot(["loss"], every=0)


def test_certified_margins_are_exact_at_eps_zero_and_targets_are_wrong():
    model = tiny_crown_cnn(2)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        z = model(x)
    spec = margin_spec(torch.tensor([3]), 10)
    lb = certified_margins(model, x[:1], 0.0, spec)
    expected = torch.stack([z[0, 3] - z[0, j] for j in range(10) if j != 3])
    torch.testing.assert_close(lb[0], expected, rtol=1e-4, atol=1e-4)
    assert (certified_margins(model, x[:1], 8 / 255, spec) <= lb + 1e-5).all()  # a bigger ball, looser bounds
    t = most_likely_wrong(model, x, y)
    assert (t != y).all()
    masked = z.clone()
    masked[torch.arange(4), y] = -math.inf
    assert torch.equal(t, masked.argmax(1))


def test_accuracy_vs_eps_is_the_accuracy_on_the_attacks_outputs():
    from shadowlab.attacks import fgsm, pgd

    model = tiny_crown_cnn(3)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    y = predicted(model, x)                          # the model is right on every image

    def accuracy(x_adv):
        return float((predicted(model, x_adv) == y).float().mean())

    accs = accuracy_vs_eps(model, x, y, [0.0, 8 / 255], attack="pgd", device="cpu", steps=3)
    assert accs.shape == (2,) and accs[0] == 1.0
    assert accs[1] == pytest.approx(accuracy(pgd(model, x, y, 8 / 255, steps=3).x_adv))
    assert accs[1] < 1.0                             # 8/255 fools the tiny model on some image
    fgsm_accs = accuracy_vs_eps(model, x, y, [8 / 255, 16 / 255], device="cpu")
    assert fgsm_accs.tolist() == pytest.approx([accuracy(fgsm(model, x, y, e).x_adv) for e in (8 / 255, 16 / 255)])
    with pytest.raises(ValueError, match="attack"):
        accuracy_vs_eps(model, x, y, [0.0], attack="cw")


def test_sweep_runs_every_combination():
    base = ShadowConfig(steps=2)
    records = sweep(lambda c: (c.lambda_tv, c.lambda_c), base, {"lambda_tv": [0.1, 0.2], "lambda_c": [2.0, 3.0, 4.0]})
    assert len(records) == 6
    assert all(r["result"] == (r["lambda_tv"], r["lambda_c"]) for r in records)
    with pytest.raises(ValueError, match="not fields"):
        sweep(lambda c: None, base, {"lambda_x": [1]})


def test_visible_perturbation_and_lesson_figures():
    delta = torch.zeros(2, 3, 4, 4)
    delta[0, 0, 0, 0], delta[1, 1, 1, 1] = 0.1, -0.02
    vis = plots.visible_perturbation(delta)
    assert vis.shape == delta.shape
    assert vis[0, 0, 0, 0] == pytest.approx(1.0) and vis[1, 1, 1, 1] == pytest.approx(0.0)   # per image gain
    assert vis[0, 2, 3, 3] == pytest.approx(0.5)                                             # grey = no change
    with pytest.raises(ValueError, match="factor"):
        plots.visible_perturbation(delta, factor=-1.0)
    x = torch.rand(3, 3, 8, 8)
    fig = plots.plot_perturbations(x, (x + 0.05).clamp(0, 1), labels=["a", "b", "c"])
    assert len(fig.axes) == 9
    ax = plots.plot_heatmap(np.arange(6.0).reshape(2, 3), [1, 2, 3], [0.1, 1.0], title="map")
    assert len(ax.texts) == 6
    hist = {"tv": torch.tensor([3.0, 2.0]), "per_candidate": {"tv": torch.tensor([[[3.0], [3.0]], [[2.0], [2.0]]])}}
    axes = plots.plot_loss_terms(hist, terms=("tv",))
    assert len(axes[0].lines) == 3                                       # two candidates and the mean
    with pytest.raises(ValueError, match="titles"):
        plots.show_images(x, titles=["only one"])
    import matplotlib.pyplot as plt

    plt.close("all")


def test_load_test_images_gives_one_image_per_class_first():
    x, y, classes = load_test_images(10, "cpu", source="subset")
    assert x.shape == (10, 3, 32, 32) and sorted(y.tolist()) == list(range(10)) and len(classes) == 10


def test_a_new_defense_is_one_adapter_class(monkeypatch):
    """The lab asks the defense's adapter for everything kind-specific: a registered adapter is all a new kind needs."""
    from shadowlab.lab.adapters import ADAPTERS, CrownIbpAdapter

    class BoxAdapter(CrownIbpAdapter):
        kind, checkpoint_defense = "box", "box"

        @classmethod
        def describe(cls, defense):
            return f"box, eps={defense.eps:g} ({defense.name})"

        def status_text(self, natural, last):
            return "box says " + ("certified" if last is not None and last["certified"] else "not yet")

    monkeypatch.setitem(ADAPTERS, "box", BoxAdapter)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    lab = ShadowLab(x, torch.tensor([0, 1]), [Defense("b", "box", tiny_crown_cnn(5), eps=0.0)], steps=2,
                    plot_every=1, certify_every=1, device="cpu", dpi=20)
    assert lab.w_defense.label == "box, eps=0 (b)"
    assert lab.config().lambda_c == 0.0                     # inherits "no colour term": the slider sits at its minimum
    result = lab.run(target=3)
    assert result.method == "crown-ibp" and int(result.target[0]) == 3
    assert [c["step"] for c in lab.certificate] == [0, 1] and all(len(c["margins"]) == 9 for c in lab.certificate)
    assert "box says" in lab.w_status.value
    with pytest.raises(ValueError, match="kind='boxes' is unknown"):
        Defense("c", "boxes", tiny_crown_cnn(5), eps=0.0)
