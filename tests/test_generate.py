"""KV-cache decoding against the full forward pass, and the samplers' defining properties."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.inference import generate as generate_lib
from llm_jax.inference import sampling
from llm_jax.parallel import sharding
from llm_jax.errors import UserError
from llm_jax.inference.generate import beam_search, generate, next_token_probs
from llm_jax.train import optimizer, state as state_lib

from conftest import model_of, tiny_config

EOS = 3


def _model(*overrides):
  return model_of(tiny_config(*overrides))


@pytest.fixture(scope="module")
def model_and_params():
  model = _model()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


@pytest.mark.parametrize("overrides, tolerance", [
    (["model.scan_layers=true"], 1e-5),  # unrolled on CPU: per-layer arrays when decoding
    (["model.scan_layers=true", "model.scan_unroll=1"], 1e-5),  # scanned, as on accelerators
    (["model.scan_layers=false"], 1e-5),
    # Heads wider than d_model / num_heads (the cache holds them), and Llama 3.1 rotary.
    (["model.head_dim=12", "model.rope_scaling=llama3", "model.rope_original_context=16"], 1e-5),
    # Weights cast once to bfloat16, the tied head a bfloat16 copy beside the float32 lookup:
    # the same roundings as the full pass, on activations that differ by float32 noise.
    (["model.matmul_precision=bfloat16"], 1e-5),
    (["model.matmul_precision=bfloat16", "model.tie_embeddings=false"], 1e-5),
    (["model.param_dtype=bfloat16"], 1e-5),  # bfloat16 weights are not widened
    (["model.dtype=bfloat16"], 5e-2),
])
def test_cached_decoding_equals_the_full_forward_pass(overrides, tolerance):
  """The decode path (`generate`'s prepared model and parameters, a cache of fewer slots
  than the context) gives the logits of the full forward pass."""
  model = _model(*overrides)
  tokens_BT = jax.random.randint(jax.random.key(1), (2, 20), 4, 512)
  params = jax.jit(model.init)(jax.random.key(0), tokens_BT)["params"]
  full_BTV = jax.jit(model.apply)({"params": params}, tokens_BT).astype(jnp.float32)
  decoding_model, decoding_params = generate_lib.for_decoding(model, params, slots=20)
  prefill = 7
  cached = jax.jit(lambda variables, tokens, positions: decoding_model.apply(
      variables, tokens, None, positions, decode=True, mutable=["cache"]))
  logits, variables = cached({"params": decoding_params}, tokens_BT[:, :prefill],
                             jnp.broadcast_to(jnp.arange(prefill), (2, prefill)))
  pieces = [logits]
  for t in range(prefill, 20):
    logits, variables = cached({"params": decoding_params, **variables}, tokens_BT[:, t:t + 1],
                               jnp.full((2, 1), t))
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1).astype(jnp.float32), full_BTV,
                             atol=tolerance, rtol=tolerance)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
  return model.apply({"params": params}, tokens)


@pytest.mark.parametrize("overrides, kept, lookup", [
    # The float32 embedding stays for the lookup beside the output head's bfloat16 copy.
    (["model.matmul_precision=bfloat16"], "bfloat16", "float32"),
    (["model.dtype=bfloat16"], "bfloat16", "bfloat16"),
    (["model.param_dtype=bfloat16"], "bfloat16", "bfloat16"),  # float32 copies would triple it
    ([], "float32", "float32"),
])
def test_decoding_reads_each_weight_in_its_matmul_dtype_and_widens_none(overrides, kept,
                                                                        lookup):
  model = _model(*overrides)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  _, prepared = generate_lib.for_decoding(model, params, slots=16)
  dtypes = {jax.tree_util.keystr(path): x.dtype for path, x in
            jax.tree_util.tree_leaves_with_path(prepared) if x.ndim > 1}
  assert dtypes.pop("['embedding']") == jnp.dtype(lookup)
  assert set(dtypes.values()) == {jnp.dtype(kept)}, dtypes


def _greedy_without_cache(model, params, prompt, steps):
  # Full forward passes over a context-sized buffer: causal, so the zeros after the last
  # real token change nothing at its position.
  buffer = np.zeros((1, model.config.context_length), np.int32)
  buffer[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + steps):
    buffer[0, t] = int(jnp.argmax(_forward(model, params, jnp.asarray(buffer))[0, t - 1]))
  return buffer[0, len(prompt):len(prompt) + steps].tolist()


def test_greedy_batch_of_different_lengths_equals_the_argmax_chain(model_and_params):
  model, params = model_and_params
  prompts = [[2, 17, 99, 240, 5], [2, 400], [2, 8, 9, 10, 11, 12, 13, 14]]
  out = generate(params, model, prompts, 10, eos_id=-1)
  for prompt, new in zip(prompts, out):
    assert new == _greedy_without_cache(model, params, prompt, 10)


def test_greedy_with_bfloat16_operands_equals_the_argmax_chain(model_and_params):
  """The decode path (per-layer parameters, head-major cache) with bfloat16 matmul operands
  follows the model's own argmax chain."""
  _, params = model_and_params
  model = _model("model.matmul_precision=bfloat16")
  assert model.config.bf16_operands
  prompts = [[2, 17, 99, 240, 5], [2, 400]]
  for prompt, new in zip(prompts, generate(params, model, prompts, 10, eos_id=-1)):
    assert new == _greedy_without_cache(model, params, prompt, 10)


