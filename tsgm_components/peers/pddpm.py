"""pDDPM, patched DDPM (Behrendt et al., MIDL 2023): a diffusion model that noises one square patch of a healthy
slice and reconstructs it with the rest of the slice as clean context; detection reconstructs every patch of a grid
over the slice this way and stitches the patch outputs.

Expressed on the project's VE machinery: the unconditional ``ScoreUNet`` trained by ``dsm_loss`` with
``region=PatchRegion(...)`` (only the patch noised, the loss over the patch alone: the reference's ``inpaint``) and
the reference's simplex noise (``peers.anoddpm.SimplexNoise``); the DDPM test step mapped to the VE σ of the same
signal-to-noise ratio (``peers.anoddpm.ddpm_sigma``, cosine schedule), and the reference's one-step reconstruction
(its ``pred_x0`` objective: the network's x0 estimate at that step) as Tweedie's denoiser D(x, σ) of the score model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tsgm_components.diffusion.inferers import slice_generator
from tsgm_components.diffusion.noise import NoiseFn

#: denoise(x (B,1,H,W), sigma (B,)) -> E[x0 | x] (B,1,H,W) on the [0, 1] scale; ``ScoreUNet.denoise``
DenoiseFn = Callable[[Tensor, Tensor], Tensor]


def patch_starts(size: int, patch_size: int, stride: int) -> list[int]:
    """First pixels of the patches along one side: 0, stride, 2·stride, ... while a patch fits, plus one patch flush
    with the far edge when these leave pixels uncovered (it overlaps its neighbour). With stride = patch_size dividing
    ``size`` (the reference: 48 of 96) the patches tile the side exactly once."""
    if not 0 < patch_size <= size:
        raise ValueError(f"patch_size must be in [1, {size}], got {patch_size}")
    if not 0 < stride <= patch_size:
        raise ValueError(f"stride must be in [1, patch_size={patch_size}] so that the patches cover the image, got {stride}")
    starts = list(range(0, size - patch_size + 1, stride))
    if starts[-1] + patch_size < size:
        starts.append(size - patch_size)
    return starts


def patch_grid(height: int, width: int, patch_size: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every patch of the detection grid, row-major (the reference's ``BoxSampler.sample_grid``)."""
    return [(top, left) for top in patch_starts(height, patch_size, stride) for left in patch_starts(width, patch_size, stride)]


def patch_masks(height: int, width: int, tops: Tensor, lefts: Tensor, patch_size: int) -> Tensor:
    """(B, 1, height, width) float32 masks, 1 inside the square patch of side ``patch_size`` at (tops[b], lefts[b])."""
    rows = torch.arange(height, device=tops.device)[None, :]
    cols = torch.arange(width, device=tops.device)[None, :]
    inside_rows = (rows >= tops[:, None]) & (rows < tops[:, None] + patch_size)
    inside_cols = (cols >= lefts[:, None]) & (cols < lefts[:, None] + patch_size)
    return (inside_rows[:, :, None] & inside_cols[:, None, :]).float()[:, None]


