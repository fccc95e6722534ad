"""Text generation with a key/value cache: one jitted prefill, then a jitted decode loop.

The model is the training model (`Transformer(..., decode=True)` caches keys and values);
the next token is chosen by `llm_jax.sampling`. Prompts of different lengths are batched
right-padded: each row's cache holds its own tokens at their positions, and its new tokens
go to the positions after its own prompt. Called inside `sharding.activate(mesh)`, the
activations and the cache take the same logical shardings as in training.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import sampling
from llm_jax.errors import UserError
from llm_jax.model import Transformer


@functools.partial(jax.jit, static_argnames=("model", "steps", "top_k", "eos_id"))
def _generate(params, prompt_BP, lengths_B, key, temperature, top_p, *, model, steps, top_k,
              eos_id):
  B, P = prompt_BP.shape
  positions_BP = jnp.broadcast_to(jnp.arange(P), (B, P))
  logits_BPV, cache = model.apply({"params": params}, prompt_BP, None, positions_BP,
                                  decode=True, mutable=["cache"])
  next_logits_BV = logits_BPV[jnp.arange(B), lengths_B - 1]

  def keep_going(carry):
    i, _, _, _, done_B, _ = carry
    return (i < steps) & ~jnp.all(done_B)

  def step(carry):
    i, cache, logits_BV, key, done_B, out_BS = carry
    key, draw = jax.random.split(key)
    token_B = sampling.sample(draw, logits_BV, temperature, top_k, top_p).astype(jnp.int32)
    token_B = jnp.where(done_B, eos_id, token_B)
    out_BS = out_BS.at[:, i].set(token_B)
    done_B = done_B | (token_B == eos_id)
    logits_B1V, cache = model.apply({"params": params, **cache}, token_B[:, None], None,
                                    (lengths_B + i)[:, None], decode=True, mutable=["cache"])
    return i + 1, cache, logits_B1V[:, 0], key, done_B, out_BS

  out_BS = jnp.full((B, steps), eos_id, jnp.int32)
  carry = (0, cache, next_logits_BV, key, jnp.zeros((B,), bool), out_BS)
  return jax.lax.while_loop(keep_going, step, carry)[-1]


def generate(params, model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
             eos_id: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
  """New token ids for each prompt, ending before end-of-sequence or at `max_new_tokens`.

  Deterministic for a given seed. A prompt that leaves fewer than `max_new_tokens` positions
  of the context is refused rather than truncated, so what the model sees is what was asked.
  """
  context = model.config.context_length
  sampling.check_options(temperature, top_k, top_p, model.config.vocab_size)
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens={max_new_tokens} must be at least 1.")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("A prompt is empty; give at least one token of text.")
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > context:
    raise UserError(f"A prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                    f"the context of {context} tokens; shorten the prompt or lower "
                    "max_new_tokens.")
  prompt_BP = np.zeros((len(prompts), longest), np.int32)
  for row, ids in enumerate(prompts):
    prompt_BP[row, :len(ids)] = ids
  lengths_B = np.asarray([len(p) for p in prompts], np.int32)
  out_BS = _generate(params, jnp.asarray(prompt_BP), jnp.asarray(lengths_B),
                     jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p),
                     model=model, steps=max_new_tokens, top_k=top_k or 0, eos_id=eos_id)
  result = []
  for row in np.asarray(out_BS).tolist():
    result.append(row[:row.index(eos_id)] if eos_id in row else row)
  return result
