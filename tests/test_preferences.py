"""Preference pairs: reading `preferences:` sources, the response-only weights and the reward
position, statistics, and the batches of training (per epoch, per process, resumable) and of
evaluation (padded)."""

import json
import types

import numpy as np
import pytest

from llm_jax.data import chat_template, preferences, sources
from llm_jax.data.documents import Subset
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.errors import UserError
from llm_jax.objectives.pairs import last_response_position

from conftest import stdlib_texts

SYSTEM = {"role": "system", "content": "Answer briefly."}
WORDS = ("self", "in", "def", "if", "return", "x", "None", "for")


@pytest.fixture(scope="module")
def tokenizer():
  return train_tokenizer(stdlib_texts(12), 448)


@pytest.fixture(scope="module")
def fmt(tokenizer):
  return chat_template.chat_format(tokenizer)


def _pair(i: int) -> dict:
  """A distinct pair; responses of 1 to 8 words."""
  return {"prompt": [{"role": "user", "content": f"q{i} " + " ".join(WORDS[:i % 3 + 1])}],
          "chosen": [{"role": "assistant", "content": f"yes{i} " + " ".join(WORDS[:i % 8 + 1])}],
          "rejected": [{"role": "assistant",
                        "content": f"no{i} " + " ".join(WORDS[-(i % 5 + 1):])}]}


def _jsonl(path, records):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


# Reading.

def test_string_and_message_forms_normalize_the_same():
  strings = {"prompt": "What is 17+25?", "chosen": "42", "rejected": "32"}
  lists = {"prompt": [{"role": "user", "content": "What is 17+25?", "name": "ann"}],
           "chosen": [{"role": "assistant", "content": "42"}],
           "rejected": [{"content": "32", "role": "assistant", "weight": 1}]}
  expected = {"prompt": [{"role": "user", "content": "What is 17+25?"}],
              "chosen": [{"role": "assistant", "content": "42"}],
              "rejected": [{"role": "assistant", "content": "32"}]}
  assert preferences.from_record(strings) == preferences.from_record(lists) == expected
  turns = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
           {"role": "user", "content": "17+25?"}]
  assert preferences.from_record({**strings, "prompt": turns})["prompt"] == turns


def test_bad_lines_are_skipped_and_counted_by_reason(tmp_path):
  good = [_pair(i) for i in range(6)]
  user = {"role": "user", "content": "hi"}
  answer = {"role": "assistant", "content": "hello"}
  _jsonl(tmp_path / "a.jsonl", [
      good[0], "{not json", good[1],
      {"prompt": "p", "chosen": "c"},  # missing field
      ["p", "c", "r"],  # missing field: not an object
      {"prompt": [user, answer], "chosen": "c", "rejected": "r"},  # malformed prompt: no user last
      {"prompt": 17, "chosen": "c", "rejected": "r"},  # malformed prompt
      {"prompt": "", "chosen": "c", "rejected": "r"},  # malformed prompt: empty
      {"prompt": "p", "chosen": [user], "rejected": "r"},  # malformed response: not the assistant
      {"prompt": "p", "chosen": {"role": "assistant", "content": "c"},
       "rejected": "r"},  # malformed response: one message, not a list
      {"prompt": "p", "chosen": "c", "rejected": [answer, user]},  # malformed response: ends user
      {"prompt": "p", "chosen": " \n", "rejected": "r"},  # empty response
      {"prompt": "p", "chosen": [], "rejected": "r"},  # empty response
      {"prompt": "p", "chosen": "same", "rejected": [{"role": "assistant", "content": "same"}]},
  ])
  _jsonl(tmp_path / "b.jsonl", good[2:] + [good[3]])  # a duplicate
  (tmp_path / "notes.txt").write_text("not a pairs file")
  source = sources.open_source(f"preferences:{tmp_path}/*",
                               types.SimpleNamespace(val_fraction=0.5))
  read = [source.train[i] for i in range(len(source.train))] + [
      source.validation[i] for i in range(len(source.validation))]
  assert source.kind == "preferences" and len(source.train) and len(source.validation)
  assert sorted(map(json.dumps, read)) == sorted(map(json.dumps, good))
  assert {reason: n for reason, n in source.skipped.items() if n} == {
      "not JSON": 1, "missing field": 2, "malformed prompt": 3, "malformed response": 3,
      "empty response": 2, "identical responses": 1, "duplicate": 1, "not JSON Lines": 1}
  sample = list(sources.text_sample([(source, 1.0)], 10**6, seed=0))  # to train a tokenizer on
  assert len(sample) == len(source.train) and all(text.startswith("q") for text in sample)
  everything = preferences.open_all_preferences(f"{tmp_path}/*.jsonl")
  assert len(everything.train) == len(good) and not len(everything.validation)


