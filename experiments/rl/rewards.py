"""Reward functions for GRPO on the number problems of experiments/rl (`module:function`).

A reward function is called as `function(prompt, completion, **fields)` with the fields of the
prompt's jsonl line other than "prompt" (here "answer") and returns a float.
"""

import re

_INTEGER = re.compile(r"-?\d+")


def first_integer(completion: str) -> int | None:
  """The first integer written in `completion` (a leading minus sign included), or None."""
  found = _INTEGER.search(completion)
  return int(found.group()) if found else None


def exact_answer(prompt: str, completion: str, *, answer: str, **fields) -> float:
  """1.0 if the first integer in the completion equals `answer`, else 0.0.

  The first integer, not the whole completion stripped: "85", " 85" and "85." all count, so a
  model is scored on its arithmetic rather than its formatting, yet it cannot earn the reward by
  listing several numbers (only the first counts) and "850" or "8 5" do not match 85. Compared
  as integers, so "085" equals "85". The prompt is not needed; it is taken as every reward
  function is called with it.
  """
  del prompt, fields  # the answer alone decides
  return float(first_integer(completion) == int(answer))
