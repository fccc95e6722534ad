"""The training loop, the same for every objective and batch source:

    pull a batch, step, log one step late, evaluate, save, stop.

The host stays ahead of the devices: step N+1 is dispatched before step N's results are
read. Every step reads only the non-finite flag of the step before; the other metrics are
read on logging steps, one step late. With several processes, they agree on stopping and
saving (a signal reached process 0, or a timed save is due) only every `train.log_every`
steps, so no other step waits for a collective.
"""

import dataclasses
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

from llm_jax import config as config_lib, paths
from llm_jax.data.batches import BatchSource
from llm_jax.errors import UserError
from llm_jax.model import flops
from llm_jax.parallel import checkpoint, hardware, sharding
from llm_jax.parallel.distributed import is_primary, log
from llm_jax.train import builder, recipes
from llm_jax.train.metrics import MetricsWriter


def check_workdir(config, workdir: pathlib.Path):
  """The config saved in `workdir` (None for a new one); refuses a workdir that is not a
  directory, or whose saved config describes a different model or objective. Writes nothing."""
  paths.check_directory(workdir, "--workdir")
  saved = workdir / "config.json"
  if not saved.exists():
    return None
  try:
    previous = config_lib.from_json(saved.read_text())
  except (json.JSONDecodeError, TypeError):
    raise UserError(f"{saved} is not a readable config; move the workdir aside or pass a "
                    "new --workdir.") from None
  _refuse_other_model(previous, config, str(workdir))
  _refuse_other_objective(previous, config, str(workdir))
  return previous


def _refuse_other_model(previous, config, where: str) -> None:
  differences = config_lib.model_differences(previous, config)
  if differences:
    raise UserError(f"{where} holds a different model ({'; '.join(differences)}); pass a new "
                    "--workdir or restore the workdir's model settings.")


def _refuse_other_objective(previous, config, where: str) -> None:
  """A run belongs to one objective: its checkpoints hold that objective's optimizer state,
  data position and metrics."""
  trained = config_lib.objective_name(previous)
  if trained != config.objective.name:
    raise UserError(f"{where} trained objective.name={trained!r}, not "
                    f"{config.objective.name!r}; pass a new --workdir with "
                    f"--config.train.init_from={where} to start from its parameters.")


def evaluate(built, params, batches) -> dict[str, float]:
  """`val_loss` and `val_<metric>` of the objective's metrics over `batches` (global arrays),
  each the mean weighted as the objective weighs it, and `val_perplexity` of a next-token
  loss."""
  totals = [jax.device_get(built.eval_step(params, batch)) for batch in batches]
  weight = max(sum(float(w) for _, w, _ in totals), 1.0)
  result = {"val_loss": sum(float(loss) for loss, _, _ in totals) / weight}
  for name in (totals[0][2] if totals else {}):
    result[f"val_{name}"] = sum(float(m[name]) for _, _, m in totals) / weight
  if built.objective.perplexity:
    result["val_perplexity"] = math.exp(min(result["val_loss"], 50.0))
  return result


def resume_state(checkpointer, config, abstract_state, data_iterator):
  """(state, step) of the newest checkpoint that restores, the data iterator moved to where it
  was then; (None, 0) if none does. A checkpoint of another model is refused; a damaged one
  is set aside (`checkpoint.restore_newest`)."""
  def restore(step):
    meta = checkpointer.metadata(step)
    if meta.get("params_only"):
      run = checkpointer.directory.parent
      raise UserError(f"{run} holds imported parameters, not a training run to resume; start "
                      f"a new --workdir with --config.train.init_from={run}.")
    saved = config_lib.from_json(meta["config"])
    _refuse_other_model(saved, config, f"The checkpoint at step {step}")
    _refuse_other_objective(saved, config, str(checkpointer.directory.parent))
    return checkpointer.restore(step, abstract_state, data_iterator)
  return checkpoint.restore_newest(checkpointer, restore, log)


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


