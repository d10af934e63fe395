"""Resumable, shardable per-image runs: the images are split over torch.distributed ranks, every rank appends its
records to a JSONL file as it goes, ``resume`` skips the images already on disk, and rank 0 gathers every record.

One call, ``run_images(indices, fn, store, settings)``, does all of it. ``fn`` maps a list of image indices to one
JSON-serialisable dict per image; it must give an image the same record whichever other images share its call
and whichever rank runs it (seed by image, or share the noise across a call as ``Smooth.certify`` does). Then a run
on K ranks, a run killed and resumed, and a single-process run return the same records, in the order of
``indices``, and write the same ``store`` file.

Files, for ``store = DIR/records.jsonl``:

- ``DIR/records.rank{r}.jsonl``: rank r's partial file while the run is going. Line 1 is a header with the run
  settings and their sha256 fingerprint; every further line is one record ``{"idx": i, ...}``, flushed and fsync'ed
  after each call of ``fn``, so a killed process loses at most the images of the call in flight (a last line cut
  short by the kill is dropped on resume).
- ``DIR/records.jsonl``: every record in the order of ``indices`` under the same header, written by rank 0 at the
  end (atomically), followed by the records on disk of images outside ``indices`` (in index order); the partial
  files are then removed.

``resume=True`` reads every ``records*.jsonl`` in DIR (any world size may have written them) and refuses, with
``RunFileError`` naming the first differing setting, a file whose header holds other settings, and one that is
corrupt. The image list is not such a setting (``IMAGE_LIST_KEYS``): records are keyed by image index and an image's
record does not depend on the others, so a run of 50 images resumed with 100 computes only the 50 new ones, and a
resumed run with fewer images returns the records of the images it lists and keeps the others in the file. A file
without records (empty: killed before its header reached the disk, or header-only: killed in the first call) holds
nothing to resume and counts as a fresh start. The header is flushed and fsync'ed when the file is created. Without
``resume`` the run starts over: files holding finished records are replaced only with ``overwrite=True`` (else
``RunFileError`` before anything is computed or removed; ``refuse_overwrite`` checks several stores at once); files
without records are replaced in any case.

Distributed: launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ... in the environment)
``init_distributed`` joins the process group (NCCL when CUDA is available, else gloo) and ``rank_device`` gives
each rank its own GPU (``LOCAL_RANK``); without those variables everything runs in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from shadowlab import validate

FORMAT = "shadowlab-records/1"
Record = dict[str, Any]


class RunFileError(RuntimeError, ValueError):
    """A partial record file is corrupt or was written with other settings than this run's."""


# ------------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, the torch.distributed backend (None: single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, which gathers the records and writes the output files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1


