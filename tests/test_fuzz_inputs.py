"""Hostile and careless inputs, generated: every public entry point answers a ValueError / TypeError that names the
argument (raised by shadowlab, never a raw torch error from deep inside), and the CLI answers one line on stderr with
exit status 2, never a traceback, never exit 0 on a wrong kind of model. Hypothesis runs derandomized (the same
examples every run)."""

from __future__ import annotations

import math
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowlab.attacks import fgsm, pgd
from shadowlab.certify import bounds
from shadowlab.certify.smoothing import Smooth, lower_confidence_bound
from shadowlab.cli.main import main
from shadowlab.models import build

SHADOWLAB = str(Path(__file__).resolve().parents[1] / "shadowlab")
FUZZ = settings(derandomize=True, max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

torch.manual_seed(0)
MODEL = build("cnn-2layer", width=1, linear_size=16).eval()   # 3 x 32 x 32 -> 10 logits
X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 7])


def refused(call, *names: str) -> str:
    """Run call; assert it raises ValueError / TypeError naming one of ``names``, raised in shadowlab's code."""
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    message = str(info.value)
    assert any(n in message for n in names), f"message does not name {names}: {message!r}"
    frames = traceback.extract_tb(info.tb)
    assert frames[-1].filename.startswith(SHADOWLAB), f"raised outside shadowlab: {frames[-1]}: {message!r}"
    assert "\n" not in message.strip(), message
    return message


# --------------------------------------------------------------------------------------------- generated inputs
def bad_images() -> st.SearchStrategy:
    """Things that are not an N x 3 x 32 x 32 float batch in [0, 1] for MODEL."""
    shapes = st.sampled_from([(2, 1, 32, 32), (2, 2, 32, 32), (2, 4, 32, 32), (2, 3, 28, 28), (2, 3, 16, 16),
                              (2, 3, 33, 31), (3, 32, 32, 1), (2, 3 * 32 * 32), (0, 3, 32, 32), (2, 1, 3, 32, 32)])
    wrong_shape = shapes.map(lambda s: torch.rand(s, generator=torch.Generator().manual_seed(1)))
    wrong_values = st.sampled_from([math.nan, math.inf, -0.5, 1.5]).map(lambda v: X.clone().index_put_(
        (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])), torch.tensor(v)))
    wrong_type = st.sampled_from([None, True, 3.0, "x", [[0.5]], X.numpy(), (X * 255).to(torch.uint8),
                                  X.to(torch.complex64), X > 0.5])
    return st.one_of(wrong_shape, wrong_values, wrong_type)


def bad_labels() -> st.SearchStrategy:
    """Things that are not 2 class indices in [0, 10)."""
    return st.one_of(
        st.sampled_from([[-1, 0], [0, 10], [3, 1000]]).map(torch.tensor),
        st.sampled_from([torch.tensor([1.0, 2.0]), torch.tensor([True, False]), torch.tensor([[1, 2]]),
                         torch.tensor([1, 2, 3]), torch.tensor(1), [1, 7], np.array([1, 7]), None]))


def bad_numbers(low_ok: float = 0.0) -> st.SearchStrategy:
    """Not a finite real number (bools, NaN, infinities, strings, None, complex, tensors with several values)."""
    return st.sampled_from([True, False, math.nan, math.inf, -math.inf, "0.1", None, 1j, torch.tensor([0.1, 0.2]),
                            np.bool_(True)])


def bad_counts(minimum: int = 1) -> st.SearchStrategy:
    """Not an integer >= minimum (1 for sample counts and steps, 0 for seeds)."""
    return st.sampled_from([minimum - 1, -1, 2.5, True, math.nan, "10", None, 1e3])


# --------------------------------------------------------------------------------------------- the API
@FUZZ
@given(bad_images())
def test_attacks_refuse_bad_images(x):
    refused(lambda: pgd(MODEL, x, Y, eps=8 / 255, steps=1), "x")
    refused(lambda: fgsm(MODEL, x, Y, eps=8 / 255), "x")


@FUZZ
@given(bad_labels())
def test_attacks_refuse_bad_labels(y):
    refused(lambda: pgd(MODEL, X, y, eps=8 / 255, steps=1), "y")
    refused(lambda: fgsm(MODEL, X, y, eps=8 / 255), "y")


@FUZZ
@given(st.sampled_from(["eps", "steps", "restarts", "seed", "step_size"]), st.data())
def test_pgd_refuses_bad_numbers(name, data):
    value = data.draw(bad_counts(0 if name in ("seed", "restarts") else 1) if name in ("steps", "restarts", "seed")
                      else bad_numbers().filter(lambda v: v is not None))   # step_size None: the default
    kwargs = {"eps": 8 / 255, "steps": 1, name: value}
    refused(lambda: pgd(MODEL, X, Y, **kwargs), name)


