import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shadowlab import checkpoints
from shadowlab.cli.main import main
from shadowlab.data import load_cifar10
from shadowlab.experiments.controls import CONTROLS
from shadowlab.experiments.reproduce import table1, table1_claims
from shadowlab.perception import ssim


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
    from shadowlab.experiments.reproduce import merge_tables

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
    from shadowlab.experiments.report import committed_figures, committed_report

    text = committed_report(tmp_path)
    assert "no committed run" in text and "table1" in text and "table2" in text
    assert committed_figures(tmp_path) == []
    assert all(p.suffix == ".png" and p.exists() for p in committed_figures())
    real = committed_report()
    if "Committed table2\n\n|" in real:
        assert "Claims:" in real and "holds_for_every_model" in real


# ------------------------------------------------------------------------------- sharded and resumed tables
TABLE_ARGS = ["--n-images", "4", "--chunk", "2", "--steps", "2", "--sigmas", "0.25", "--channels", "1",
              "--n", "50", "--noise-samples", "4", "--source", "subset", "--device", "cpu"]


def table_files(out) -> dict:
    """A table run's files without timings, command and world size: per-image CSV, shadows, rows and claims."""
    from pathlib import Path

    found = {}
    for name in ("table1", "table2"):
        folder = Path(out) / name
        if not folder.exists():
            continue
        saved = json.loads((folder / f"{name}.json").read_text())
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in saved["rows"]]
        with open(folder / f"{name}_per_image.csv") as f:
            csv_rows = list(csv.DictReader(f))
        found[name] = {"csv": csv_rows, "rows": rows, "claims": saved["claims"],
                       "shadows": np.load(folder / f"{name}_shadows.npz")["x_shadow"].tolist(),
                       "records": sorted(p.name for p in (folder / "records").iterdir())}
    return found


@pytest.mark.slow
def test_two_gloo_ranks_write_the_tables_of_one_process(tmp_path):
    from tests.conftest import run_one_and_ranks

    model = _need("crownibp-cnn-2layer")[0]
    _need("smooth-sigma0.25")
    run_one_and_ranks(["reproduce", "all", *TABLE_ARGS, "--models", model], tmp_path / "one", tmp_path / "two")
    one, two = table_files(tmp_path / "one"), table_files(tmp_path / "two")
    assert set(one) == {"table1", "table2"} and one == two
    assert len(one["table1"]["csv"]) == len(one["table2"]["csv"]) == 4
    assert one["table2"]["records"] == [f"{model}.jsonl"]   # the ranks' partial files were merged and removed
    assert json.loads((tmp_path / "two" / "table2" / "table2.json").read_text())["settings"]["world_size"] == 2


def _killed_table2(out, model, calls_before_kill):
    """Child process: Table 2 one image per call, killed (os._exit: no cleanup) inside a later call."""
    import os

    from shadowlab.experiments import reproduce

    original = reproduce.table2_work
    calls = []

    def dying(*a, **kw):
        work = original(*a, **kw)

        def run(ids):
            calls.append(ids)
            if len(calls) > calls_before_kill:
                os._exit(9)
            return work(ids)
        return run

    reproduce.table2_work = dying
    reproduce.table2(models=[model], n_images=4, steps=2, chunk=1, source="subset", device="cpu", out_dir=out,
                     progress=False)


def test_killed_table_run_resumes_to_the_files_of_an_uninterrupted_one(tmp_path, monkeypatch):
    import multiprocessing

    from shadowlab.experiments import reproduce
    from shadowlab.experiments.runs import RunFileError

    model = _need("crownibp-cnn-2layer")[0]
    kw = dict(models=[model], n_images=4, steps=2, chunk=1, source="subset", device="cpu", progress=False)
    reproduce.table2(out_dir=tmp_path / "ref" / "table2", **kw)

    out = tmp_path / "run" / "table2"
    proc = multiprocessing.get_context("fork").Process(target=_killed_table2, args=(out, model, 2))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 9 and not (out / "table2.json").exists()   # killed in its third image
    partial = out / "records" / f"{model}.rank0.jsonl"
    assert [json.loads(s)["idx"] for s in partial.read_text().splitlines()[1:]] == [0, 1]

    computed = []
    original = reproduce.table2_work

    def counting(*a, **k):
        work = original(*a, **k)
        return lambda ids: computed.extend(ids) or work(ids)

    monkeypatch.setattr(reproduce, "table2_work", counting)
    reproduce.table2(out_dir=out, resume=True, **kw)
    assert computed == [2, 3]          # the two finished images are not attacked again
    assert table_files(tmp_path / "run") == table_files(tmp_path / "ref")
    # a records file written with other settings is refused, naming the setting
    partial.write_text("\n".join((out / "records" / f"{model}.jsonl").read_text().splitlines()[:2]) + "\n")
    with pytest.raises(RunFileError, match=r"config.steps: file 2, this run 3"):
        reproduce.table2(out_dir=out, resume=True, **{**kw, "steps": 3})
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        reproduce.table2(out_dir=None, resume=True, **kw)
    with pytest.raises(ValueError, match="chunk=0"):
        reproduce.table2(out_dir=out, **{**kw, "chunk": 0})


