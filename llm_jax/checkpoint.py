"""Orbax checkpoints of the train state and the data iterator, restorable onto any mesh.

A checkpoint lives under `WORKDIR/checkpoints/<step>/` with two items: `state` (the sharded
TrainState, written by every process) and `data` (each process's Grain iterator state, one
JSON file per process through Grain's Orbax handler, so a resumed run continues with the
next unseen batch). Saves are asynchronous: training goes on while the arrays are written;
the iterator state is captured when `save` is called. `wait()` blocks until the last save is
complete on disk. Restoring takes target shardings from the caller, so Orbax reshards a
checkpoint written on one mesh onto another.
"""

import pathlib

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: pathlib.Path, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, step: int, abstract_state, data_iterator):
    """The saved state; `data_iterator` is moved to where it was at that step.

    `abstract_state` holds ShapeDtypeStructs with the target shardings.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