def agreed(step: int, every: int, stop: bool, save: bool, process_count: int) -> tuple[bool, bool]:
  """Process 0's (stop, save) on every process, so all of them save and stop at one step.

  One process acts at once. Several exchange the flags only every `every` steps: the
  exchange is a collective that waits for the step before it on the devices.
  """
  if process_count == 1:
    return stop, save
  if step % every:
    return False, False
  return tuple(bool(f) for f in multihost_utils.broadcast_one_to_all(np.asarray([stop, save])))


class _Progress:
  """Metrics rows of logging steps, written one step late (metrics.jsonl, TensorBoard,
  progress bar), with tokens/s and MFU over the steps since the row before."""

  def __init__(self, config, workdir: pathlib.Path, start_step: int, peak: float,
               rows_per_example: int):
    self.config, self.peak = config, peak
    self.tokens_per_step = (config.train.batch_size * rows_per_example *
                            config.model.context_length)
    self.writer = MetricsWriter(workdir, start_step)
    self.bar = tqdm.tqdm(total=config.train.steps, initial=start_step,
                         disable=not is_primary(), file=sys.stderr, dynamic_ncols=True,
                         unit="step")
    self.pending = None  # (step, device metrics, validation and host metrics)
    self.timer_start, self.timer_step = None, start_step
    self.last_row = {}

  def start_timer(self, step: int, metrics) -> None:
    """Times from the end of the first step, which includes compilation."""
    jax.block_until_ready(metrics)
    self.timer_start, self.timer_step = time.perf_counter(), step

  def hold(self, step: int, metrics, extra: dict) -> None:
    """Holds the row of `step`: device `metrics` and `extra` values (validation, host)."""
    self.pending = (step, metrics, extra)

  def flush(self) -> None:
    """Writes the held row, if any; blocks until its step is done."""
    if self.pending is None:
      return
    step, device_metrics, extra = self.pending
    self.pending = None
    row = {k: float(v) for k, v in jax.device_get(device_metrics).items() if k != "nonfinite"}
    now = time.perf_counter()
    if self.timer_start is not None and step > self.timer_step:
      tokens_per_sec = (step - self.timer_step) * self.tokens_per_step / (now - self.timer_start)
      row["tokens_per_sec"] = tokens_per_sec
      row["mfu"] = flops.mfu(tokens_per_sec, self.config.model, self.peak)
    self.timer_start, self.timer_step = now, step
    row["tokens_seen"] = step * self.tokens_per_step
    row.update(extra)
    self.writer.write(step, row)
    self.bar.set_postfix(loss=f"{row['loss']:.3f}",
                         tok_s=f"{row.get('tokens_per_sec', 0):.0f}", refresh=False)
    self.last_row.update(row)

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def _check_finite(step: int, metrics, on_nonfinite: str, checkpointer) -> None:
  """Stops the run (or notes the skip) after a step with a non-finite loss or gradient."""
  if not bool(metrics["nonfinite"]):
    return
  if on_nonfinite == "skip":
    log(f"Step {step}: non-finite loss or gradients; its update was skipped "
        f"({int(metrics['skipped_steps'])} skipped so far)")
    return
  checkpointer.wait()
  good = checkpointer.steps()
  raise UserError(
      f"Step {step} had a non-finite loss or gradient norm, so training stopped "
      f"(train.on_nonfinite=stop); the last good state is the checkpoint at step "
      f"{good[-1] if good else 'none'}. Lower train.learning_rate or set "
      "--config.train.on_nonfinite=skip, and rerun to resume.")


