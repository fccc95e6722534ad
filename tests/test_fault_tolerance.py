"""Fault tolerance: exact resume after SIGKILL, SIGTERM saves and exits 0, damaged
checkpoints are set aside, checkpoints restore onto other meshes and process counts,
non-finite steps are skipped or stop the run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llm_jax.parallel import checkpoint, sharding
from llm_jax.data import pipeline, sources
from llm_jax.data.tokenizer import load_tokenizer
from llm_jax.errors import UserError
from llm_jax.train import loop

from conftest import TINY_OVERRIDES, build, tiny_config

RUN_STEPS = 120


def _command(workdir, corpus):
  overrides = [*TINY_OVERRIDES, f"data.source=files:{corpus}/*.py", f"train.steps={RUN_STEPS}",
               "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=10",
               "train.keep_checkpoints=2", "train.keep_steps=[20]", "train.sample_tokens=0"]
  return [sys.executable, "-m", "llm_jax.cli", "train", "--workdir", str(workdir),
          *[f"--config.{o}" for o in overrides]]


def _start(workdir, corpus):
  return subprocess.Popen(_command(workdir, corpus), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _wait_for_checkpoint(process, workdir, step):
  path = workdir / "checkpoints" / str(step)
  deadline = time.monotonic() + 300
  while not path.exists():
    assert process.poll() is None, process.communicate()[1]
    assert time.monotonic() < deadline
    time.sleep(0.02)


def _losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(text_corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = subprocess.run(_command(workdir, text_corpus), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  return workdir


def test_uninterrupted_run_keeps_the_newest_and_the_listed_checkpoints(uninterrupted):
  steps = sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [20, RUN_STEPS - 10, RUN_STEPS]
  assert [s for s, _, _ in _losses(uninterrupted)] == list(range(1, RUN_STEPS + 1))


def test_sigkill_then_rerun_logs_the_same_losses_bit_for_bit(uninterrupted, text_corpus,
                                                            tmp_path):
  process = _start(tmp_path, text_corpus)
  _wait_for_checkpoint(process, tmp_path, 10)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert process.returncode == -signal.SIGKILL
  killed_at = len(_losses(tmp_path))
  assert killed_at < RUN_STEPS  # it really was interrupted
  rerun = subprocess.run(_command(tmp_path, text_corpus), capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr
  assert "Resumed from the checkpoint at step" in rerun.stderr
  assert _losses(tmp_path) == _losses(uninterrupted)  # every step once, exactly equal


def test_sigterm_saves_exits_0_and_resumes_exactly(uninterrupted, text_corpus, tmp_path):
  process = _start(tmp_path, text_corpus)
  _wait_for_checkpoint(process, tmp_path, 10)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 0, err
  assert "Stopped by SIGTERM" in err and "Run the same command again to resume" in err
  last_logged = _losses(tmp_path)[-1][0]
  assert last_logged < RUN_STEPS and (tmp_path / "checkpoints" / str(last_logged)).exists()
  rerun = subprocess.run(_command(tmp_path, text_corpus), capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr
  assert _losses(tmp_path) == _losses(uninterrupted)


# --- damaged checkpoints -------------------------------------------------------------------

def _truncate_an_array_file(step_dir):
  files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
  files[-1].write_bytes(files[-1].read_bytes()[:16])


def _remove_the_state(step_dir):
  shutil.rmtree(step_dir / "state")


def _garble_the_metadata(step_dir):
  for path in (step_dir / "meta").iterdir():
    path.write_text("{not json")


def _remove_the_data_position(step_dir):
  for path in (step_dir / "data").glob("process_*.json"):
    path.unlink()


@pytest.fixture(scope="module")
def short_run(text_corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("short")
  config = tiny_config(f"data.source=files:{text_corpus}/*.py", "train.steps=20",
                       "train.checkpoint_every=5", "train.keep_checkpoints=3")
  loop.train(config, workdir)
  return config, workdir


# Orbax leaves the reads of a failed restore as never-awaited coroutines; that is its noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_truncate_an_array_file, _remove_the_state,
                                    _garble_the_metadata, _remove_the_data_position])
def test_damaged_newest_checkpoint_is_set_aside_for_the_previous(short_run, tmp_path, damage):
  config, original = short_run
  workdir = tmp_path / "run"
  shutil.copytree(original, workdir)
  damage(workdir / "checkpoints" / "20")
  built = build(config)
  run_tokenizer = load_tokenizer(workdir / "tokenizer.model")
  iterator = iter(pipeline.training_dataset(
      [(source.train, w) for source, w in sources.open_sources(config.data)], run_tokenizer,
      config.model.context_length, config.train.batch_size, seed=config.train.seed))
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", 3)
  state, step = loop.resume_state(checkpointer, config, built.abstract_state(), iterator)
  checkpointer.close()
  assert step == 15 and int(state.step) == 15
  # The damaged checkpoint was moved, not deleted; the valid ones are all still there.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      "10", "15"]
  (moved,) = (workdir / "damaged_checkpoints").iterdir()
  assert moved.name.startswith("20-") and any(moved.iterdir())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_training_resumes_past_a_damaged_checkpoint(short_run, text_corpus, tmp_path):
  config, original = short_run
  workdir = tmp_path / "run"
  shutil.copytree(original, workdir)
  _truncate_an_array_file(workdir / "checkpoints" / "20")
  longer = tiny_config(f"data.source=files:{text_corpus}/*.py", "train.steps=25",
                       "train.checkpoint_every=5", "train.keep_checkpoints=3")
  loop.train(longer, workdir)
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text()
           .splitlines()]
  assert steps == [5, 10, 15, 20, 25]  # rows after step 15 were replaced, not duplicated
  assert (workdir / "checkpoints" / "25").exists()


# --- elastic restore --------------------------------------------------------------------------

@pytest.mark.parametrize("target_mesh, devices", [
    ({"data": 1, "fsdp": 4, "tensor": 1}, 4),
    ({"data": 2, "fsdp": 1, "tensor": 2}, 4),
])
def test_checkpoint_from_8_devices_restores_onto_another_mesh(tmp_path, tokenizer,
                                                              target_mesh, devices):
  config = tiny_config("mesh.fsdp=8")
  state = build(config).init_state()
  iterator = iter(pipeline.training_dataset([([f"doc {i}" for i in range(8)], 1.0)], tokenizer,
                                            32, 8, seed=0))
  writer = checkpoint.Checkpointer(tmp_path, 2)
  writer.save(1, state, iterator, "{}", b"tokenizer")
  writer.wait()
  writer.close()

  for key, value in target_mesh.items():
    config.mesh[key] = value
  target = build(config, jax.devices()[:devices])
  reader = checkpoint.Checkpointer(tmp_path, 2)
  restored = reader.restore(1, target.abstract_state(), iterator)
  assert reader.metadata(1)["tokenizer"] == b"tokenizer"
  reader.close()
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(b.sharding.device_set) == devices


def test_data_position_restores_under_another_process_count(tokenizer, tmp_path):
  docs = [f"document {i} " * (i % 9 + 1) for i in range(48)]

  def dataset(process_index=0, process_count=1):
    return pipeline.training_dataset([(docs, 1.0)], tokenizer, 16, 8, seed=1,
                                     process_index=process_index, process_count=process_count)

  hosts = [iter(dataset(p, 2)) for p in range(2)]
  for host in hosts:
    for _ in range(5):
      next(host)
  # What the two processes of a run write into the checkpoint's data item.
  for p, host in enumerate(hosts):
    (tmp_path / f"process_{p}-of-2.json").write_text(json.dumps(host.get_state()))
  expected = [np.concatenate([next(h)["inputs"] for h in hosts]) for _ in range(3)]
  single = iter(dataset())
  checkpoint._DataHandler().restore(tmp_path, args=checkpoint._DataRestore(single))
  for inputs in expected:
    np.testing.assert_array_equal(next(single)["inputs"], inputs)


# --- non-finite steps ---------------------------------------------------------------------------

def test_a_nan_batch_leaves_the_state_unchanged(tokenizer):
  config = tiny_config()
  built = build(config)
  state = built.init_state()
  before = jax.device_get(state.params)
  batch = next(iter(pipeline.training_dataset([(["some words here"] * 8, 1.0)], tokenizer,
                                              32, 8, seed=0)))
  batch["weights"][0, 0] = np.nan
  with sharding.activate(built.mesh):
    state, metrics = built.train_step(state, built.global_batch(batch), None)
  assert bool(metrics["nonfinite"]) and int(state.skipped) == 1 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def _inject_nan_at(monkeypatch, bad_step):
  calls = {"n": 0}
  real = sharding.global_batch

  def global_batch(batch, mesh, shardings=None):
    if "targets" in batch and batch["inputs"].shape[0] == 8:
      calls["n"] += 1
      # The evaluation set is built first: train.eval_tokens=512 is 16 rows, 2 batches of 8.
      if calls["n"] == bad_step + 2:
        batch = {**batch, "weights": np.full_like(batch["weights"], np.nan)}
    return real(batch, mesh, shardings)

  monkeypatch.setattr(loop.sharding, "global_batch", global_batch)


def test_skip_mode_counts_and_goes_on(text_corpus, tmp_path, monkeypatch):
  _inject_nan_at(monkeypatch, 7)
  config = tiny_config(f"data.source=files:{text_corpus}/*.py", "train.steps=10",
                       "train.on_nonfinite=skip", "train.sample_tokens=0",
                       # a save whenever a microsecond has passed: after every step
                       "train.checkpoint_every=0", "train.checkpoint_minutes=1e-8",
                       "train.keep_checkpoints=20")
  loop.train(config, tmp_path)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 10 and rows[-1]["skipped_steps"] == 1
  assert rows[0]["skipped_steps"] == 0 and np.isfinite(rows[-1]["loss"])
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == list(range(1, 11))


def test_stop_mode_stops_with_the_last_good_checkpoint(text_corpus, tmp_path, monkeypatch):
  _inject_nan_at(monkeypatch, 7)
  config = tiny_config(f"data.source=files:{text_corpus}/*.py", "train.steps=10",
                       "train.checkpoint_every=5", "train.sample_tokens=0")
  with pytest.raises(UserError, match="Step 7 had a non-finite loss.*checkpoint at step 5"):
    loop.train(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["5"]


def test_signals_become_requests():
  before = signal.getsignal(signal.SIGINT)  # ignored when the test run is a background job
  with loop._Requests() as requests:
    os.kill(os.getpid(), signal.SIGUSR1)
    assert requests.save and requests.stop_signal is None
    os.kill(os.getpid(), signal.SIGINT)
    assert requests.stop_signal == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before
