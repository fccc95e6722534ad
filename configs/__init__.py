"""Configs: `get_config(variant)` files. Installed as the package `llm_jax.configs`."""
