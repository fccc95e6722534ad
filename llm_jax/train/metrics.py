"""Metrics: one JSON object per logged step in WORKDIR/metrics.jsonl, and TensorBoard events.

Only process 0 writes. On resume, rows past the restored step are dropped before new rows are
appended, so the file never holds a step twice.
"""

import json
import math
import pathlib

from tensorboardX import SummaryWriter

from llm_jax.parallel.distributed import is_primary
from llm_jax import paths
from llm_jax.errors import UserError


class MetricsWriter:
  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.enabled = is_primary()
    if not self.enabled:
      return
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._truncate_after(resume_step)
    self._file = self.path.open("a")
    self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    rows = [line for line in self.path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    if len(kept) != len(rows):
      paths.write_atomically(self.path, "".join(line + "\n" for line in kept))

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tensorboard.add_scalar(key, value, step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tensorboard.close()


def _plain(value):
  value = float(value) if hasattr(value, "dtype") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep them visible as strings
  return value


def read_metrics(workdir) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl, oldest first."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise UserError(f"{path} does not exist; give the workdir of a run.")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
