"""Text generation with a key/value cache: one jitted prefill, then a jitted decode loop.

The model is the training model (`Transformer(..., decode=True)` caches keys and values);
the next token is chosen by `llm_jax.inference.sampling` (`generate`) or by beam search
(`beam_search`). Prompts of different lengths are batched right-padded: each row's cache
holds its own tokens at their positions, and its new tokens go to the positions after its
own prompt. Called inside `sharding.activate(mesh)`, the activations and the cache take the
same logical shardings as in training.

Token ids in, token ids out: text, tokenizers and checkpoints are `llm_jax.inference.run`'s business.
"""

import dataclasses
import functools
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.inference import sampling
from llm_jax.errors import UserError
from llm_jax.model.transformer import MATMUL_WEIGHTS, Transformer


def prefill(params, model: Transformer, prompt_BP, lengths_B, num_tokens: int | None = None):
  """Caches the prompts' keys and values; returns (cache, each row's next-token logits).

  `num_tokens` keeps the logits of the first ids only: those the tokenizer has, when the
  embedding is padded past it.
  """
  B, P = prompt_BP.shape
  positions_BP = jnp.broadcast_to(jnp.arange(P), (B, P))
  logits_BPV, cache = model.apply({"params": params}, prompt_BP, None, positions_BP,
                                  decode=True, mutable=["cache"])
  return cache, logits_BPV[jnp.arange(B), lengths_B - 1, :num_tokens]


def _decode_one(params, model: Transformer, cache, token_B, positions_B, num_tokens):
  """Feeds one token per row at its position; returns (next-token logits, updated cache)."""
  logits_B1V, cache = model.apply({"params": params, **cache}, token_B[:, None], None,
                                  positions_B[:, None], decode=True, mutable=["cache"])
  return logits_B1V[:, 0, :num_tokens], cache


def for_decoding(model: Transformer, params, slots: int):
  """The model and parameters a decode loop runs: the same computation, prepared once per
  call rather than once per step (XLA does not hoist loop-invariant work out of the loop).

  - The cache holds `slots` positions (the prompt width plus the steps, at most the
    context), not the whole context: attention reads every slot in every step.
  - Matmul weights wider than the dtype their matmuls take (`ModelConfig.matmul_dtype`:
    float32 weights of a bfloat16 model or under bfloat16 operands) are narrowed to it, so a
    step reads half the bytes and casts nothing, for a copy of half the parameters' size.
    Under bfloat16 operands a tied float32 embedding stays for the lookup, and a bfloat16
    copy of it is the output head. Nothing is widened: a copy would outweigh the weights.
  - Where the layer scan is unrolled anyway (CPU), each layer's parameters are arrays of
    their own, not sliced out of the stacked ones in every step.
  """
  c = model.config
  c = dataclasses.replace(c, context_length=min(slots, c.context_length))
  dtype = c.matmul_dtype

  def narrowed(x):
    return x.astype(dtype) if x.dtype.itemsize > dtype.itemsize else x

  params = dict(nn.meta.unbox(params))
  embedding = params.pop("embedding")
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: narrowed(x) if path[-1].key in MATMUL_WEIGHTS else x, params)
  if c.tie_embeddings and dtype == c.dtype:  # the lookup and the head take one dtype
    embedding = narrowed(embedding)
  elif c.tie_embeddings and embedding.dtype.itemsize > dtype.itemsize:
    params["lm_head"] = embedding.T.astype(dtype)
    c = dataclasses.replace(c, tie_embeddings=False)
  params["embedding"] = embedding
  if c.scan_layers and c.scan_unroll == c.num_layers:
    stacked = params.pop("layers")
    for i in range(c.num_layers):
      params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    c = dataclasses.replace(c, scan_layers=False)
  return Transformer(c), params


def _bucket(n: int, cap: int) -> int:
  """`n` rounded up to a power of two (at least 16), at most `cap`: prompt lengths and step
  counts take a handful of shapes, so a stream of requests compiles a handful of programs."""
  return min(cap, max(16, 1 << (n - 1).bit_length()))


def _reorder_rows(cache, rows_R):
  # A cache leaf is [..., rows, kv_heads, slots, head_dim] (keys: [..., head_dim, slots]), with
  # a leading layer axis when the layers are scanned.
  return jax.tree.map(lambda x: jnp.take(x, rows_R, axis=x.ndim - 4), cache)


def _start(params, model, prompt_BP, lengths_B, samples: int, num_tokens):
  """Prefill of each distinct prompt once, its cache and logits copied to its `samples` rows.

  Returns the decoding state: (step 0, cache, logits, done flags) of B * samples rows."""
  cache, logits_BV = prefill(params, model, prompt_BP, lengths_B, num_tokens)
  rows_R = jnp.repeat(jnp.arange(prompt_BP.shape[0]), samples)
  return (0, _reorder_rows(cache, rows_R), logits_BV[rows_R],
          jnp.zeros(rows_R.shape, bool))