SMOOTH = Smooth(MODEL, 10, 0.25, device="cpu")


@FUZZ
@given(bad_images())
def test_smoothing_refuses_bad_images(x):
    if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] == 3:
        return   # one C x H x W image is a batch of one by contract
    refused(lambda: SMOOTH.certify(x, n0=4, n=8, alpha=0.01), "x")
    refused(lambda: SMOOTH.predict(x, n=8, alpha=0.01), "x")


@FUZZ
@given(st.sampled_from(["n0", "n", "alpha", "batch_size", "seed"]), st.data())
def test_smoothing_refuses_bad_numbers(name, data):
    bad = bad_numbers() if name == "alpha" else bad_counts(0 if name == "seed" else 1)
    # batch_size=None is the Smooth's own chunk (certify.smoothing.default_batch_size), not a bad value
    value = data.draw(bad.filter(lambda v: v is not None) if name == "batch_size" else bad)
    kwargs = {"n0": 4, "n": 8, "alpha": 0.01, name: value}
    refused(lambda: SMOOTH.certify(X, **kwargs), name)
    if name != "n0":
        refused(lambda: SMOOTH.predict(X, **{k: v for k, v in kwargs.items() if k != "n0"}), name)


@FUZZ
@given(bad_numbers())
def test_smooth_refuses_a_bad_sigma_or_class_count(value):
    refused(lambda: Smooth(MODEL, 10, value, device="cpu"), "sigma")
    refused(lambda: Smooth(MODEL, value, 0.25, device="cpu"), "num_classes")


def test_smooth_refuses_a_class_count_other_than_the_models():
    refused(lambda: Smooth(MODEL, 5, 0.25, device="cpu").certify(X, 4, 8, 0.01), "num_classes")


@FUZZ
@given(st.sampled_from([(2.5, 3), (1, 2.5), (-1, 3), (4, 3), (1, 0), (True, 3), (1, True), (math.nan, 3),
                        (np.array([1.5, 2]), 3), ("1", 3), (None, 3), (np.array([1, 2]), np.array([3, 4, 5]))]))
def test_lower_confidence_bound_refuses_non_counts(args):
    refused(lambda: lower_confidence_bound(*args, 0.001), "n_a", "n=")


def test_lower_confidence_bound_still_takes_counts():
    assert lower_confidence_bound(990, 1000, 0.001) == pytest.approx(0.976, abs=1e-3)
    assert lower_confidence_bound(np.int64(5), 10.0, 0.01) > 0
    assert lower_confidence_bound(np.array([0, 5]), 10, 0.01).shape == (2,)


C = bounds.margin_spec(Y, 10)


@FUZZ
@given(st.sampled_from(["ibp", "crown-ibp", "crown"]), st.sampled_from(["nan-spec", "inf-spec", "nan-x", "bad-eps",
                                                                       "int-spec", "shape-spec"]))
def test_bounds_refuse_nan_specs_boxes_and_budgets(method, what):
    x, eps, spec = X, 2 / 255, C.clone()
    if what == "nan-spec":
        spec[0, 0, 0] = math.nan
    elif what == "inf-spec":
        spec[1, 2, 3] = math.inf
    elif what == "nan-x":
        x = X.clone()
        x[0, 0, 0, 0] = math.nan
    elif what == "bad-eps":
        eps = True
    elif what == "int-spec":
        spec = spec.long()
    else:
        spec = spec[:, :, :5]
    name = {"nan-spec": "C", "inf-spec": "C", "nan-x": "x", "bad-eps": "eps", "int-spec": "C", "shape-spec": "C"}[what]
    if what == "int-spec":   # an integer specification is a valid linear function: it is cast, not refused
        assert bounds.lower_bounds(MODEL, x, eps, spec, method).shape == (2, 9)
        return
    refused(lambda: bounds.lower_bounds(MODEL, x, eps, spec, method), name)


@FUZZ
@given(st.sampled_from(["nan-lo", "nan-hi", "inf-hi", "empty", "shape", "int"]))
def test_box_bounds_refuse_nan_and_empty_boxes(what):
    lo, hi = (X - 0.01).clamp(0, 1), (X + 0.01).clamp(0, 1)
    if what == "nan-lo":
        lo = lo.clone()
        lo[0, 0, 0, 0] = math.nan
    elif what == "nan-hi":
        hi = hi.clone()
        hi[1, 2, 3, 4] = math.nan
    elif what == "inf-hi":
        hi = hi.clone()
        hi[1, 2, 3, 4] = math.inf
    elif what == "empty":
        lo, hi = hi, lo
    elif what == "shape":
        hi = hi[:, :1]
    else:
        lo, hi = lo.long(), hi.long()
    refused(lambda: bounds.box_lower_bounds(MODEL, lo, hi, C, "ibp"), "lo", "hi")


