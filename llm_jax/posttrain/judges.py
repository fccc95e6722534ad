"""What judges a completion in RL: `rl.reward`, Python functions and reward models, weighed.

`rl.reward` is one judge or several, `;`-separated, each optionally `=WEIGHT` (default 1):

    mytask.rewards:exact_answer                      a function of an importable module
    experiments/rl/rewards.py:exact_answer           a function of a Python file
    runs/rm                                          a reward model (`configs/posttrain.py:reward`)
    mytask.rewards:exact_answer=1; runs/rm=0.5       the weighted sum of both

A function is called as `function(prompt, completion, **fields)` with the prompt as its data
line gives it (a string or a list of messages), the completion's text (without its end of
turn) and the line's other fields; it returns a number. Modules are imported with the current
directory on the path, as `python -m` does. Every process of a multi-process run calls the
functions on every completion, so they must not depend on the process.

A reward model scores the prompt and completion through its own tokenizer and chat template,
at the completion's last token, as it was trained (`llm_jax.objectives.reward_model`).

A function that raises or returns something that is not a finite number stops the run with a
message naming the prompt and the function (`rl.reward_errors=stop`), or is scored 0 and
counted (`zero`); so is a completion too long for a reward model's context.
"""

import dataclasses
import importlib
import math
import os
import pathlib
import sys
from collections.abc import Callable

import numpy as np

from llm_jax.inference import evaluate
from llm_jax.parallel import checkpoint, sharding
from llm_jax.data import chat_template
from llm_jax.data.tokenizer import tokenizer_from_bytes
from llm_jax.parallel.distributed import log
from llm_jax import paths
from llm_jax.errors import UserError

_FORMS = ("give 'module:function', 'path/to/file.py:function' or a reward-model run directory, "
          "several as 'A=2; B=1'")


class _Failed(Exception):
  """A completion its judge could not score; the message says why."""


@dataclasses.dataclass
class Judge:
  """Scores completions: `scorers` (name, weight, score(records, completions) -> [R] with NaN
  where a completion could not be scored, and why in `problems`)."""
  scorers: list[tuple[str, float, Callable]]
  on_error: str  # 'stop' or 'zero'

  def __call__(self, records: list[dict], completions: list[str]
               ) -> tuple[np.ndarray, dict[str, float]]:
    """(the weighted reward [R] of completion i answering records[i], metrics: each scorer's
    mean when there are several, and `reward_errors` under rl.reward_errors=zero)."""
    total, metrics, errors = np.zeros(len(completions)), {}, 0
    for name, weight, score in self.scorers:
      values = score(records, completions)
      failed = ~np.isfinite(values)
      if failed.any() and self.on_error == "stop":  # a reward model's score overflowed
        _fail("stop", name, records[int(np.argmax(failed))], "scored a completion "
              f"{values[failed][0]}, not a finite number")
      errors += int(failed.sum())
      values = np.where(failed, 0.0, values)
      total += weight * values
      if len(self.scorers) > 1:
        metrics[f"reward_{name}"] = float(values.mean())
    if self.on_error == "zero":
      metrics["reward_errors"] = errors
    return total, metrics


def _fail(on_error: str, judge: str, record: dict, why: str) -> float:
  if on_error == "zero":
    return math.nan
  prompt = record["given"] if isinstance(record["given"], str) else record["prompt"][-1]["content"]
  raise UserError(f"The reward {judge} {why} for the prompt {prompt[:200]!r}; fix it, or set "
                  "--config.rl.reward_errors=zero to score such completions 0 and count them.")


def _import_function(spec: str, entry: str) -> Callable:
  location, _, name = spec.rpartition(":")
  try:
    if location.endswith(".py"):
      path = pathlib.Path(location).expanduser()
      if not path.is_file():
        raise UserError(f"rl.reward={entry!r}: {path} is not a file; {_FORMS}.")
      module = paths.import_file(path, path.stem)
    else:
      if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
      module = importlib.import_module(location)
  except UserError:
    raise
  except Exception as error:  # noqa: BLE001 - any failure of the user's module is theirs
    raise UserError(f"rl.reward={entry!r}: importing {location} failed with "
                    f"{type(error).__name__}: {error}; fix the module or the name.") from None
  function = getattr(module, name, None)
  if not callable(function):
    raise UserError(f"rl.reward={entry!r}: {location} has no function {name!r}; {_FORMS}.")
  return function