def _step(params, model, lengths_R, key, temperature, top_p, state, *, top_k, eos_id,
          num_tokens):
  """One decoding step of every row: choose a token, feed it. Returns (state, key, tokens)."""
  i, cache, logits_RV, done_R = state
  key, draw = jax.random.split(key)
  token_R = sampling.sample(draw, logits_RV, temperature, top_k, top_p).astype(jnp.int32)
  token_R = jnp.where(done_R, eos_id, token_R)
  done_R = done_R | (token_R == eos_id)
  logits_RV, cache = _decode_one(params, model, cache, token_R, lengths_R + i, num_tokens)
  return (i + 1, cache, logits_RV, done_R), key, token_R


@functools.partial(jax.jit, static_argnames=("model", "max_steps", "samples", "top_k", "eos_id",
                                             "num_tokens"))
def _generate(params, prompt_BP, lengths_B, key, temperature, top_p, steps, *, model,
              max_steps, samples, top_k, eos_id, num_tokens):
  model, params = for_decoding(model, params, prompt_BP.shape[1] + max_steps)
  state = _start(params, model, prompt_BP, lengths_B, samples, num_tokens)
  lengths_R = jnp.repeat(lengths_B, samples)
  step = functools.partial(_step, params, model, lengths_R, top_k=top_k, eos_id=eos_id,
                           num_tokens=num_tokens)

  def keep_going(carry):
    (i, _, _, done_R), _, _ = carry
    return (i < steps) & ~jnp.all(done_R)

  def body(carry):
    state, key, out_RS = carry
    state, key, token_R = step(key, temperature, top_p, state)
    return state, key, out_RS.at[:, state[0] - 1].set(token_R)

  out_RS = jnp.full((lengths_R.shape[0], max_steps), eos_id, jnp.int32)
  return jax.lax.while_loop(keep_going, body, (state, key, out_RS))[-1]


def _padded_prompts(model: Transformer, prompts: list[list[int]], max_new_tokens: int):
  """Checks prompts against the context; returns [B, P] ids, right-padded to a bucket of
  lengths, and the lengths [B]."""
  context = model.config.context_length
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("A prompt is empty; give at least one token of text.")
  longest = max(len(p) for p in prompts)
  if longest > context:
    raise UserError(f"A prompt of {longest} tokens exceeds the context of {context} tokens; "
                    "shorten the prompt.")
  if longest + max_new_tokens > context:
    raise UserError(f"A prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                    f"the context of {context} tokens; shorten the prompt or lower "
                    "max_new_tokens.")
  return _right_padded(prompts, _bucket(longest, context))


def _right_padded(prompts: list[list[int]], width: int):
  """([B, width] ids of `prompts` padded with 0, their lengths [B])."""
  prompt_BP = np.zeros((len(prompts), width), np.int32)
  for row, ids in enumerate(prompts):
    prompt_BP[row, :len(ids)] = ids
  return jnp.asarray(prompt_BP), jnp.asarray([len(p) for p in prompts], jnp.int32)


def _check_max_new_tokens(max_new_tokens: int) -> None:
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens={max_new_tokens} must be at least 1.")


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


def generate(params, model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
             eos_id: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float = 1.0, seed: int = 0, num_tokens: int | None = None,
             samples: int = 1) -> list[list[int]]:
  """New token ids for each prompt, ending before end-of-sequence or at `max_new_tokens`,
  all below `num_tokens` if given (the tokenizer's size, under a padded embedding).

  With `samples` > 1, each prompt is prefilled once and continued `samples` times (rows
  prompt-major). Deterministic for a given seed. A prompt that leaves fewer than
  `max_new_tokens` positions of the context is refused rather than truncated, so what the
  model sees is what was asked.
  """
  sampling.check_options(temperature, top_k, top_p, model.config.vocab_size)
  _check_max_new_tokens(max_new_tokens)
  prompt_BP, lengths_B = _padded_prompts(model, prompts, max_new_tokens)
  out_RS = _generate(params, prompt_BP, lengths_B, jax.random.key(seed),
                     jnp.float32(temperature), jnp.float32(top_p), jnp.int32(max_new_tokens),
                     model=model, max_steps=_bucket(max_new_tokens, model.config.context_length),
                     samples=samples, top_k=top_k or 0, eos_id=eos_id, num_tokens=num_tokens)
  return [_until_eos(row[:max_new_tokens], eos_id) for row in np.asarray(out_RS).tolist()]


