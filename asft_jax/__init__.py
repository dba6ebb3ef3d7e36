"""asft-jax: aligning Llama models with ASFT and its baselines in JAX."""

__version__ = "0.1.0"
