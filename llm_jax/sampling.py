"""Choosing the next token from logits: small pure functions, usable one by one.

Every function takes logits `[..., V]` and keeps their shape. Filters return logits with the
excluded tokens set to -inf, so they compose: temperature, then top-k, then top-p, then a
categorical draw. A temperature of 0 means greedy.
"""

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError

_EXCLUDED = -jnp.inf


def greedy(logits_BV):
  """The most likely token (the first one on ties)."""
  return jnp.argmax(logits_BV, axis=-1)


def top_k_filter(logits_BV, k: int):
  """Keeps the k largest logits (ties at the k-th value are kept too)."""
  kth_largest_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
  return jnp.where(logits_BV < kth_largest_B1, _EXCLUDED, logits_BV)


def top_p_filter(logits_BV, p: float):
  """Keeps the smallest set of most likely tokens whose probability reaches `p` (nucleus).

  A token is kept when the probability mass of the tokens strictly more likely than it is
  below `p`; the most likely token is always kept.
  """
  sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept_BV = mass_before_BV < p
  # The smallest kept logit is the threshold; everything below it is outside the nucleus.
  threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < threshold_B1, _EXCLUDED, logits_BV)


def sample(key, logits_BV, temperature, top_k: int = 0, top_p: float = 1.0):
  """One token per row: greedy when `temperature` is 0, else a filtered categorical draw.

  `top_k=0` and `top_p=1` switch those filters off. `temperature` may be a traced scalar;
  `top_k` is static (it sets a shape).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  if top_k:
    scaled_BV = top_k_filter(scaled_BV, top_k)
  scaled_BV = jnp.where(top_p < 1.0, top_p_filter(scaled_BV, top_p), scaled_BV)
  drawn_B = jax.random.categorical(key, scaled_BV, axis=-1)
  return jnp.where(temperature > 0, drawn_B, greedy(logits_BV))


def check_options(temperature: float, top_k: int | None, top_p: float,
                  vocab_size: int) -> None:
  """Raises UserError for sampling options no sampler accepts (`top_k=None`: no top-k)."""
  if not temperature >= 0:
    raise UserError(f"--temperature={temperature} must be 0 (greedy) or positive.")
  if top_k is not None and not 1 <= top_k <= vocab_size:
    raise UserError(f"--top_k={top_k} must be between 1 and the vocabulary size "
                    f"{vocab_size}; leave it out for no top-k.")
  if not 0 < top_p <= 1:
    raise UserError(f"--top_p={top_p} must be in (0, 1]; 1 turns it off.")
