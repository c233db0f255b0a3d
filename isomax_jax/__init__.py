"""isomax_jax: out-of-distribution detection with the IsoMax loss family in JAX/Flax."""

__version__ = "0.1.0"
