"""VGG backbones (shapes, target maps) and the heads' logits on hand-computed inputs."""
import math

import pytest
import torch

from models import VGG_LAYERS, build_head, build_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch, convs", [("vgg13", 10), ("vgg16", 13), ("vgg19", 16)])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_shapes_at_112(arch, convs, batch_norm):
    model = build_model(arch, batch_norm=batch_norm, width=1 / 16, input_size=112, embedding_dim=24)
    layers = list(model.features)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in layers) == convs
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in layers) == (convs if batch_norm else 0)
    assert [m.out_channels for m in layers if isinstance(m, torch.nn.Conv2d)] == \
        [c // 16 for c in VGG_LAYERS[arch] if c != "M"]
    out = model(torch.randn(3, 3, 112, 112))
    assert out.embedding.shape == (3, 24)
    assert out.maps.shape == (3, 32, 7, 7)


def test_vgg_shapes_at_224_and_maps_are_the_last_relu_output():
    model = build_model("vgg16", width=1 / 32, input_size=224, embedding_dim=8).eval()
    images = torch.randn(2, 3, 224, 224)
    out = model(images)
    assert out.embedding.shape == (2, 8)
    assert out.maps.shape == (2, 16, 14, 14)
    assert isinstance(model.features[-1], torch.nn.ReLU)
    torch.testing.assert_close(out.maps, model.features(images), rtol=0, atol=0)
    assert (out.maps >= 0).all()
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["vgg13", "vgg16", "vgg19"])
def test_drop_last_pool_gives_14x14_maps_at_112(arch):
    model = build_model(arch, batch_norm=True, width=1 / 16, input_size=112, embedding_dim=8,
                        drop_last_pool=True).eval()
    layers = [m.out_channels if isinstance(m, torch.nn.Conv2d) else "M"
              for m in model.features if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))]
    table = [c if c == "M" else c // 16 for c in VGG_LAYERS[arch]]
    last_pool = len(table) - 1 - table[::-1].index("M")
    assert layers == table[:last_pool] + table[last_pool + 1:]  # the fourth pool, before conv5
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.features) == \
        sum(c != "M" for c in VGG_LAYERS[arch])
    images = torch.randn(2, 3, 112, 112)
    out = model(images)
    assert out.maps.shape == (2, 32, 14, 14) and model.map_size == 14
    torch.testing.assert_close(out.maps, model.features(images), rtol=0, atol=0)
    assert model.target_conv is [m for m in model.features if isinstance(m, torch.nn.Conv2d)][-1]
    # The embedding head pools 14 -> 7 before its fully connected layer.
    assert model.fc.in_features == 32 * 7 * 7 and out.embedding.shape == (2, 8)
    # Stride 8: any multiple of 8 is a valid input; without the option it is not.
    small = build_model(arch, width=1 / 16, input_size=40, drop_last_pool=True).eval()
    assert small(torch.randn(1, 3, 40, 40)).maps.shape[-2:] == (5, 5)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model(arch, width=1 / 16, input_size=40)


def test_maps_carry_gradient_from_both_losses():
    torch.manual_seed(0)
    model = build_model("vgg13", width=1 / 16, input_size=64, embedding_dim=8)
    out = model(torch.randn(2, 3, 64, 64))
    # One image's embedding: the batch sum of a training-mode BatchNorm's output does not
    # depend on its input, so its gradient would be rounding noise.
    grad_embedding, = torch.autograd.grad(out.embedding[0].sum(), out.maps, retain_graph=True)
    grad_maps, = torch.autograd.grad(out.maps.square().sum(), out.maps)
    assert grad_embedding.abs().sum() > 0
    torch.testing.assert_close(grad_maps, 2 * out.maps)


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="vgg11"), "arch"), (dict(input_size=100), "input_size"),
    (dict(width=0.0), "width"), (dict(dropout=1.0), "dropout"),
    (dict(input_size=100, drop_last_pool=True), "multiple of 8")])
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)
    with pytest.raises(TypeError, match="drop_last_pool"):
        build_model(drop_last_pool="yes")


def _set_weights(head, rows):
    with torch.no_grad():
        head.weight.copy_(torch.tensor(rows, dtype=head.weight.dtype))


def test_softmax_head_is_affine():
    head = build_head("softmax", 2, 3)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
        head.fc.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    logits = head(torch.tensor([[3.0, 4.0]]), torch.tensor([0]))
    # [3, 8, -1] + bias
    torch.testing.assert_close(logits, torch.tensor([[3.5, 8.0, -2.0]]))


def test_cosface_logits():
    head = build_head("cosface", 2, 2, s=2.0)
    assert head.m == 0.4
    _set_weights(head, [[1.0, 0.0], [0.0, 2.0]])
    # e = (3, 4) / 5: cos = (0.6, 0.8); the true class 0 loses m = 0.4.
    logits = head(torch.tensor([[3.0, 4.0], [3.0, 4.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(logits, torch.tensor([[2 * 0.2, 2 * 0.8], [2 * 0.6, 2 * 0.4]]))


def test_arcface_logits_both_branches():
    head = build_head("arcface", 2, 2, s=10.0)
    assert head.m == 0.5
    _set_weights(head, [[1.0, 0.0], [0.0, 1.0]])
    embedding = torch.tensor([[0.6, 0.8], [-0.95, math.sqrt(1 - 0.95 ** 2)]])
    logits = head(embedding, torch.tensor([0, 0]))
    # Row 0: cos(acos(0.6) + 0.5) = 0.6 cos 0.5 - 0.8 sin 0.5 = 0.5265496 - 0.3835410.
    # Row 1: cos = -0.95 < cos(pi - 0.5) = -0.8775826, the fallback cos - m sin(m):
    #        -0.95 - 0.5 * 0.4794255 = -1.1897128.
    expected = torch.tensor([[10 * 0.1430086, 10 * 0.8], [10 * -1.1897128, 10 * 0.3122499]])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_margin_gradients_are_exact():
    # The margins are differentiable (no in-place ops under no_grad): float64 gradcheck.
    for kind in ("cosface", "arcface"):
        head = build_head(kind, 5, 4, s=3.0).double()
        embedding = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([0, 1, 2, 3, 0, 1])
        assert torch.autograd.gradcheck(lambda e: head(e, labels), (embedding,))


def test_bad_head_arguments():
    with pytest.raises(ValueError, match="kind"):
        build_head("sphereface", 4, 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_head("softmax", 4, 0)
    with pytest.raises(ValueError, match="labels"):
        build_head("arcface", 4, 3)(torch.randn(2, 4), None)
