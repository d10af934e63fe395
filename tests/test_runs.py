"""Resumable, shardable runs: 2 gloo ranks equal 1 process, a killed run resumes to the same files without
recomputing, and a corrupt or mismatched partial file is refused."""

import csv
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from shadowlab import checkpoints
from shadowlab.cli.main import main
from shadowlab.experiments import runs
from shadowlab.experiments.runs import RunFileError, run_images
from shadowlab.models import build
from tests.conftest import run_one_and_ranks

SETTINGS = {"what": "test", "n": 3}


def record_of(i: int) -> dict:
    """A per-image record that depends on the image only (seeded by its index)."""
    g = torch.Generator().manual_seed(1000 + i)
    return {"value": float(torch.randn((), generator=g)), "square": i * i}


def compute(ids):
    return [record_of(i) for i in ids]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ------------------------------------------------------------------------------------------- the runner
def test_single_process_records_in_order_and_store(tmp_path):
    store = tmp_path / "records.jsonl"
    order = [7, 3, 5, 1, 9]
    recs = run_images(order, compute, store, SETTINGS, chunk=2, progress=False)
    assert [r["idx"] for r in recs] == order
    assert recs == [{**record_of(i), "idx": i} for i in order]
    header, *body = [json.loads(s) for s in lines(store)]
    assert header["settings"]["what"] == "test" and [r["idx"] for r in body] == order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]  # the partial file is gone


def _killed_run(store, order, after):
    """Child process: compute images, then die (os._exit: no cleanup, no finally) inside call number `after`."""
    calls = []

    def fn(ids):
        calls.append(ids)
        if len(calls) == after:
            os._exit(9)
        return compute(ids)

    run_images(order, fn, store, SETTINGS, chunk=2, progress=False)


def _reference_and_killed(tmp_path, order, calls):
    """An uninterrupted run of ``order`` (the reference) and a run killed by os._exit inside call ``calls``:
    (reference store, killed run's store, its partial file)."""
    ref = tmp_path / "ref" / "records.jsonl"
    run_images(order, compute, ref, SETTINGS, chunk=2, progress=False)
    store = tmp_path / "run" / "records.jsonl"
    proc = multiprocessing.get_context("fork").Process(target=_killed_run, args=(store, order, calls))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 9
    return ref, store, store.with_name("records.rank0.jsonl")


def test_killed_run_resumes_to_the_same_files_without_recomputing(tmp_path):
    order = list(range(10))
    # killed in its third call: two calls (4 images) were written
    ref, store, partial = _reference_and_killed(tmp_path, order, 3)
    assert [json.loads(s)["idx"] for s in lines(partial)[1:]] == [0, 1, 2, 3]
    with open(partial, "a") as f:  # a record cut short by the kill
        f.write('{"idx": 4, "val')
    assert not store.exists()

    seen = []

    def fn(ids):
        seen.extend(ids)
        return compute(ids)

    recs = run_images(order, fn, store, SETTINGS, chunk=2, resume=True, progress=False)
    assert seen == [4, 5, 6, 7, 8, 9]  # finished images are not recomputed
    assert store.read_text() == ref.read_text()
    assert recs == run_images(order, compute, ref, SETTINGS, progress=False)
    assert not partial.exists()
    # resuming a finished run computes nothing and keeps the file
    seen.clear()
    run_images(order, fn, store, SETTINGS, resume=True, progress=False)
    assert seen == [] and store.read_text() == ref.read_text()
    # without --resume a run starts over
    run_images(order, fn, store, SETTINGS, progress=False)
    assert seen == order


