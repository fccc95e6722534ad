"""llm-jax's train step against a PyTorch reference of the same model and optimizer.

    pip install -e '.[bench]'
    python experiments/benchmarks/side_by_side.py [--shapes default 25m] [--rounds 4] \
        [--steps 2] [--threads N] [--frameworks llm-jax pytorch pytorch-bf16] [--json] \
        [--decode BATCH [BATCH ...] [--sample]] [--config.KEY=VALUE ...]

The reference is what a user would otherwise pick: Hugging Face `LlamaForCausalLM` built
from a `LlamaConfig` with the same vocabulary, width, layers, heads, kv heads, MLP width,
tied embeddings, rotary theta and RMSNorm epsilon (the script checks that the parameter
counts agree), trained in eager mode with `torch.optim.AdamW` (same betas, epsilon,
weight decay on matrices only, warmup-cosine learning rate) and global-norm gradient
clipping, on the same batch size and sequence length; the loss is the same mean next-token
cross-entropy. It runs twice: `pytorch` in float32 (PyTorch's default, and what the ratio is
taken against), and `pytorch-bf16` under `torch.autocast("cpu", torch.bfloat16)`, PyTorch's
mixed precision, for comparison with llm-jax's bfloat16 matmul operands on CPUs that have
bfloat16 dot instructions (`model.matmul_precision`).

Each framework runs in its own worker process (one process tree, one run) that builds and
warms its step once and then, on request, times a block of `--steps` steps. The llm-jax
worker runs with the host malloc settings the `llm-jax` command uses
(`llm_jax.parallel.host_memory`); the PyTorch workers with the environment as it is. The parent
asks the workers in turn, A B C A B C ... for `--rounds` rounds, so that other load on the
machine falls on all alike, and reports the median step time of each and the ratio of
tokens/s (wall clock), with each process's CPU time per step beside it (on a shared machine
the wall clock includes waiting for the cores; CPU time does not, though spin-waiting
threads inflate it). All get the same cores: XLA's CPU thread pool uses every core, and the
PyTorch workers call `torch.set_num_threads(--threads)` (default: the core count).

`--decode BATCH ...` compares generation instead: `llm_jax.inference.generate.generate` against
`LlamaForCausalLM.generate` (KV cache, eager; `pytorch-bf16` is the model in bfloat16), on
BATCH prompts of half the context, greedy, and with `--sample` also sampled (temperature 1,
top-p 0.95) by a second worker per framework, timed in the same alternation as the greedy
ones, so that the cost of sampling is read from one run. Each batch size is its own
alternation. A timed "step" is one decode step: a call for DECODE_TOKENS new tokens minus a
call for one (the prefill and first token), divided by DECODE_TOKENS - 1, so neither side's
prefill counts.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"default": "configs/llama.py:default", "25m": "configs/llama.py:25m"}
FRAMEWORKS = ("llm-jax", "pytorch", "pytorch-bf16")
DECODE_TOKENS = 64
SAMPLED = " top-p"  # the name of a framework's sampling worker: "llm-jax top-p"


def _decode_step_times(generate, steps: int) -> list[float]:
  """Per-token times of `steps` decode steps: (DECODE_TOKENS new tokens - 1) / (that - 1)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    generate(DECODE_TOKENS)
    middle = time.perf_counter()
    generate(1)
    times.append(((middle - start) - (time.perf_counter() - middle)) / (DECODE_TOKENS - 1))
  return times