class PatchRegion:
    """pDDPM's training region (a ``RegionFn`` of ``dsm_loss``): one square patch per image, a uniformly drawn patch
    of the detection grid (``on_grid``: the reference's ``grid_boxes: True``) or at a uniformly random position inside
    the image (its ``BoxSampler.sample_single_box``, which may also place boxes partly outside the image).

    Args:
        patch_size: side of the patch in pixels (reference: 48 at 96², half the side).
        stride: grid step (reference: the patch size).
        on_grid: draw from the grid (True) or anywhere (False).
    """

    def __init__(self, patch_size: int, stride: int, on_grid: bool = True):
        self.patch_size = int(patch_size)
        self.stride = int(stride)
        self.on_grid = bool(on_grid)

    def __call__(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 1, H, W) mask in {0, 1} for images x0 (B, 1, H, W), drawn from ``generator``."""
        batch, _, height, width = x0.shape
        gen_device = generator.device if generator is not None else x0.device
        if self.on_grid:
            grid = torch.tensor(patch_grid(height, width, self.patch_size, self.stride), device=gen_device)
            chosen = grid[torch.randint(len(grid), (batch,), generator=generator, device=gen_device)]
            tops, lefts = chosen[:, 0], chosen[:, 1]
        else:
            if self.patch_size > min(height, width):
                raise ValueError(f"patch_size {self.patch_size} does not fit images of {height}×{width}")
            tops = torch.randint(height - self.patch_size + 1, (batch,), generator=generator, device=gen_device)
            lefts = torch.randint(width - self.patch_size + 1, (batch,), generator=generator, device=gen_device)
        return patch_masks(height, width, tops, lefts, self.patch_size).to(x0.device)


def noise_patch(x: Tensor, noise: Tensor, sigma: float, mask: Tensor) -> Tensor:
    """x + σ·mask·noise: the patch noised to σ, every other pixel exactly x. x, noise (B, 1, H, W); mask (B|1, 1, H, W)."""
    return torch.where(mask > 0, x + sigma * noise, x)


class PatchedReconstructor:
    """pDDPM's healthy reconstruction (a ``Reconstructor``): for every patch of the grid (:func:`patch_grid`), noise
    that patch of the slice to σ (:func:`noise_patch`; the rest stays the clean slice), denoise the whole image in one
    step and keep the patch of the output; pixels covered by several patches get the mean (the reference's
    ``agg_overlap: avg``). Output clipped to [0, 1].

    As in the reference, one noise draw per slice serves all its patches; each slice draws from its own generator
    (``slice_generator(seed, index)``), so results do not depend on batching.

    Args:
        denoise: D(x, σ), e.g. ``ScoreUNet.denoise``; one call per patch.
        noise: the training noise (``SimplexNoise``, or ``noise.randn``).
        sigma: the VE level of the reference's test step (``ddpm_sigma(t, "cosine")``).
        patch_size, stride: the grid, as in training.
        seed: noise seed.
        batch_size: slices per network call.
        device: where the network runs.
    """

    def __init__(
        self,
        denoise: DenoiseFn,
        noise: NoiseFn,
        sigma: float,
        patch_size: int,
        stride: int,
        seed: int = 0,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
    ):
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.denoise = denoise
        self.noise = noise
        self.sigma = float(sigma)
        self.patch_size = int(patch_size)
        self.stride = int(stride)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)

    def n_patches(self, image_size: int) -> int:
        """Patches of a slice of side ``image_size``: its network calls (NFE) per slice."""
        return len(patch_grid(image_size, image_size, self.patch_size, self.stride))

    @torch.no_grad()
    def __call__(self, slices: Tensor) -> Tensor:
        """slices (N, 1, H, W) in [0, 1] -> reconstructions (N, 1, H, W) in [0, 1], float32 on the CPU."""
        slices = slices.to(self.device, torch.float32)
        height, width = slices.shape[-2:]
        grid = patch_grid(height, width, self.patch_size, self.stride)
        outputs = []
        for first in range(0, slices.shape[0], self.batch_size):
            chunk = slices[first : first + self.batch_size]
            generators = [slice_generator(self.seed, first + i, self.device) for i in range(chunk.shape[0])]
            noise = self.noise(chunk.shape, generators, self.device)
            sigma = chunk.new_full((chunk.shape[0],), self.sigma)
            total, count = torch.zeros_like(chunk), torch.zeros_like(chunk)
            for top, left in grid:
                mask = patch_masks(height, width, torch.tensor([top], device=self.device), torch.tensor([left], device=self.device), self.patch_size)
                total += mask * self.denoise(noise_patch(chunk, noise, self.sigma, mask), sigma)
                count += mask
            outputs.append((total / count).clamp(0.0, 1.0))
        return torch.cat(outputs).cpu()
