import json
import warnings

import pytest
import torch

from shadowlab import checkpoints
from shadowlab.checkpoints import CheckpointError
from shadowlab.data import file_sha256
from shadowlab.models import build


def _save(name="tiny", arch="cnn-2layer", kw=None):
    kw = kw or {"width": 1, "linear_size": 16}
    torch.manual_seed(0)
    model = build(arch, **kw)
    checkpoints.save(model, name, arch=arch, arch_kwargs=kw, defense="none", seed=0, metrics={"x": 1.0})
    return model


def test_round_trip(models_tmp):
    model = _save()
    loaded, meta = checkpoints.load("tiny")
    assert meta["arch"] == "cnn-2layer" and meta["metrics"] == {"x": 1.0} and "torch" in meta["versions"]
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded(x))
    assert checkpoints.available() == ["tiny"]


def test_oversized_checkpoint_warns_in_models_folder(models_tmp, tmp_path, monkeypatch):
    """A checkpoint over the committed-size limit warns when it lands in the models folder, and only there."""
    monkeypatch.setattr(checkpoints, "COMMITTED_MAX_BYTES", 1000)
    with pytest.warns(UserWarning, match="must stay under 1,000 bytes"):
        _save()
    elsewhere = tmp_path / "elsewhere"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _save(str(elsewhere / "tiny"))
    assert (elsewhere / "tiny.safetensors").stat().st_size > 1000


def test_names_with_dots(models_tmp):
    """'smooth-sigma0.25' and 'smooth-sigma0.12' are two checkpoints, not one file with suffix .25/.12."""
    _save("smooth-sigma0.25")
    _save("smooth-sigma0.12")
    assert checkpoints.available() == ["smooth-sigma0.12", "smooth-sigma0.25"]
    assert (models_tmp / "smooth-sigma0.25.safetensors").exists()
    checkpoints.load("smooth-sigma0.25")


def test_missing_checkpoint_lists_available(models_tmp):
    _save()
    with pytest.raises(CheckpointError, match="missing.*tiny"):
        checkpoints.load("nope")


def test_corrupt_weights_rejected(models_tmp):
    _save()
    path = models_tmp / "tiny.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoints.load("tiny")


def test_truncated_file_with_matching_hash_rejected(models_tmp):
    _save()
    path = models_tmp / "tiny.safetensors"
    path.write_bytes(b"not a safetensors file")
    meta = json.loads((models_tmp / "tiny.json").read_text())
    meta["sha256"] = file_sha256(path)
    (models_tmp / "tiny.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        checkpoints.load("tiny")


def test_wrong_architecture_rejected(models_tmp):
    _save()
    meta = json.loads((models_tmp / "tiny.json").read_text())
    meta["arch_kwargs"] = {"width": 2, "linear_size": 16}
    (models_tmp / "tiny.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match architecture.*shape mismatch"):
        checkpoints.load("tiny")
    meta["arch"] = "cnn-4layer"
    (models_tmp / "tiny.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match architecture"):
        checkpoints.load("tiny")


def test_bad_sidecar(models_tmp):
    _save()
    (models_tmp / "tiny.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoints.load("tiny")
    (models_tmp / "tiny.json").write_text("{}")
    with pytest.raises(CheckpointError, match="lacks"):
        checkpoints.load("tiny")


def test_never_unpickles(models_tmp):
    """A pickle file renamed to .safetensors is refused, not executed."""
    _save()
    path = models_tmp / "tiny.safetensors"
    torch.save({"w": torch.zeros(1)}, path)
    meta = json.loads((models_tmp / "tiny.json").read_text())
    meta["sha256"] = file_sha256(path)
    (models_tmp / "tiny.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        checkpoints.load("tiny")


def test_committed_models_load():
    names = checkpoints.available()
    if not names:
        pytest.skip("no committed models in data/models")
    for name in names:
        model, meta = checkpoints.load(name)
        assert (checkpoints.models_dir() / f"{name}.safetensors").stat().st_size < checkpoints.COMMITTED_MAX_BYTES
        for key in ("arch", "defense", "recipe", "seed", "data_source", "metrics", "command", "versions"):
            assert key in meta, f"{name} sidecar lacks {key}"


@pytest.mark.parametrize("field, value, message", [
    ("arch_kwargs", [1, 2], "arch_kwargs"), ("sha256", None, "sha256"), ("arch", 3, "arch"),
    ("arch_kwargs", {"width": 200_000, "linear_size": 16}, r"arch_kwargs.width=200000 must be an integer in \[0"),
    ("arch_kwargs", {"width": {"x": 1}}, "arch_kwargs.width"), ("defense_parameter", {"sigma": -1}, "sigma"),
    ("defense_parameter", [0.25], "defense_parameter"), ("defense", 7, "defense")])
def test_sidecar_schema_is_checked_before_anything_is_built(models_tmp, monkeypatch, field, value, message):
    _save()
    meta = json.loads((models_tmp / "tiny.json").read_text())
    (models_tmp / "tiny.json").write_text(json.dumps({**meta, field: value}))
    monkeypatch.setattr(checkpoints, "build", lambda *a, **k: pytest.fail("built before the schema check"))
    with pytest.raises(CheckpointError, match=message):
        checkpoints.load("tiny")


def test_architecture_is_compared_with_the_file_before_allocation(models_tmp, monkeypatch):
    _save()
    meta = json.loads((models_tmp / "tiny.json").read_text())
    (models_tmp / "tiny.json").write_text(json.dumps({**meta, "arch_kwargs": {"width": 4000, "linear_size": 16}}))
    real_build = checkpoints.build

    def only_on_meta(*a, **k):   # the skeleton is built on the meta device: no memory for its weights
        model = real_build(*a, **k)
        assert all(p.is_meta for p in model.parameters()), "allocated before the shapes were compared"
        return model

    monkeypatch.setattr(checkpoints, "build", only_on_meta)
    with pytest.raises(CheckpointError, match="does not match architecture"):
        checkpoints.load("tiny")


def test_an_existing_checkpoint_is_refused_without_force(models_tmp):
    _save()
    checkpoints.refuse_existing("brand-new")
    with pytest.raises(CheckpointError, match="already exists.*--force"):
        checkpoints.refuse_existing("tiny")
    checkpoints.refuse_existing("tiny", force=True)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "a..b", "", "x" * 200, 3, "a\\b"])
def test_checkpoint_names_are_checked_by_one_validator(name):
    from shadowlab import validate

    with pytest.raises(ValueError, match=r"name=.* must be a checkpoint name"):
        validate.checkpoint_name(name)


def test_cli_train_refuses_an_existing_name_or_a_path_before_training(models_tmp, tmp_path, monkeypatch, capsys):
    from shadowlab.cli import commands  # the command's own name for train (imported at its top)
    from shadowlab.cli.main import main

    monkeypatch.setattr(commands, "train", lambda *a, **k: pytest.fail("trained before the name was checked"))
    _save("taken")
    before = {p.name: p.read_bytes() for p in models_tmp.iterdir()}
    for args, message in ((["--name", "taken"], "already exists"), (["--name", "../x"], "--name='../x'"),
                          (["--name", "sub/x"], "--name='sub/x'")):
        assert main(["train", "--arch", "cnn", *args, "--source", "subset", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in models_tmp.iterdir()} == before
    assert not (tmp_path.parent / "x.safetensors").exists()