class _JaxDecode:
  """llm_jax.inference.generate.generate on BATCH random prompts of half the context."""

  def __init__(self, config, batch_size: int, sample: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from llm_jax import config as config_lib
    from llm_jax.model import flops
    from llm_jax.inference import generate
    from llm_jax.model.transformer import ModelConfig, Transformer
    m = config.model
    model = Transformer(ModelConfig.from_config(config_lib.resolve(config).model))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    prompts = np.random.default_rng(0).integers(
        0, m.vocab_size, (batch_size, m.context_length // 2)).tolist()
    options = dict(temperature=1.0, top_p=0.95) if sample else {}
    self._generate = lambda new_tokens: generate.generate(
        params, model, prompts, new_tokens, eos_id=-1, **options)
    self.params = flops.param_counts(m)["params"]
    self.setup = {"jax": jax.__version__, "bf16_matmul_operands": model.config.bf16_operands,
                  "host_malloc": os.environ.get("LLM_JAX_HOST_MALLOC", "default")}

  def time_steps(self, steps: int) -> list[float]:
    return _decode_step_times(self._generate, steps)


class _TorchDecode:
  """LlamaForCausalLM.generate with its KV cache, eager, float32 or all bfloat16."""

  def __init__(self, config, threads: int, batch_size: int, sample: bool, bf16: bool):
    import torch
    torch.set_num_threads(threads)
    self._torch = torch
    reference = _TorchStep(config, threads)
    model = reference.model.eval()
    if bf16:
      model = model.to(torch.bfloat16)
    m = config.model
    prompts = torch.randint(0, m.vocab_size, (batch_size, m.context_length // 2),
                            generator=torch.Generator().manual_seed(0))
    options = dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0) if sample else dict(
        do_sample=False)

    def generate(new_tokens):
      with torch.inference_mode():
        return model.generate(prompts, attention_mask=torch.ones_like(prompts),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0, use_cache=True, **options)

    self._generate = generate
    self.params = reference.params
    self.setup = {**reference.setup, "autocast_bf16": False, "bf16_weights": bf16}

  def time_steps(self, steps: int) -> list[float]:
    return _decode_step_times(self._generate, steps)


def _load_config(shape: str, overrides: list[str]):
  from llm_jax import config as config_lib
  return config_lib.load_config(SHAPES[shape], [o.removeprefix("--") for o in overrides])


class _JaxStep:
  """The real `llm-jax train` step (llm_jax.tools.bench) on a synthetic batch."""

  def __init__(self, config):
    import jax
    from llm_jax.tools import bench
    from llm_jax.model import flops
    from llm_jax.parallel import sharding
    from llm_jax import config as config_lib
    config_lib.validate(config, jax.device_count())
    self._timer = bench.TrainStepTimer(config, sharding.make_mesh(config.mesh))
    self.params = flops.param_counts(config.model)["params"]
    self.setup = {"compile_time_sec": self._timer.compile_time_sec,
                  "jax": jax.__version__, "devices": jax.device_count(),
                  "bf16_matmul_operands": self._timer.built.model.config.bf16_operands,
                  "host_malloc": os.environ.get("LLM_JAX_HOST_MALLOC", "default")}

  def time_steps(self, steps: int) -> list[float]:
    return self._timer.time_steps(steps)


class _TorchStep:
  """Hugging Face LlamaForCausalLM + torch.optim.AdamW, eager on the CPU: float32, or with
  `autocast` the forward and backward under torch.autocast to bfloat16."""

  def __init__(self, config, threads: int, autocast: bool = False):
    import math

    import torch
    import transformers
    torch.set_num_threads(threads)
    torch.manual_seed(config.train.seed)
    m, t = config.model, config.train
    hf_config = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.context_length,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu")
    self.model = transformers.LlamaForCausalLM(hf_config).train()
    self.params = sum(p.numel() for p in self.model.parameters())
    # Decay matrices and embeddings, not RMSNorm scales, as llm_jax.train.optimizer does.
    decay = [p for p in self.model.parameters() if p.ndim >= 2]
    no_decay = [p for p in self.model.parameters() if p.ndim < 2]
    self.optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=t.learning_rate, betas=(t.b1, t.b2), eps=t.eps)

    def lr_factor(step):
      if step < t.warmup_steps:
        return step / max(t.warmup_steps, 1)
      progress = min((step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1), 1.0)
      return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
    generator = torch.Generator().manual_seed(t.seed)
    tokens = torch.randint(0, m.vocab_size, (t.batch_size, m.context_length + 1),
                           generator=generator)
    self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
    self.grad_clip = t.grad_clip
    self._torch = torch
    self._autocast = autocast
    self.setup = {"torch": torch.__version__, "transformers": transformers.__version__,
                  "threads": torch.get_num_threads(), "autocast_bf16": autocast,
                  "attention": self.model.config._attn_implementation}

  def _step(self):
    torch = self._torch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._autocast):
      logits = self.model(input_ids=self.inputs).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                               self.targets.reshape(-1))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    self.scheduler.step()
    return loss.item()  # the step is done when its loss is on the host

  def time_steps(self, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self._step()
      times.append(time.perf_counter() - start)
    return times


def _worker(args, overrides) -> None:
  """Builds one framework's step, warms it, then times a block of steps per stdin line."""
  config = _load_config(args.shape, overrides)
  if args.decode and args.worker == "llm-jax":
    step = _JaxDecode(config, args.decode[0], args.sample)
  elif args.decode:
    step = _TorchDecode(config, args.threads, args.decode[0], args.sample,
                        bf16=args.worker == "pytorch-bf16")
  elif args.worker == "llm-jax":
    step = _JaxStep(config)
  else:
    step = _TorchStep(config, args.threads, autocast=args.worker == "pytorch-bf16")
  step.time_steps(2)  # warm-up: compilation, allocator, thread pools
  print(json.dumps({"params": step.params, **step.setup}), flush=True)
  for line in sys.stdin:
    cpu_start = time.process_time()
    times = step.time_steps(int(line))
    print(json.dumps({"times": times, "cpu_sec": time.process_time() - cpu_start}), flush=True)


def _start(framework, shape, args, overrides, decode_batch: int = 0,
           sample: bool = False) -> tuple[subprocess.Popen, dict]:
  from llm_jax.parallel import host_memory
  command = [sys.executable, __file__, "--worker", framework, "--shape", shape,
             "--threads", str(args.threads), *overrides]
  if decode_batch:
    command += ["--decode", str(decode_batch)] + (["--sample"] if sample else [])
  environment = None  # as it is
  if framework == "llm-jax":
    environment = host_memory.tuned_environment(os.environ)
  process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=environment)
  return process, json.loads(process.stdout.readline())