def _function_scorer(function: Callable, name: str, on_error: str) -> Callable:
  def score(records, completions):
    values = np.zeros(len(completions))
    for i, (record, completion) in enumerate(zip(records, completions)):
      try:
        value = function(record["given"], completion, **record["fields"])
      except Exception as error:  # noqa: BLE001 - reported as the user's function failing
        values[i] = _fail(on_error, name, record, f"raised {type(error).__name__}: {error}")
        continue
      try:
        values[i] = float(value)
      except (TypeError, ValueError):
        values[i] = math.nan
      if not math.isfinite(values[i]):
        values[i] = _fail(on_error, name, record, f"returned {value!r}, not a finite number")
    return values
  return score


def _model_scorer(run: pathlib.Path, entry: str, on_error: str, mesh_config) -> Callable:
  init = checkpoint.open_init_source(run, log, option="rl.reward")
  if not init.config.model.get("reward_head", False):
    raise UserError(f"rl.reward={entry!r}: {run} is a language model, not a reward model; "
                    "train one with --config configs/posttrain.py:reward.")
  mesh = sharding.make_mesh(mesh_config)
  init, model, params = checkpoint.load(init.location, mesh, log, option="rl.reward")
  chat_format = chat_template.chat_format(tokenizer_from_bytes(init.tokenizer))
  log(f"Reward model {init.location}")

  def score(records, completions):
    scores, fits = evaluate.score_responses(
        params, model, chat_format,
        [r["prompt"] + [{"role": "assistant", "content": c}] for r, c in zip(records, completions)],
        mesh=mesh)
    for i in np.flatnonzero(~fits):  # raises, or leaves NaN to be scored 0 and counted
      _fail(on_error, str(run), records[i], "cannot read the completion in its context of "
            f"{model.config.context_length} tokens")
    return scores
  return score


def _entries(spec: str) -> list[tuple[str, float, str]]:
  """(judge, weight, entry as written) of each `;`-separated entry of `rl.reward`."""
  entries = []
  for entry in filter(None, (e.strip() for e in spec.split(";"))):
    what, weight = entry, 1.0
    head, sep, tail = entry.rpartition("=")
    if sep:
      try:
        what, weight = head, float(tail)
      except ValueError:
        pass  # an '=' that is part of a path or name
    if not math.isfinite(weight):
      raise UserError(f"rl.reward entry {entry!r} has a weight that is not a number; {_FORMS}.")
    entries.append((what.strip(), weight, entry))
  if not entries:
    raise UserError(f"rl.reward is empty; {_FORMS}.")
  return entries


def judge(rl_config, mesh_config) -> Judge:
  """The judge `rl.reward` names, every function imported and reward model loaded, or one
  sentence saying which entry cannot be."""
  scorers = []
  for spec, weight, entry in _entries(rl_config.reward):
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
      checkpoint_dir = path.parent.name == "checkpoints" and path.name.isdigit()
      if not ((path / "checkpoints").is_dir() or checkpoint_dir):
        raise UserError(f"rl.reward={entry!r}: {path} is a directory but not a run (it has no "
                        "checkpoints/); point it at a reward model's --workdir.")
      name = path.parent.parent.name if checkpoint_dir else path.name
      score = _model_scorer(path, entry, rl_config.reward_errors, mesh_config)
    elif ":" in spec and spec.rpartition(":")[2].isidentifier():
      name = spec.rpartition(":")[2]
      score = _function_scorer(_import_function(spec, entry), name, rl_config.reward_errors)
    else:
      raise UserError(f"rl.reward={entry!r} is neither a function nor a run directory; "
                      f"{_FORMS}.")
    if any(name == other for other, _, _ in scorers):  # each its own metric
      name = f"{name}_{len(scorers)}"
    scorers.append((name, weight, score))
  return Judge(scorers, rl_config.reward_errors)
