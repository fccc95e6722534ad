"""Orbax checkpoints: train state, data position, config and tokenizer, restorable anywhere.

A checkpoint is `WORKDIR/checkpoints/<step>/` with three items:

- `state`: the sharded TrainState, written by every process (Orbax/tensorstore);
- `data`: each process's batch-source state, one JSON file per process. A source that
  merges them (`merge_states`, as the text pipeline's streams do) resumes under another
  process count too;
- `meta`: the run's config (`auto` choices unresolved) and tokenizer, to validate a restore
  and to rebuild the run.

Saves are asynchronous: `save` blocks only while the arrays are copied off the device and
the small items are written, and training continues while Orbax writes the arrays. A step
directory appears under its final name only once complete, so a process killed mid-save
leaves nothing that looks like a checkpoint. Restoring takes target shardings from the
caller, so Orbax reshards a checkpoint written on one mesh onto another.
"""

import base64
import dataclasses
import functools
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from llm_jax import config as config_lib
from llm_jax.errors import UserError
from llm_jax.model.transformer import ModelConfig, Transformer
from llm_jax.parallel import sharding
from llm_jax.parallel.distributed import is_primary


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """One JSON file per process, as Grain writes them.

  On restore, a batch source that can resume under another process count merges every
  process's state itself (`merge_states`); any other gets the state of its own process.
  """

  def save(self, directory: epath.Path, item=None, args=None):
    state = (item or args.item).get_state()
    (pathlib.Path(directory) / _process_file()).write_text(json.dumps(state))

  def restore(self, directory: epath.Path, item=None, args=None):
    iterator = item or args.item
    files = {f.name: f for f in pathlib.Path(directory).glob("process_*-of-*.json")}
    if not files:
      raise FileNotFoundError(f"no data-iterator state in {directory}")
    if hasattr(iterator, "merge_states"):
      state = iterator.merge_states([json.loads(files[name].read_text())
                                     for name in sorted(files)])
    elif _process_file() in files:
      state = json.loads(files[_process_file()].read_text())
    else:
      raise UserError(f"The saved data position in {directory} was written by another number "
                      f"of processes ({', '.join(sorted(files))}); resume with that many.")
    try:
      iterator.set_state(state)
    except (KeyError, TypeError, ValueError, IndexError) as e:  # it read, but does not fit
      raise UserError(f"The saved data position in {directory} is not one this run's data can "
                      f"resume from ({type(e).__name__}: {e}); resume with the run's own data "
                      "and objective, or pass a new --workdir.") from None
    return iterator


