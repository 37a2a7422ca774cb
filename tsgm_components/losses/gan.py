"""CycleGAN objectives (Zhu et al. 2017, reference defaults) and the image history pool.

Images are in [0, 1] (see :mod:`tsgm_components.networks.cyclegan`). The reference measures the cycle and
identity L1 terms on [-1, 1] images, i.e. twice the [0, 1] L1; :data:`L1_RANGE_SCALE` applies that factor so
λ = 10 and the identity weight 0.5 keep their reference meaning relative to the LSGAN terms.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

__all__ = ["L1_RANGE_SCALE", "lsgan_loss", "discriminator_loss", "CycleGANLossWeights", "ImagePool"]

#: |a - b| on the reference's [-1, 1] scale equals 2 |a - b| on our [0, 1] scale.
L1_RANGE_SCALE = 2.0


def lsgan_loss(scores: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean of (scores - 1)² for real targets, scores² for fake ones."""
    target = torch.ones_like(scores) if target_is_real else torch.zeros_like(scores)
    return F.mse_loss(scores, target)


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Reference discriminator objective: 0.5 · (LSGAN(real → 1) + LSGAN(fake → 0))."""
    return 0.5 * (lsgan_loss(real_scores, True) + lsgan_loss(fake_scores, False))


def l1_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of two [0, 1] images, on the reference's [-1, 1] scale."""
    return L1_RANGE_SCALE * F.l1_loss(a, b)


class CycleGANLossWeights:
    """Loss weights: cycle λ_A, λ_B, identity weight (identity term = identity · λ · L1) and ``change_ab``.

    Defaults are the reference ones (λ_A = λ_B = 10, identity 0.5, change_ab 0). ``change_ab`` > 0 adds
    change_ab · L1(G_AB(real_a), real_a), not in the paper: an L1 penalty on what G_AB changes in a healthy slice,
    which favours sparse changes (a lesion) over rewriting the whole slice (tried at commit 8f0dab4:
    ``git show 8f0dab4:benchmarks/results/stage1_variants_cpu.md``).
    """

    def __init__(self, lambda_a: float = 10.0, lambda_b: float = 10.0, identity: float = 0.5, change_ab: float = 0.0):
        if min(lambda_a, lambda_b, identity, change_ab) < 0:
            raise ValueError(f"loss weights must be >= 0, got {lambda_a}, {lambda_b}, {identity}, {change_ab}")
        self.lambda_a, self.lambda_b, self.identity, self.change_ab = lambda_a, lambda_b, identity, change_ab

    def generator_losses(
        self,
        real_a: torch.Tensor,
        real_b: torch.Tensor,
        rec_a: torch.Tensor,
        rec_b: torch.Tensor,
        idt_a: torch.Tensor | None,
        idt_b: torch.Tensor | None,
        d_b_fake_b: torch.Tensor,
        d_a_fake_a: torch.Tensor,
        fake_b: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All generator terms and their sum ``loss_G`` (scalars).

        ``rec_a = G_BA(G_AB(real_a))``, ``rec_b = G_AB(G_BA(real_b))``; ``idt_a = G_AB(real_b)`` and
        ``idt_b = G_BA(real_a)`` (identity mappings; None when the identity weight is 0);
        ``d_b_fake_b = D_B(G_AB(real_a))``, ``d_a_fake_a = D_A(G_BA(real_b))``; ``fake_b = G_AB(real_a)`` (needed
        when ``change_ab`` > 0). D_A judges domain A, D_B domain B
        (the reference calls G_AB "G_A" and D_B "D_A"; the names here say which domain each one belongs to).
        """
        losses = {
            "loss_gan_AB": lsgan_loss(d_b_fake_b, True),
            "loss_gan_BA": lsgan_loss(d_a_fake_a, True),
            "loss_cycle_A": self.lambda_a * l1_loss(rec_a, real_a),
            "loss_cycle_B": self.lambda_b * l1_loss(rec_b, real_b),
        }
        if self.identity > 0:
            if idt_a is None or idt_b is None:
                raise ValueError("identity outputs are required when the identity weight is > 0")
            losses["loss_idt_AB"] = self.identity * self.lambda_b * l1_loss(idt_a, real_b)
            losses["loss_idt_BA"] = self.identity * self.lambda_a * l1_loss(idt_b, real_a)
        if self.change_ab > 0:
            if fake_b is None:
                raise ValueError("fake_b = G_AB(real_a) is required when change_ab > 0")
            losses["loss_change_AB"] = self.change_ab * l1_loss(fake_b, real_a)
        losses["loss_G"] = sum(losses.values())
        return losses


class ImagePool:
    """History of generated images (Shrivastava et al. 2017), as in the reference ``ImagePool``.

    ``query(images)`` (B, C, H, W): while fewer than ``pool_size`` images are stored, each image is stored and
    returned; afterwards, with probability 0.5 an image is swapped with a random stored one (the stored one is
    returned), otherwise returned as is. ``pool_size=0`` disables the pool. Randomness comes from a private,
    seeded generator so runs are reproducible; the pool is checkpointable (``state_dict``/``load_state_dict``).
    """

    def __init__(self, pool_size: int = 50, seed: int = 0):
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}")
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool_size == 0:
            return images.detach()
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() > 0.5:
                index = self.rng.randrange(self.pool_size)
                out.append(self.images[index].to(image.device, copy=True))
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"images": [im.detach().cpu().as_subclass(torch.Tensor) for im in self.images], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(_as_random_state(state["rng"]))
        self.images = list(state["images"])  # moved to the batch's device on use


def _as_random_state(state: object) -> tuple:
    """``random.setstate`` wants nested tuples; a checkpoint round trip may have turned them into lists."""
    version, internal, gauss = state  # type: ignore[misc]
    return (version, tuple(internal), gauss)