def test_temperature_zero_is_greedy_whatever_the_filters(model_and_params):
  model, params = model_and_params
  prompts = [[2, 17, 99], [2, 400, 401, 402]]
  greedy = generate(params, model, prompts, 8, eos_id=-1)
  assert generate(params, model, prompts, 8, eos_id=-1, temperature=0.0, top_k=5, top_p=0.5,
                  seed=7) == greedy


def test_sampling_is_deterministic_per_seed_and_stops_at_eos(model_and_params):
  model, params = model_and_params
  prompts = [[2, 17, 99], [2, 400, 401, 402]]
  a = generate(params, model, prompts, 12, eos_id=-1, temperature=1.5, seed=3)
  assert a == generate(params, model, prompts, 12, eos_id=-1, temperature=1.5, seed=3)
  assert a != generate(params, model, prompts, 12, eos_id=-1, temperature=1.5, seed=4)
  first = a[0][0]  # make the first sampled token of row 0 the end of sequence
  stopped = generate(params, model, prompts, 12, eos_id=first, temperature=1.5, seed=3)
  assert stopped[0] == []
  assert stopped[1] == a[1][:a[1].index(first)] if first in a[1] else stopped[1] == a[1]


def test_generation_under_a_sharded_mesh_matches_one_device(model_and_params):
  model, _ = model_and_params
  config = tiny_config("mesh.fsdp=2", "mesh.tensor=4")
  mesh = sharding.make_mesh(config.mesh)
  state = state_lib.init_state(model, optimizer.make_optimizer(config.train), mesh, seed=5)
  prompts = [[2, 5, 6], [2, 7], [2, 8, 9, 10], [2, 11]]
  with sharding.activate(mesh):
    sharded = generate(state.params, model, prompts, 6, eos_id=-1, temperature=0.8, seed=1)
  local = jax.device_get(state.params)
  assert sharded == generate(local, model, prompts, 6, eos_id=-1, temperature=0.8, seed=1)


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompts=[[]]), "prompt is empty"),
    (dict(prompts=[[2] * 30], max_new_tokens=5), "exceeds the context of 32"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=513), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_generation_options(model_and_params, kwargs, words):
  model, params = model_and_params
  args = {"prompts": [[2, 3]], "max_new_tokens": 4, **kwargs}
  with pytest.raises(UserError, match=words):
    generate(params, model, args.pop("prompts"), args.pop("max_new_tokens"), eos_id=EOS, **args)


def _sequence_log_prob(model, params, prompt, new_tokens):
  """Total log-probability of `new_tokens` after `prompt`, from one uncached forward pass."""
  # Padded to the context, so that every call is one program; causal, so the padding after
  # the last token changes nothing before it.
  tokens = np.zeros((1, model.config.context_length), np.int32)
  tokens[0, :len(prompt) + len(new_tokens)] = prompt + new_tokens
  log_probs = np.asarray(jax.nn.log_softmax(_forward(model, params, tokens)[0], axis=-1))
  return float(sum(log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(new_tokens)))


BEAM_PROMPTS = [[2, 17, 99, 240, 5], [2, 400], [2, 8, 9, 10, 11, 12, 13, 14], [2, 31, 7]]


