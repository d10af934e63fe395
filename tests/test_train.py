import pytest
import torch

from shadowlab.attacks import pgd
from shadowlab.cli.main import main
from shadowlab.data import load_cifar10
from shadowlab.defenses.train import TrainConfig, accuracy, adversarial_batch, augment_batch, train
from shadowlab.models import build


def test_augment_is_crop_and_flip():
    x = torch.rand(8, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # zero shift and no flip reproduces the input exactly for some samples across many draws
    g = torch.Generator().manual_seed(1)
    hits = sum(bool(torch.equal(augment_batch(x[:1], g, pad=0), x[:1])) for _ in range(20))
    assert 0 < hits < 20  # pad 0: only flips change the image


def _small_data():
    x, y, _ = load_cifar10("test", n=256, source="subset")
    return x, y


@pytest.mark.parametrize("defense, sigma", [("none", 0.0), ("gaussian", 0.25)])
def test_loss_falls_and_is_deterministic(defense, sigma):
    x, y = _small_data()
    cfg = TrainConfig(
        arch="cnn-2layer",
        defense=defense,
        sigma=sigma,
        epochs=8,
        batch_size=64,
        optimizer="adam",
        lr=3e-3,
        weight_decay=0.0,
        augment=False,
        seed=3,
    )
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = build("cnn-2layer", width=2, linear_size=64)
        summary = train(model, x, y, cfg, device="cpu", progress=False)
        runs.append((summary, model))
    losses = runs[0][0]["epoch_losses"]
    assert losses[-1] < losses[0] - 0.2
    assert runs[0][0]["epoch_losses"] == runs[1][0]["epoch_losses"]
    assert accuracy(runs[0][1], x, y, device="cpu") > 0.3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"defense": "mixup"}, "defense='mixup'"),
        ({"defense": "gaussian", "sigma": 0.0}, "sigma > 0"),
        ({"sigma": -1.0}, "sigma=-1.0"),
        ({"eps": -0.1}, "eps=-0.1"),
        ({"epochs": 0}, "epochs=0"),
        ({"optimizer": "lbfgs"}, "optimizer='lbfgs'"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_cli_writes_checkpoint(tmp_path, fake_jpeg_archive):
    rc = main(
        [
            "train",
            "--jpeg",
            str(fake_jpeg_archive),
            "--arch",
            "cnn-2layer",
            "--arch-kwargs",
            '{"width": 1, "linear_size": 16}',
            "--defense",
            "gaussian",
            "--sigma",
            "0.12",
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--max-steps",
            "3",
            "--source",
            "jpeg",
            "--n-train",
            "30",
            "--n-test",
            "30",
            "--out-dir",
            str(tmp_path),
            "--name",
            "smoke",
            "--init-scheme",
            "ibp",
        ]
    )
    assert rc == 0
    import json

    meta = json.loads((tmp_path / "smoke.json").read_text())
    assert meta["defense_parameter"] == {"sigma": 0.12} and meta["steps"] == 3
    assert set(meta["metrics"]) == {"clean_accuracy", "noisy_accuracy"}
    assert meta["command"].startswith("python -m shadowlab train")
    assert meta["recipe"]["init_scheme"] == "ibp" and "--init-scheme ibp" in meta["command"]


def test_train_cli_rejects_bad_input(capsys):
    assert main(["train", "--defense", "gaussian", "--sigma", "0", "--source", "subset"]) == 2
    assert "sigma" in capsys.readouterr().err


def test_crown_ibp_schedule_warmup_ramp_and_beta_fraction():
    from shadowlab.defenses.train import crown_ibp_schedule

    cfg = TrainConfig(defense="crown-ibp", eps=0.1, warmup_frac=0.1, ramp_frac=0.5, kappa_end=0.5,
                      beta_frac=0.5, train_eps_factor=1.0)
    total = 100
    assert crown_ibp_schedule(5, total, cfg) == (0.0, 1.0, 1.0, 0.0)  # warm-up: eps 0, pure natural loss
    eps, beta, kappa, _ = crown_ibp_schedule(10 + 25, total, cfg)  # half-way up the ramp
    assert eps == pytest.approx(0.05) and kappa == pytest.approx(0.75) and beta == pytest.approx(0.0)
    eps, beta, kappa, _ = crown_ibp_schedule(10 + 10, total, cfg)  # a fifth of the ramp: beta 40% of its way down
    assert beta == pytest.approx(0.6) and eps == pytest.approx(0.02)
    assert crown_ibp_schedule(99, total, cfg) == (pytest.approx(0.1), 0.0, pytest.approx(0.5), 0.0)


def test_warmup_regulariser_weight_fades_over_the_ramp():
    from shadowlab.defenses.train import crown_ibp_schedule

    cfg = TrainConfig(defense="crown-ibp", eps=0.1, warmup_frac=0.1, ramp_frac=0.5, warmup_reg=0.4)
    regs = [crown_ibp_schedule(step, 100, cfg)[3] for step in (5, 10, 35, 60, 99)]
    assert regs == pytest.approx([0.4, 0.4, 0.2, 0.0, 0.0])  # full in the warm-up, 0 once eps reaches its target
    # the weight follows the ramp, not eps, so eps = 0 (no robust loss) is no special case
    zero = TrainConfig(defense="crown-ibp", eps=0.0, warmup_frac=0.1, ramp_frac=0.5, warmup_reg=0.4)
    assert crown_ibp_schedule(35, 100, zero)[3] == pytest.approx(0.2)


def test_beta_start_zero_is_plain_ibp_training():
    from shadowlab.defenses.train import crown_ibp_schedule

    cfg = TrainConfig(defense="crown-ibp", eps=0.1, warmup_frac=0.1, ramp_frac=0.5, beta_start=0.0, beta_frac=0.5)
    betas = [crown_ibp_schedule(step, 100, cfg)[1] for step in range(100)]
    assert betas == [0.0] * 100
    half = TrainConfig(defense="crown-ibp", eps=0.1, warmup_frac=0.0, ramp_frac=1.0, beta_start=0.5, beta_frac=1.0)
    assert crown_ibp_schedule(50, 100, half)[1] == pytest.approx(0.25)


@pytest.mark.parametrize("schedule,final_lr", [("step", 1e-5), ("constant", 1e-3)])
def test_adam_learning_rate_schedule(schedule, final_lr):
    from shadowlab.defenses.train import make_optimizer

    cfg = TrainConfig(defense="crown-ibp", eps=0.1, optimizer="adam", lr=1e-3, ramp_frac=0.6, lr_schedule=schedule)
    opt, sched = make_optimizer(torch.nn.Linear(2, 2), cfg, total=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(final_lr)
    if schedule == "step":  # decays after the ramp (60% of the steps): at 80% and 90%
        assert lrs[79] == pytest.approx(1e-3) and lrs[80] == pytest.approx(1e-4) and lrs[90] == pytest.approx(1e-5)


@pytest.mark.parametrize("field,value", [("beta_frac", 0.0), ("beta_frac", 1.5), ("ramp_frac", -0.1),
                                         ("warmup_frac", 2.0), ("beta_start", -0.1), ("beta_end", 1.5),
                                         ("kappa_end", -1.0), ("lr_schedule", "cosine"), ("warmup_reg", -0.5),
                                         ("warmup_reg", float("nan"))])
def test_schedule_fractions_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(defense="crown-ibp", eps=0.1, **{field: value})


def test_ibp_initialisation_keeps_interval_bounds_from_exploding():
    import math

    from shadowlab.certify.bounds import ibp_bounds
    from shadowlab.defenses.train import ibp_initialise

    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    widths = {}
    for scheme in ("default", "ibp"):
        torch.manual_seed(0)
        model = build("cnn-4layer", width=1, linear_size=512)
        last = model[-1].weight.clone()
        if scheme == "ibp":
            ibp_initialise(model)
            layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            for layer in layers[:-1]:
                fan_in = layer.weight[0].numel()
                assert layer.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.15)
            assert torch.equal(model[-1].weight, last)  # the last layer keeps its default initialisation
        with torch.no_grad():
            lo, hi = ibp_bounds(model, x, 0.01)
        widths[scheme] = (hi - lo).mean().item()
    # input width 0.02 / std ~ 0.08 after normalisation: the IBP init keeps the output width of that order,
    # PyTorch's default init lets it grow by orders of magnitude through 7 layers
    assert widths["ibp"] < 2.0 and widths["default"] > 50 * widths["ibp"]


def test_init_scheme_is_validated():
    with pytest.raises(ValueError, match="init_scheme='xavier'"):
        TrainConfig(init_scheme="xavier")
    with pytest.raises(ValueError, match="init_scheme='ibp'.*init='cnn-undefended'"):
        TrainConfig(init_scheme="ibp", init="cnn-undefended")


def test_train_applies_the_init_scheme_of_its_config():
    from shadowlab.defenses.train import ibp_initialise

    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    cfg = TrainConfig(arch="cnn-2layer", defense="crown-ibp", eps=0.01, optimizer="adam", lr=0.0, weight_decay=0.0,
                      epochs=1, batch_size=8, augment=False, init_scheme="ibp")
    torch.manual_seed(1)
    trained = build("cnn-2layer", width=1, linear_size=16)
    train(trained, x, y, cfg, device="cpu", progress=False)  # lr 0: the weights stay as initialised
    torch.manual_seed(1)
    expected = build("cnn-2layer", width=1, linear_size=16)
    ibp_initialise(expected)
    for a, b in zip(trained.parameters(), expected.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_cli_plain_ibp_recipe_reaches_the_sidecar(tmp_path, fake_jpeg_archive, monkeypatch):
    import shadowlab.certify.bounds

    calls = []
    crown = shadowlab.certify.bounds._crown
    monkeypatch.setattr(shadowlab.certify.bounds, "_crown", lambda *a, **k: calls.append(a[1]) or crown(*a, **k))
    args = ["train", "--jpeg", str(fake_jpeg_archive), "--source", "jpeg", "--arch", "cnn-2layer",
            "--arch-kwargs", '{"width": 1, "linear_size": 16}', "--defense", "crown-ibp", "--eps", "2/255",
            "--optimizer", "adam", "--lr", "1e-3", "--epochs", "2", "--batch-size", "10", "--n-train", "30",
            "--n-test", "30", "--n-verify", "10", "--warmup-frac", "0", "--beta-start", "0", "--beta-end", "0",
            "--lr-schedule", "constant", "--out-dir", str(tmp_path), "--name", "plain-ibp"]
    assert main(args) == 0
    import json

    meta = json.loads((tmp_path / "plain-ibp.json").read_text())
    assert meta["recipe"]["beta_start"] == 0.0 and meta["recipe"]["lr_schedule"] == "constant"
    assert "--beta-start 0" in meta["command"] and meta["steps"] == 6
    assert 0.0 <= meta["metrics"]["ibp_verified_error"] <= 1.0
    assert calls == ["ibp"]  # plain IBP: no CROWN pass while training; one CROWN-IBP pass for the verified error


def test_train_cli_batch_norm_and_warmup_regularizer_reach_the_checkpoint(tmp_path, fake_jpeg_archive, monkeypatch):
    import json

    import shadowlab.certify.bounds
    from shadowlab import checkpoints
    from shadowlab.defenses import train as train_module

    weights = []  # the regulariser weight of every robust-loss call (train's own name for the loss)
    loss = train_module.crown_ibp_training_loss
    monkeypatch.setattr(train_module, "crown_ibp_training_loss", lambda *a: weights.append(a[5]) or loss(*a))
    args = ["train", "--jpeg", str(fake_jpeg_archive), "--source", "jpeg", "--arch", "cnn-2layer",
            "--arch-kwargs", '{"width": 1, "linear_size": 16, "batch_norm": true}', "--defense", "crown-ibp",
            "--eps", "2/255", "--optimizer", "adam", "--lr", "1e-3", "--epochs", "2", "--batch-size", "10",
            "--n-train", "30", "--n-test", "30", "--n-verify", "10", "--warmup-frac", "0", "--ramp-frac", "1",
            "--warmup-reg", "0.4", "--init-scheme", "ibp", "--out-dir", str(tmp_path), "--name", "bn-reg"]
    assert main(args) == 0
    meta = json.loads((tmp_path / "bn-reg.json").read_text())
    assert meta["recipe"]["warmup_reg"] == 0.4 and "--warmup-reg 0.4" in meta["command"]
    # the regulariser's weight fades linearly from 0.4 as eps ramps up over the 6 steps (step 0 has eps 0: no bound)
    assert weights == pytest.approx([0.4 * (1 - t / 6) for t in range(1, 6)])
    model, _ = checkpoints.load(tmp_path / "bn-reg.safetensors")
    norms = [m for m in model if isinstance(m, shadowlab.certify.bounds.BATCH_NORMS)]
    assert len(norms) == 3 and not model.training
    assert all(int(bn.num_batches_tracked) == 6 and not torch.all(bn.running_var == 1) for bn in norms)
    assert 0.0 <= meta["metrics"]["verified_error"] <= 1.0


def test_adversarial_batch_stays_in_the_ball_and_leaves_batch_norm_alone():
    x, y = _small_data()
    torch.manual_seed(0)
    model = build("cnn-2layer", width=2, linear_size=64, batch_norm=True).train()
    cfg = TrainConfig(arch="cnn-2layer", defense="pgd", eps=4 / 255, pgd_steps=3, seed=1)
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x_adv = adversarial_batch(model, x[:32], y[:32], cfg, step=5)
    assert model.training
    assert not x_adv.requires_grad and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x[:32]).abs().max() <= 4 / 255 + 1e-6 and (x_adv - x[:32]).abs().max() > 3 / 255
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))
    assert torch.equal(x_adv, adversarial_batch(model, x[:32], y[:32], cfg, step=5))


def test_pgd_training_raises_pgd_accuracy_over_natural_training():
    x, y, _ = load_cifar10("test", n=1000, source="subset")
    x_eval, y_eval, x_train, y_train = x[:200], y[:200], x[200:], y[200:]
    robust = {}
    for defense in ("none", "pgd"):
        torch.manual_seed(0)
        model = build("cnn-2layer", width=2, linear_size=64)
        cfg = TrainConfig(arch="cnn-2layer", defense=defense, eps=4 / 255 if defense == "pgd" else 0.0, pgd_steps=3,
                          epochs=6, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0, augment=False, seed=0)
        train(model, x_train, y_train, cfg, device="cpu", progress=False)
        robust[defense] = 1 - pgd(model, x_eval, y_eval, 4 / 255, steps=10, seed=0).success.float().mean().item()
    assert robust["pgd"] > robust["none"] + 0.03, robust


def test_pgd_defense_needs_eps():
    with pytest.raises(ValueError, match="defense='pgd' needs eps > 0"):
        TrainConfig(defense="pgd")
    with pytest.raises(ValueError, match="pgd_steps"):
        TrainConfig(defense="pgd", eps=0.01, pgd_steps=0)
