"""Stage 2's diffusion machinery: the VE SDE, the samplers over ``denoise(x, sigma)``, noise, the slice inferer and precision."""
