"""diffq: compressed and accelerated Diffusion Transformers in JAX/Flax."""