def _alternate(workers: dict, args, tokens_per_step: int) -> tuple[dict, int]:
  """Times every worker's steps in turn, A B C A B C ...; ({name: timings and setup}, the
  models' parameter count)."""
  counts = {name: setup["params"] for name, (_, setup) in workers.items()}
  if len(set(counts.values())) != 1:
    raise SystemExit(f"The models differ in size: {counts}; the comparison is off.")
  times = {name: [] for name in workers}
  cpu_per_step = {name: [] for name in workers}
  for _ in range(args.rounds):
    for name, (process, _) in workers.items():
      process.stdin.write(f"{args.steps}\n")
      process.stdin.flush()
      block = json.loads(process.stdout.readline())
      times[name] += block["times"]
      cpu_per_step[name].append(block["cpu_sec"] / args.steps)
  for process, _ in workers.values():
    process.stdin.close()
    process.wait()
  result = {}
  for name, (_, setup) in workers.items():
    step_time = statistics.median(times[name])
    result[name] = {"step_time_sec": step_time, "tokens_per_sec": tokens_per_step / step_time,
                    "cpu_time_per_step_sec": statistics.median(cpu_per_step[name]),
                    **{k: v for k, v in setup.items() if k != "params"}}
  return result, counts.popitem()[1]


def _ratios(timed: dict, frameworks: list[str], suffix: str = "") -> dict:
  return {f"ratio_to_{f}{suffix}": (timed[f"llm-jax{suffix}"]["tokens_per_sec"]
                                    / timed[f"{f}{suffix}"]["tokens_per_sec"])
          for f in frameworks[1:]}