def test_a_resume_with_more_images_computes_only_the_new_ones(tmp_path):
    store, ref = tmp_path / "grown.jsonl", tmp_path / "ref.jsonl"
    run_images([0, 1, 2], compute, store, {**SETTINGS, "n_images": 3}, chunk=2, progress=False)
    seen: list[int] = []

    def fn(ids):
        seen.extend(ids)
        return compute(ids)

    grown = run_images([0, 1, 2, 3, 4], fn, store, {**SETTINGS, "n_images": 5}, chunk=2, resume=True, progress=False)
    assert seen == [2, 3, 4]   # the chunks are [0, 1], [2, 3], [4]: a chunk with an image missing runs whole
    assert grown == run_images([0, 1, 2, 3, 4], compute, ref, {**SETTINGS, "n_images": 5}, chunk=2, progress=False)
    assert lines(store) == lines(ref)   # the same file, header included, as one run of five images
    fewer = run_images([1, 2], fn, store, {**SETTINGS, "n_images": 2}, resume=True, progress=False)
    assert [r["idx"] for r in fewer] == [1, 2] and seen == [2, 3, 4]
    assert [json.loads(x)["idx"] for x in lines(store)[1:]] == [1, 2, 0, 3, 4]   # the others are kept, not dropped
    again = run_images([0, 1, 2, 3, 4], fn, store, {**SETTINGS, "n_images": 5}, chunk=2, resume=True, progress=False)
    assert again == grown and seen == [2, 3, 4] and lines(store) == lines(ref)
    with pytest.raises(RunFileError, match=r"other settings.*n: file 3, this run 4"):   # the rest still counts
        run_images([0, 1, 2, 3, 4, 5], fn, store, {**SETTINGS, "n": 4, "n_images": 6}, resume=True, progress=False)


def test_mismatched_or_corrupt_partial_file_is_refused(tmp_path):
    store = tmp_path / "records.jsonl"
    run_images([0, 1, 2], compute, store, SETTINGS, progress=False)
    with pytest.raises(RunFileError, match=r"other settings.*n: file 3, this run 4"):
        run_images([0, 1, 2], compute, store, {**SETTINGS, "n": 4}, resume=True, progress=False)
    good = lines(store)
    store.write_text("\n".join([good[0], good[1], "{not json", good[3]]) + "\n")
    with pytest.raises(RunFileError, match="line 3 is not a JSON record"):
        run_images([0, 1, 2], compute, store, SETTINGS, resume=True, progress=False)
    store.write_text("garbage\n" + "\n".join(good[1:]) + "\n")
    with pytest.raises(RunFileError, match="line 1 is not a JSON header"):
        run_images([0, 1, 2], compute, store, SETTINGS, resume=True, progress=False)
    edited = json.loads(good[0])
    edited["settings"]["n"] = 99  # settings edited without the fingerprint
    store.write_text("\n".join([json.dumps(edited), *good[1:]]) + "\n")
    with pytest.raises(RunFileError, match="fingerprint"):
        run_images([0, 1, 2], compute, store, SETTINGS, resume=True, progress=False)
    with pytest.raises(ValueError, match="chunk"):
        run_images([0], compute, store, SETTINGS, chunk=0)
    with pytest.raises(ValueError, match="distinct"):
        run_images([0, 0], compute, store, SETTINGS)


def test_init_distributed_single_process_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = runs.init_distributed()
    assert ctx.rank == 0 and ctx.world_size == 1 and not ctx.distributed and ctx.is_main
    assert runs.rank_device(ctx, "cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        runs.init_distributed("gloo")


# ------------------------------------------------------------------------------------------- certify smoothing
@pytest.fixture
def tiny_smooth(tmp_path, monkeypatch):
    """A small random smoothing model in a temporary models folder."""
    monkeypatch.setenv("SHADOWLAB_MODELS", str(tmp_path / "models"))
    torch.manual_seed(0)
    model = build("cnn-2layer", width=1, linear_size=16).eval()
    checkpoints.save(model, "tiny-smooth", arch="cnn-2layer", arch_kwargs={"width": 1, "linear_size": 16},
                     defense="gaussian", defense_parameter={"sigma": 0.25})
    return "tiny-smooth"


CERTIFY = ["certify", "smoothing", "--model", "tiny-smooth", "--n-images", "5", "--n", "64", "--n0", "16",
           "--chunk", "2", "--batch-size", "64", "--source", "subset", "--device", "cpu"]


def outputs(out: Path) -> dict:
    """The files of a certify run without their timings, command and world size."""
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(out / "certify.csv"))]
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items()
               if not k.startswith("seconds") and k not in ("command", "world_size")}
    recs = [{k: v for k, v in json.loads(s).items() if k != "seconds"} for s in lines(out / "records.jsonl")]
    return {"csv": rows, "summary": summary, "records": recs,
            "files": sorted(p.name for p in out.iterdir())}


