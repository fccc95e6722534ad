"""Prompts for RL: reading `prompts:` sources (both forms, the other fields kept, bad lines
counted, the split), their refusal for next-token training, which prompts fit, and the
batches of prompt indices (per epoch, by seed, resumable)."""

import json
import types

import numpy as np
import pytest

from llm_jax.data import batches, chat_template, prompts, sources
from llm_jax.data.documents import Source, Subset
from llm_jax.errors import UserError


SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "What is 17+25?"}
ANSWER = {"role": "assistant", "content": "42"}
WORDS = ("self", "in", "def", "if", "return", "x", "None", "for")


@pytest.fixture(scope="module")
def fmt(tokenizer):
  return chat_template.chat_format(tokenizer)


def _problem(i: int) -> dict:
  """A distinct line of a prompts file: a prompt of 1 to 8 words and its answer."""
  return {"prompt": f"q{i} " + " ".join(WORDS[:i % 8 + 1]), "answer": str(i)}


def _jsonl(path, records):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def _all(documents) -> list:
  return [documents[i] for i in range(len(documents))]


# Reading.

def test_a_string_prompt_is_one_user_turn_and_the_other_fields_are_kept():
  record = prompts.from_record({"prompt": "What is 17+25?", "answer": "42", "id": 7,
                                "tests": ["assert f() == 42"]})
  assert record == {"prompt": [USER], "fields": {"answer": "42", "id": 7,
                                                 "tests": ["assert f() == 42"]},
                    "given": "What is 17+25?"}


def test_a_message_prompt_keeps_its_turns_and_is_given_back_as_written():
  given = [SYSTEM, {"role": "user", "content": "hi", "name": "ann"}, ANSWER,
           {"content": "What is 17+25?", "role": "user"}]
  record = prompts.from_record({"answer": "42", "prompt": given})
  assert record["prompt"] == [SYSTEM, {"role": "user", "content": "hi"}, ANSWER, USER]
  assert record["given"] == given and record["given"][1]["name"] == "ann"
  assert record["fields"] == {"answer": "42"}


def test_bad_lines_are_skipped_and_counted_by_reason(tmp_path):
  good = [_problem(i) for i in range(6)] + [{**_problem(0), "answer": "another"}]
  _jsonl(tmp_path / "a.jsonl", [
      good[0], "{not json", good[1],
      ["What is 17+25?"],  # missing prompt: not an object
      {"question": "What is 17+25?", "answer": "42"},  # missing prompt
      {"prompt": 17},  # malformed prompt
      {"prompt": USER},  # malformed prompt: one message, not a list
      {"prompt": [USER, ANSWER]},  # malformed prompt: nothing left to answer
      {"prompt": [ANSWER, USER]},  # malformed prompt: does not start with the user
      {"prompt": [{"role": "user", "content": " "}]},  # malformed prompt: an empty message
      {"prompt": [{"role": "human", "content": "hi"}]},  # malformed prompt: unknown role
      {"prompt": []},  # malformed prompt: no messages
      {"prompt": ""},  # empty prompt
      {"prompt": " \n\t", "answer": "42"},  # empty prompt
  ])
  _jsonl(tmp_path / "b.jsonl", good[2:] + [good[3]])  # good[3] twice: a duplicate
  (tmp_path / "notes.txt").write_text("not a prompts file")
  source = prompts.open_prompts(f"prompts:{tmp_path}/*", 0.5)
  assert source.kind == "prompts" and len(source.train) and len(source.validation)
  read = _all(source.train) + _all(source.validation)
  # The same prompt with another answer is another problem, so it is kept.
  assert sorted(map(json.dumps, read)) == sorted(json.dumps(prompts.from_record(r))
                                                 for r in good)
  assert {reason: n for reason, n in source.skipped.items() if n} == {
      "not JSON": 1, "missing prompt": 2, "malformed prompt": 7, "empty prompt": 2,
      "duplicate": 1, "not JSON Lines": 1}


def test_a_glob_with_no_usable_prompt_is_one_clear_error(tmp_path):
  _jsonl(tmp_path / "bad.jsonl", [{"question": "p"}, {"prompt": ""}])
  with pytest.raises(UserError, match=r"No usable prompt .*1 missing prompt, 1 empty prompt.*"
                                      r"\"prompt\""):
    prompts.open_prompts(f"prompts:{tmp_path}/*.jsonl", 0.1)


def test_the_split_is_by_line_whatever_the_file_order_and_both_sides_exist(tmp_path):
  problems = [_problem(i) for i in range(200)]
  _jsonl(tmp_path / "a.jsonl", problems[:120])
  _jsonl(tmp_path / "b.jsonl", problems[120:])
  source = prompts.open_prompts(f"prompts:{tmp_path}/*.jsonl", 0.25)
  train, validation = _all(source.train), _all(source.validation)
  assert 25 <= len(validation) <= 75 and len(train) + len(validation) == 200
  assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in validation}
  again = prompts.open_prompts(f"prompts:{tmp_path}/[ba].jsonl", 0.25)
  assert _all(again.train) == train and _all(again.validation) == validation
  # Two prompts hash to one side or the other; one is moved so both splits exist.
  _jsonl(tmp_path / "tiny.jsonl", problems[:2])
  tiny = prompts.open_prompts(f"prompts:{tmp_path}/tiny.jsonl", 0.0)
  assert len(tiny.train) == len(tiny.validation) == 1


