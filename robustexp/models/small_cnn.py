"""A small convolutional network with BatchNorm for 28x28 inputs (the embedded default)."""

from __future__ import annotations

from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (width, width, 2*width, 2*width) with 2x2 max-pooling after
    the second and the fourth, global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width), *_conv_bn_relu(width, width), nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