@pytest.mark.slow
def test_two_gloo_ranks_write_the_files_of_one_process(tmp_path, tiny_smooth):
    run_one_and_ranks(CERTIFY, tmp_path / "one", tmp_path / "two", timeout=600, in_process=True)
    one, two = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert one == two
    assert len(one["csv"]) == 5 and one["files"] == ["certify.csv", "records.jsonl", "summary.json", "summary.md"]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2


def test_certify_resume_continues_and_refuses_other_settings(tmp_path, tiny_smooth, monkeypatch, capsys):
    from shadowlab.certify.smoothing import Smooth

    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*CERTIFY, "--out-dir", str(full)]) == 0
    # an interrupted run: its partial file holds the header and the first two images
    part.mkdir()
    kept = lines(full / "records.jsonl")[:3]
    (part / "records.rank0.jsonl").write_text("\n".join(kept) + "\n")
    certified = []
    original = Smooth.certify

    def counting(self, x, *a, **kw):
        certified.append(len(x))
        return original(self, x, *a, **kw)

    monkeypatch.setattr(Smooth, "certify", counting)
    assert main([*CERTIFY, "--out-dir", str(part), "--resume"]) == 0
    assert sum(certified) == 3  # only the three unfinished images
    assert outputs(part) == outputs(full)
    # a partial file written with other settings is refused, naming the setting
    (part / "records.rank0.jsonl").write_text("\n".join(kept) + "\n")
    (part / "records.jsonl").unlink()
    capsys.readouterr()
    assert main([*CERTIFY[:-12], "--n", "128", *CERTIFY[-10:], "--out-dir", str(part), "--resume"]) == 2
    assert "n: file 64, this run 128" in capsys.readouterr().err


def test_auto_chunk_is_the_cpu_chunk_on_a_cpu_and_sized_by_memory_on_a_gpu(monkeypatch):
    from shadowlab.experiments.runs import CPU_CHUNK, auto_chunk

    assert auto_chunk("cpu", 10**6) == CPU_CHUNK and auto_chunk("cpu", 10**6, cap=3) == 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))
    assert auto_chunk("cuda", 2**20, cap=512) == 512                  # 4 GiB / 1 MiB per image, capped
    assert auto_chunk("cuda", 2**26, cap=512) == 64                   # 4 GiB / 64 MiB
    assert auto_chunk("cuda", 2**40, cap=512) == 1                    # never below one image
    with pytest.raises(ValueError, match="bytes_per_image=0"):
        auto_chunk("cpu", 0)


# ------------------------------------------------------------------------------------------- nothing lost
def test_header_reaches_the_disk_and_a_file_without_records_is_a_fresh_start(tmp_path):
    order = list(range(6))
    # killed inside its first call: the header was flushed and fsync'ed when the file was created
    ref, store, partial = _reference_and_killed(tmp_path, order, 1)
    assert len(lines(partial)) == 1 and json.loads(lines(partial)[0])["format"] == runs.FORMAT
    assert runs.count_records(partial) == 0
    recs = run_images(order, compute, store, SETTINGS, chunk=2, resume=True, progress=False)
    assert store.read_text() == ref.read_text() and [r["idx"] for r in recs] == order
    # an empty partial file (killed before its header) and a header-only one of other settings: fresh starts
    for content in ("", '{"format": "shadowlab-rec'):
        store.unlink()
        partial.write_text(content)
        run_images(order, compute, store, SETTINGS, chunk=2, resume=True, progress=False)
        assert store.read_text() == ref.read_text() and not partial.exists()
    header = json.dumps(runs._header({**SETTINGS, "n": 99}), sort_keys=True)
    store.unlink()
    partial.write_text(header + "\n" + '{"idx": 0, "val')   # header-only, a record cut short
    run_images(order, compute, store, SETTINGS, chunk=2, resume=True, progress=False)
    assert store.read_text() == ref.read_text()


