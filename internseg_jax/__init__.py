"""internseg_jax: InternViT-6B semantic segmentation in JAX/Flax."""
