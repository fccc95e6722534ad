"""Orbax checkpoints: train state, data position, config and tokenizer, restorable anywhere.

A checkpoint is `WORKDIR/checkpoints/<step>/` with three items:

- `state`: the sharded TrainState, written by every process (Orbax/tensorstore);
- `data`: each process's data-iterator state, one JSON file per process. Restoring merges
  every process's file, so a run with another process count still finds the state of each
  of its streams (see `llm_jax.data.pipeline.StreamBatches`);
- `meta`: the resolved config and the tokenizer, to validate a restore and to rebuild the run.

Saves are asynchronous: `save` blocks only while the arrays are copied off the device and
the small items are written, and training continues while Orbax writes the arrays. A step
directory appears under its final name only once complete, so a process killed mid-save
leaves nothing that looks like a checkpoint. Restoring takes target shardings from the
caller, so Orbax reshards a checkpoint written on one mesh onto another.
"""

import base64
import dataclasses
import json
import pathlib
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """One JSON file per process, as Grain writes them; restored from every process's files."""

  def save(self, directory: epath.Path, item=None, args=None):
    state = (item or args.item).get_state()
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (pathlib.Path(directory) / name).write_text(json.dumps(state))

  def restore(self, directory: epath.Path, item=None, args=None):
    iterator = item or args.item
    files = sorted(pathlib.Path(directory).glob("process_*-of-*.json"))
    if not files:
      raise FileNotFoundError(f"no data-iterator state in {directory}")
    states = [json.loads(f.read_text()) for f in files]
    merged = {"layout": states[0].get("layout"), "streams": {}}
    for state in states:
      merged["streams"].update(state.get("streams", {}))
    iterator.set_state(merged)
    return iterator


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
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.CustomSteps(steps=list(keep_steps))])
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

  def steps(self) -> list[int]:
    """Steps of the complete checkpoints on disk, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, config_json: str,
           tokenizer_proto: bytes) -> float:
    """Starts saving; returns the seconds training was blocked."""
    start = time.perf_counter()
    meta = {"step": step, "config": config_json,
            "tokenizer": base64.b64encode(tokenizer_proto).decode("ascii")}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=_DataSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=True)
    return time.perf_counter() - start

  def metadata(self, step: int) -> dict:
    """The `meta` item: {'step', 'config' (JSON text), 'tokenizer' (SentencePiece bytes)}."""
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
