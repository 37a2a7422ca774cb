"""Stage 1: applying the CycleGAN generators (translation, pseudo-pairs with lesion blending)."""
