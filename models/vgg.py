"""VGG face recognition backbones whose forward also returns the ECLoss target maps.

The convolutional part follows torchvision's VGG layer tables (configurations "B", "D" and
"E" of Simonyan and Zisserman: VGG13, VGG16, VGG19), without residual connections, as the
paper uses them. The ECLoss target is the post-ReLU output of the last convolution
(``conv5_x``): 14x14 at a 224x224 input, 7x7 at 112x112. ``drop_last_pool=True`` removes
the pool between ``conv4_x`` and ``conv5_x`` (the fourth), so ``conv5_x`` runs at stride 8:
14x14 maps and the paper's 19,307 templates at 112x112, where the layers before ``conv5_x``
cost a quarter of what they cost at 224x224. After it the embedding head of
arcface_torch's IResNet: pool5, ``BatchNorm2d -> Dropout -> Flatten -> Linear -> BatchNorm1d``
(the last BatchNorm's scale frozen at 1, as there).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["VGG_LAYERS", "FaceOutput", "FaceNet", "build_model"]

# Output channels of each 3x3 convolution; "M" is a 2x2 max pool (torchvision's cfgs).
VGG_LAYERS: dict[str, tuple] = {
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512),
}
# The tables stop at the last convolution: its ReLU output is the ECLoss target, and pool5
# belongs to the embedding head. Four pools give the target a stride of 16 (8 without the
# fourth, drop_last_pool=True).
TARGET_STRIDE = 16


class FaceOutput(NamedTuple):
    """``embedding``: ``(B, E)``; ``maps``: ``(B, C, h, w)``, the last conv's post-ReLU output."""

    embedding: torch.Tensor
    maps: torch.Tensor


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class FaceNet(nn.Module):
    """A VGG trunk and an embedding head; ``forward(images) -> FaceOutput``.

    Args:
        arch: ``"vgg13"``, ``"vgg16"`` or ``"vgg19"``.
        batch_norm: a BatchNorm after every convolution (torchvision's ``vgg*_bn``).
        width: multiplies every channel count (0.25 gives 16..128 channels), for small runs.
        input_size: the square input side; any multiple of 16 works (maps are ``size / 16``;
            with ``drop_last_pool``, any multiple of 8 and maps of ``size / 8``).
        embedding_dim: ``E``, the length of the face embedding.
        dropout: dropout probability before the embedding's fully connected layer.
        drop_last_pool: leave out the max pool before the last convolution block, so the
            target maps have twice the side (14x14 at 112x112 input).
    """

    def __init__(self, arch: str = "vgg16", *, batch_norm: bool = False, width: float = 1.0,
                 input_size: int = 224, embedding_dim: int = 512, dropout: float = 0.0,
                 drop_last_pool: bool = False):
        super().__init__()
        if arch not in VGG_LAYERS:
            raise ValueError(f"arch must be one of {sorted(VGG_LAYERS)}, got {arch!r}")
        if not width > 0:
            raise ValueError(f"width must be positive, got {width}")
        if not isinstance(drop_last_pool, bool):
            raise TypeError(f"drop_last_pool must be True or False, got {drop_last_pool!r}")
        stride = TARGET_STRIDE // 2 if drop_last_pool else TARGET_STRIDE
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < stride \
                or input_size % stride:
            raise ValueError(f"input_size must be a positive multiple of {stride}, got {input_size}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.arch, self.input_size, self.drop_last_pool = arch, input_size, drop_last_pool
        table = list(VGG_LAYERS[arch])
        if drop_last_pool:
            del table[len(table) - 1 - table[::-1].index("M")]
        layers: list[nn.Module] = []
        channels = 3
        for item in table:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out = _scaled(item, width)
            layers.append(nn.Conv2d(channels, out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self._target_index = max(i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d))
        self.map_channels = channels
        self.map_size = input_size // stride
        # pool5 with ceil_mode so that 7x7 maps (112 input) keep their border row: 7 -> 4.
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        pooled = -(-self.map_size // 2)
        self.bn_maps = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * pooled * pooled, embedding_dim)
        self.bn_embedding = nn.BatchNorm1d(embedding_dim)
        nn.init.constant_(self.bn_embedding.weight, 1.0)
        self.bn_embedding.weight.requires_grad = False
        self._init_weights()

    @property
    def target_conv(self) -> nn.Conv2d:
        """The convolution whose (batch-normalised) ReLU output is the ECLoss target.

        A property, not an attribute: a second registration of the same module would put
        its parameters twice into ``state_dict`` (and break checkpoints that lack them).
        """
        return self.features[self._target_index]

    def _init_weights(self):
        # torchvision's VGG initialisation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> FaceOutput:
        """``images``: ``(B, 3, S, S)`` normalised; returns the embedding and the target maps."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        maps = self.features(images)
        x = self.bn_maps(self.pool(maps))
        x = self.fc(torch.flatten(self.dropout(x), 1))
        return FaceOutput(self.bn_embedding(x), maps)


def build_model(arch: str = "vgg16", *, batch_norm: bool = False, width: float = 1.0,
                input_size: int = 224, embedding_dim: int = 512, dropout: float = 0.0,
                drop_last_pool: bool = False) -> FaceNet:
    """A :class:`FaceNet` (see there for the arguments)."""
    return FaceNet(arch, batch_norm=batch_norm, width=width, input_size=input_size,
                   embedding_dim=embedding_dim, dropout=dropout, drop_last_pool=drop_last_pool)
