"""Choosing the next token from logits: small pure functions, usable one by one.

Every function takes logits `[B, V]`; filters keep that shape. Filters return logits with the
excluded tokens set to -inf, so they compose: temperature, then top-k, then top-p, then a
categorical draw. A temperature of 0 means greedy.
"""

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError

_EXCLUDED = -jnp.inf


def greedy(logits_BV):
  """The most likely token (the first one on ties).

  Two plain reductions (the maximum, then the first index holding it): XLA:CPU runs them
  about twice as fast as argmax's single reduction over (value, index) pairs.
  """
  V = logits_BV.shape[-1]
  is_max_BV = logits_BV == jnp.max(logits_BV, axis=-1, keepdims=True)
  return jnp.min(jnp.where(is_max_BV, jnp.arange(V)[None], V), axis=-1).astype(jnp.int32)


_DRAW_BLOCK = 128  # tokens per block of categorical's two-level search


def categorical(key, logits_BV):
  """One token per row, drawn with probability softmax(logits) (-inf: never).

  Inverts the cumulative distribution at one uniform number per row, in two levels: the
  block of _DRAW_BLOCK tokens it falls in, then the token within that block. This needs B
  random numbers and no cumulative sum over the whole vocabulary, where a Gumbel-max draw
  (`jax.random.categorical`) needs B x V random numbers and two logarithms of each: 0.15
  against 1.5 ms for 8 rows of 8,192 tokens on XLA:CPU.
  """
  B, V = logits_BV.shape
  blocks = -(-V // _DRAW_BLOCK)
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  probs_BLC = jnp.pad(probs_BV, ((0, 0), (0, blocks * _DRAW_BLOCK - V))).reshape(
      B, blocks, _DRAW_BLOCK)
  block_mass_BL = jnp.sum(probs_BLC, axis=-1)
  block_cdf_BL = jnp.cumsum(block_mass_BL, axis=-1)
  # In (0, total]: a point that no zero-probability token's empty interval can hold.
  u_B1 = (1.0 - jax.random.uniform(key, (B, 1))) * block_cdf_BL[:, -1:]
  block_B1 = jnp.minimum(jnp.sum(block_cdf_BL < u_B1, axis=-1, keepdims=True), blocks - 1)
  before_B1 = (jnp.take_along_axis(block_cdf_BL, block_B1, axis=1)
               - jnp.take_along_axis(block_mass_BL, block_B1, axis=1))
  cdf_BC = before_B1 + jnp.cumsum(
      jnp.take_along_axis(probs_BLC, block_B1[..., None], axis=1)[:, 0], axis=-1)
  within_B = jnp.minimum(jnp.sum(cdf_BC < u_B1, axis=-1), _DRAW_BLOCK - 1)
  return jnp.minimum(block_B1[:, 0] * _DRAW_BLOCK + within_B, V - 1).astype(jnp.int32)


def top_k_filter(logits_BV, k: int):
  """Keeps the k largest logits (ties at the k-th value are kept too)."""
  kth_largest_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
  return jnp.where(logits_BV < kth_largest_B1, _EXCLUDED, logits_BV)


TOP_P_HALVINGS = 32  # bisection steps of top_p_filter's threshold: (max - min) / 2**32 apart


def top_p_filter(logits_BV, p: float):
  """Keeps the smallest set of most likely tokens whose probability reaches `p` (nucleus).

  A token is kept when the probability mass of the tokens strictly more likely than it is
  below `p`; the most likely token is always kept. The lowest kept logit is found by bisection
  (TOP_P_HALVINGS passes over the logits) rather than by sorting the vocabulary, which costs
  XLA:CPU about ten times as much; a logit within (max - min) / 2**TOP_P_HALVINGS of that
  threshold may fall on either side of it.
  """
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)

  def mass_above(t_B1):
    return jnp.sum(jnp.where(logits_BV > t_B1, probs_BV, 0.0), axis=-1, keepdims=True)

  def halve(_, bounds):
    # Throughout: mass_above(low) >= p > mass_above(high), so high ends at the lowest kept logit.
    low_B1, high_B1 = bounds
    middle_B1 = (low_B1 + high_B1) / 2
    in_nucleus_B1 = mass_above(middle_B1) < p
    return (jnp.where(in_nucleus_B1, low_B1, middle_B1),
            jnp.where(in_nucleus_B1, middle_B1, high_B1))

  finite_BV = jnp.isfinite(logits_BV)
  low_B1 = jnp.min(jnp.where(finite_BV, logits_BV, jnp.inf), axis=-1, keepdims=True) - 1.0
  high_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  _, threshold_B1 = jax.lax.fori_loop(0, TOP_P_HALVINGS, halve, (low_B1, high_B1))
  return jnp.where(logits_BV < threshold_B1, _EXCLUDED, logits_BV)


def sample(key, logits_BV, temperature, top_k: int = 0, top_p: float = 1.0):
  """One token per row: greedy when `temperature` is 0, else a filtered categorical draw.

  `top_k=0` and `top_p=1` switch those filters off. `temperature` and `top_p` may be traced
  scalars; `top_k` is static (it sets a shape). Only the work the options ask for is done:
  greedy decoding never filters or draws, and `top_p=1` never looks for a nucleus.
  """
  logits_BV = logits_BV.astype(jnp.float32)

  def draw(logits_BV):
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    if top_k:
      scaled_BV = top_k_filter(scaled_BV, top_k)
    scaled_BV = jax.lax.cond(top_p < 1.0, top_p_filter, lambda x, _: x, scaled_BV, top_p)
    return categorical(key, scaled_BV)

  return jax.lax.cond(temperature > 0, draw, greedy, logits_BV)


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