def _process_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """The checkpoints of one run.

  `read_only=True` (for inference) never writes, moves or deletes anything, and restores
  parameters only (`restore_params`); training uses the default.
  """

  def __init__(self, directory: pathlib.Path, keep: int = 1, keep_steps=(),
               read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.read_only = read_only
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.CustomSteps(steps=list(keep_steps))])
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    if read_only:  # Orbax warns that a read-only manager is read-only; users asked for that
      absl_logger.setLevel(logging.ERROR)
    try:
      options = ocp.CheckpointManagerOptions(
          preservation_policy=policy, create=not read_only, read_only=read_only,
          enable_async_checkpointing=not read_only)
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          # Both handlers read the same files; the PyTree one can restore a part of the state.
          item_handlers={"state": (ocp.PyTreeCheckpointHandler() if read_only
                                   else ocp.StandardCheckpointHandler()),
                         "data": _DataHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    finally:
      absl_logger.setLevel(level)

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, config_json: str,
           tokenizer_bytes: bytes) -> float:
    """Starts saving; returns the seconds training was blocked."""
    start = time.perf_counter()
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=_DataSave(data_iterator),
        meta=ocp.args.JsonSave(_meta(step, config_json, tokenizer_bytes))), force=True)
    return time.perf_counter() - start

  def save_params(self, step: int, params, config_json: str, tokenizer_bytes: bytes) -> None:
    """Saves parameters alone (an imported model): inference and `train.init_from` read
    them; a training run cannot resume from them (no optimizer state, no data position)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}),
        meta=ocp.args.JsonSave(_meta(step, config_json, tokenizer_bytes, params_only=True))),
        force=True)
    self.wait()

  def metadata(self, step: int) -> dict:
    """The `meta` item: {'step', 'config' (JSON text), 'tokenizer' (its `to_bytes()`), and
    'params_only' for a checkpoint of parameters alone}."""
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict) or meta.get("step") != step:
      raise ValueError(f"unreadable metadata for step {step}")
    return {**meta, "tokenizer": base64.b64decode(meta["tokenizer"])}

  def restore(self, step: int, abstract_state, data_iterator):
    """The saved state; `data_iterator` is moved to where it was at that step.

    `abstract_state` holds ShapeDtypeStructs with the target shardings.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=_DataRestore(data_iterator)))
    return restored.state

  def restore_params(self, step: int, abstract_params):
    """Only the parameters of the saved state (no optimizer state), e.g. for inference.

    `abstract_params` holds ShapeDtypeStructs with the target shardings.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(
                abstract_params)},
            partial_restore=True)))
    return restored.state["params"]

  def param_shapes(self, step: int) -> dict:
    """The saved parameters' shapes (a pytree of tuples), read from metadata alone."""
    tree = self._manager.item_metadata(step)["state"]
    return jax.tree.map(lambda leaf: tuple(leaf.shape), getattr(tree, "tree", tree)["params"])

  def set_aside(self, step: int) -> pathlib.Path:
    """Moves a damaged checkpoint out of the way (never deletes it); returns where to."""
    damaged = self.directory.parent / "damaged_checkpoints"
    damaged.mkdir(exist_ok=True)
    target = damaged / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(self.directory / str(step)), str(target))
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _meta(step: int, config_json: str, tokenizer_bytes: bytes, params_only: bool = False):
  meta = {"step": step, "config": config_json,
          "tokenizer": base64.b64encode(tokenizer_bytes).decode("ascii")}
  return {**meta, "params_only": True} if params_only else meta


def saved_steps(directory) -> list[int]:
  """Steps of the complete checkpoints in `directory`; creates and changes nothing."""
  directory = pathlib.Path(directory)
  return Checkpointer(directory, read_only=True).steps() if directory.is_dir() else []


def restore_newest(checkpointer: Checkpointer, restore, log, steps=None):
  """(restore(step), step) of the newest checkpoint that reads, or (None, 0) if none does.

  A checkpoint that fails to read (truncated or missing files, unreadable metadata) is
  reported and the one before it is tried; a writable checkpointer first moves it to
  WORKDIR/damaged_checkpoints (never deletes it), a read-only one leaves it where it is. A
  `UserError` from `restore` (a checkpoint that reads but does not fit: another model,
  objective or data position) is raised, not damage.
  `steps` limits the search to those steps.
  """
  for step in reversed(checkpointer.steps() if steps is None else steps):
    try:
      return restore(step), step
    except UserError:
      raise
    except Exception as e:  # any failure to read a checkpoint means it cannot be used
      reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      moved = ""
      if not checkpointer.read_only:
        target = checkpointer.set_aside(step) if is_primary() else None
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        moved = f"moved it to {target} and "
      log(f"The checkpoint at step {step} cannot be read ({reason}); {moved}trying the one "
          "before it")
  return None, 0