def test_beam_search_of_width_one_is_greedy(model_and_params):
  model, params = model_and_params
  greedy = generate(params, model, BEAM_PROMPTS, 9, eos_id=-1)
  beams = beam_search(params, model, BEAM_PROMPTS, 9, eos_id=-1, beams=1)
  assert [h[0].tokens for h in beams] == greedy


def test_wider_beams_find_sequences_at_least_as_likely_as_greedy(model_and_params):
  model, params = model_and_params
  greedy = generate(params, model, BEAM_PROMPTS, 9, eos_id=-1)
  # Every hypothesis has 9 tokens (no end token), so the length penalty ranks like the sum.
  beams = beam_search(params, model, BEAM_PROMPTS, 9, eos_id=-1, beams=4, num_return=4)
  better = 0
  for prompt, greedy_tokens, hypotheses in zip(BEAM_PROMPTS, greedy, beams):
    greedy_log_prob = _sequence_log_prob(model, params, prompt, greedy_tokens)
    best = hypotheses[0]
    assert best.log_prob >= greedy_log_prob - 1e-4
    better += best.log_prob > greedy_log_prob + 1e-4
    # Reported totals are the sequences' own log-probabilities, and they come best first.
    for h in hypotheses:
      assert len(h.tokens) == 9
      np.testing.assert_allclose(h.log_prob, _sequence_log_prob(model, params, prompt, h.tokens),
                                 atol=1e-3)
    assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
    assert len({tuple(h.tokens) for h in hypotheses}) == 4  # distinct beams, no copies
  assert better > 0  # on these prompts the wider search does find something greedy misses


def test_beam_search_ends_at_eos_and_the_length_penalty_decides_between_lengths(
    model_and_params):
  model, params = model_and_params
  prompt = [[2, 17, 99]]
  free = beam_search(params, model, prompt, 8, eos_id=-1, beams=3, num_return=3)[0]
  eos = free[1].tokens[2]  # a token that a good beam emits third: make it the end token
  for penalty in (0.0, 2.0):
    hyps = beam_search(params, model, prompt, 8, eos_id=eos, beams=3, num_return=3,
                       length_penalty=penalty)[0]
    for h in hyps:
      assert eos not in h.tokens
      ended = len(h.tokens) < 8
      full = h.tokens + ([eos] if ended else [])
      np.testing.assert_allclose(h.log_prob, _sequence_log_prob(model, params, prompt[0], full),
                                 atol=1e-3)
      np.testing.assert_allclose(h.score, h.log_prob / len(full) ** penalty, rtol=1e-5)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_next_token_probs_are_the_softmax_at_each_prompts_last_position(model_and_params):
  model, params = model_and_params
  prompts = [[2, 17, 99, 240], [2, 400]]
  probs = next_token_probs(params, model, prompts)
  for row, prompt in enumerate(prompts):
    logits = model.apply({"params": params}, jnp.asarray([prompt]))[0, -1]
    np.testing.assert_allclose(probs[row], jax.nn.softmax(logits), atol=1e-6)
  np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kwargs, words", [
    (dict(beams=0), "beams"), (dict(beams=600), "vocabulary"),
    (dict(beams=2, num_return=3), "sequences per prompt"),
    (dict(length_penalty=-1.0), "length_penalty"),
])
def test_bad_beam_options(model_and_params, kwargs, words):
  model, params = model_and_params
  with pytest.raises(UserError, match=words):
    beam_search(params, model, [[2, 3]], 4, eos_id=EOS, **{"beams": 2, **kwargs})


# --- samplers on their own -------------------------------------------------------------------

def _draws(logits_V, n, **kwargs):
  logits_NV = jnp.broadcast_to(logits_V, (n, logits_V.shape[-1]))
  return np.asarray(sampling.sample(jax.random.key(0), logits_NV, **kwargs))


def test_greedy_is_the_first_argmax():
  logits_BV = jnp.asarray([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 5.0],
                           [-jnp.inf, -3.0, -4.0, -3.0]])
  np.testing.assert_array_equal(sampling.greedy(logits_BV), [1, 0, 1])


def _chi_square_999(dof: int) -> float:
  """The 0.999 quantile of chi-square with `dof` degrees of freedom (Wilson-Hilferty)."""
  return dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3