# --------------------------------------------------------------------------------------------- the CLI
class WorkStarted(Exception):
    """Raised when a command got past its checks: the fuzzer's inputs must all be refused before any work."""


@pytest.fixture
def no_work(monkeypatch):
    from shadowlab.cli import commands  # the train command's own name for train (imported at its top)
    from shadowlab.experiments import reproduce, runs

    def started(*a, **k):
        raise WorkStarted

    monkeypatch.setattr(runs, "run_images", started)
    monkeypatch.setattr(reproduce, "run_images", started)
    monkeypatch.setattr(commands, "train", started)


COMMON = ["--device", "cpu", "--source", "subset"]
T1 = ["reproduce", "table1", "--sigmas", "0.25", "--n-images", "1", "--n", "16", "--n0", "4", "--steps", "1"]
T2 = ["reproduce", "table2", "--models", "crownibp-cnn-2layer-eps2", "--n-images", "1", "--steps", "1"]
CS = ["certify", "smoothing", "--model", "smooth-sigma0.25", "--n-images", "1", "--n", "16", "--n0", "4"]
CC = ["certify", "crown-ibp", "--model", "crownibp-cnn-2layer-eps2", "--n-images", "1", "--pgd-steps", "0"]
TR = ["train", "--arch", "cnn-2layer", "--epochs", "1", "--n-train", "10", "--n-test", "10", "--name", "fuzz-x"]
BAD_OPTIONS = [
    (T1, "--seed", ["-1", "x", "1.5"]), (T1, "--device", ["cuda", "foo", "cuda:7", ""]),
    (T1, "--n-images", ["0", "-3", "abc"]), (T1, "--n", ["0", "nan"]), (T1, "--alpha", ["0", "1", "nan", "-1"]),
    (T1, "--sigmas", ["-0.25", "nan", "0"]), (T1, "--chunk", ["0", "-1"]), (T1, "--min-ssim", ["0", "2", "nan"]),
    (T1, "--model-template", ["crownibp-cnn-2layer-eps2", "smooth-sigma0.50", "nowhere-{sigma}", "{oops"]),
    (T2, "--models", ["smooth-sigma0.25", "cnn-undefended", "nowhere", "/nonexistent/ckpt"]),
    (T2, "--steps", ["0", "-2"]), (T2, "--device", ["cuda", "tpu"]),
    (CS, "--n", ["0", "-5"]), (CS, "--n0", ["0"]), (CS, "--alpha", ["0", "1.5", "nan"]),
    (CS, "--batch-size", ["0"]), (CS, "--seed", ["-1"]), (CS, "--sigma", ["0", "-1", "nan", "inf"]),
    (CS, "--model", ["../../etc/passwd", "nowhere"]), (CS, "--skip", ["0"]), (CS, "--device", ["cuda"]),
    (CC, "--eps", ["-1/255", "x", "1/0"]), (CC, "--batch-size", ["0"]), (CC, "--model", ["smooth-sigma0.25"]),
    (CC, "--n-images", ["0"]),
    (TR, "--name", ["../x", "a/b", "..", "crownibp-cnn-2layer-eps2"]), (TR, "--seed", ["-1"]),
    (TR, "--arch-kwargs", ["[1, 2]", "{bad", '"width"']), (TR, "--device", ["cuda", "foo"]),
]
CASES = [(cmd, opt, v) for cmd, opt, values in BAD_OPTIONS for v in values]


@pytest.mark.parametrize("cmd, option, value", CASES, ids=[f"{c[0]}-{c[1]}{o}={v}" for c, o, v in CASES])
def test_cli_answers_bad_input_with_one_line_and_exit_2(cmd, option, value, tmp_path, capsys, no_work,
                                                         monkeypatch):
    monkeypatch.setenv("SHADOWLAB_MODELS", str(Path(SHADOWLAB).parent / "data" / "models"))
    argv = [*cmd, *COMMON, option, value]
    if cmd[0] != "train":
        argv += ["--out-dir", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as exc:   # argparse: a value of the wrong type
        code = exc.code
    except WorkStarted:
        pytest.fail(f"{' '.join(argv)}: the command started its work with {option} {value!r}")
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.jsonl"))