@dataclasses.dataclass
class InitSource:
  """The checkpoint a new run takes its parameters from (`train.init_from`); only read."""
  checkpointer: Checkpointer
  step: int
  config: Any  # the source run's config
  tokenizer: bytes  # its tokenizer's `to_bytes()` (`tokenizer.tokenizer_from_bytes` reads it)

  @property
  def location(self) -> str:
    """Where the parameters come from: the checkpoint's own directory."""
    return str(self.checkpointer.directory / str(self.step))

  @functools.cached_property
  def source_shapes(self) -> dict:
    """{parameter path: shape} of the source, read once from the checkpoint's metadata."""
    return traverse_util.flatten_dict(self.checkpointer.param_shapes(self.step))

  def check_shapes(self, params, config) -> None:
    """Refuses when a parameter of `params` (arrays or ShapeDtypeStructs of `config`'s model)
    has another shape in the source, naming the config keys that differ."""
    source_shapes = self.source_shapes
    for path, value in traverse_util.flatten_dict(params).items():
      if path in source_shapes and source_shapes[path] != value.shape:
        differences = config_lib.model_differences(self.config, config)
        raise UserError(
            f"train.init_from={self.location} has parameter {'/'.join(path)} of shape "
            f"{source_shapes[path]}, this model's is {value.shape} "
            f"({'; '.join(differences) or 'same model keys'}); start from a run of the "
            "same architecture or change those keys back.")

  def params(self, fresh_params, config, log) -> dict:
    """`fresh_params` (a new, sharded initialisation of `config`'s model) with every parameter
    the source also has replaced by the source's values, resharded onto the same shardings.

    A parameter of another shape is refused (`check_shapes`); one the new model has and the
    source lacks (a new head) keeps its fresh values, and one only the source has is left
    out; both are named in the log.
    """
    self.check_shapes(fresh_params, config)
    source_shapes = self.source_shapes
    fresh = traverse_util.flatten_dict(fresh_params)
    shared = {path: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
              for path, v in fresh.items() if path in source_shapes}
    restored = traverse_util.flatten_dict(self.checkpointer.restore_params(
        self.step, traverse_util.unflatten_dict(shared)))
    for what, paths in (("kept its fresh initialisation", fresh.keys() - source_shapes.keys()),
                        ("was left out", source_shapes.keys() - fresh.keys())):
      if paths:
        names = ", ".join(sorted("/".join(p) for p in paths))
        log(f"Not in both models, so {what}: {names}")
    return traverse_util.unflatten_dict({**fresh, **restored})


def model_of(config, platform: str | None = None) -> Transformer:
  """The model a run of `config` builds, its `auto` choices resolved for `platform` (default:
  this machine's)."""
  return Transformer(ModelConfig.from_config(config_lib.resolve(config, platform).model))


def _checkpoints_of(path, option: str) -> tuple[Checkpointer, list[int] | None]:
  """The read-only checkpointer of the run directory `path` (every step) or of the checkpoint
  directory `path` = RUN/checkpoints/STEP (that step alone)."""
  path = pathlib.Path(path)
  if (path / "checkpoints").is_dir():
    directory, steps = path / "checkpoints", None
  elif path.parent.name == "checkpoints" and path.name.isdigit() and path.is_dir():
    directory, steps = path.parent, [int(path.name)]
  else:
    raise UserError(f"{option}={path} is not a run directory with checkpoints; point it at the "
                    "--workdir of a finished run (or its checkpoints/STEP).")
  return Checkpointer(directory, read_only=True), steps


def _source(checkpointer: Checkpointer, step: int) -> InitSource:
  meta = checkpointer.metadata(step)
  return InitSource(checkpointer, step, config_lib.from_json(meta["config"]), meta["tokenizer"])


def open_init_source(path, log, option: str = "train.init_from") -> InitSource:
  """The newest checkpoint whose metadata reads, of the run directory `path` or the checkpoint
  directory `path` (RUN/checkpoints/STEP) itself; no parameters are read."""
  checkpointer, steps = _checkpoints_of(path, option)
  source, _ = restore_newest(checkpointer, functools.partial(_source, checkpointer), log, steps)
  if source is None:
    raise UserError(f"{option}={path} has no readable checkpoint; point it at a run that "
                    "saved one.")
  return source


def load(path, mesh, log, model: Transformer | None = None, option: str = "train.init_from"
         ) -> tuple[InitSource, Transformer, dict]:
  """(checkpoint, model, parameters) of the newest checkpoint that reads whole, of the run
  directory `path` or of `path` = RUN/checkpoints/STEP: the one way a run is loaded.

  The parameters are placed on `mesh` (a Mesh, or a function of the run's config giving one)
  as `model`'s (a model of the same shapes, say the run being trained, whose dtypes they take)
  or the checkpoint's own model's. Nothing is written; a checkpoint that cannot be read is
  reported and the one before it used.
  """
  checkpointer, steps = _checkpoints_of(path, option)

  def read(step):
    source = _source(checkpointer, step)
    loaded = model or model_of(source.config)
    placed_on = mesh if isinstance(mesh, jax.sharding.Mesh) else mesh(source.config)
    return source, loaded, checkpointer.restore_params(
        step, sharding.abstract_params(loaded, placed_on))

  loaded, _ = restore_newest(checkpointer, read, log, steps)
  if loaded is None:
    raise UserError(f"{option}={path} has no readable checkpoint; point it at a run that "
                    "saved one.")
  return loaded