def test_top_p_draws_have_the_nucleus_distribution():
  # 300 tokens: the nucleus spans three blocks of the two-level draw, and most draws from the
  # whole distribution land outside it, so they are rejected a few times over.
  logits_V = jax.random.normal(jax.random.key(3), (300,)) * 2
  probs = np.exp(np.asarray(logits_V, np.float64) - float(logits_V.max()))
  probs /= probs.sum()
  p = 0.5
  order = np.argsort(-probs)
  nucleus = order[:int(np.searchsorted(np.cumsum(probs[order]), p)) + 1]
  n = 20_000
  counts = np.bincount(_draws(logits_V, n, temperature=1.0, top_p=p), minlength=300)
  assert counts.sum() == counts[nucleus].sum()
  expected = n * probs[nucleus] / probs[nucleus].sum()
  assert np.sum((counts[nucleus] - expected) ** 2 / expected) < _chi_square_999(len(nucleus) - 1)


def test_top_p_keeps_ties_at_the_edge_together():
  # Each 0.3 token has 0.4 of mass strictly more likely than it: both are in the nucleus of
  # p = 0.5 and both are out of that of p = 0.3.
  logits_V = jnp.log(jnp.asarray([0.3, 0.4, 0.3]))
  n = 6000
  counts = np.bincount(_draws(logits_V, n, temperature=1.0, top_p=0.5), minlength=3)
  expected = n * np.asarray([0.3, 0.4, 0.3])
  assert np.sum((counts - expected) ** 2 / expected) < _chi_square_999(2)
  assert set(_draws(logits_V, 500, temperature=1.0, top_p=0.3).tolist()) == {1}


def test_top_p_rows_left_after_the_last_round_take_their_most_likely_token(monkeypatch):
  monkeypatch.setattr(sampling, "NUCLEUS_ROUNDS", 1)
  # Flat rows: every token is in the nucleus, so the first draw is kept, whatever it is.
  # Rows with one token of 2% ahead of 49 others: the nucleus of p = 0.01 is that token alone,
  # and a first draw mostly lands outside it.
  flat_V = jnp.zeros(50)
  ahead_V = jnp.zeros(50).at[7].set(0.02)
  logits_BV = jnp.stack([flat_V, ahead_V] * 16)
  drawn = np.asarray(sampling.top_p_categorical(jax.random.key(0), logits_BV, 0.01))
  assert set(drawn[1::2].tolist()) == {7}  # kept, or left after the round and given the top
  assert len(set(drawn[::2].tolist())) > 1  # the flat rows kept their own draws


def test_draws_across_blocks_of_a_large_vocabulary_match_the_distribution():
  probs = {5: 0.4, 127: 0.1, 128: 0.2, 299: 0.3}  # blocks of 128 tokens, and a partial one
  logits_V = jnp.full((300,), -jnp.inf).at[jnp.asarray(list(probs))].set(
      jnp.log(jnp.asarray(list(probs.values()))))
  n = 20_000
  counts = np.bincount(_draws(logits_V, n, temperature=1.0), minlength=300)
  assert counts.sum() == counts[list(probs)].sum()
  expected = n * np.asarray(list(probs.values()))
  assert np.sum((counts[list(probs)] - expected) ** 2 / expected) < 16.27  # chi-square 0.999, 3 dof


def test_top_k_never_leaves_the_k_most_likely():
  logits = jax.random.normal(jax.random.key(1), (50,)) * 2
  drawn = set(_draws(logits, 2000, temperature=2.0, top_k=5).tolist())
  assert drawn <= set(np.argsort(-np.asarray(logits))[:5].tolist()) and len(drawn) > 1


def test_top_k_then_top_p_draws_from_the_nucleus_of_the_k_most_likely():
  logits = jax.random.normal(jax.random.key(5), (50,)) * 2
  k, p = 3, 0.9  # without top-k, the nucleus of 0.9 would reach well past 3 tokens
  top = np.argsort(-np.asarray(logits))[:k]
  probs = np.exp(np.asarray(logits)[top] - float(logits.max()))
  probs /= probs.sum()  # renormalised over the k: what top-p sees
  nucleus = top[:int(np.searchsorted(np.cumsum(probs), p)) + 1]
  drawn = set(_draws(logits, 2000, temperature=1.0, top_k=k, top_p=p).tolist())
  assert drawn <= set(nucleus.tolist()) and len(drawn) > 1


def test_top_p_never_leaves_the_smallest_set_reaching_p():
  logits = jax.random.normal(jax.random.key(2), (50,)) * 2
  p = 0.6
  probs = np.asarray(jax.nn.softmax(logits))
  order = np.argsort(-probs)
  size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest prefix with mass >= p
  drawn = set(_draws(logits, 2000, temperature=1.0, top_p=p).tolist())
  assert drawn <= set(order[:size].tolist()) and len(drawn) > 1