def test_table1_model_template_names_each_sigma_checkpoint():
    from shadowlab.experiments.settings import Table1Settings

    assert Table1Settings().model_name(0.5) == "smooth-sigma0.50"
    assert Table1Settings(model_template="cohen-resnet110-sigma{sigma}").model_name(0.25) == "cohen-resnet110-sigma0.25"
    with pytest.raises(ValueError, match="model_template"):
        Table1Settings(model_template="bad-{s}").model_name(0.25)
    with pytest.raises(ValueError, match="one checkpoint for several sigmas"):
        table1(sigmas=(0.25, 0.5), model_template="smooth-sigma0.25")
    with pytest.raises(checkpoints.CheckpointError, match="nowhere-0.25"):
        table1(sigmas=(0.25,), model_template="nowhere-{sigma}", n_images=1, source="subset", out_dir=None)


def test_paper_settings_keep_what_the_user_set():
    """--paper applies the authors' settings but never overrides a setting the user gave (it once replaced
    --n-images 100 by 500); the CLI, the tables and .paper() share one definition of each default."""
    from shadowlab.cli.commands import reproduce_settings
    from shadowlab.cli.main import build_parser
    from shadowlab.experiments.settings import Table1Settings, Table2Settings

    parse = lambda *a: reproduce_settings(build_parser().parse_args(["reproduce", "all", *a]))
    assert parse() == (Table1Settings(), Table2Settings())
    assert parse("--paper") == (Table1Settings.paper(), Table2Settings.paper())
    t1, t2 = parse("--paper", "--n-images", "100")
    assert t2 == Table2Settings.paper(n_images=100) and t2.steps == 300 and t2.early_stop_margin is None
    assert t1.n_images == 100 and t1.n == 100_000 and t1.keep_targets is None
    t1, t2 = parse("--paper", "--n", "10000", "--keep-targets", "2", "--channels", "1")
    assert (t1.n, t1.keep_targets, t1.channels, t1.noise_samples) == (10_000, 2, (1,), 400)
    t1, t2 = parse("--paper", "--pruned", "--n-images", "25")
    assert t1 == Table1Settings.paper_pruned(n_images=25) and t2 == Table2Settings.paper(n_images=25)
    assert (t1.n, t1.noise_samples, t1.steps, t1.channels, t1.keep_targets) == (100_000, 400, 300, (1, 3), 1)
    assert t1.early_stop_margin is not None and t1.early_stop_scope == "candidate"
    with pytest.raises(ValueError, match="--pruned .* --paper"):
        parse("--pruned")
    t1, t2 = parse("--no-early-stop", "--keep-targets", "0", "--sigmas", "0.25", "--no-controls")
    assert t1.early_stop_margin is None and t2.early_stop_margin is None and t1.keep_targets is None
    assert t1.sigmas == (0.25,) and not t1.controls and not t2.controls and t1.steps == Table1Settings().steps
    with pytest.raises(ValueError, match="unknown Table2Settings settings"):
        Table2Settings.paper(noise_samples=4)
    with pytest.raises(ValueError, match="n_images"):
        Table1Settings(n_images=0)
    with pytest.raises(ValueError, match="channels"):
        Table1Settings().replace(channels=(2,))
    with pytest.raises(ValueError, match="early_stop_scope"):
        Table1Settings(early_stop_scope="table")
    with pytest.raises(ValueError, match="settle_tol"):
        Table1Settings(settle_tol=-0.1)
    with pytest.raises(ValueError, match="prune_step"):
        Table1Settings.paper_pruned(prune_step=0)


def test_reproduce_cli_paper_keeps_n_images(monkeypatch, tmp_path):
    from shadowlab.experiments import reproduce

    seen = {}

    def fake_table2(settings, **kw):
        seen.update(settings.to_dict())
        return SimpleNamespace(name="table2", markdown="", settings={}, to_dict=lambda: {})

    monkeypatch.setattr(reproduce, "table2", fake_table2)
    (tmp_path / "table2").mkdir()
    assert main(["reproduce", "table2", "--paper", "--n-images", "100", "--out-dir", str(tmp_path)]) == 0
    assert seen["n_images"] == 100 and seen["steps"] == 300 and seen["early_stop_margin"] is None
    assert main(["reproduce", "table2", "--out-dir", str(tmp_path)]) == 0
    assert seen["n_images"] == 10 and seen["steps"] == 40 and seen["early_stop_margin"] == 0.0


def test_work_chunk_counts_a_forward_pass_and_follows_the_device(monkeypatch):
    from torch import nn

    from shadowlab.experiments.reproduce import activation_elements, work_chunk

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    assert activation_elements(model, (3, 2, 2)) == 12 + 5 + 5 + 3
    assert work_chunk("table2", torch.device("cpu"), [model], (3, 2, 2)) == 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 10**9, 10**10))
    per_image = 25 * 9 * 9 * 16
    assert work_chunk("table2", torch.device("cuda"), [model], (3, 2, 2)) == min(512, 10**9 // per_image)
    assert work_chunk("table1", torch.device("cuda"), [model], (3, 32, 32), noise_samples=400, channels=2) == \
        min(64, 10**9 // (2 * 4 * 400 * 3072 * 9 * 2))
    with pytest.raises(ValueError, match="table='table3'"):
        work_chunk("table3", torch.device("cpu"), [model], (3, 2, 2))