def _compare(shape, args, overrides) -> dict:
  config = _load_config(shape, overrides)
  m, t = config.model, config.train
  result = {"shape": shape, "batch_size": t.batch_size, "context_length": m.context_length,
            "dtype": m.dtype, "rounds": args.rounds, "steps_per_round": args.steps}
  if not args.decode:
    timed, result["params"] = _alternate(
        {f: _start(f, shape, args, overrides) for f in args.frameworks}, args,
        t.batch_size * m.context_length)
    return {**result, **timed, **_ratios(timed, args.frameworks)}
  result["decode"] = []
  for batch in args.decode:
    workers = {}
    for sample in ([False, True] if args.sample else [False]):
      for f in args.frameworks:
        workers[f + SAMPLED * sample] = _start(f, shape, args, overrides, batch, sample)
    timed, result["params"] = _alternate(workers, args, batch)
    row = {"batch": batch, **timed, **_ratios(timed, args.frameworks)}
    if args.sample:
      row.update(_ratios(timed, args.frameworks, SAMPLED))
      row.update({f"sampled_over_greedy_{f}": timed[f + SAMPLED]["step_time_sec"]
                  / timed[f]["step_time_sec"] for f in args.frameworks})
    result["decode"].append(row)
  return result


def _print_times(timed: dict, names: list[str], per_token: bool) -> None:
  for name in names:
    r = timed[name]
    cpu = ("" if per_token else  # a decode turn's CPU time includes its prefills
           f"  (process CPU time {r['cpu_time_per_step_sec'] * 1e3:.0f} ms/step)")
    print(f"  {name:18s} {r['step_time_sec'] * 1e3:8.2f} ms/step "
          f"{r['tokens_per_sec']:10,.0f} tokens/s{cpu}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--rounds", type=int, default=4, help="A B alternations per shape")
  parser.add_argument("--steps", type=int, default=2, help="steps timed per turn")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="PyTorch intra-op threads (default: every core, as XLA uses)")
  parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS,
                      help="llm-jax and the references to time (llm-jax is always timed)")
  parser.add_argument("--json", action="store_true", help="print one JSON object per shape")
  parser.add_argument("--decode", type=int, nargs="+", default=[], metavar="BATCH",
                      help="time decode steps at these batch sizes instead of train steps")
  parser.add_argument("--sample", action="store_true",
                      help="with --decode: also time sampling (temperature 1, top-p 0.95)")
  parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
  parser.add_argument("--shape", choices=list(SHAPES), help=argparse.SUPPRESS)
  args, overrides = parser.parse_known_args()
  args.frameworks = ["llm-jax"] + [f for f in args.frameworks if f != "llm-jax"]
  if len(args.frameworks) < 2:
    parser.error("--frameworks needs at least one PyTorch reference beside llm-jax.")
  if args.worker:
    _worker(args, overrides)
    return
  for shape in args.shapes:
    result = _compare(shape, args, overrides)
    if args.json:
      print(json.dumps(result), flush=True)
      continue
    print(f"{shape}: {result['params'] / 1e6:.1f}M params, {result['dtype']}, median of "
          f"{args.rounds} x {args.steps} steps per framework, alternating")
    if not args.decode:
      print(f"  batch {result['batch_size']} x {result['context_length']} tokens")
      _print_times(result, args.frameworks, per_token=False)
      for f in args.frameworks[1:]:
        print(f"  llm-jax / {f} tokens/s: {result[f'ratio_to_{f}']:.2f}x", flush=True)
      continue
    for row in result["decode"]:
      print(f"  decode batch {row['batch']}, context {result['context_length']}:")
      names = [f + SAMPLED * sample for sample in ([False, True] if args.sample else [False])
               for f in args.frameworks]
      _print_times(row, names, per_token=True)
      for f in args.frameworks[1:]:
        line = f"  llm-jax / {f} tokens/s: greedy {row[f'ratio_to_{f}']:.2f}x"
        if args.sample:
          line += f", top-p {row[f'ratio_to_{f}{SAMPLED}']:.2f}x"
        print(line)
      if args.sample:
        print("  sampled / greedy step time: " + ", ".join(
            f"{f} {row[f'sampled_over_greedy_{f}']:.2f}" for f in args.frameworks), flush=True)


if __name__ == "__main__":
  main()
