"""The trade-off curve: success against the SSIM threshold, read off committed per-image records."""

import json

import pytest

from shadowlab.experiments.tradeoff import load_per_image, success_curve, tradeoff


def _table(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "table2.json").write_text(json.dumps({"per_image": rows}))
    return d


def test_success_curve_counts_certified_shadows_at_each_threshold():
    rows = [{"model": "m", "index": 0, "spoofed": True, "ssim": 0.95},
            {"model": "m", "index": 1, "spoofed": True, "ssim": 0.88},
            {"model": "m", "index": 2, "spoofed": False, "ssim": 0.99}]
    assert success_curve(rows, "model", (0.85, 0.9, 0.96)) == {"m": [2 / 3, 1 / 3, 0.0]}


def test_tradeoff_compares_runs_on_their_common_images_and_names_where_the_reference_is_below(tmp_path):
    a = _table(tmp_path, "a", [{"model": "m", "index": i, "spoofed": True, "ssim": 0.92} for i in range(2)])
    b = _table(tmp_path, "b", [{"model": "m", "index": i, "spoofed": True, "ssim": 0.97} for i in range(4)])
    res = tradeoff({"a": a, "b": b}, out=tmp_path / "curve", thresholds=(0.9, 0.95))
    assert res["images"] == 2
    assert res["curves"]["a"]["m"] == [1.0, 0.0] and res["curves"]["b"]["m"] == [1.0, 1.0]
    assert res["reference_below"]["m"]["b"] == [0.95]
    assert (tmp_path / "curve.png").stat().st_size > 0 and (tmp_path / "curve.json").is_file()
    with pytest.raises(ValueError, match="table_dir"):
        tradeoff({"a": tmp_path})


def test_a_rejudged_table_is_read_with_its_rejudged_verdicts(tmp_path):
    rows = [{"model": "m", "index": i, "spoofed": i == 0, "ssim": 0.95} for i in range(2)]
    d = _table(tmp_path, "a", rows)
    assert load_per_image(d)[1] == rows
    (d / "rejudge.json").write_text(json.dumps({"rejudged_spoofed": [True, True]}))
    assert [r["spoofed"] for r in load_per_image(d)[1]] == [True, True]
    (d / "rejudge.json").write_text(json.dumps({"rejudged_spoofed": [True]}))   # another table's rows: ignored
    assert load_per_image(d)[1] == rows
