"""Importing the authors' checkpoints: synthetic files in each exact format, written here with random weights and
batch-norm statistics, must give the logits of a forward pass written here from the file's own tensors; unsafe or
mismatched files are refused with errors naming what was expected."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from shadowlab import checkpoints, importers
from shadowlab.cli.main import main
from shadowlab.data import file_sha256
from shadowlab.importers import ImportCheckpointError, import_cohen, import_crown_ibp

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------- synthetic files
class Weights:
    """Random tensors for a state dict: He-scaled convolutions, random batch-norm statistics."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.sd: dict[str, torch.Tensor] = {}

    def conv(self, key: str, cout: int, cin: int, k: int, bias: bool = False) -> None:
        self.sd[key + "weight"] = torch.randn(cout, cin, k, k, generator=self.g) * math.sqrt(2 / (k * k * cout))
        if bias:
            self.sd[key + "bias"] = torch.randn(cout, generator=self.g) * 0.1

    def linear(self, key: str, cout: int, cin: int) -> None:
        self.sd[key + "weight"] = torch.randn(cout, cin, generator=self.g) / math.sqrt(cin)
        self.sd[key + "bias"] = torch.randn(cout, generator=self.g) * 0.1

    def bn(self, key: str, c: int) -> None:
        u = lambda lo, hi: lo + (hi - lo) * torch.rand(c, generator=self.g)  # noqa: E731
        self.sd.update({key + "weight": u(0.5, 1.5), key + "bias": u(-0.2, 0.2), key + "running_mean": u(-0.2, 0.2),
                        key + "running_var": u(0.5, 2.0), key + "num_batches_tracked": torch.tensor(1000)})