def complete(params, model: Transformer, prompts: list[list[int]], width: int, key,
             max_new_tokens: int, *, eos_id: int, samples: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, num_tokens: int | None = None) -> jax.Array:
  """[B * samples, max_new_tokens] new ids of the B `prompts`, each padded to `width` (rows
  prompt-major, `eos_id` after a row's end), for callers that ask the same shapes again and
  again (RL rollouts): one program per B, `width`, `max_new_tokens` and `samples`, with no
  bucketing and no checks (width + max_new_tokens must fit the context)."""
  prompt_BP, lengths_B = _right_padded(prompts, width)
  return _generate(params, prompt_BP, lengths_B, key, jnp.float32(temperature),
                   jnp.float32(top_p), jnp.int32(max_new_tokens), model=model,
                   max_steps=max_new_tokens, samples=samples, top_k=0, eos_id=eos_id,
                   num_tokens=num_tokens)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens"))
def _stream_start(params, prompt_BP, lengths_B, *, model, num_tokens):
  return _start(params, model, prompt_BP, lengths_B, 1, num_tokens)


_stream_step = jax.jit(_step, static_argnames=("model", "top_k", "eos_id", "num_tokens"),
                       donate_argnames="state")


def stream(params, model: Transformer, prompt: list[int], max_new_tokens: int, *, eos_id: int,
           temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
           seed: int = 0, num_tokens: int | None = None) -> Iterator[int]:
  """Yields the new token ids of one prompt as they are decoded, ending before
  end-of-sequence: the tokens `generate` returns for the same arguments and seed."""
  sampling.check_options(temperature, top_k, top_p, model.config.vocab_size)
  _check_max_new_tokens(max_new_tokens)
  prompt_BP, lengths_B = _padded_prompts(model, [prompt], max_new_tokens)
  model, params = for_decoding(
      model, params, prompt_BP.shape[1] + _bucket(max_new_tokens, model.config.context_length))
  state = _stream_start(params, prompt_BP, lengths_B, model=model, num_tokens=num_tokens)
  key, temperature, top_p = jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p)
  for _ in range(max_new_tokens):
    state, key, token_R = _stream_step(params, model, lengths_B, key, temperature, top_p,
                                       state, top_k=top_k or 0, eos_id=eos_id,
                                       num_tokens=num_tokens)
    token = int(token_R[0])
    if token == eos_id:
      return
    yield token


# --- beam search -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Hypothesis:
  tokens: list[int]  # new tokens, without the end-of-sequence token
  log_prob: float  # total log-probability of the new tokens (and of the end, if reached)
  score: float  # log_prob / length ** length_penalty: what beams are ranked by


def _length_normalised(log_prob, length, length_penalty):
  return log_prob / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty


@functools.partial(jax.jit, static_argnames=("model", "steps", "beams", "eos_id", "num_tokens"))
def _beam_search(params, prompt_BP, lengths_B, length_penalty, *, model, steps, beams, eos_id,
                 num_tokens):
  B, W = prompt_BP.shape[0], beams
  model, params = for_decoding(model, params, prompt_BP.shape[1] + steps)
  cache, logits_BV = prefill(params, model, prompt_BP, lengths_B, num_tokens)
  cache = _reorder_rows(cache, jnp.repeat(jnp.arange(B), W))  # row b*W + w is beam w of b
  log_probs_BWV = jnp.repeat(jax.nn.log_softmax(logits_BV.astype(jnp.float32))[:, None], W, 1)
  V = log_probs_BWV.shape[-1]
  # Every beam starts as the same prompt: only beam 0 may extend it at first, so the first
  # step picks W different tokens instead of W copies of the best one.
  totals_BW = jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf)[None].repeat(B, 0)
  # Once a beam has ended, its only continuation is "stay ended" at no cost.
  stay_ended_V = jnp.where(jnp.arange(V) == eos_id, 0.0, -jnp.inf)

  def keep_going(carry):
    i, _, _, _, _, ended_BW, _ = carry
    return (i < steps) & ~jnp.all(ended_BW)

  def step(carry):
    i, cache, log_probs_BWV, totals_BW, lengths_BW, ended_BW, out_BWS = carry
    log_probs_BWV = jnp.where(ended_BW[..., None], stay_ended_V, log_probs_BWV)
    candidates_BWV = totals_BW[..., None] + log_probs_BWV
    candidate_lengths_BW = lengths_BW + (~ended_BW).astype(jnp.int32)
    ranks_BWV = _length_normalised(candidates_BWV, candidate_lengths_BW[..., None],
                                   length_penalty)
    _, best_BW = jax.lax.top_k(ranks_BWV.reshape(B, W * V), W)
    parent_BW, token_BW = best_BW // V, (best_BW % V).astype(jnp.int32)
    totals_BW = jnp.take_along_axis(candidates_BWV.reshape(B, W * V), best_BW, axis=1)
    lengths_BW = jnp.take_along_axis(candidate_lengths_BW, parent_BW, axis=1)
    ended_BW = jnp.take_along_axis(ended_BW, parent_BW, axis=1) | (token_BW == eos_id)
    out_BWS = jnp.take_along_axis(out_BWS, parent_BW[..., None], axis=1)
    out_BWS = out_BWS.at[:, :, i].set(token_BW)
    cache = _reorder_rows(cache, (jnp.arange(B)[:, None] * W + parent_BW).reshape(-1))
    logits_RV, cache = _decode_one(params, model, cache, token_BW.reshape(-1),
                                   jnp.repeat(lengths_B, W) + i, num_tokens)
    log_probs_BWV = jax.nn.log_softmax(logits_RV.astype(jnp.float32)).reshape(B, W, V)
    return i + 1, cache, log_probs_BWV, totals_BW, lengths_BW, ended_BW, out_BWS

  out_BWS = jnp.full((B, W, steps), eos_id, jnp.int32)
  carry = (0, cache, log_probs_BWV, totals_BW, jnp.zeros((B, W), jnp.int32),
           jnp.zeros((B, W), bool), out_BWS)
  _, _, _, totals_BW, lengths_BW, _, out_BWS = jax.lax.while_loop(keep_going, step, carry)
  scores_BW = _length_normalised(totals_BW, lengths_BW, length_penalty)
  order_BW = jnp.argsort(-scores_BW, axis=1)
  pick = functools.partial(jnp.take_along_axis, indices=order_BW, axis=1)
  return (jnp.take_along_axis(out_BWS, order_BW[..., None], axis=1), pick(totals_BW),
          pick(scores_BW))


