"""Re-judging a table from its committed files: SSIM again from the 8-bit images, a separate certification."""

import json

import numpy as np
import pytest

from shadowlab import checkpoints
from shadowlab.experiments.rejudge import load_table, rejudge, ssim_figure
from shadowlab.experiments.reproduce import table1, table2


def _need(prefix):
    names = [m for m in checkpoints.available() if m.startswith(prefix)]
    if not names:
        pytest.skip(f"no committed {prefix}* checkpoints")
    return names


def test_rejudge_table2_agrees_exactly_with_the_bounds(tmp_path):
    names = _need("crownibp-")
    res = table2(models=names[:1], n_images=3, steps=3, out_dir=tmp_path, progress=False, source="subset")
    report = rejudge(tmp_path, progress=False)
    assert report["rows"] == 3 and report["max_abs_ssim_difference"] < 1e-5
    assert report["spoofed_agreement"] == 1.0 and report["success_agreement"] == 1.0   # deterministic bounds
    assert report["committed_success_rate"] == pytest.approx(res.rows[0]["success"])
    assert json.loads((tmp_path / "rejudge.json").read_text())["table"] == "table2"
    ssim_figure(tmp_path)
    assert (tmp_path / "table2_ssim_vs_l2.png").exists()


def test_rejudge_table1_recomputes_ssim_and_recertifies(tmp_path):
    _need("smooth-sigma0.25")
    table1(sigmas=(0.25,), n_images=2, n=64, n0=16, n_select=32, steps=2, noise_samples=4, channels=(1,),
           out_dir=tmp_path, progress=False, source="subset")
    report = rejudge(tmp_path, n=64, progress=False)
    assert report["max_abs_ssim_difference"] < 1e-5 and report["success_rows_below_min_ssim"] == 0
    assert 0.0 <= report["spoofed_agreement"] <= 1.0 and report["certify"]["n"] == 64


def test_load_table_refuses_a_mismatched_npz(tmp_path):
    _need("crownibp-")
    table2(models=_need("crownibp-")[:1], n_images=2, steps=1, out_dir=tmp_path, progress=False, source="subset",
           controls=False)
    np.savez_compressed(tmp_path / "table2_shadows.npz", x_shadow=np.zeros((1, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="1 images but the CSV has 2 rows"):
        load_table(tmp_path)
    with pytest.raises(ValueError, match="table_dir"):
        load_table(tmp_path / "nowhere")