def cohen_cifar_state(blocks: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """bearpaw's BasicBlock CIFAR ResNet under Sequential(NormalizeLayer, net): keys '1.*'."""
    w = Weights(seed)
    w.conv("1.conv1.", 16, 3, 3)
    w.bn("1.bn1.", 16)
    cin = 16
    for stage, planes in enumerate((16, 32, 64), 1):
        for i in range(blocks):
            p = f"1.layer{stage}.{i}."
            w.conv(p + "conv1.", planes, cin, 3)
            w.bn(p + "bn1.", planes)
            w.conv(p + "conv2.", planes, planes, 3)
            w.bn(p + "bn2.", planes)
            if i == 0 and cin != planes:
                w.conv(p + "downsample.0.", planes, cin, 1)
                w.bn(p + "downsample.1.", planes)
            cin = planes
    w.linear("1.fc.", 10, 64)
    return w.sd


def cohen_imagenet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's ResNet-50 (Bottleneck, stride in conv2) inside DataParallel inside Sequential: '1.module.*'."""
    w = Weights(seed)
    w.conv("1.module.conv1.", 64, 3, 7)
    w.bn("1.module.bn1.", 64)
    cin = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for i in range(blocks):
            p = f"1.module.layer{stage}.{i}."
            w.conv(p + "conv1.", planes, cin, 1)
            w.bn(p + "bn1.", planes)
            w.conv(p + "conv2.", planes, planes, 3)
            w.bn(p + "bn2.", planes)
            w.conv(p + "conv3.", 4 * planes, planes, 1)
            w.bn(p + "bn3.", 4 * planes)
            if i == 0:
                w.conv(p + "downsample.0.", 4 * planes, cin, 1)
                w.bn(p + "downsample.1.", 4 * planes)
            cin = 4 * planes
    w.linear("1.module.fc.", 1000, 2048)
    return w.sd


def save_cohen(path, state, arch, legacy=True):
    """Cohen et al.'s train.py: {'epoch', 'arch', 'state_dict', 'optimizer'}; their 2019 files use torch's legacy
    (pre-1.6) serialisation."""
    first = next(iter(state))
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros_like(state[first])}},
                 "param_groups": [{"lr": 0.001, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}]}
    torch.save({"epoch": 90, "arch": arch, "state_dict": state, "optimizer": optimizer}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


# CROWN-IBP model_defs as (kind, arguments) lists: conv (cout, cin, k, stride, padding), linear (cout, cin)
def crown_ibp_layers(family: str, **kw) -> list[tuple]:
    if family == "model_cnn_2layer":
        w, ls = kw["width"], kw.get("linear_size", 128)
        return [("conv", 4 * w, 3, 4, 2, 1), ("relu",), ("conv", 8 * w, 4 * w, 4, 2, 1), ("relu",), ("flatten",),
                ("linear", ls, 8 * w * 64), ("relu",), ("linear", 10, ls)]
    if family == "model_cnn_4layer":
        w, ls = kw["width"], kw["linear_size"]
        return [("conv", 4 * w, 3, 3, 1, 1), ("relu",), ("conv", 4 * w, 4 * w, 4, 2, 1), ("relu",),
                ("conv", 8 * w, 4 * w, 3, 1, 1), ("relu",), ("conv", 8 * w, 8 * w, 4, 2, 1), ("relu",), ("flatten",),
                ("linear", ls, 8 * w * 64), ("relu",), ("linear", ls, ls), ("relu",), ("linear", 10, ls)]
    if family == "model_cnn_3layer_fixed":
        k, w = kw["kernel_size"], kw["width"]
        ls = kw.get("linear_size") or 64 * w
        h = (32 - 4) // 4 if k == 5 else 32 // 4
        return [("conv", 4 * w, 3, k, 1, 1), ("relu",), ("conv", 8 * w, 4 * w, k, 1, 1), ("relu",),
                ("conv", 8 * w, 8 * w, 4, 4, 0), ("relu",), ("flatten",), ("linear", ls, 8 * w * h * h), ("relu",),
                ("linear", 10, ls)]
    if family == "IBP_large":
        ls = kw.get("linear_size", 512)
        convs = [(64, 3, 1), (64, 64, 1), (128, 64, 2), (128, 128, 1), (128, 128, 1)]
        layers = []
        for cout, cin, s in convs:
            layers += [("conv", cout, cin, 3, s, 1), ("relu",)]
        return layers + [("flatten",), ("linear", ls, 128 * 16 * 16), ("relu",), ("linear", 10, ls)]
    raise AssertionError(family)


def crown_ibp_state(layers: list[tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    w = Weights(seed)
    for i, layer in enumerate(layers):
        if layer[0] == "conv":
            w.conv(f"{i}.", layer[1], layer[2], layer[3], bias=True)
        elif layer[0] == "linear":
            w.linear(f"{i}.", layer[1], layer[2])
    return w.sd


# ------------------------------------------------------------------------------------------- reference forwards
def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        training=False, eps=1e-5)


def cohen_cifar_forward(sd, x, blocks):
    out = (x - CIFAR_MEAN) / CIFAR_STD
    out = F.relu(_bn(F.conv2d(out, sd["1.conv1.weight"], padding=1), sd, "1.bn1."))
    for stage in (1, 2, 3):
        for i in range(blocks):
            p = f"1.layer{stage}.{i}."
            s = 2 if stage > 1 and i == 0 else 1
            o = F.relu(_bn(F.conv2d(out, sd[p + "conv1.weight"], stride=s, padding=1), sd, p + "bn1."))
            o = _bn(F.conv2d(o, sd[p + "conv2.weight"], padding=1), sd, p + "bn2.")
            if p + "downsample.0.weight" in sd:
                out = _bn(F.conv2d(out, sd[p + "downsample.0.weight"], stride=s), sd, p + "downsample.1.")
            out = F.relu(o + out)
    return F.linear(F.avg_pool2d(out, 8).flatten(1), sd["1.fc.weight"], sd["1.fc.bias"])


def cohen_imagenet_forward(sd, x):
    q = "1.module."
    out = (x - IMAGENET_MEAN) / IMAGENET_STD
    out = F.relu(_bn(F.conv2d(out, sd[q + "conv1.weight"], stride=2, padding=3), sd, q + "bn1."))
    out = F.max_pool2d(out, 3, 2, 1)
    for stage, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3)):
        for i in range(blocks):
            p = f"{q}layer{stage}.{i}."
            s = 2 if stage > 1 and i == 0 else 1
            o = F.relu(_bn(F.conv2d(out, sd[p + "conv1.weight"]), sd, p + "bn1."))
            o = F.relu(_bn(F.conv2d(o, sd[p + "conv2.weight"], stride=s, padding=1), sd, p + "bn2."))
            o = _bn(F.conv2d(o, sd[p + "conv3.weight"]), sd, p + "bn3.")
            if p + "downsample.0.weight" in sd:
                out = _bn(F.conv2d(out, sd[p + "downsample.0.weight"], stride=s), sd, p + "downsample.1.")
            out = F.relu(o + out)
    return F.linear(out.mean((2, 3)), sd[q + "fc.weight"], sd[q + "fc.bias"])