def beam_search(params, model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
                eos_id: int, beams: int, length_penalty: float = 1.0,
                num_return: int = 1, num_tokens: int | None = None) -> list[list[Hypothesis]]:
  """The `num_return` best of `beams` hypotheses for each prompt, best first (of tokens below
  `num_tokens`, if given).

  Beams are ranked by total log-probability divided by length ** `length_penalty` (length
  counts new tokens, the end-of-sequence token included): 0 ranks by total log-probability,
  which favours short endings; larger values favour longer ones. A beam ends at
  end-of-sequence or after `max_new_tokens`; the search stops when every beam has ended.
  With `beams=1` this is greedy decoding.
  """
  if beams < 1:
    raise UserError(f"beams={beams} must be at least 1 (1 is greedy decoding).")
  if beams > model.config.vocab_size:
    raise UserError(f"beams={beams} exceeds the vocabulary of {model.config.vocab_size} "
                    "tokens; use fewer beams.")
  if not 1 <= num_return <= beams:
    raise UserError(f"Asked for {num_return} sequences per prompt from {beams} beams; ask for "
                    "between 1 and the number of beams.")
  if not length_penalty >= 0:
    raise UserError(f"length_penalty={length_penalty} must be 0 or positive.")
  _check_max_new_tokens(max_new_tokens)
  prompt_BP, lengths_B = _padded_prompts(model, prompts, max_new_tokens)
  out_BWS, totals_BW, scores_BW = jax.device_get(_beam_search(
      params, prompt_BP, lengths_B, jnp.float32(length_penalty), model=model,
      steps=max_new_tokens, beams=beams, eos_id=eos_id, num_tokens=num_tokens))
  return [[Hypothesis(_until_eos(out_BWS[b, w].tolist(), eos_id), float(totals_BW[b, w]),
                      float(scores_BW[b, w])) for w in range(num_return)]
          for b in range(len(prompts))]


# --- the next-token distribution -------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "num_tokens"))
def _next_token_probs(params, prompt_BP, lengths_B, *, model, num_tokens):
  logits_BPV = model.apply({"params": params}, prompt_BP)
  last_BV = logits_BPV[jnp.arange(prompt_BP.shape[0]), lengths_B - 1, :num_tokens]
  return jax.nn.softmax(last_BV.astype(jnp.float32), axis=-1)


def next_token_probs(params, model: Transformer, prompts: list[list[int]],
                     num_tokens: int | None = None) -> np.ndarray:
  """[B, V] probabilities of the token after each prompt (one full forward pass), over the
  first `num_tokens` ids if given."""
  prompt_BP, lengths_B = _padded_prompts(model, prompts, max_new_tokens=0)
  return np.asarray(_next_token_probs(params, prompt_BP, lengths_B, model=model,
                                      num_tokens=num_tokens))
