"""CycleGAN networks of Zhu et al. (2017): ResNet generator and 70×70 PatchGAN discriminator.

Layer recipe, normalisation and initialisation follow the reference code (``resnet_9blocks``, ``basic`` D):
InstanceNorm without affine parameters (hence every conv before a norm keeps its bias), reflection padding,
no dropout, weights drawn from N(0, 0.02).

Value ranges: both networks take images in **[0, 1]** (the range of the prepared slices) and map them to
[-1, 1] as their first operation, which is the range the reference networks see; the generator maps its tanh
output back to [0, 1]. Inside, the computation is exactly the reference one, so a generator can be used on the
prepared data, exported (``ckpt_export``) and applied to new images without any extra scaling step.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResnetGenerator", "PatchDiscriminator", "init_normal"]


def init_normal(module: nn.Module, gain: float = 0.02) -> None:
    """Reference ``init_type='normal'``: conv weights ~ N(0, gain), biases 0 (norm layers here have no weights)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResidualBlock(nn.Module):
    """``x + (reflect-pad 1, conv3, norm, ReLU, reflect-pad 1, conv3, norm)(x)``; shape preserved."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """Image-to-image generator: (B, in_channels, H, W) in [0, 1] -> (B, out_channels, H, W) in [0, 1].

    H and W must be multiples of 4 (two stride-2 downsamplings). ``n_blocks=9, ngf=64`` is the reference
    ``resnet_9blocks`` (11,365,633 parameters for 1 channel in and out). ``config``: the constructor arguments
    (stored in checkpoints, see ``checkpoints.CycleGANSpec``).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 64, n_blocks: int = 9):
        super().__init__()
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "ngf": ngf, "n_blocks": n_blocks}
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):  # downsampling
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                nn.InstanceNorm2d(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [ResidualBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):  # upsampling
            mult = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x * 2.0 - 1.0) + 1.0) * 0.5


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: (B, in_channels, H, W) in [0, 1] -> (B, 1, H', W') real/fake scores (LSGAN logits).

    ``n_layers=3, ndf=64`` is the reference 70×70 PatchGAN (2,762,689 parameters for 1 input channel);
    a 256×256 input gives a 30×30 score map. H and W must be at least 2**n_layers * 4 or so for a non-empty map.
    ``config``: the constructor arguments (stored in checkpoints).
    """

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        self.config = {"in_channels": in_channels, "ndf": ndf, "n_layers": n_layers}
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2 if n < n_layers else 1, padding=1),
                nn.InstanceNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * 2.0 - 1.0)