def crown_ibp_forward(sd, layers, x):
    out = (x - CIFAR_MEAN) / CIFAR_STD  # CROWN-IBP's data loader normalisation
    for i, layer in enumerate(layers):
        if layer[0] == "conv":
            out = F.conv2d(out, sd[f"{i}.weight"], sd[f"{i}.bias"], stride=layer[4], padding=layer[5])
        elif layer[0] == "linear":
            out = F.linear(out, sd[f"{i}.weight"], sd[f"{i}.bias"])
        elif layer[0] == "relu":
            out = F.relu(out)
        else:
            out = out.reshape(out.shape[0], -1)
    return out


def assert_logits(got, want):
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert want.std() > 0  # not a degenerate network


def images(n=3, size=32, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- Cohen et al.
@pytest.mark.parametrize("arch,blocks", [("cifar_resnet20", 3),
                                         pytest.param("cifar_resnet110", 18, marks=pytest.mark.slow)])
def test_cohen_cifar_imports_to_the_same_logits(tmp_path, models_tmp, arch, blocks):
    state = cohen_cifar_state(blocks)
    src = save_cohen(tmp_path / "checkpoint.pth.tar", state, arch)
    name = f"cohen-{arch}-sigma0.25"
    import_cohen(src, 0.25, name)
    model, meta = checkpoints.load(name)  # by name, from the models folder
    x = images()
    with torch.no_grad():
        assert_logits(model(x), cohen_cifar_forward(state, x, blocks))
    assert meta["defense"] == "gaussian" and meta["defense_parameter"] == {"sigma": 0.25}
    assert meta["arch"] == {"cifar_resnet20": "resnet20", "cifar_resnet110": "resnet110"}[arch]
    src_meta = meta["source"]
    assert src_meta["format"] == "cohen" and src_meta["arch"] == arch and src_meta["epoch"] == 90
    assert src_meta["sha256"] == file_sha256(src)
    assert src_meta["normalization"]["std"] == pytest.approx([0.2023, 0.1994, 0.2010])


@pytest.mark.slow
def test_cohen_imagenet_resnet50_imports_to_the_same_logits(tmp_path):
    state = cohen_imagenet_state()
    src = save_cohen(tmp_path / "checkpoint.pth.tar", state, "resnet50", legacy=False)
    out = import_cohen(src, 0.5, "cohen-resnet50-sigma0.50", out_dir=tmp_path / "models")
    model, meta = checkpoints.load(out)
    x = images(n=2, size=64)  # 64 x 64 keeps it quick; the network is fully convolutional up to its mean pool
    with torch.no_grad():
        assert_logits(model(x), cohen_imagenet_forward(state, x))
    assert meta["arch"] == "resnet50-imagenet" and meta["source"]["dataset"] == "imagenet"


def test_cohen_errors_name_what_was_expected(tmp_path):
    state = cohen_cifar_state(3)
    with pytest.raises(ImportCheckpointError, match="arch='cifar_resnet56'.*cifar_resnet110"):
        import_cohen(save_cohen(tmp_path / "a.pth", state, "cifar_resnet56"), 0.25, "x", tmp_path)
    # ResNet-20 weights labelled ResNet-110: the first missing block is named as the file should hold it
    with pytest.raises(ImportCheckpointError, match=r"cifar_resnet110.*18 BasicBlocks.*missing.*1\.layer1\.3\."):
        import_cohen(save_cohen(tmp_path / "b.pth", state, "cifar_resnet110"), 0.25, "x", tmp_path)
    with pytest.raises(ImportCheckpointError, match=r"unexpected.*1\.extra\.weight"):
        import_cohen(save_cohen(tmp_path / "c.pth", {**state, "1.extra.weight": torch.zeros(2)}, "cifar_resnet20"),
                     0.25, "x", tmp_path)
    wrong = dict(state, **{"1.fc.weight": torch.zeros(10, 32)})
    with pytest.raises(ImportCheckpointError, match=r"shape mismatch 1\.fc\.weight: file \(10, 32\), expected "
                                                    r"\(10, 64\)"):
        import_cohen(save_cohen(tmp_path / "d.pth", wrong, "cifar_resnet20"), 0.25, "x", tmp_path)
    bare = {k[2:]: v for k, v in state.items()}  # the ResNet saved without the NormalizeLayer wrapper
    with pytest.raises(ImportCheckpointError, match="'1.'"):
        import_cohen(save_cohen(tmp_path / "e.pth", bare, "cifar_resnet20"), 0.25, "x", tmp_path)
    with pytest.raises(ValueError, match="sigma"):
        import_cohen(tmp_path / "a.pth", 0.0, "x", tmp_path)
    assert not list(tmp_path.glob("x.*"))  # nothing written by any refused import


def test_bearpaw_resnet164_is_refused_as_resnet110(tmp_path):
    # bearpaw/pytorch-classification's "resnet110" weights: Bottleneck blocks (conv1/conv2/conv3), 'module.' prefix
    w = Weights(0)
    w.conv("module.conv1.", 16, 3, 3)
    w.bn("module.bn1.", 16)
    w.conv("module.layer1.0.conv1.", 16, 16, 1)
    w.conv("module.layer1.0.conv2.", 16, 16, 3)
    w.conv("module.layer1.0.conv3.", 64, 16, 1)
    w.bn("module.layer1.0.bn3.", 64)
    w.linear("module.fc.", 10, 256)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 164, "state_dict": w.sd, "best_acc": 94.5}, path)
    with pytest.raises(ImportCheckpointError, match="ResNet-164.*BasicBlocks"):
        import_cohen(path, 0.25, "x", tmp_path)
    labelled = {"1." + k[len("module."):]: v for k, v in w.sd.items()}
    with pytest.raises(ImportCheckpointError, match="Bottleneck"):
        import_cohen(save_cohen(tmp_path / "l.pth", labelled, "cifar_resnet110"), 0.25, "x", tmp_path)