def test_a_glob_with_no_usable_pair_is_one_clear_error(tmp_path):
  _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "c"}])
  with pytest.raises(UserError, match=r"No usable preference pair .*1 identical responses.*"
                                      r"\"prompt\""):
    preferences.open_preferences(f"preferences:{tmp_path}/*.jsonl", 0.1)


# Encoding.

def test_weights_cover_exactly_the_response_and_its_closing_token(tokenizer, fmt):
  prompt = [SYSTEM, {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an earlier answer"},  # context, not a target
            {"role": "user", "content": "and now?"}]
  pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "the chosen words"}],
          "rejected": [{"role": "assistant", "content": "rejected"}]}
  encoded = preferences.encode_pair(fmt, pair, 96)
  for side in preferences.SIDES:
    inputs, targets, weights = (encoded[f"{side}_{k}"] for k in ("inputs", "targets", "weights"))
    assert (inputs.dtype, targets.dtype, weights.dtype) == (np.int32, np.int32, np.float32)
    assert inputs.shape == targets.shape == weights.shape == (96,)
    ids, _ = fmt.encode(prompt + pair[side])
    assert inputs[:len(ids)].tolist() == ids.tolist() and not inputs[len(ids):].any()
    assert targets[:len(ids) - 1].tolist() == ids[1:].tolist() and not targets[len(ids):].any()
    # One run of weights: the response's words and <|im_end|>, nothing of the prompt.
    scored = np.flatnonzero(weights)
    assert np.all(np.diff(scored) == 1)
    assert tokenizer.decode(targets[scored]) == pair[side][0]["content"] + "<|im_end|>"
    assert scored[0] + 1 == len(fmt.prompt(prompt))


def test_a_reward_is_read_at_the_last_response_token(fmt):
  pair = _pair(7)
  length = max(len(fmt.encode(pair["prompt"] + pair[side])[0]) for side in preferences.SIDES)
  encoded = preferences.encode_pair(fmt, pair, length)  # the longer side fits exactly
  for side in preferences.SIDES:
    index = int(last_response_position(encoded[f"{side}_weights"][None])[0])
    inputs = encoded[f"{side}_inputs"]
    assert index < length and inputs[index] == fmt.stop_id and not inputs[index + 1:].any()
    weights = encoded[f"{side}_weights"]
    assert weights[index - 1] == 1 and not weights[index:].any()
  assert preferences.encode_pair(fmt, pair, length - 1) is None
  assert last_response_position(np.zeros((2, 8), np.float32)).tolist() == [0, 0]


def test_too_long_pairs_are_none_and_counted(fmt):
  pairs = [_pair(i) for i in range(8)]
  pairs[2]["chosen"][0]["content"] = " ".join(WORDS * 8)
  pairs[5]["rejected"][0]["content"] = " ".join(WORDS * 8)
  counts, used = preferences.pair_statistics(pairs, fmt, 48)
  assert used.dtype == np.int64 and used.tolist() == [0, 1, 3, 4, 6, 7]
  assert preferences.encode_pair(fmt, pairs[2], 48) is None
  assert counts == {"used": 6, "too_long": 2}