def train(config, workdir, objective=None, batch_source=None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns final metrics.

  `objective` says what a step minimises (`llm_jax.objectives`) and `batch_source(config,
  workdir, inherited_tokenizer)` returns the run's `BatchSource`; both default to those
  `objective.name` names (`llm_jax.train.recipes`). An objective with a `reference` reads the
  parameters of the checkpoint the run started from (`train.init_from`), loaded once here.
  SIGTERM or SIGINT ends the run after the current step with a checkpoint (exit status 0);
  SIGUSR1 writes a checkpoint and goes on. A refusal (a `UserError`) before any checkpoint or
  metrics row removes what this call made in `workdir`.
  """
  named_objective, named_source = recipes.configured(config)
  objective, batch_source = objective or named_objective, batch_source or named_source
  workdir = pathlib.Path(workdir).expanduser()
  undo = paths.undo_new_entries(workdir)
  try:
    with _Requests() as requests:
      run = _set_up(config, workdir, objective, batch_source)
      with sharding.activate(run.built.mesh):
        summary, done = _steps(run, requests)
        return _finish(run, summary, done, requests.stop_signal)
  except UserError:  # a refusal writes nothing: what this call made goes, unless it has results
    if is_primary() and not _has_results(workdir):
      undo()
    raise


def _has_results(workdir: pathlib.Path) -> bool:
  """Whether `workdir` holds a checkpoint or a metrics row, which no refusal removes."""
  metrics = workdir / "metrics.jsonl"
  return bool(checkpoint.saved_steps(workdir / "checkpoints")) or (
      metrics.exists() and metrics.stat().st_size > 0)


@dataclasses.dataclass
class _Run:
  """What a run trains with, once set up: its compiled steps, data, checkpoints and state."""
  config: object
  workdir: pathlib.Path
  built: builder.Built
  batches: BatchSource
  checkpointer: checkpoint.Checkpointer
  state: object  # the TrainState
  start_step: int
  reference: dict | None  # the parameters the run started from, when the objective reads them
  config_json: str  # as saved with every checkpoint
  peak_flops: float  # of this machine's devices, the denominator of MFU

  def __post_init__(self):
    self.evaluation = [self.built.global_batch(b) for b in self.batches.evaluation]

  def validate(self, params) -> dict[str, float]:
    if self.batches.evaluate:
      return self.batches.evaluate(params)
    return evaluate(self.built, params, self.evaluation)


def _set_up(config, workdir, objective, batch_source) -> _Run:
  """Checks, data, compiled steps and the state to start from (restored or initialised); the
  config is written only once nothing more can be refused."""
  config_lib.validate(config, jax.device_count())
  previous_config = check_workdir(config, workdir)
  resolved = config_lib.resolve(config)
  mesh = sharding.make_mesh(config.mesh)
  t, m = config.train, config.model
  log(f"Mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices; "
      f"{flops.param_counts(m)['params'] / 1e6:.2f}M parameters; "
      f"{config_lib.describe_resolved(resolved)}")
  built = builder.build(resolved, mesh, objective)
  directory = workdir / "checkpoints"
  init = None
  if t.init_from and not checkpoint.saved_steps(directory):
    init = checkpoint.open_init_source(t.init_from, log)
    init.check_shapes(sharding.abstract_params(built.model, mesh), config)  # before any write
  # The batch source's own checks (an RL judge's) come before a reference is loaded.
  batches = batch_source(config, workdir, init.tokenizer if init else None)
  pinned = previous_config.train.get("init_from", "") if previous_config is not None else ""
  reference = None
  if objective.reference:
    source, _, reference = checkpoint.load(pinned or t.init_from, mesh, log, model=built.model)
    log(f"Reference: {source.location}")
  checkpointer = checkpoint.Checkpointer(directory, t.keep_checkpoints, t.keep_steps)
  state, start_step = resume_state(checkpointer, config, built.abstract_state(), batches.train)
  saved = config.copy_and_resolve_references()
  if state is not None:
    log(f"Resumed from the checkpoint at step {start_step}")
    if previous_config is not None:  # keeps where the run started from
      saved.train.init_from = pinned
  else:
    state = built.init_state()
    if t.init_from:
      init = init or checkpoint.open_init_source(t.init_from, log)
      state = state.replace(params=init.params(state.params, config, log))
      saved.train.init_from = init.location
      log(f"Parameters from {init.location}; optimizer, step and data start fresh")
  config_json = config_lib.to_json(saved)
  if is_primary():  # only now: a refused resume leaves the workdir as it was
    paths.write_atomically(workdir / "config.json", config_json)
  peak, peak_note = hardware.peak_flops(bf16_operands=built.model.config.bf16_operands)
  log(f"MFU is relative to the {peak_note}; {flops.flops_per_token(m) / 1e6:.1f} MFLOPs/token")
  return _Run(config, workdir, built, batches, checkpointer, state, start_step, reference,
              config_json, peak)


def _steps(run: _Run, requests) -> tuple[dict, int]:
  """Trains from `run.start_step` to `train.steps` or a stop request: (the last metrics row,
  the steps done). Saves and closes the checkpoints and metrics, also on a non-finite stop."""
  t = run.config.train
  progress = _Progress(run.config, run.workdir, run.start_step, run.peak_flops,
                       run.built.objective.rows_per_example)
  last_save, previous, done, state = time.monotonic(), None, run.start_step, run.state
  try:
    for step in range(run.start_step, t.steps):
      local, host_metrics = run.batches.next(state.params, step)
      state, metrics = run.built.train_step(state, run.built.global_batch(local), run.reference)
      done = step + 1
      if previous is not None:  # the step before: its flag is ready by now
        _check_finite(*previous, t.on_nonfinite, run.checkpointer)
      previous = (done, metrics)
      progress.flush()
      if progress.timer_start is None:
        progress.start_timer(done, metrics)
      is_last = done == t.steps
      validation = None
      if (t.eval_every and done % t.eval_every == 0) or is_last:
        validation = run.validate(state.params)
      if done % t.log_every == 0 or is_last or validation is not None:
        progress.hold(done, metrics, host_metrics | (validation or {}))
      minutes_due = bool(t.checkpoint_minutes) and (
          time.monotonic() - last_save >= 60 * t.checkpoint_minutes)
      stop, save_now = agreed(done, t.log_every, requests.stop_signal is not None,
                              requests.save or minutes_due, jax.process_count())
      if ((t.checkpoint_every and done % t.checkpoint_every == 0) or is_last or stop
          or save_now):
        _check_finite(*previous, t.on_nonfinite, run.checkpointer)  # never save a bad step
        previous = None
        blocked = run.checkpointer.save(done, state, run.batches.train, run.config_json,
                                        run.batches.tokenizer.to_bytes())
        last_save, requests.save = time.monotonic(), False
        log(f"Checkpoint {done}: training blocked {blocked:.2f}s, writing in the background")
      progress.bar.update(1)
      if stop:
        break
    if previous is not None:
      _check_finite(*previous, t.on_nonfinite, run.checkpointer)
    progress.flush()
  finally:  # also when stopping on a non-finite step: finish saves, keep the metrics
    progress.close()
    run.checkpointer.close()
  run.state = state
  return progress.last_row, done


def _finish(run: _Run, summary: dict, done: int, stop_signal: str | None) -> dict:
  """The summary of a finished run, with its final validation (logged)."""
  if stop_signal:
    log(f"Stopped by {stop_signal} after step {done}; the checkpoint is saved. "
        "Run the same command again to resume.")
    return summary
  if not any(k.startswith("val_") for k in summary):  # nothing left to train: the restored
    summary.update(run.validate(run.state.params))  # model's
  final = [f"{k.removeprefix('val_')} {v:.4f}" for k, v in summary.items()
           if k.startswith("val_") and k != "val_perplexity"]
  if "val_perplexity" in summary:
    final.insert(1, f"perplexity {summary['val_perplexity']:.2f} (ln vocab = "
                 f"{math.log(run.config.model.vocab_size):.2f})")
  if final:
    log("Final validation " + ", ".join(final))
  return summary