def test_a_fresh_run_never_replaces_finished_records_without_overwrite(tmp_path):
    store = tmp_path / "records.jsonl"
    run_images([0, 1, 2], compute, store, SETTINGS, progress=False)
    before = store.read_text()
    calls = []

    def fn(ids):
        calls.append(ids)
        return compute(ids)

    with pytest.raises(RunFileError, match=r"holds 3 finished record.*--resume.*--overwrite"):
        run_images([0, 1, 2], fn, store, {**SETTINGS, "n": 4}, overwrite=False, progress=False)
    assert calls == [] and store.read_text() == before   # refused before any work, nothing removed
    # a partial file with records is protected too; one without records is not in the way
    partial = store.with_name("records.rank0.jsonl")
    store.rename(partial)
    with pytest.raises(RunFileError, match="rank0"):
        runs.refuse_overwrite([store])
    partial.write_text(lines(partial)[0] + "\n")
    runs.refuse_overwrite([store])
    run_images([0, 1, 2], fn, store, SETTINGS, overwrite=False, progress=False)
    assert store.read_text() == before
    # another store in the same folder is never touched by this one's run
    other = tmp_path / "other.jsonl"
    run_images([5], compute, other, SETTINGS, progress=False)
    kept = other.read_text()
    run_images([0, 1, 2], compute, store, SETTINGS, overwrite=True, progress=False)
    assert other.read_text() == kept


# a tiny two-group run (two stores, as a table's sigmas or models), killed with SIGKILL by a child process
TWO_GROUPS = {"a": list(range(5)), "b": list(range(10, 15))}


def _two_group_run(out: str, kill_group: str, kill_call: int, resume: bool) -> None:
    """Run groups a then b (chunk 2) into out; SIGKILL this process in call ``kill_call`` of ``kill_group``
    (kill_call 0: right after the group finished, i.e. at the boundary to the next group)."""
    import signal

    for group, order in TWO_GROUPS.items():
        calls = []

        def fn(ids, group=group, calls=calls):
            calls.append(ids)
            if group == kill_group and len(calls) == kill_call:
                os.kill(os.getpid(), signal.SIGKILL)
            return compute(ids)

        run_images(order, fn, Path(out) / f"{group}.jsonl", {**SETTINGS, "group": group}, resume=resume, chunk=2,
                   progress=False, overwrite=False)
        if group == kill_group and kill_call == 0:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("kill_group, kill_call", [("a", 1), ("a", 0), ("b", 1), ("b", 2)],
                         ids=["first-chunk", "group-boundary", "first-chunk-of-b", "mid-b"])
