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
