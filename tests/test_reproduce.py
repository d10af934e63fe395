import csv
import json

import numpy as np
import pytest
import torch

from shadowlab import checkpoints
from shadowlab.cli import main
from shadowlab.controls import CONTROLS
from shadowlab.data import load_cifar10
from shadowlab.perception import ssim
from shadowlab.reproduce import markdown_table, table1, table1_claims


def _need(prefix: str) -> list[str]:
    names = [m for m in checkpoints.available() if m.startswith(prefix)]
    if not names:
        pytest.skip(f"no committed {prefix}* checkpoints")
    return names


def _row(sigma, ch, nat, spoof, success=0.5, controls=(0.0, 0.0, 0.0)):
    r = {"sigma": sigma, "channels": ch, "natural_mean_radius": nat, "spoofed_mean_radius": spoof,
         "success": success}
    for name, v in zip(CONTROLS, controls):
        r[f"control_{name}_success"] = v
    r["attack_beats_controls"] = success > max(controls)
    return r


def test_claims_logic():
    rows = [_row(0.25, 1, 0.5, 0.6), _row(0.25, 3, 0.5, 0.2), _row(0.5, 1, 0.8, 0.5), _row(0.5, 3, 0.8, None)]
    claims = table1_claims(rows)
    assert claims["spoofed_over_natural_radius"]["sigma 0.25, 1-channel"] == pytest.approx(1.2)
    assert claims["spoofed_over_natural_radius"]["sigma 0.50, 3-channel"] is None
    assert claims["larger_for_some_sigma"] is True
    assert claims["comparable_for_every_sigma"] is False  # 0.5 / 0.8 < 0.7
    assert claims["beats_controls_everywhere"] is True
    rows[2]["spoofed_mean_radius"] = 0.6
    assert table1_claims(rows)["comparable_for_every_sigma"] is True
    rows[3] = _row(0.5, 3, 0.8, None, success=0.1, controls=(0.2, 0.0, 0.0))   # a control beats the attack
    assert table1_claims(rows)["beats_controls_everywhere"] is False


def test_markdown_table_formats_and_missing_values():
    text = markdown_table([("a", "a", "pct"), ("b", "b", "2"), ("c", "c", "str")], [{"a": 0.5, "b": 1.234, "c": "x"},
                                                                                    {"a": None, "b": 2.0}])
    lines = text.splitlines()
    assert lines[0] == "| a | b | c |" and lines[2] == "| 50.0% | 1.23 | x |" and lines[3] == "| - | 2.00 | - |"


def test_table1_tiny_run_writes_every_output_and_counts_only_imperceptible_successes(tmp_path):
    _need("smooth-sigma0.25")
    res = table1(sigmas=(0.25,), n_images=2, n=50, n0=10, n_select=20, steps=2, noise_samples=4, channels=(1,),
                 out_dir=tmp_path, progress=False, source="subset")
    assert len(res.rows) == 1 and len(res.per_image) == 2
    row = res.rows[0]
    assert row["mean_linf"] <= 1.0 and 0.0 <= row["success"] <= row["spoof_rate"]
    for key in ("csv", "json", "markdown", "figure", "ssim_figure", "shadows"):
        assert (tmp_path / res.files[key].split("/")[-1]).exists()
    saved = json.loads((tmp_path / "table1.json").read_text())
    assert saved["settings"]["n"] == 50 and "| sigma |" in res.markdown
    with open(tmp_path / "table1_per_image.csv") as f:
        records = list(csv.DictReader(f))
    shadows = np.load(tmp_path / "table1_shadows.npz")
    assert shadows["x_shadow"].dtype == np.uint8 and shadows["x_shadow"].shape == (2, 3, 32, 32)
    # the committed 8-bit image gives the CSV's SSIM again, and no row below min_ssim is a success
    x, _, _ = load_cifar10("test", n=2, source="subset")
    again = ssim(x, torch.from_numpy(shadows["x_shadow"]).float() / 255)
    assert again.tolist() == pytest.approx([float(r["ssim"]) for r in records], abs=1e-5)
    for r in records:
        assert r["success"] == str(r["spoofed"] == "True" and float(r["ssim"]) >= 0.9)
        for name in CONTROLS:   # controls are computed on the same images
            assert f"control_{name}_success" in r


def test_table1_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_images=0"):
        table1(n_images=0)
    with pytest.raises(ValueError, match="channels"):
        table1(channels=(2,))
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_ssim"):
            table1(min_ssim=bad)


def test_reproduce_cli_table2_tiny(tmp_path, capsys):
    names = _need("crownibp-")
    rc = main(["reproduce", "table2", "--n-images", "2", "--steps", "2", "--models", names[0],
               "--out-dir", str(tmp_path), "--source", "subset", "--min-ssim", "0.95"])
    assert rc == 0
    out = json.loads((tmp_path / "table2" / "table2.json").read_text())
    assert out["rows"][0]["model"] == names[0] and "command" in out["settings"]
    assert out["settings"]["min_ssim"] == 0.95
    for rec in out["per_image"]:
        assert not rec["success"] or (rec["spoofed"] and rec["ssim"] >= 0.95)
    assert "attack error" in capsys.readouterr().out


def test_merge_tables_equals_one_run(tmp_path):
    _need("smooth-sigma0.25")
    kw = dict(n_images=2, n=50, n0=10, n_select=20, steps=2, noise_samples=4, channels=(1,), progress=False,
              source="subset")
    from shadowlab.reproduce import merge_tables

    both = table1(sigmas=(0.25, 0.50), out_dir=tmp_path / "both", **kw)
    a = table1(sigmas=(0.25,), out_dir=tmp_path / "a", **kw)
    b = table1(sigmas=(0.50,), out_dir=tmp_path / "b", **kw)
    merged = merge_tables([tmp_path / "b", tmp_path / "a"], tmp_path / "merged")   # parts in any order
    assert len(a.rows) + len(b.rows) == len(merged.rows) == 2
    for key in ("success", "spoof_rate", "mean_ssim", "mean_l2"):
        assert [r[key] for r in merged.rows] == pytest.approx([r[key] for r in both.rows])
    assert np.array_equal(np.load(tmp_path / "merged" / "table1_shadows.npz")["x_shadow"],
                          np.load(tmp_path / "both" / "table1_shadows.npz")["x_shadow"])
    assert merged.claims == both.claims and (tmp_path / "merged" / "table1.png").exists()
    with pytest.raises(ValueError, match="table_dirs"):
        merge_tables([tmp_path / "nowhere"], tmp_path / "x")


def test_committed_report_reads_tables_claims_and_rejudgement(tmp_path):
    from shadowlab.reproduce import committed_figures, committed_report

    text = committed_report(tmp_path)
    assert "no committed run" in text and "table1" in text and "table2" in text
    assert committed_figures(tmp_path) == []
    assert all(p.suffix == ".png" and p.exists() for p in committed_figures())
    real = committed_report()
    if "Committed table2\n\n|" in real:
        assert "Claims:" in real and "holds_for_every_model" in real
