import json

import pytest

from shadowlab import checkpoints
from shadowlab.cli import main
from shadowlab.reproduce import table1, table1_claims


def _need(prefix: str) -> list[str]:
    names = [m for m in checkpoints.available() if m.startswith(prefix)]
    if not names:
        pytest.skip(f"no committed {prefix}* checkpoints")
    return names


def test_claims_logic():
    rows = [{"sigma": 0.25, "natural_mean_radius": 0.5, "spoofed_mean_radius_1ch": 0.6,
             "spoofed_mean_radius_3ch": 0.2},
            {"sigma": 0.5, "natural_mean_radius": 0.8, "spoofed_mean_radius_1ch": 0.5,
             "spoofed_mean_radius_3ch": None}]
    claims = table1_claims(rows, (1, 3))
    assert claims["spoofed_over_natural_radius"]["sigma 0.25, 1-channel"] == pytest.approx(1.2)
    assert claims["larger_for_some_sigma"] is True
    assert claims["comparable_for_every_sigma"] is False  # 0.5 / 0.8 < 0.7
    rows[1]["spoofed_mean_radius_1ch"] = 0.6
    assert table1_claims(rows, (1, 3))["comparable_for_every_sigma"] is True


def test_table1_tiny_run_writes_every_output(tmp_path):
    _need("smooth-sigma0.25")
    res = table1(sigmas=(0.25,), n_images=2, n=50, n0=10, n_select=20, steps=2, noise_samples=4, channels=(1,),
                 out_dir=tmp_path, progress=False, source="subset")
    assert len(res.rows) == 1 and len(res.per_image) == 2
    row = res.rows[0]
    assert 0.0 <= row["success_1ch"] <= 1.0 and row["mean_linf_1ch"] <= 1.0
    for key in ("csv", "json", "markdown", "figure"):
        assert (tmp_path / res.files[key].split("/")[-1]).exists()
    saved = json.loads((tmp_path / "table1.json").read_text())
    assert saved["settings"]["n"] == 50 and "| sigma |" in res.markdown


def test_table1_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_images=0"):
        table1(n_images=0)
    with pytest.raises(ValueError, match="channels"):
        table1(channels=(2,))


def test_reproduce_cli_table2_tiny(tmp_path, capsys):
    names = _need("crownibp-")
    rc = main(["reproduce", "table2", "--n-images", "2", "--steps", "2", "--models", names[0],
               "--out-dir", str(tmp_path), "--source", "subset"])
    assert rc == 0
    out = json.loads((tmp_path / "table2" / "table2.json").read_text())
    assert out["rows"][0]["model"] == names[0] and "command" in out["settings"]
    assert "attack error" in capsys.readouterr().out
