"""The training loop: workdir checks, data, tokenizer, state, steps, metrics, checkpoints.

The host stays out of the device's way: step N+1 is dispatched before step N's metrics are
read; only step N's non-finite flag is read every step (one step late), the other metrics
on logging steps.
"""

import json
import math
import pathlib
import signal
import sys
import time

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from llm_jax import config as config_lib
from llm_jax import flops, generate, sharding
from llm_jax.checkpoint import Checkpointer
from llm_jax.data import pipeline, sources
from llm_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from llm_jax.errors import UserError
from llm_jax.model import ModelConfig, Transformer
from llm_jax.sharding import is_primary
from llm_jax.train import optimizer, state as state_lib, step as step_lib
from llm_jax.train.metrics import MetricsWriter

# Keys that change the parameters or what they compute; the others (compute dtype, remat,
# attention kernel, scan unrolling, matmul precision) may change between runs of the same
# workdir.
_EXECUTION_ONLY_MODEL_KEYS = ("dtype", "remat_policy", "attention", "attention_block_size",
                              "scan_unroll", "matmul_precision")


def log(message: str) -> None:
  if is_primary():
    print(message, file=sys.stderr, flush=True)


def check_workdir(config, workdir: pathlib.Path) -> None:
  """Refuses a workdir whose saved config describes a different model. Writes nothing."""
  saved = workdir / "config.json"
  if not saved.exists():
    return
  try:
    previous = config_lib.from_json(saved.read_text())
  except (json.JSONDecodeError, TypeError):
    raise UserError(f"{saved} is not a readable config; move the workdir aside or pass a "
                    "new --workdir.") from None
  _refuse_other_model(previous, config, str(workdir))


def _refuse_other_model(previous, config, where: str) -> None:
  differences = [d for d in config_lib.model_differences(previous, config)
                 if d.split(":")[0].removeprefix("model.") not in _EXECUTION_ONLY_MODEL_KEYS]
  if differences:
    raise UserError(f"{where} holds a different model ({'; '.join(differences)}); pass a new "
                    "--workdir or restore the workdir's model settings.")


def prepare_tokenizer(config, workdir: pathlib.Path,
                      mixture: list[tuple[sources.Source, float]]) -> Tokenizer:
  """The run's tokenizer: the workdir's, the configured one, or a newly trained one."""
  saved = workdir / "tokenizer.model"
  given = config.data.tokenizer
  if saved.exists():
    tokenizer = load_tokenizer(saved)
    if given and load_tokenizer(given).model_proto != tokenizer.model_proto:
      raise UserError(f"data.tokenizer={given} differs from {saved} already in the workdir; "
                      "pass a new --workdir or drop data.tokenizer.")
  elif given:
    tokenizer = load_tokenizer(given)
  else:
    tokenizer = None
    if is_primary():
      log(f"Training a {config.model.vocab_size}-piece SentencePiece BPE tokenizer on "
          f"{config.data.tokenizer_sample_bytes / 1e6:.1f} MB of the training split")
      tokenizer = train_tokenizer(
          sources.text_sample(mixture, config.data.tokenizer_sample_bytes, config.train.seed),
          config.model.vocab_size)
  if tokenizer is not None and tokenizer.vocab_size != config.model.vocab_size:
    raise UserError(f"The tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size="
                    f"{config.model.vocab_size}; set --config.model.vocab_size="
                    f"{tokenizer.vocab_size}.")
  if is_primary() and not saved.exists():
    tokenizer.save(saved)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer saved")
    tokenizer = load_tokenizer(saved)
  return tokenizer


def evaluate(eval_step, params, batches) -> float:
  totals = [eval_step(params, batch) for batch in batches]
  loss_sum = sum(float(loss) for loss, _ in totals)
  count = sum(float(n) for _, n in totals)
  return loss_sum / max(count, 1.0)


class _Requests:
  """SIGTERM/SIGINT ask to stop after the current step; SIGUSR1 asks for a checkpoint."""

  def __init__(self):
    self.stop_signal: str | None = None
    self.save = False
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGUSR1:
      self.save = True
    elif self.stop_signal and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C does not wait for the checkpoint
    else:
      self.stop_signal = signal.Signals(signum).name


def _agreed(*flags: bool) -> tuple[bool, ...]:
  """Process 0's flags on every process, so all of them save and stop at the same step."""
  if jax.process_count() == 1:
    return flags
  return tuple(bool(f) for f in multihost_utils.broadcast_one_to_all(np.asarray(flags)))