def test_kill_9_then_resume_gives_the_records_of_an_uninterrupted_run(tmp_path, kill_group, kill_call):
    import subprocess
    import sys

    ref, out = tmp_path / "ref", tmp_path / "run"
    _two_group_run(str(ref), "", -1, resume=False)
    code = (f"from tests.test_runs import _two_group_run; _two_group_run({str(out)!r}, {kill_group!r}, "
            f"{kill_call}, False)")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, timeout=300, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr   # killed by SIGKILL
    # a fresh run now refuses (the killed run left finished records: group a's at least, after its first chunk)
    if (kill_group, kill_call) != ("a", 1):
        with pytest.raises(RunFileError, match="finished record"):
            _two_group_run(str(out), "", -1, resume=False)
    _two_group_run(str(out), "", -1, resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["a.jsonl", "b.jsonl"]
    for group in TWO_GROUPS:
        assert (out / f"{group}.jsonl").read_bytes() == (ref / f"{group}.jsonl").read_bytes()


# ------------------------------------------------------------------------------------------- the tables' folders
def test_table_on_the_wrong_kind_or_sigma_of_checkpoint_is_one_clear_line(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (["table1", "--sigmas", "0.25", "--model-template", "crownibp-cnn-2layer-eps2"],
         ["table1 at sigma 0.25", "'crown-ibp'"]),
        (["table1", "--sigmas", "0.5", "--model-template", "smooth-sigma0.25"], ["sigma 0.5", "sigma 0.25"]),
        (["table2", "--models", "smooth-sigma0.25"], ["CROWN-IBP", "'gaussian'"]),
        (["table2", "--models", "cnn-undefended"], ["CROWN-IBP", "'none'"]),
    ]
    for args, words in cases:
        assert main(["reproduce", *args, "--out-dir", str(out), "--device", "cpu", "--source", "subset"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert all(w in err for w in words), err
    assert not out.exists()   # nothing written


def test_fresh_table_run_refuses_to_replace_finished_records_unless_overwrite(tmp_path, capsys):
    from shadowlab.experiments import reproduce

    records = tmp_path / "table2" / "records"
    records.mkdir(parents=True)
    finished = records / "crownibp-cnn-2layer-eps2.jsonl"
    finished.write_text('{"format": "x"}\n{"idx": 0}\n')
    other = records / "some-other-model.jsonl"    # another group's records: never touched
    other.write_text('{"format": "x"}\n{"idx": 0}\n')
    args = ["reproduce", "table2", "--models", "crownibp-cnn-2layer-eps2", "--out-dir", str(tmp_path),
            "--device", "cpu", "--source", "subset", "--n-images", "1", "--steps", "1", "--no-controls"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "finished record" in err and "--overwrite" in err and "--resume" in err
    assert finished.read_text() == '{"format": "x"}\n{"idx": 0}\n'
    with pytest.raises(RunFileError, match="finished record"):
        reproduce.table2(models=["crownibp-cnn-2layer-eps2"], n_images=1, steps=1, out_dir=tmp_path / "table2",
                         overwrite=False, progress=False, source="subset", device="cpu")
    assert reproduce.group_file(records, "/abs/path/ckpt").parent == records
    assert reproduce.group_file(records, "../../x.safetensors").parent == records
    assert reproduce.group_file(records, "crownibp-a") == records / "crownibp-a.jsonl"
    assert main([*args, "--overwrite"]) == 0
    assert other.read_text() == '{"format": "x"}\n{"idx": 0}\n'


def test_checkpoint_given_as_a_path_writes_only_under_out_dir(tmp_path):
    import shutil

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(checkpoints.models_dir() / f"crownibp-cnn-2layer-eps2{suffix}", ckpts / f"mine{suffix}")
    before = sorted(p.name for p in ckpts.iterdir())
    out = tmp_path / "out"
    args = ["reproduce", "table2", "--models", str(ckpts / "mine"), "--out-dir", str(out), "--device", "cpu",
            "--source", "subset", "--n-images", "1", "--steps", "1", "--no-controls"]
    assert main(args) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == before
    (record,) = (out / "table2" / "records").iterdir()
    assert record.name.startswith("mine-") and record.suffix == ".jsonl"
    assert main([*args, "--resume"]) == 0 and sorted(p.name for p in ckpts.iterdir()) == before


def test_a_setting_added_later_reads_as_the_value_that_reproduces_older_files(tmp_path):
    store = tmp_path / "records.jsonl"
    run_images([0, 1], compute, store, SETTINGS, progress=False)   # written before config.best_by existed
    same = run_images([0, 1], compute, store, {**SETTINGS, "config.best_by": "statistic"}, resume=True,
                      progress=False)
    assert [r["idx"] for r in same] == [0, 1]
    with pytest.raises(RunFileError, match=r"config.best_by: file 'statistic', this run 'ssim'"):
        run_images([0, 1], compute, store, {**SETTINGS, "config.best_by": "ssim"}, resume=True, progress=False)
