"""boxseg_jax: box-supervised instance segmentation in JAX/Flax."""

__version__ = "0.1.0"
