"""Where a decode step's time goes: one step of `generate`'s model, profiled by XLA op.

    python experiments/benchmarks/decode_profile.py [--batch 8] [--prompt 128] [--slots 192] \
        [--steps 30] [--config FILE[:variant]] [--config.KEY=VALUE ...]

Prepares the model and parameters as `llm_jax.inference.generate` does for its decode loop (cast
weights, per-layer arrays, a cache of `--slots` positions), prefills `--batch` random prompts
of `--prompt` tokens, then runs the jitted one-token step `--steps` times under
`jax.profiler` (the cache donated, as the loop updates it in place) and prints the profile's
time per step summed by XLA op over all threads (core time, not wall time: on 2 cores the
wall time is at most about half of the total), largest first, with each op's output shape
from the compiled program.
"""

import argparse
import collections
import glob
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax.inference import generate
from llm_jax.model.transformer import ModelConfig, Transformer


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/llama.py:default")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--slots", type=int, default=192, help="cache positions (prompt + steps)")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--top", type=int, default=20, help="ops to print")
  args, overrides = parser.parse_known_args()
  if args.slots <= args.prompt:
    parser.error(f"--slots={args.slots} leaves no room after a --prompt of {args.prompt} "
                 "tokens; give more slots than prompt tokens.")
  config = config_lib.resolve(config_lib.load_config(
      args.config, [o.removeprefix("--") for o in overrides]))
  model = Transformer(ModelConfig.from_config(config.model))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  model, params = generate.for_decoding(model, params, args.slots)
  prompts = jnp.asarray(np.random.default_rng(0).integers(
      0, config.model.vocab_size, (args.batch, args.prompt)), jnp.int32)
  lengths = jnp.full((args.batch,), args.prompt, jnp.int32)
  cache, _ = jax.jit(generate.prefill, static_argnames="model")(params, model, prompts, lengths)
  step = jax.jit(generate._decode_one, static_argnames=("model", "num_tokens"),
                 donate_argnums=(2,))
  token, positions = prompts[:, 0], lengths
  shapes = {}
  for line in step.lower(params, model, cache, token, positions, None).compile().as_text(
      ).splitlines():
    if found := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+)", line):
      shapes[found[1]] = found[2]
  for _ in range(3):
    _, cache = step(params, model, cache, token, positions, None)
  jax.block_until_ready(cache)

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
      _, cache = step(params, model, cache, token, positions, None)
      jax.block_until_ready(cache)
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    profile = jax.profiler.ProfileData.from_file(trace)
  per_op = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if line.name.startswith("python"):
        continue
      for event in line.events:
        if "Execute" not in event.name:
          per_op[event.name] += event.duration_ns / args.steps / 1e3
  print(f"batch {args.batch}, {args.slots} cache slots: {sum(per_op.values()):,.0f} us of core "
        f"time per decode step, by XLA op:")
  for name, us in per_op.most_common(args.top):
    print(f"  {us:8.1f} us  {name:28s} {shapes.get(name, '')}")


if __name__ == "__main__":
  main()
