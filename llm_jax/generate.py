"""Sampling text from the model.

`sample` runs the training model's full forward pass over a fixed context-sized buffer for
every new token, inside one jitted loop. It is exact and simple; it recomputes the prefix at
each step, so it is meant for short samples (the end-of-run sample), not for serving.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model import Transformer


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _sample_loop(params, buffer_1T, prompt_length, rng, temperature, *, model, steps):
  def body(i, carry):
    buffer_1T, rng = carry
    position = prompt_length + i - 1
    logits_V = model.apply({"params": params}, buffer_1T)[0, position].astype(jnp.float32)
    rng, key = jax.random.split(rng)
    sampled = jax.random.categorical(key, logits_V / jnp.maximum(temperature, 1e-6))
    token = jnp.where(temperature > 0, sampled, jnp.argmax(logits_V))
    return buffer_1T.at[0, position + 1].set(token.astype(buffer_1T.dtype)), rng
  buffer_1T, _ = jax.lax.fori_loop(0, steps, body, (buffer_1T, rng))
  return buffer_1T


def sample(params, model: Transformer, prompt_ids: list[int], max_new_tokens: int,
           temperature: float, seed: int, eos_id: int) -> list[int]:
  """New token ids after `prompt_ids` (stopping before end-of-sequence).

  A prompt that leaves no room in the context is truncated from the left.
  """
  context = model.config.context_length
  room = max(1, min(max_new_tokens, context - 1))
  prompt_ids = list(prompt_ids)[-(context - room):]
  buffer = np.zeros((1, context), np.int32)
  buffer[0, :len(prompt_ids)] = prompt_ids
  out = _sample_loop(params, jnp.asarray(buffer), len(prompt_ids), jax.random.key(seed),
                     jnp.float32(temperature), model=model, steps=room)
  new = np.asarray(out[0, len(prompt_ids):len(prompt_ids) + room]).tolist()
  return new[:new.index(eos_id)] if eos_id in new else new
