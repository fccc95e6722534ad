"""The trainer's seams: an objective and a batch source written here train through the shared
step and loop; the loop stays ahead of the devices; processes agree only every few steps."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.data.batches import BatchSource
from llm_jax.errors import UserError
from llm_jax.objectives import Objective
from llm_jax.train import loop

from conftest import tiny_config

# A per-row label in place of next-token targets: a batch layout the text pipeline never
# makes, so nothing in the step or loop can be assuming next-token batches.
LABELS = (5, 9)


def _classify(model, params, batch):
  """Cross-entropy of the row's label (one of the LABELS ids) at the last position."""
  logits_BV = model.apply({"params": params}, batch["tokens"])[:, -1].astype(jnp.float32)
  label_B = jnp.asarray(LABELS, jnp.int32)[batch["label"]]
  log_probs_BV = jax.nn.log_softmax(logits_BV)
  losses_B = -jnp.take_along_axis(log_probs_BV, label_B[:, None], axis=1)[:, 0]
  correct_B = jnp.argmax(logits_BV, axis=-1) == label_B
  return jnp.sum(losses_B), {"accuracy": jnp.sum(correct_B.astype(jnp.float32))}


CLASSIFY = Objective(
    name="classify", loss=_classify, weight=lambda batch: jnp.float32(batch["label"].shape[0]),
    weight_name="rows",
    batch={"tokens": ("int32", ("batch", "length")), "label": ("int32", ("batch",))})


class _Rows:
  """Batches of random tokens labelled by the parity of their first token; its position is
  the number of batches read, and every batch it yields is recorded."""

  def __init__(self, rows: int, length: int):
    self.rows, self.length, self.position, self.read = rows, length, 0, []

  def __next__(self):
    rng = np.random.default_rng(self.position)
    tokens = rng.integers(0, 512, (self.rows, self.length)).astype(np.int32)
    self.read.append(self.position)
    self.position += 1
    return {"tokens": tokens, "label": (tokens[:, 0] % 2).astype(np.int32)}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _source(tokenizer, created):
  def make(config, workdir, inherited_tokenizer):
    assert inherited_tokenizer is None
    workdir.mkdir(parents=True, exist_ok=True)
    rows = _Rows(config.train.batch_size, config.model.context_length)
    created.append(rows)
    evaluation = [next(_Rows(config.train.batch_size, config.model.context_length))]
    return BatchSource(rows, evaluation, tokenizer)
  return make


def _config(*extra):
  return tiny_config("train.sample_tokens=0", "train.learning_rate=1e-2", *extra)


def test_an_objective_written_here_trains_and_resumes_through_the_shared_loop(
    tmp_path, tokenizer):
  created = []
  summary = loop.train(_config(), tmp_path, CLASSIFY, _source(tokenizer, created))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"loss", "accuracy", "rows", "grad_norm"} <= rows[0].keys()
  assert rows[0]["rows"] == 8
  # Guessing between the two labels is ln 2 = 0.69; the start is near ln 512 = 6.2.
  assert rows[0]["loss"] > 2 and rows[-1]["loss"] < 1.0 and summary["val_loss"] < 1.0
  assert created[0].read == list(range(30))

  longer = _config("train.steps=40")
  loop.train(longer, tmp_path, CLASSIFY, _source(tokenizer, created))
  assert created[1].read == list(range(30, 40))  # the batch source's position was restored


def _slow(model, params, batch):
  """The classifier's loss plus a long chain of matmuls that changes nothing but its cost."""
  x = jnp.full((256, 256), 1e-3, jnp.float32)
  for _ in range(12):
    x = jnp.tanh(x @ x)
  loss, metrics = _classify(model, params, batch)
  return loss + 0.0 * jnp.sum(x), metrics


def test_the_loop_dispatches_each_step_before_reading_the_one_before(tmp_path, tokenizer,
                                                                      monkeypatch):
  slow = dataclasses.replace(CLASSIFY, name="slow", loss=_slow)
  ready_at_dispatch = []  # was the previous step's output ready when the next was dispatched?
  real_build = loop.builder.build

  def recording_build(*args, **kwargs):
    built = real_build(*args, **kwargs)
    outputs = []

    def train_step(state, batch, reference):
      if outputs:
        ready_at_dispatch.append(outputs[-1].is_ready())
      state, metrics = built.train_step(state, batch, reference)
      outputs.append(metrics["loss"])
      return state, metrics
    return dataclasses.replace(built, train_step=train_step)

  monkeypatch.setattr(loop.builder, "build", recording_build)
  loop.train(_config("train.steps=12", "train.eval_every=0", "train.checkpoint_every=0"),
             tmp_path, slow, _source(tokenizer, []))
  assert len(ready_at_dispatch) == 11
  # Each step takes tens of milliseconds on the devices and far less on the host: a loop that
  # waited for step N before dispatching N+1 would find it ready every time.
  assert sum(not ready for ready in ready_at_dispatch) >= 9, ready_at_dispatch


def test_processes_agree_on_stop_and_save_only_every_n_steps(monkeypatch):
  exchanged = []

  def broadcast(flags):
    exchanged.append(flags.tolist())
    return flags
  monkeypatch.setattr(loop.multihost_utils, "broadcast_one_to_all", broadcast)
  agreed = [loop.agreed(step, 5, True, step > 7, process_count=2) for step in range(1, 11)]
  assert exchanged == [[True, False], [True, True]]  # two collectives in ten steps
  assert agreed == [(False, False)] * 4 + [(True, False)] + [(False, False)] * 4 + [(True, True)]
  # A single process acts on its own requests at once, with no collective.
  assert loop.agreed(3, 5, True, False, process_count=1) == (True, False)
  assert len(exchanged) == 2


def test_a_workdir_that_is_a_file_is_refused_and_left_alone(tmp_path):
  path = tmp_path / "w"
  path.write_text("not a run")
  with pytest.raises(UserError, match="is a file, not a directory"):
    loop.train(_config(), path)
  assert path.read_text() == "not a run"
