"""The certify commands: per-image CSV, summary and Markdown; crown-ibp sharded over gloo ranks equals one process,
and an interrupted run resumes without verifying its finished images again."""

import csv
import json
from pathlib import Path

import pytest
import torch

from shadowlab import checkpoints
from shadowlab.cli.main import main
from tests.conftest import run_one_and_ranks

CROWN = [m for m in checkpoints.available() if m.startswith("crownibp-cnn-2layer")]


def verify_files(out: Path) -> dict:
    """A crown-ibp run's files without timings, command and world size."""
    summary = {k: v for k, v in json.loads((out / "verify_summary.json").read_text()).items()
               if not k.startswith("seconds") and k not in ("command", "world_size")}
    return {"csv": list(csv.DictReader(open(out / "verify.csv"))), "summary": summary,
            "files": sorted(p.name for p in out.iterdir())}


def verify_args(out: Path) -> list[str]:
    return ["certify", "crown-ibp", "--model", CROWN[0], "--n-images", "6", "--chunk", "2", "--pgd-steps", "3",
            "--source", "subset", "--device", "cpu", "--out-dir", str(out)]


def test_cli_certify_crown_ibp_on_test_and_train_split(tmp_path, models_tmp, fake_jpeg_archive, capsys):
    import json

    from shadowlab import checkpoints
    from shadowlab.cli.main import main
    from shadowlab.models import build

    torch.manual_seed(0)
    model = build("cnn-2layer", width=1, linear_size=16)
    checkpoints.save(model, models_tmp / "tiny-crownibp", arch="cnn-2layer",
                     arch_kwargs={"width": 1, "linear_size": 16}, defense="crown-ibp",
                     defense_parameter={"eps": 2 / 255})
    summaries = {}
    for split in ("test", "train"):
        out = tmp_path / split
        assert main(["certify", "crown-ibp", "--model", "tiny-crownibp", "--split", split, "--n-images", "20",
                     "--pgd-steps", "3", "--source", "jpeg", "--jpeg", str(fake_jpeg_archive),
                     "--out-dir", str(out)]) == 0
        summaries[split] = json.loads((out / "verify_summary.json").read_text())
        assert f"20 {split} images" in (out / "verify.md").read_text()
        rows = (out / "verify.csv").read_text().splitlines()
        assert len(rows) == 21 and rows[0].startswith("idx,label,predict,correct,verified_ibp")
    for split, summary in summaries.items():
        assert summary["split"] == split and summary["n_images"] == 20
        # a verified image is a correct one: verified error >= PGD error >= clean error
        assert summary["verified_error"] >= summary["pgd_error"] >= summary["clean_error"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["certify", "crown-ibp", "--model", "tiny-crownibp", "--split", "val"])
    assert "--split" in capsys.readouterr().err


@pytest.mark.skipif(not CROWN, reason="no committed crownibp-cnn-2layer checkpoint")
def test_crown_ibp_resume_verifies_only_the_unfinished_images(tmp_path, monkeypatch, capsys):
    from shadowlab.cli import certify as command  # the command's own name for the verifier (imported at its top)

    full, part = tmp_path / "full", tmp_path / "part"
    assert main(verify_args(full)) == 0
    summary = json.loads((full / "verify_summary.json").read_text())
    assert summary["verified_error"] >= summary["pgd_error"] >= summary["clean_error"]
    part.mkdir()   # an interrupted run: its partial file holds the header and the first chunk
    (part / "records.rank0.jsonl").write_text("\n".join((full / "records.jsonl").read_text().splitlines()[:3]) + "\n")
    seen = []
    original = command.certified
    monkeypatch.setattr(command, "certified", lambda m, x, *a, **k: seen.append(len(x)) or original(m, x, *a, **k))
    assert main([*verify_args(part), "--resume"]) == 0
    assert sum(seen) == 2 * 4   # two methods (ibp, crown-ibp) on the four unfinished images
    assert verify_files(part) == verify_files(full)
    (part / "records.rank0.jsonl").write_text((full / "records.jsonl").read_text())
    capsys.readouterr()
    assert main([*verify_args(part)[:-2], "--pgd-steps", "4", "--out-dir", str(part), "--resume"]) == 2
    assert "pgd_steps: file 3, this run 4" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not CROWN, reason="no committed crownibp-cnn-2layer checkpoint")
def test_crown_ibp_on_two_gloo_ranks_writes_the_files_of_one_process(tmp_path):
    run_one_and_ranks(verify_args(tmp_path / "x")[:-2], tmp_path / "one", tmp_path / "two", timeout=600)
    assert verify_files(tmp_path / "one") == verify_files(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "verify_summary.json").read_text())["world_size"] == 2