def test_prompts_open_through_the_source_names_and_train_a_tokenizer(tmp_path):
  _jsonl(tmp_path / "p.jsonl", [_problem(i) for i in range(10)])
  source = sources.open_source(f"prompts:{tmp_path}/*.jsonl",
                               types.SimpleNamespace(val_fraction=0.2))
  assert source.kind == "prompts" and len(source.train) + len(source.validation) == 10
  sample = list(sources.text_sample([(source, 1.0)], 10**6, seed=0))
  assert sorted(sample) == sorted(record["prompt"][0]["content"] for record in _all(source.train))
  with pytest.raises(UserError, match="'prompts:<glob>'"):
    sources.open_source("prompt:x.jsonl", types.SimpleNamespace(val_fraction=0.2))


def test_next_token_training_refuses_prompts_and_names_grpo():
  records = [prompts.from_record(_problem(i)) for i in range(3)]
  source = Source("prompts:x/*.jsonl", records, records, "prompts files", {}, "prompts")
  text = Source("builtin", ["a text"], ["b text"], "text")
  config = types.SimpleNamespace(model=types.SimpleNamespace(context_length=64),
                                 data=types.SimpleNamespace(chat_truncate=False))
  for mixture in ([(source, 1.0)], [(text, 0.5), (source, 0.5)]):
    with pytest.raises(UserError, match=r"Prompts are for RL.*posttrain.py:grpo"):
      batches.training_mixture(config, mixture, tokenizer=None)


# Which prompts fit.

def test_a_prompt_is_encoded_as_the_ids_a_model_continues(tokenizer, fmt):
  record = prompts.from_record({"prompt": [SYSTEM, USER, ANSWER, {"role": "user",
                                                                  "content": "And 17+26?"}]})
  ids = prompts.encode_prompt(fmt, record)
  assert ids == fmt.prompt(record["prompt"])
  assert ids[-len(fmt.prompt_tail(record["prompt"])):] == fmt.prompt_tail(record["prompt"])
  text = tokenizer.decode(ids)
  assert text.index("Answer briefly.") < text.index("42") < text.index("And 17+26?")
  assert text.endswith("<|im_start|>assistant<|im_sep|>")


def test_too_long_prompts_are_counted_exactly(fmt):
  records = [prompts.from_record(_problem(i)) for i in range(12)]
  lengths = [len(prompts.encode_prompt(fmt, r)) for r in records]
  limit = sorted(lengths)[6]  # a prompt of exactly `limit` ids fits
  counts, used = prompts.prompt_statistics(records, fmt, limit)
  expected = [i for i, n in enumerate(lengths) if n <= limit]
  assert used.dtype == np.int64 and used.tolist() == expected
  assert counts == {"used": len(expected), "too_long": 12 - len(expected)}
  assert 6 < len(expected) < 12
  assert prompts.prompt_statistics(records, fmt, min(lengths) - 1)[0] == {"used": 0,
                                                                          "too_long": 12}
  assert prompts.prompt_statistics(records[:0], fmt, limit)[1].shape == (0,)


# Batches of prompts.

def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _order(batch_list) -> list[int]:
  return np.concatenate([b["prompt_index"] for b in batch_list]).tolist()


def test_every_prompt_comes_once_an_epoch_shuffled_anew(fmt):
  used = Subset([prompts.from_record(_problem(i)) for i in range(13)], np.arange(3, 13))
  got = _take(iter(prompts.prompt_batches(used, 4, seed=3)), 5)  # 20 indices: two epochs
  assert all(set(b) == {"prompt_index"} and b["prompt_index"].dtype == np.int32
             and b["prompt_index"].shape == (4,) for b in got)
  order = _order(got)
  assert sorted(order[:10]) == sorted(order[10:]) == list(range(10))
  assert order[:10] != order[10:]  # shuffled anew
  assert order[:10] != list(range(10))  # shuffled at all


def test_the_order_is_set_by_the_seed_alone():
  records = [prompts.from_record(_problem(i)) for i in range(16)]
  by_seed = {seed: [_order(_take(iter(prompts.prompt_batches(records, 8, seed=seed)), 4))
                    for _ in range(2)] for seed in (0, 1)}
  assert by_seed[0][0] == by_seed[0][1] and by_seed[1][0] == by_seed[1][1]  # every process
  assert by_seed[0][0] != by_seed[1][0]


def test_resume_from_a_saved_state_continues_at_the_next_batch():
  records = [prompts.from_record(_problem(i)) for i in range(7)]
  dataset = prompts.prompt_batches(records, 3, seed=5)
  iterator = iter(dataset)
  _take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
  expected = _order(_take(iterator, 4))
  assert _order(_take(iter(dataset), 4)) != expected  # the state is what moves it
  resumed = iter(dataset)
  resumed.set_state(state)
  assert _order(_take(resumed, 4)) == expected


def test_no_prompts_to_batch_is_one_clear_error():
  with pytest.raises(UserError, match="no prompts to train on"):
    prompts.prompt_batches(Subset([prompts.from_record(_problem(0))], np.zeros(0, np.int64)), 4,
                           seed=0)


def test_one_prompt_a_step_is_batched_like_several():
  """A step of one prompt (batch_size == group_size) reads every prompt once an epoch, as a
  step of several does: the endless repeat used to overflow Grain's length for batches of 1."""
  records = [prompts.from_record(_problem(i)) for i in range(6)]
  one = _order(_take(iter(prompts.prompt_batches(records, 1, seed=2)), 12))
  two = _order(_take(iter(prompts.prompt_batches(records, 2, seed=2)), 6))
  assert one == two
  assert sorted(one[:6]) == sorted(one[6:]) == list(range(6))