def init_distributed(backend: str | None = None) -> DistContext:
    """Join the torchrun process group when the environment names one (WORLD_SIZE > 1), else a single process.

    backend: "nccl" or "gloo"; default NCCL when CUDA is available, else gloo. Already initialised groups are
    reused. Returns the DistContext; call ``finish_distributed`` at the end. Example, under
    ``torchrun --nproc_per_node 2 -m shadowlab certify smoothing ...``: ranks 0 and 1, world size 2.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                           dist.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend={backend!r} must be 'nccl' or 'gloo'")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, backend)


def finish_distributed(ctx: DistContext) -> None:
    """Leave the process group joined by ``init_distributed`` (nothing for a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(ctx: DistContext, device: torch.device | str | None = None) -> torch.device:
    """This rank's device: ``device`` if given with an index, cuda:LOCAL_RANK for CUDA under several ranks, else
    CUDA when available, else CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and ctx.distributed:
            return torch.device("cuda", ctx.local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", ctx.local_rank if ctx.distributed else torch.cuda.current_device())
    return torch.device("cpu")


CPU_CHUNK = 8   # images per call on a CPU: larger batches add no throughput on a few cores, only lost work on a kill


def auto_chunk(device: torch.device | str, bytes_per_image: int, cap: int = 512, fraction: float = 0.5) -> int:
    """Images per call of a table's work on ``device``: ``CPU_CHUNK`` on a CPU; on a GPU as many as fit in
    ``fraction`` of its free memory at ``bytes_per_image`` (an estimate of the work's peak memory per image), at
    most ``cap`` and at least 1. A GPU needs large batches to reach its throughput (Table 2 ran 9x faster at 250
    images per call than at 8 on an H200, docs/research-scale.md)."""
    bytes_per_image = validate.count(bytes_per_image, "bytes_per_image")
    cap = validate.count(cap, "cap")
    device = torch.device(device)
    if device.type != "cuda":
        return min(cap, CPU_CHUNK)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(fraction * free) // bytes_per_image))


def _all_gather(ctx: DistContext, obj: Any) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(ctx: DistContext, value: float) -> float:
    """The mean of ``value`` over every rank (every rank must call it; a single process returns value)."""
    values = _all_gather(ctx, float(value))
    return sum(values) / len(values)


def _barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


# ------------------------------------------------------------------------------------------------- record files
# Settings that name the image list rather than how an image is computed: ignored when a resume compares settings.
IMAGE_LIST_KEYS = frozenset({"indices_sha256", "n_images"})
# Settings added after record files were committed, each with the value that reproduces what those files did: a
# file without the key is read as having that value (a run with another value is still refused).
ADDED_SETTINGS: dict[str, Any] = {"config.best_by": "statistic", "prune_step": 5, "settle_window": 10,
                                   "settle_tol": 1e-3}


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the settings as canonical JSON (sorted keys): equal settings, equal fingerprint."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _header(settings: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "fingerprint": fingerprint(settings), "settings": settings}


def _differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    ours = json.loads(json.dumps(ours, default=str))  # compare in the file's JSON types (tuples as lists)
    keys = sorted(set(theirs) | set(ours))
    return [f"{k}: file {theirs.get(k, '<absent>')!r}, this run {ours.get(k, '<absent>')!r}"
            for k in keys if theirs.get(k, "<absent>") != ours.get(k, "<absent>")]


def read_records(path: Path, settings: dict[str, Any], allow_cut_last_line: bool = True) -> list[Record]:
    """The records of one file, after checking its header against ``settings``.

    Raises RunFileError naming the file and line when it is corrupt (bad JSON, no header, a record without an
    integer "idx"), or naming every differing setting when the header's settings differ from ``settings`` in
    anything but the image list (``IMAGE_LIST_KEYS``; the caller keeps the records of the images it wants).
    A last line without its newline (a write cut short by a kill) is dropped when ``allow_cut_last_line``.
    """
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    cut = lines[-1] != ""
    if cut and allow_cut_last_line:
        lines = lines[:-1]
    elif not cut:
        lines = lines[:-1]
    if not lines:
        raise RunFileError(f"{path}: empty record file (no header line, no records); delete it")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path}: line 1 is not a JSON header ({err}): the file is corrupt; delete it or run "
                           "without --resume") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(header.get("settings"), dict):
        raise RunFileError(f"{path}: line 1 is not a {FORMAT} header: the file is corrupt or not a record file")
    if header.get("fingerprint") != fingerprint(header["settings"]):
        raise RunFileError(f"{path}: the header's fingerprint does not match its settings: the file was edited or "
                           "is corrupt")
    def per_image(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in {**ADDED_SETTINGS, **d}.items() if k not in IMAGE_LIST_KEYS}

    if fingerprint(per_image(header["settings"])) != fingerprint(per_image(settings)):
        diffs = _differences(per_image(header["settings"]), per_image(settings))
        raise RunFileError(f"{path} was written with other settings than this run's, so its records cannot be "
                           f"resumed: {'; '.join(diffs[:6])}. Rerun with the file's settings, or write to another "
                           "--out-dir (or start over with --overwrite, which replaces these records)")
    records = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunFileError(f"{path}: line {n} is not a JSON record ({err}): the file is corrupt") from None
        if not isinstance(rec, dict) or isinstance(rec.get("idx"), bool) or not isinstance(rec.get("idx"), int):
            raise RunFileError(f"{path}: line {n} is not a record with an integer 'idx': the file is corrupt")
        records.append(rec)
    return records


def _write_line(f, obj: Any) -> None:
    f.write(json.dumps(obj, sort_keys=True) + "\n")


def _sync(f) -> None:
    """Push f's buffer to the disk: a kill -9 after this loses nothing written so far."""
    f.flush()
    os.fsync(f.fileno())


def count_records(path: Path) -> int:
    """Complete record lines in a record file (its lines after the header, a last line cut short not counted):
    0 for an empty or header-only file, which holds nothing to resume or to lose."""
    data = path.read_bytes()
    return max(0, data.count(b"\n") - 1)


def refuse_overwrite(stores: Sequence[str | os.PathLike], what: str = "--overwrite") -> None:
    """RunFileError when a record file of any of ``stores`` (merged or partial) holds finished records: a fresh run
    would replace them. The message names the file, its record count, and the two ways on: ``--resume`` (same
    settings) or ``what`` (replace them). Files without records are not in the way."""
    for store in map(Path, stores):
        for path in _record_files(store):
            n = count_records(path)
            if n:
                raise RunFileError(f"{path} holds {n} finished record(s) of an earlier run; a fresh run would replace "
                                   f"them: continue it with --resume (same settings), replace them with {what}, or "
                                   "choose another --out-dir")


def _partial(store: Path, rank: int) -> Path:
    return store.with_name(f"{store.stem}.rank{rank}{store.suffix}")


def _record_files(store: Path) -> list[Path]:
    return sorted(p for p in store.parent.glob(f"{store.stem}*{store.suffix}")
                  if p == store or p.name.startswith(f"{store.stem}.rank"))


def _truncate_cut_line(path: Path) -> None:
    """Drop a last line cut short by a kill, so that appending starts on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ------------------------------------------------------------------------------------------------- the runner
def _done(store: Path, mine: Path, settings: dict[str, Any], resume: bool, overwrite: bool, ctx: DistContext
          ) -> tuple[dict[int, Record], bool]:
    """run_images' step 1: the records already on disk (with ``resume``; else the store's files are removed, or
    RunFileError without ``overwrite``), and whether this rank's partial file holds none (rewrite it)."""
    done: dict[int, Record] = {}
    fresh_mine = False
    if resume:
        for path in _record_files(store):
            if count_records(path) == 0:   # empty or header-only: nothing to resume (whatever its settings)
                fresh_mine = fresh_mine or path == mine
                continue
            for rec in read_records(path, settings):
                done.setdefault(rec["idx"], rec)
    else:
        if not overwrite:
            refuse_overwrite([store])
        _barrier(ctx)
        if ctx.is_main:
            for path in _record_files(store):
                path.unlink()
    _barrier(ctx)
    return done, fresh_mine


def _gather(store: Path, mine: Path, indices: list[int], settings: dict[str, Any], local: list[Record],
            ctx: DistContext, others: dict[int, Record] | None = None) -> list[Record]:
    """run_images' step 3: rank 0 gathers every rank's records (``local`` here), writes the merged file, then every
    rank removes its partial file. Returns the records in the order of ``indices`` on rank 0, [] elsewhere.
    ``others``: records on disk of images outside ``indices`` (a resume with fewer images); the merged file keeps
    them after the run's own, in index order, so that a later, larger run still finds them."""
    gathered: list[list[Record]] = [local]
    if ctx.distributed:
        gathered = [None] * ctx.world_size  # type: ignore[list-item]
        dist.gather_object(local, gathered if ctx.is_main else None, dst=0)
    records: list[Record] = []
    if ctx.is_main:
        by_idx: dict[int, Record] = {}
        for part in gathered:
            for rec in part:
                by_idx.setdefault(rec["idx"], rec)
        missing = [i for i in indices if i not in by_idx]
        if missing:
            raise RuntimeError(f"records of {len(missing)} images are missing after the gather, e.g. {missing[:5]}")
        records = [json.loads(json.dumps(by_idx[i], sort_keys=True)) for i in indices]  # as read back from JSONL
        kept = [rec for _, rec in sorted((others or {}).items())]   # outside indices, so never in by_idx
        tmp = store.with_name(store.name + ".tmp")
        with open(tmp, "w") as f:
            _write_line(f, _header(settings))
            for rec in records + kept:
                _write_line(f, rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, store)
    _barrier(ctx)
    mine.unlink(missing_ok=True)
    if ctx.is_main:  # partial files of earlier runs with more ranks, now merged (on a shared file system)
        for path in _record_files(store):
            if path != store:
                path.unlink(missing_ok=True)
    return records


def run_images(indices: Sequence[int], fn: Callable[[list[int]], list[Record]], store: str | os.PathLike,
               settings: dict[str, Any], resume: bool = False, chunk: int = 1, ctx: DistContext | None = None,
               progress: bool = True, desc: str = "images", overwrite: bool = True) -> list[Record]:
    """Run ``fn`` on every image index not yet done, sharded over the ranks, and return all records on rank 0.

    indices: distinct ints (the images, in output order). fn: list of at most ``chunk`` indices -> one
    JSON-serialisable dict per index (without "idx", which is added). store: the merged JSONL file (see the
    module docstring); settings: everything a record depends on (JSON-serialisable), checked on resume.
    resume: continue from the record files of ``store`` (files without records count as a fresh start).
    overwrite: without ``resume``, replace this store's finished records; False raises RunFileError
    (``refuse_overwrite``) when any exist. Other stores in the folder are never touched.
    Returns, on rank 0, one record per index in the order of ``indices``, each with its "idx"; on other ranks [].
    Example: ``run_images(range(500), lambda ids: [{"ok": certify(i)} for i in ids], "out/records.jsonl",
    {"sigma": 0.25, "n": 100000}, resume=True)``.
    """
    ctx = ctx if ctx is not None else DistContext()
    indices = [int(i) for i in indices]
    if len(set(indices)) != len(indices):
        raise ValueError("indices must be distinct")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be an integer >= 1")
    settings = {**settings, "indices_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest()}
    store = Path(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    mine = _partial(store, ctx.rank)

    # 1. what is done already (every rank reads what it can see; the union is shared)
    done, fresh_mine = _done(store, mine, settings, resume, overwrite, ctx)
    wanted = set(indices)
    others = {i: r for i, r in done.items() if i not in wanted}   # kept in the merged file, not returned
    done = {i: r for i, r in done.items() if i in wanted}
    known = set().union(*_all_gather(ctx, sorted(done)))

    # 2. this rank's share of what is left. The calls are fixed chunks of ``indices`` whatever the world size and
    # whatever is done already, so an image is always computed in the same batch: a batched fn whose floats depend
    # on the batch (a GPU kernel's choice, a CPU reduction order) still gives a sharded or resumed run the records
    # of a single uninterrupted one. A chunk with any image missing is recomputed whole (the records on disk win).
    calls = [ids for ids in _chunks(indices, chunk) if any(i not in known for i in ids)]
    my_calls = calls[ctx.rank::ctx.world_size]
    n_share = sum(len(ids) for ids in my_calls)
    if resume and mine.exists() and not fresh_mine:
        _truncate_cut_line(mine)
    new_file = fresh_mine or not mine.exists()
    computed: list[Record] = []
    with open(mine, "w" if new_file else "a") as f, tqdm(total=n_share, desc=desc, unit="img",
                                                         disable=not progress or not ctx.is_main) as bar:
        if new_file:   # the header reaches the disk before any work: a kill in the first call leaves a valid file
            _write_line(f, _header(settings))
            _sync(f)
        for ids in my_calls:
            out = fn(list(ids))
            if len(out) != len(ids):
                raise ValueError(f"fn returned {len(out)} records for {len(ids)} indices")
            for i, rec in zip(ids, out):
                rec = {**rec, "idx": i}
                _write_line(f, rec)
                computed.append(rec)
            _sync(f)
            bar.update(len(ids))

    # 3. rank 0 gathers, writes the merged file, then every rank removes its partial file
    return _gather(store, mine, indices, settings, list(done.values()) + computed, ctx, others)
