import pytest
import torch
from torch import nn

from shadowlab.certify.rules import BATCH_NORMS
from shadowlab.models import REGISTRY, Normalize, build, fold_batch_norm, num_parameters


# resnet50-imagenet has 1000 classes (tests/test_importers.py)
@pytest.mark.parametrize("name", sorted(set(REGISTRY) - {"resnet110", "resnet50-imagenet"}))
def test_registry_output_shapes(name):
    model = build(name).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert isinstance(model[0], Normalize)  # pixel space in: normalisation is the first layer


def test_resnet110_depth():
    model = build("resnet110")
    convs = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    assert convs == 109  # 108 in blocks + stem; + final linear = 110 layers


def test_cpu_cnn_size():
    assert 0.5e6 < num_parameters(build("cnn")) < 1.5e6


def test_crown_families_are_bound_friendly():
    allowed = (Normalize, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear)
    for name in ("cnn-2layer", "cnn-3layer", "cnn-4layer"):
        assert all(isinstance(m, allowed) for m in build(name))
        raw = build(name, normalize=False)  # the ablation without the input normalisation
        assert not any(isinstance(m, Normalize) for m in raw) and len(raw) == len(build(name)) - 1
        assert raw(torch.rand(2, 3, 32, 32)).shape == (2, 10)
        plain, bn = build(name), build(name, batch_norm=True)
        # one batch norm between every hidden layer and its ReLU, none after the logits layer
        assert [type(m) for m in bn if not isinstance(m, BATCH_NORMS)] == [type(m) for m in plain]
        hidden = [i for i, m in enumerate(bn) if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
        assert all(isinstance(bn[i + 1], BATCH_NORMS) and isinstance(bn[i + 2], nn.ReLU)
                   for i in hidden)
        assert bn[-1].out_features == 10 and bn.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_normalize_is_affine_in_pixels():
    norm = Normalize()
    x = torch.rand(4, 3, 8, 8)
    expected = (x - torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), expected)


def test_unknown_name_and_bad_kwargs():
    with pytest.raises(ValueError, match="name='vgg99'.*accepted"):
        build("vgg99")
    with pytest.raises(ValueError, match="bad arguments"):
        build("cnn", depth=3)
    with pytest.raises(ValueError, match="depth=21"):
        from shadowlab.models import resnet
        resnet(21)


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_fold_batch_norm_is_the_same_function_with_fewer_layers(name):
    torch.manual_seed(0)
    model = build(name)
    for m in model.modules():             # running statistics and affine maps far from the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.train()                         # folding must use the running statistics whatever the mode
    x = torch.rand(16, 3, 32, 32)
    folded = fold_batch_norm(model)
    assert model.training                 # the original is untouched
    with torch.no_grad():
        want, got = model.eval()(x), folded(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.training
    before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    after = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    if name == "cnn":
        assert before == 6 and after == 0   # every conv-BN pair of the Sequential folded
    else:
        assert after <= before              # BN inside residual blocks stays (not in a Sequential pair)
    xi = x.clone().requires_grad_(True)   # gradients still reach the input (the attack's use)
    folded(xi).sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0
