"""How long a checkpoint save blocks training, and how long it takes to be complete on disk.

    python experiments/benchmarks/checkpoint_save.py [--config configs/llama.py:125m] [--saves 3]

Builds the real sharded train state of the config (parameters and AdamW moments), saves it
through `llm_jax.parallel.checkpoint.Checkpointer` as `llm-jax train` does, and prints the median over
`--saves` saves of the blocking part (the `save` call) and the total (until `wait` returns).
"""

import argparse
import json
import statistics
import tempfile
import time

import jax

from llm_jax import config as config_lib
from llm_jax.model import flops
from llm_jax.parallel import sharding
from llm_jax.parallel.checkpoint import Checkpointer
from llm_jax.train import builder


class _DataPosition:
  """Stands in for the data iterator: its state is a few hundred bytes of JSON anyway."""

  def get_state(self):
    return {"layout": {}, "streams": {}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=None)
  parser.add_argument("--saves", type=int, default=3)
  args = parser.parse_args()
  config = config_lib.load_config(args.config, [])
  state = builder.build(config_lib.resolve(config), sharding.make_mesh(config.mesh)).init_state()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  blocked, total = [], []
  with tempfile.TemporaryDirectory() as directory:
    checkpointer = Checkpointer(directory, keep=2)
    for step in range(1, args.saves + 1):
      start = time.perf_counter()
      blocked.append(checkpointer.save(step, state, _DataPosition(), "{}", b""))
      checkpointer.wait()
      total.append(time.perf_counter() - start)
    checkpointer.close()
  print(json.dumps({
      "config": args.config or "configs/base.py",
      "params": flops.param_counts(config.model)["params"],
      "state_bytes": state_bytes,
      "blocking_sec": statistics.median(blocked),
      "total_sec": statistics.median(total),
      "first_save_total_sec": total[0],
  }))


if __name__ == "__main__":
  main()