def restore_newest(checkpointer: Checkpointer, config, abstract_state, data_iterator):
  """(state, step) of the newest checkpoint that restores, or (None, 0) if none does.

  A checkpoint that fails to read (truncated or missing files, unreadable metadata) is
  reported and moved to WORKDIR/damaged_checkpoints, never deleted, and the next older one
  is tried. A checkpoint of another model or data layout is an error, not damage.
  """
  for step in reversed(checkpointer.steps()):
    try:
      meta = checkpointer.metadata(step)
      _refuse_other_model(config_lib.from_json(meta["config"]), config,
                          f"The checkpoint at step {step}")
      return checkpointer.restore(step, abstract_state, data_iterator), step
    except UserError:
      raise
    except Exception as e:  # any failure to read a checkpoint means it cannot be used
      reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      moved = checkpointer.set_aside(step) if is_primary() else None
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
      log(f"The checkpoint at step {step} is damaged ({reason}); moved it to {moved} and "
          "trying the previous one")
  return None, 0


def train(config, workdir) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns final metrics.

  SIGTERM or SIGINT ends the run after the current step with a checkpoint (exit status 0);
  SIGUSR1 writes a checkpoint and goes on.
  """
  with _Requests() as requests:
    return _train(config, pathlib.Path(workdir), requests)


def _train(config, workdir: pathlib.Path, requests: _Requests) -> dict:
  config_lib.validate(config, jax.device_count())
  check_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  t, m = config.train, config.model
  log(f"Mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices; "
      f"{flops.param_counts(m)['params'] / 1e6:.2f}M parameters")

  mixture = sources.open_sources(config.data)
  for source, weight in mixture:
    log(source.summary() + (f"; {weight:.0%} of training tokens" if len(mixture) > 1 else ""))
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = prepare_tokenizer(config, workdir, mixture)

  model = Transformer(ModelConfig.from_config(m))
  tx = optimizer.make_optimizer(t)
  schedule = optimizer.learning_rate_schedule(t)
  train_step, eval_step = step_lib.compile_steps(model, tx, schedule, mesh, t.grad_accum_steps)
  checkpointer = Checkpointer(workdir / "checkpoints", t.keep_checkpoints, t.keep_steps)

  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  data_iterator = iter(pipeline.training_dataset(
      [(source.train, weight) for source, weight in mixture], tokenizer, m.context_length,
      t.batch_size, seed=t.seed, **process))
  eval_batches = [sharding.global_batch(b, mesh) for b in pipeline.evaluation_batches(
      [(source.validation, weight) for source, weight in mixture], tokenizer, m.context_length,
      t.batch_size, t.eval_tokens, **process)]
  scored = int(sum(float(b["weights"].sum()) for b in eval_batches))
  log(f"Evaluation: {len(eval_batches)} batches, {scored} scored validation tokens")

  state, start_step = restore_newest(checkpointer, config, state_lib.abstract_with_shardings(
      model, tx, mesh), data_iterator)
  if state is None:
    state = state_lib.init_state(model, tx, mesh, t.seed)
  else:
    log(f"Resumed from the checkpoint at step {start_step}")
  config_json = config_lib.to_json(config)
  if is_primary():  # only now: a refused resume leaves the workdir as it was
    tmp = workdir / "config.json.tmp"
    tmp.write_text(config_json)
    tmp.replace(workdir / "config.json")

  peak, peak_note = flops.peak_flops(model_config=m)
  log(f"MFU is relative to the {peak_note}; {flops.flops_per_token(m) / 1e6:.1f} MFLOPs/token")
  writer = MetricsWriter(workdir, start_step)
  tokens_per_step = t.batch_size * m.context_length
  progress = tqdm.tqdm(total=t.steps, initial=start_step, disable=not is_primary(),
                       file=sys.stderr, dynamic_ncols=True, unit="step")
  pending = None  # (step, device metrics) of a logging step, read one step late
  timer_start, timer_step = None, start_step
  summary = {}
  eval_results = {}

  def flush(pending_row):
    nonlocal timer_start, timer_step
    step, device_metrics = pending_row
    values = jax.device_get(device_metrics)
    now = time.perf_counter()
    row = {k: float(v) for k, v in values.items() if k not in ("tokens", "nonfinite")}
    if timer_start is not None and step > timer_step:
      tokens_per_sec = (step - timer_step) * tokens_per_step / (now - timer_start)
      row["tokens_per_sec"] = tokens_per_sec
      row["mfu"] = flops.mfu(tokens_per_sec, m, peak)
    timer_start, timer_step = now, step
    row["tokens_seen"] = step * tokens_per_step
    if step in eval_results:
      row["val_loss"] = eval_results.pop(step)
      row["val_perplexity"] = math.exp(min(row["val_loss"], 50.0))
    writer.write(step, row)
    progress.set_postfix(loss=f"{row['loss']:.3f}",
                         tok_s=f"{row.get('tokens_per_sec', 0):.0f}", refresh=False)
    return row

  def check_finite(step, device_metrics):
    if not bool(device_metrics["nonfinite"]):
      return
    skipped = int(device_metrics["skipped_steps"])
    if t.on_nonfinite == "skip":
      log(f"Step {step}: non-finite loss or gradients; its update was skipped ({skipped} "
          "skipped so far)")
      return
    checkpointer.wait()
    good = checkpointer.steps()
    raise UserError(
        f"Step {step} had a non-finite loss or gradient norm, so training stopped "
        f"(train.on_nonfinite=stop); the last good state is the checkpoint at step "
        f"{good[-1] if good else 'none'}. Lower train.learning_rate or set "
        "--config.train.on_nonfinite=skip, and rerun to resume.")

  last_save = time.monotonic()

  def save(step):
    nonlocal last_save
    blocked = checkpointer.save(step, state, data_iterator, config_json,
                                tokenizer.model_proto)
    last_save = time.monotonic()
    log(f"Checkpoint {step}: training blocked {blocked:.2f}s, writing in the background")

  previous = None  # (step, metrics) of the step before, checked for non-finite values
  done = start_step
  with sharding.activate(mesh):
    try:
      for step in range(start_step, t.steps):
        batch = sharding.global_batch(next(data_iterator), mesh)
        state, metrics = train_step(state, batch)
        done = step + 1
        if previous is not None:
          check_finite(*previous)
        previous = (done, metrics)
        if pending is not None:
          summary.update(flush(pending))
          pending = None
        if timer_start is None:  # the first step includes compilation: time from its end
          jax.block_until_ready(metrics)
          timer_start, timer_step = time.perf_counter(), done
        is_last = done == t.steps
        if (t.eval_every and done % t.eval_every == 0) or is_last:
          eval_results[done] = evaluate(eval_step, state.params, eval_batches)
        if done % t.log_every == 0 or is_last or done in eval_results:
          pending = (done, metrics)
        minutes_due = bool(t.checkpoint_minutes) and (
            time.monotonic() - last_save >= 60 * t.checkpoint_minutes)
        stop, save_now = _agreed(requests.stop_signal is not None, requests.save or minutes_due)
        if ((t.checkpoint_every and done % t.checkpoint_every == 0) or is_last or stop
            or save_now):
          check_finite(*previous)  # never save after a step that should have stopped the run
          previous = None
          save(done)
          requests.save = False
        progress.update(1)
        if stop:
          break
      if previous is not None:
        check_finite(*previous)
      if pending is not None:
        summary.update(flush(pending))
    finally:  # also when stopping on a non-finite step: finish saves, keep the metrics
      progress.close()
      checkpointer.close()
      writer.close()

    if requests.stop_signal:
      log(f"Stopped by {requests.stop_signal} after step {done}; the checkpoint is saved. "
          "Run the same command again to resume.")
      return summary
    if "val_loss" not in summary:  # nothing left to train: report the restored model
      summary["val_loss"] = evaluate(eval_step, state.params, eval_batches)
      summary["val_perplexity"] = math.exp(min(summary["val_loss"], 50.0))
    log(f"Final validation loss {summary['val_loss']:.4f}, perplexity "
        f"{summary['val_perplexity']:.2f} (ln vocab = {math.log(m.vocab_size):.2f})")
    if t.sample_tokens:  # every process: the parameters span all of them
      prompt_ids = [tokenizer.bos_id, *tokenizer.encode(t.sample_prompt)]
      room = min(t.sample_tokens, m.context_length - len(prompt_ids))
      new_ids = generate.generate(
          state.params, model, [prompt_ids], room, eos_id=tokenizer.eos_id,
          temperature=t.sample_temperature, seed=t.seed)[0] if room > 0 else []
      summary["sample"] = t.sample_prompt + tokenizer.decode(new_ids)
      if is_primary():
        print(f"--- sample (temperature {t.sample_temperature}) ---\n{summary['sample']}\n---",
              flush=True)
  return summary