# ------------------------------------------------------------------------------------------- CROWN-IBP
CROWN_IBP_CASES = [
    ("model_cnn_2layer", {"in_ch": 3, "in_dim": 32, "width": 2, "linear_size": 256}),
    ("model_cnn_4layer", {"in_ch": 3, "in_dim": 32, "width": 1, "linear_size": 512}),
    ("model_cnn_3layer_fixed", {"in_ch": 3, "in_dim": 32, "kernel_size": 5, "width": 1}),
    ("model_cnn_3layer_fixed", {"in_ch": 3, "in_dim": 32, "kernel_size": 3, "width": 2, "linear_size": 64}),
    ("IBP_large", {"in_ch": 3, "in_dim": 32, "linear_size": 64}),
]


@pytest.mark.parametrize("family,params", CROWN_IBP_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_crown_ibp_imports_to_the_same_logits(tmp_path, models_tmp, family, params):
    kw = {k: v for k, v in params.items() if k not in ("in_ch", "in_dim")}
    layers = crown_ibp_layers(family, **kw)
    state = crown_ibp_state(layers)
    src = tmp_path / "cnn_best.pth"
    torch.save({"state_dict": state, "epoch": 199, "robust_err": 0.7, "clean_err": 0.55}, src)
    import_crown_ibp(src, family, params, 8 / 255, "authors-model")
    model, meta = checkpoints.load("authors-model")
    x = images()
    with torch.no_grad():
        assert_logits(model(x), crown_ibp_forward(state, layers, x))
    assert meta["defense"] == "crown-ibp" and meta["defense_parameter"] == {"eps": pytest.approx(8 / 255)}
    assert meta["source"]["format"] == "crown-ibp" and meta["source"]["robust_err"] == 0.7
    assert meta["source"]["sha256"] == file_sha256(src)


def test_crown_ibp_model_is_bound_friendly_and_wrapped_variants_load(tmp_path):
    from shadowlab.certify.verify import certified

    layers = crown_ibp_layers("model_cnn_2layer", width=1)
    state = crown_ibp_state(layers)
    # a state_dict stored as a one-element list, with a 'prev' key: both as CROWN-IBP's own loader handles them
    src = tmp_path / "wrapped.pth"
    torch.save({"state_dict": [{**state, "prev_0.weight": torch.zeros(1)}], "epoch": 3}, src)
    out = import_crown_ibp(src, "model_cnn_2layer", {"width": 1}, 2 / 255, "m", tmp_path)
    model, _ = checkpoints.load(out)
    x = images()
    with torch.no_grad():
        assert_logits(model(x), crown_ibp_forward(state, layers, x))
    assert certified(model, x, model(x).argmax(1), 0.0, "crown-ibp").all()  # eps 0: every prediction certified


def test_crown_ibp_errors_name_what_was_expected(tmp_path):
    layers = crown_ibp_layers("model_cnn_2layer", width=2, linear_size=256)
    src = tmp_path / "w2.pth"
    torch.save({"state_dict": crown_ibp_state(layers), "epoch": 1}, src)
    with pytest.raises(ImportCheckpointError, match=r"shape mismatch 0\.weight: file \(8, 3, 4, 4\), expected "
                                                    r"\(4, 3, 4, 4\)"):
        import_crown_ibp(src, "model_cnn_2layer", {"width": 1, "linear_size": 256}, 8 / 255, "x", tmp_path)
    with pytest.raises(ImportCheckpointError, match="model_cnn_5layer.*model_cnn_2layer"):
        import_crown_ibp(src, "model_cnn_5layer", {"width": 2}, 8 / 255, "x", tmp_path)
    with pytest.raises(ImportCheckpointError, match="in_dim=28"):
        import_crown_ibp(src, "model_cnn_2layer", {"width": 2, "in_dim": 28}, 8 / 255, "x", tmp_path)
    with pytest.raises(ImportCheckpointError, match="missing.*linear_size"):
        import_crown_ibp(src, "model_cnn_4layer", {"width": 2}, 8 / 255, "x", tmp_path)
    # a 4-layer file read as a 2-layer model: the 2-layer net lacks the file's later layers
    layers4 = crown_ibp_layers("model_cnn_4layer", width=2, linear_size=256)
    src4 = tmp_path / "w4.pth"
    torch.save({"state_dict": crown_ibp_state(layers4)}, src4)
    with pytest.raises(ImportCheckpointError, match=r"unexpected.*'9\.weight'|shape mismatch"):
        import_crown_ibp(src4, "model_cnn_2layer", {"width": 2, "linear_size": 256}, 8 / 255, "x", tmp_path)
    torch.save({"model": crown_ibp_state(layers)}, tmp_path / "nosd.pth")
    with pytest.raises(ImportCheckpointError, match="'state_dict'"):
        import_crown_ibp(tmp_path / "nosd.pth", "model_cnn_2layer", {"width": 2}, 8 / 255, "x", tmp_path)
    with pytest.raises(ImportCheckpointError, match="does not exist"):
        import_crown_ibp(tmp_path / "absent.pth", "model_cnn_2layer", {"width": 2}, 8 / 255, "x", tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ImportCheckpointError, match="cannot read"):
        import_crown_ibp(tmp_path / "junk.pth", "model_cnn_2layer", {"width": 2}, 8 / 255, "x", tmp_path)
    assert not list(tmp_path.glob("x.*"))


# ------------------------------------------------------------------------------------------- safety
class Payload:
    """A pickle whose loading runs a shell command (creates the marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, capsys, legacy):
    marker = tmp_path / "ran"
    src = tmp_path / "payload.pth"
    state = crown_ibp_state(crown_ibp_layers("model_cnn_2layer", width=1))
    torch.save({"state_dict": state, "epoch": Payload(marker)}, src, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ImportCheckpointError, match="refused.*nothing in the file was run"):
        import_crown_ibp(src, "model_cnn_2layer", {"width": 1}, 8 / 255, "evil", tmp_path)
    code = main(["import-checkpoint", "crown-ibp", str(src), "--arch", "model_cnn_2layer", "--arch-kwargs",
                 '{"width": 1}', "--eps", "8/255", "--name", "evil", "--out-dir", str(tmp_path)])
    assert code == 2 and "refused" in capsys.readouterr().err
    torch.save({"state_dict": state, "arch": "cifar_resnet20", "epoch": Payload(marker)}, src)
    with pytest.raises(ImportCheckpointError, match="refused"):
        import_cohen(src, 0.25, "evil", tmp_path)
    assert not marker.exists() and not list(tmp_path.glob("evil.*"))
    # the file really is malicious: a plain unpickle runs its command
    torch.load(src, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------- command line
def test_cli_import_checkpoint_then_use_by_name(tmp_path, models_tmp, capsys):
    src = save_cohen(tmp_path / "checkpoint.pth.tar", cohen_cifar_state(3), "cifar_resnet20")
    assert main(["import-checkpoint", "cohen", str(src), "--sigma", "0.12", "--name", "cohen-r20"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["defense_parameter"] == {"sigma": 0.12} and printed["source"]["format"] == "cohen"
    assert "cohen-r20" in checkpoints.available()
    meta = checkpoints.read_metadata("cohen-r20")
    assert meta["command"].startswith("python -m shadowlab import-checkpoint cohen")
    # usable by name: certify smoothing reads sigma from the imported sidecar
    assert main(["certify", "smoothing", "--model", "cohen-r20", "--n-images", "2", "--n", "32", "--n0", "16",
                 "--source", "subset", "--device", "cpu", "--out-dir", str(tmp_path / "cert")]) == 0
    assert json.loads((tmp_path / "cert" / "summary.json").read_text())["sigma"] == 0.12
    layers = crown_ibp_layers("model_cnn_4layer", width=1, linear_size=64)
    torch.save({"state_dict": crown_ibp_state(layers)}, tmp_path / "c.pth")
    assert main(["import-checkpoint", "crown-ibp", str(tmp_path / "c.pth"), "--arch", "model_cnn_4layer",
                 "--arch-kwargs", '{"width": 1, "linear_size": 64}', "--eps", "2/255", "--name", "cibp"]) == 0
    assert checkpoints.read_metadata("cibp")["defense_parameter"]["eps"] == pytest.approx(2 / 255)
    assert main(["import-checkpoint", "crown-ibp", str(tmp_path / "c.pth"), "--arch", "model_cnn_4layer",
                 "--arch-kwargs", "{width: 1}", "--eps", "2/255", "--name", "bad"]) == 2
    assert "--arch-kwargs" in capsys.readouterr().err


def test_resnet50_imagenet_architecture():
    from shadowlab.models import Normalize, build

    model = build("resnet50-imagenet").eval()
    assert isinstance(model[0], Normalize)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
    assert importers.COHEN_ARCHS["resnet50"][0] == "resnet50-imagenet"


def test_import_refuses_an_existing_name_unless_force(tmp_path, models_tmp, capsys):
    src = save_cohen(tmp_path / "checkpoint.pth.tar", cohen_cifar_state(3), "cifar_resnet20")
    assert main(["import-checkpoint", "cohen", str(src), "--sigma", "0.25", "--name", "taken"]) == 0
    weights = (models_tmp / "taken.safetensors").read_bytes()
    sidecar = (models_tmp / "taken.json").read_text()
    capsys.readouterr()
    assert main(["import-checkpoint", "cohen", str(src), "--sigma", "0.5", "--name", "taken"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (models_tmp / "taken.safetensors").read_bytes() == weights and (models_tmp / "taken.json").read_text() \
        == sidecar
    with pytest.raises(checkpoints.CheckpointError, match="already exists"):
        import_cohen(src, 0.5, "taken")
    assert main(["import-checkpoint", "cohen", str(src), "--sigma", "0.5", "--name", "taken", "--force"]) == 0
    assert checkpoints.read_metadata("taken")["defense_parameter"] == {"sigma": 0.5}
    for bad in ("../escape", "a/b", ".."):
        assert main(["import-checkpoint", "cohen", str(src), "--sigma", "0.5", "--name", bad]) == 2
        assert "must be a checkpoint name" in capsys.readouterr().err
    assert not (models_tmp.parent / "escape.safetensors").exists()