# Training batches.

def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_every_pair_comes_once_an_epoch_with_its_own_arrays(fmt):
  pairs = Subset([_pair(i) for i in range(13)], np.arange(3, 13))  # 10 pairs
  batches = _take(iter(preferences.pair_batches(pairs, fmt, 48, 5, seed=3)), 4)
  order = np.concatenate([b["pair_index"] for b in batches])
  assert sorted(order[:10]) == sorted(order[10:]) == list(range(10))
  assert order[:10].tolist() != order[10:].tolist()  # shuffled anew
  for batch in batches:
    assert batch["pair_index"].dtype == np.int32 and batch["valid"].tolist() == [1.0] * 5
    for row, index in enumerate(batch["pair_index"]):
      for key, value in preferences.encode_pair(fmt, pairs[int(index)], 48).items():
        np.testing.assert_array_equal(batch[key][row], value)


def test_processes_share_out_the_global_batch(fmt):
  pairs = [_pair(i) for i in range(10)]
  whole = _take(iter(preferences.pair_batches(pairs, fmt, 48, 4, seed=1)), 4)
  parts = [_take(iter(preferences.pair_batches(pairs, fmt, 48, 4, seed=1, process_index=p,
                                               process_count=2)), 4) for p in range(2)]
  for b, batch in enumerate(whole):
    for key, value in batch.items():
      np.testing.assert_array_equal(np.concatenate([parts[0][b][key], parts[1][b][key]]), value)
  with pytest.raises(UserError, match="multiple of the process count"):
    preferences.pair_batches(pairs, fmt, 48, 4, seed=1, process_count=3)


def test_resume_from_a_saved_state_continues_at_the_next_batch(fmt):
  pairs = [_pair(i) for i in range(7)]
  dataset = preferences.pair_batches(pairs, fmt, 48, 3, seed=5)
  iterator = iter(dataset)
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 3)
  resumed = iter(dataset)
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 3)):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_extra_values_arrive_with_their_pair(fmt):
  pairs = [_pair(i) for i in range(6)]
  extra = lambda i: {"reference_chosen": np.float32(i * 1.5), "reference_rejected": np.float32(-i)}
  for batch in _take(iter(preferences.pair_batches(pairs, fmt, 48, 4, seed=0, extra=extra)), 3):
    assert batch["reference_chosen"].tolist() == (batch["pair_index"] * 1.5).tolist()
    assert batch["reference_rejected"].tolist() == (-batch["pair_index"]).tolist()


# Evaluation batches.

def test_evaluation_batches_are_padded_and_the_same_for_any_process_count(fmt):
  pairs = [_pair(i) for i in range(12)]
  pairs[1]["chosen"][0]["content"] = " ".join(WORDS * 8)  # too long: left out
  extra = lambda i: {"reference_chosen": np.float32(i + 1)}
  whole = preferences.evaluation_pair_batches(pairs, fmt, 48, 4, 10, extra=extra)
  assert len(whole) == 3  # 9 pairs in 3 batches of 4
  valid = np.concatenate([b["valid"] for b in whole])
  index = np.concatenate([b["pair_index"] for b in whole])
  assert valid.tolist() == [1] * 9 + [0] * 3
  assert index.tolist() == [0, *range(2, 10), -1, -1, -1]
  last = whole[-1]
  assert not last["chosen_weights"][1:].any() and not last["rejected_weights"][1:].any()
  assert not last["reference_chosen"][1:].any()
  assert set(whole[0]) == set(next(iter(preferences.pair_batches(pairs[2:], fmt, 48, 4, seed=0,
                                                                 extra=extra))))
  parts = [preferences.evaluation_pair_batches(pairs, fmt, 48, 4, 10, p, 2, extra=extra)
           for p in range(2)]
  for b, batch in enumerate(whole):
    for key, value in batch.items():
      np.testing.assert_array_equal(np.concatenate([parts[0][b][key], parts[1][b][key]]), value)