def test_sampling_frequencies_match_the_distribution():
  probs = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
  n = 20_000
  counts = np.bincount(_draws(jnp.log(jnp.asarray(probs)), n, temperature=1.0), minlength=5)
  chi_square = np.sum((counts - n * probs) ** 2 / (n * probs))
  assert chi_square < 18.47  # the 0.999 quantile of chi-square with 4 degrees of freedom


def test_temperature_sharpens_and_flattens():
  logits = jnp.log(jnp.asarray([0.6, 0.3, 0.1]))
  cold = np.bincount(_draws(logits, 4000, temperature=0.3), minlength=3) / 4000
  hot = np.bincount(_draws(logits, 4000, temperature=3.0), minlength=3) / 4000
  assert cold[0] > 0.85 and hot[0] < 0.5


def test_generation_keeps_to_the_tokenizers_ids_under_a_padded_embedding(model_and_params):
  model, boxed = model_and_params
  params = nn.meta.unbox(boxed)
  # Make the padded rows 500.. the most likely next tokens everywhere (the output head is the
  # tied embedding, so large rows there are large logits).
  params = {**params, "embedding": params["embedding"].at[500:].multiply(50.0)}
  prompts = [[2, 5, 6], [2, 7]]
  free = generate(params, model, prompts, 6, eos_id=-1)
  assert max(max(ids) for ids in free) >= 500  # the test's premise: padding would win
  kept = generate(params, model, prompts, 6, eos_id=-1, num_tokens=500)
  assert max(max(ids) for ids in kept) < 500
  beams = beam_search(params, model, prompts, 4, eos_id=-1, beams=3, num_tokens=500)
  assert all(max(h.tokens) < 500 for hypotheses in beams for h in hypotheses)
  assert next_token_probs(params, model, prompts, num_tokens=500).shape == (2, 500)


def test_prompts_of_many_lengths_compile_a_handful_of_programs(model_and_params):
  model, params = model_and_params
  before = generate_lib._generate._cache_size()
  rng = np.random.default_rng(3)
  for length in range(1, 25):  # a stream of requests of every prompt length and many budgets
    prompt = [2, *rng.integers(4, 500, length - 1).tolist()]
    generate(params, model, [prompt], 1 + length % 7, eos_id=-1)
  # Prompt lengths round up to 16 or 32 tokens and step counts to 16: two programs, not 24.
  assert generate_lib._generate._cache_size() - before <= 2


def test_samples_share_one_prefill_and_match_separate_rows(model_and_params, monkeypatch):
  model, params = model_and_params
  prompts = [[2, 5, 6], [2, 7, 8, 9]]
  prefilled_rows = []
  real_prefill = generate_lib.prefill

  def counting_prefill(params, model, prompt_BP, *args):
    prefilled_rows.append(prompt_BP.shape[0])
    return real_prefill(params, model, prompt_BP, *args)
  monkeypatch.setattr(generate_lib, "prefill", counting_prefill)
  greedy = generate(params, model, prompts, 6, eos_id=-1, samples=3, seed=4)
  sampled = generate(params, model, prompts, 6, eos_id=-1, samples=3, temperature=1.0, seed=4)
  assert prefilled_rows and set(prefilled_rows) == {2}  # one prefill row per prompt
  alone = generate(params, model, prompts, 6, eos_id=-1)
  assert greedy == [alone[0]] * 3 + [alone[1]] * 3  # the copied cache continues each prompt
  assert len({tuple(ids) for ids in sampled[:3]}) > 1  # samples of one prompt differ
  assert sampled == generate(params, model, prompts, 6, eos_id=-1, samples=3, temperature=1.0,
                             seed=4)


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 0.9)])
def test_streaming_yields_the_tokens_of_the_batch_call(model_and_params, temperature, top_p):
  model, params = model_and_params
  prompt = [2, 11, 12, 13]
  for seed in (0, 1):
    batch = generate(params, model, [prompt], 12, eos_id=3, temperature=temperature,
                     top_p=top_p, seed=seed)[0]
    streamed = list(generate_lib.stream(params, model, prompt, 12, eos_id=3,
                                        temperature=temperature, top_p=top_p, seed=seed))
    assert streamed == batch
