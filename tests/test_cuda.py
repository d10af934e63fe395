"""The CUDA paths against the CPU: the attack, CERTIFY, the bounds, the precision option and a one-rank torchrun run.

Skipped where no GPU is present; `scripts/gpu-check` runs them on one. Tolerances, stated per test: bounds and the
attack's loss agree to float32 rounding (1e-4 relative); CERTIFY draws its noise from a per-device generator, so
CPU and GPU see different samples and agree only statistically (same predictions, radii within what the
Clopper-Pearson bound moves for a few votes at n); bf16 changes the base network, so its certificates agree with
fp32 on predictions and within a few votes.
"""

import json

import pytest
import torch

from shadowlab import checkpoints
from shadowlab.certify.bounds import lower_bounds, margin_spec
from shadowlab.certify.smoothing import Smooth
from shadowlab.data import load_cifar10
from shadowlab.experiments.settings import Table2Settings
from shadowlab.shadow.attack import attack_crown_ibp, attack_smoothing
from shadowlab.shadow.config import ShadowConfig
from tests.conftest import run_one_and_ranks

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: scripts/gpu-check runs these")]
CROWN = "crownibp-cnn-2layer-eps2"
SMOOTH = "smooth-sigma0.25"


def _images(n):
    x, y, _ = load_cifar10("test", n=n, source="subset")
    return x, y


def test_bounds_on_cuda_equal_the_cpu():
    model, meta = checkpoints.load(CROWN, device="cpu")
    eps = float(meta["defense_parameter"]["eps"])
    x, y = _images(16)
    C = margin_spec(y, 10)
    for method in ("ibp", "crown-ibp", "crown"):
        cpu = lower_bounds(model, x[:4], eps, C[:4], method)
        gpu = lower_bounds(model.cuda(), x[:4].cuda(), eps, C[:4].cuda(), method).cpu()
        model.cpu()
        assert torch.allclose(cpu, gpu, rtol=1e-4, atol=1e-4), method


def test_crown_ibp_attack_on_cuda_matches_the_cpu():
    model, meta = checkpoints.load(CROWN, device="cpu")
    eps = float(meta["defense_parameter"]["eps"])
    x, y = _images(4)
    cfg = Table2Settings(steps=20, early_stop_margin=None).shadow_config()
    cpu = attack_crown_ibp(model, eps, x, y, cfg, progress=False, device="cpu")
    gpu = attack_crown_ibp(model, eps, x, y, cfg, progress=False, device="cuda")
    h_cpu, h_gpu = cpu.history["classification"], gpu.history["classification"].cpu()
    assert torch.allclose(h_cpu[:5], h_gpu[:5], rtol=1e-3, atol=1e-4)   # the first steps, before rounding adds up
    assert abs(int(cpu.success.sum()) - int(gpu.success.sum())) <= 1


def test_certify_on_cuda_agrees_with_the_cpu_and_bf16_with_fp32():
    model, _ = checkpoints.load(SMOOTH, device="cpu")
    x, _ = _images(8)
    cpu = Smooth(model, 10, 0.25, device="cpu").certify(x, 100, 2000, 0.001)
    gpu = Smooth(model, 10, 0.25, device="cuda").certify(x, 100, 2000, 0.001)
    bf16 = Smooth(model, 10, 0.25, device="cuda", precision="bf16").certify(x, 100, 2000, 0.001)
    tf32 = Smooth(model, 10, 0.25, device="cuda", precision="tf32").certify(x, 100, 2000, 0.001)
    for other in (gpu, bf16, tf32):
        for a, b in zip(cpu, other):
            assert a.prediction == b.prediction or -1 in (a.prediction, b.prediction)
            if a.prediction == b.prediction != -1:
                assert abs(a.pA_lower - b.pA_lower) < 0.05      # a few dozen votes of 2000
    same_noise = [(a.counts, b.counts) for a, b in zip(gpu, tf32)]
    assert sum(sum(abs(u - v) for u, v in zip(a, b)) for a, b in same_noise) <= 0.01 * 8 * 2000


def test_smoothing_attack_in_bf16_on_cuda_reaches_its_target():
    model, _ = checkpoints.load(SMOOTH, device="cpu")
    x, y = _images(2)
    cfg = ShadowConfig.paper_smoothing(steps=30, noise_samples=32, precision="bf16")
    res = attack_smoothing(model, 0.25, x, y, cfg, targets=(y + 1) % 10, n=1000, progress=False, device="cuda")
    assert torch.isfinite(res.history["classification"]).all()
    assert res.history["classification"][-1] < res.history["classification"][0]


def test_one_rank_torchrun_on_cuda_writes_the_files_of_one_process(tmp_path):
    args = ["reproduce", "table2", "--models", CROWN, "--n-images", "4", "--steps", "5", "--source", "subset",
            "--device", "cuda", "--no-controls"]

    run_one_and_ranks(args, tmp_path / "one", tmp_path / "run", nproc=1, timeout=600)
    a = json.loads((tmp_path / "one" / "table2" / "table2.json").read_text())
    b = json.loads((tmp_path / "run" / "table2" / "table2.json").read_text())
    # GPU kernels need not be bit-reproducible (atomic adds in convolution backward): the verdicts must agree, the
    # margins to 1e-3
    keys = ("index", "label", "prediction", "verified", "target", "spoofed", "success")
    assert [{k: r[k] for k in keys} for r in a["per_image"]] == [{k: r[k] for k in keys} for r in b["per_image"]]
    assert all(abs(r["margin"] - q["margin"]) <= 1e-3 for r, q in zip(a["per_image"], b["per_image"]))
