"""The per-image records of Tables 1 and 2: 8-bit images survive the JSON text, and the rows are the records'
aggregates (successes alone give the spoofed radius; controls' rates; natural certificates summarised)."""

import pytest
import torch

from shadowlab.experiments.controls import CONTROLS
from shadowlab.experiments.table_images import decode_image, encode_image, table1_rows, table2_rows


def test_encode_decode_round_trips_8_bit_pixels():
    img = torch.rand(3, 5, 7)
    back = decode_image(encode_image(img), (3, 5, 7))
    assert back.dtype.name == "uint8" and back.shape == (3, 5, 7)
    assert (torch.from_numpy(back).float() / 255 - img).abs().max() <= 0.5 / 255 + 1e-6
    assert decode_image(encode_image(torch.tensor([[[2.0, -1.0]]])), (1, 1, 2)).tolist() == [[[255, 0]]]


def _attack(success, spoofed, radius, ssim, ctrl_success):
    rec = {"target": 1, "shadow_prediction": 1, "spoofed": spoofed, "ssim": ssim, "success": success,
           "spoofed_radius": radius, "l2": 2.0, "linf": 0.1, "tv": 0.01, "steps_run": 4, "margin": 0.5,
           "shadow": encode_image(torch.zeros(3, 2, 2))}
    for name in CONTROLS:
        rec.update({f"control_{name}_success": ctrl_success, f"control_{name}_spoofed": ctrl_success,
                    f"control_{name}_ssim": 1.0, f"control_{name}_l2": 0.0})
    return rec


def test_table1_rows_aggregate_the_records():
    records = [
        {"idx": 0, "label": 3, "seconds": 2.0, "natural": {"prediction": 3, "radius": 0.4, "pA_lower": 0.9,
                                                           "counts": [0] * 10},
         "ch1": _attack(True, True, 0.3, 0.95, False)},
        {"idx": 1, "label": 5, "seconds": 4.0, "natural": {"prediction": -1, "radius": 0.0, "pA_lower": 0.4,
                                                           "counts": [0] * 10},
         "ch1": _attack(False, True, 0.9, 0.5, True)},  # spoofed, but visible: not a success
    ]
    rows, per_image, shadows = table1_rows(0.25, "smooth-sigma0.25", (1,), records, (3, 2, 2))
    row = rows[0]
    assert row["natural_certified_accuracy"] == 0.5 and row["natural_mean_radius"] == pytest.approx(0.4)
    assert row["success"] == 0.5 and row["spoof_rate"] == 1.0
    assert row["spoofed_mean_radius"] == pytest.approx(0.3)   # the visible shadow's radius does not count
    assert row["control_natural_success"] == 0.5 and row["seconds"] == 6.0 and row["steps_run"] == 4
    assert [r["index"] for r in per_image] == [0, 1] and per_image[1]["natural_prediction"] == -1
    assert "shadow" not in per_image[0] and per_image[0]["control_init_spoofed"] is False
    assert len(shadows) == 2 and shadows[0].shape == (3, 2, 2)


def test_table2_rows_aggregate_the_records():
    records = [{"idx": i, "label": 0, "prediction": p, "verified": v, "seconds": 1.0, **_attack(s, s, 0.0, 0.95, False)}
               for i, (p, v, s) in enumerate([(0, True, False), (1, False, True), (0, False, True), (0, False, False)])]
    row, per_image, _ = table2_rows("m", {"arch": "cnn-2layer"}, 2 / 255, records, (3, 2, 2))
    assert row["clean_error"] == 0.25 and row["verified_error"] == 0.75
    assert row["attack_error"] == 0.5 and row["eps_255"] == "2/255" and row["control_smooth_noise_success"] == 0.0
    assert [r["index"] for r in per_image] == [0, 1, 2, 3] and per_image[1]["margin"] == 0.5


def test_authors_means_count_every_non_abstaining_image_whatever_its_label():
    from shadowlab.certify.smoothing import Certificate
    from shadowlab.experiments.table_images import authors_means

    natural = [Certificate(0, 0.5, 0.9, [9, 1]), Certificate(1, 0.3, 0.8, [2, 8]), Certificate(-1, 0.0, 0.4, [5, 5])]
    shadows = [{"shadow_prediction": 3, "shadow_radius": 0.6},      # spoofed
               {"shadow_prediction": -1, "shadow_radius": 0.0},     # abstained: 0
               {"shadow_prediction": 2, "shadow_radius": 9.0}]      # natural abstained: not counted
    out = authors_means(natural, shadows)
    assert out["authors_natural_mean_radius"] == pytest.approx(0.4)       # 0.5 and 0.3 (label or not)
    assert out["authors_adversarial_mean_radius"] == pytest.approx(0.3)   # 0.6 and 0
    old = authors_means(natural, [{"shadow_prediction": 3}] * 3)          # records written before the radius
    assert old == {"authors_natural_mean_radius": None, "authors_adversarial_mean_radius": None}
