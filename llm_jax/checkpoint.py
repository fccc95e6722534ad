"""Orbax checkpoints of the train state and the data iterator, restorable onto any mesh.

A checkpoint lives under `WORKDIR/checkpoints/<step>/` with two items: `state` (the sharded
TrainState, written by every process) and `data` (the Grain iterator state as JSON, so a
resumed run continues with the next unseen batch). Saves are asynchronous: training goes on
while the arrays are written; `wait()` blocks until the last save is complete on disk.
Restoring takes target shardings from the caller, so Orbax reshards a checkpoint written on
one mesh onto another.
"""

import pathlib

import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: pathlib.Path, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, step: int, abstract_state):
    """(state, data_state); `abstract_state` holds ShapeDtypeStructs with target shardings."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
