"""Sweeps: a grid of configs trained one after another, each in its own workdir.

A sweep file (`configs/sweeps/x.py`) defines `get_sweep()` returning a `Sweep`: a base config
spec, overrides shared by every member, and named members, each a dict of `KEY: value`
overrides built with `grid`, `zipped` and `product`. A member may fix a compute budget with
the reserved key `flops_budget`: its `train.steps` becomes
`flops_budget / (flops.flops_per_token * batch_size * context_length)` and its warmup a fixed
fraction of those steps, so every member's learning-rate schedule spans its own run.

`run` checks every member (unknown keys, invalid values, budgets too small for one step)
before the first one trains, then trains them in order with `llm_jax.train.loop.train`:

    SWEEP_DIR/tokenizer.model    one tokenizer shared by all members (unless the sweep sets one)
    SWEEP_DIR/<name>/            the member's workdir: config, checkpoints, metrics
    SWEEP_DIR/<name>/result.json written once, when the member finished all its steps
    SWEEP_DIR/sweep.jsonl        one row per member, rebuilt from the members' state

A member with `result.json` is skipped; any other member resumes from its newest checkpoint,
because `train` always does. `sweep.jsonl` is a summary derived from the workdirs (rewritten
atomically after each member); the workdirs are never deleted or overwritten.
"""

import dataclasses
import itertools
import json
import pathlib
import re
import shlex
import sys
import time
from typing import Any, Iterable

from llm_jax import config as config_lib, paths
from llm_jax.model import flops
from llm_jax.errors import UserError

BUDGET_KEY = "flops_budget"  # reserved member key: a FLOPs budget, not a config key
RESULT_FILE = "result.json"
ATTEMPTS_FILE = "sweep_attempts.jsonl"
SWEEP_FUNCTION = "get_sweep"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


# --- grid helpers: each returns a list of override dicts -----------------------------------

def grid(**axes: Iterable) -> list[dict]:
  """The Cartesian product of the axes: `grid(a=[1, 2], b=[3])` -> [{a:1,b:3}, {a:2,b:3}].

  Keyword names cannot hold dots, so write `grid(**{"model.d_model": [64, 128]})`.
  """
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zipped(**axes: Iterable) -> list[dict]:
  """Values taken together, position by position: all axes must have the same length."""
  columns = {key: list(values) for key, values in axes.items()}
  lengths = {len(values) for values in columns.values()}
  if len(lengths) > 1:
    raise UserError(f"zipped() axes have different lengths "
                    f"({', '.join(f'{k}: {len(v)}' for k, v in columns.items())}); give every "
                    "axis the same number of values.")
  keys = list(columns)
  return [dict(zip(keys, values)) for values in zip(*columns.values())]


def product(*groups: list[dict]) -> list[dict]:
  """Every combination of one dict from each group, merged; a key set twice is an error."""
  members = []
  for combination in itertools.product(*groups):
    merged = {}
    for part in combination:
      clash = set(merged) & set(part)
      if clash:
        raise UserError(f"product() sets {sorted(clash)[0]!r} in two groups; set each key in "
                        "one group only.")
      merged.update(part)
    members.append(merged)
  return members


MODEL_SHAPE_KEYS = ("model.d_model", "model.num_layers", "model.num_heads",
                    "model.num_kv_heads", "model.mlp_dim")


def model_shapes(shapes: Iterable[tuple]) -> list[dict]:
  """Model sizes from (d_model, num_layers, num_heads, num_kv_heads, mlp_dim) tuples."""
  shapes = list(shapes)
  return zipped(**{key: [shape[i] for shape in shapes] for i, key in enumerate(MODEL_SHAPE_KEYS)})


def default_name(overrides: dict) -> str:
  """A workdir-safe name from the overrides' leaf keys and values, e.g. `d_model=64-lr=0.003`."""
  parts = []
  for key, value in overrides.items():
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    parts.append(f"{key.rsplit('.', 1)[-1]}={text}".replace("/", "_").replace(" ", ""))
  return "-".join(parts) or "base"


def named(members: list[dict], name=default_name) -> dict[str, dict]:
  """{name: overrides} with names from `name(overrides)` (a function or a format string)."""
  result = {}
  for overrides in members:
    if isinstance(name, str):
      text = name.format(**{k.rsplit(".", 1)[-1]: v for k, v in overrides.items()})
    else:
      text = name(overrides)
    if text in result:
      raise UserError(f"Two sweep members are both named {text!r}; make the names unique.")
    result[text] = overrides
  return result


# --- the sweep and its members --------------------------------------------------------------

@dataclasses.dataclass
class Sweep:
  """What a sweep file's `get_sweep()` returns.

  Attributes:
    members: {name: {KEY: value}} of member overrides (see `named`); KEY is a config key or
      `flops_budget`.
    base: the base config spec `path.py[:variant]` (None: configs/base.py).
    overrides: {KEY: value} applied to every member before its own overrides.
    warmup_fraction: with a `flops_budget`, warmup steps as a share of the member's steps.
  """
  members: dict[str, dict]
  base: str | None = None
  overrides: dict = dataclasses.field(default_factory=dict)
  warmup_fraction: float = 0.05


@dataclasses.dataclass
class Member:
  """One resolved member: its config, where it trains and what it costs."""
  name: str
  overrides: dict
  override_args: list[str]  # every `KEY=VALUE` applied to the base, resolved steps included
  config: Any
  workdir: pathlib.Path

  def cost(self) -> dict:
    """Parameters, tokens and training FLOPs from llm_jax.model.flops."""
    m, t = self.config.model, self.config.train
    tokens = t.steps * t.batch_size * m.context_length
    return {**flops.param_counts(m), "tokens": tokens,
            "flops": flops.flops_per_token(m) * tokens}


def _format_value(value) -> str:
  if isinstance(value, (list, tuple)):
    return "[" + ",".join(_format_value(v) for v in value) + "]"
  return repr(value) if isinstance(value, float) else str(value)


def load_sweep(path: str) -> Sweep:
  """Runs the sweep file and returns its `get_sweep()`."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise UserError(f"Sweep file {path!r} does not exist; pass a configs/sweeps/NAME.py file.")
  module = paths.import_file(file, f"_llm_jax_sweep_{file.stem}")
  if not hasattr(module, SWEEP_FUNCTION):
    raise UserError(f"Sweep file {file} defines no {SWEEP_FUNCTION}(); add one returning "
                    "llm_jax.tools.sweep.Sweep(members=..., base=..., overrides=...).")
  sweep = getattr(module, SWEEP_FUNCTION)()
  if not isinstance(sweep, Sweep):
    raise UserError(f"{SWEEP_FUNCTION}() in {file} returned {type(sweep).__name__}; return an "
                    "llm_jax.tools.sweep.Sweep.")
  if not sweep.members:
    raise UserError(f"{SWEEP_FUNCTION}() in {file} returned no members; add at least one.")
  return sweep


def resolve(sweep: Sweep, sweep_dir: pathlib.Path, num_devices: int) -> list[Member]:
  """Every member's validated config, in order; raises UserError naming the first bad member.

  Nothing is written: this runs for every member before any of them trains.
  """
  tokenizer_args = [] if _base_sets_tokenizer(sweep) else [
      f"data.tokenizer={sweep_dir / 'tokenizer.model'}"]
  members = []
  for name, overrides in sweep.members.items():
    if not _NAME_PATTERN.match(name):
      raise UserError(f"Sweep member name {name!r} is not a safe directory name; use letters, "
                      "digits and . _ = + - only.")
    try:
      members.append(_resolve_member(sweep, name, overrides, sweep_dir, num_devices,
                                     tokenizer_args))
    except UserError as e:
      raise UserError(f"Sweep member {name!r}: {e}") from None
  return members


def select(members: list[Member], only: list[str]) -> list[Member]:
  """The members named in `only` (all if empty); an unknown name is an error."""
  names = [m.name for m in members]
  unknown = [name for name in only if name not in names]
  if unknown:
    raise UserError(f"--only {unknown[0]!r} is not a member of this sweep; members are "
                    f"{', '.join(names)}.")
  return [m for m in members if not only or m.name in only]


def _base_sets_tokenizer(sweep: Sweep) -> bool:
  config = config_lib.load_config(sweep.base, [])
  return bool(config.data.tokenizer) or "data.tokenizer" in sweep.overrides


def _resolve_member(sweep, name, overrides, sweep_dir, num_devices, tokenizer_args) -> Member:
  merged = {**sweep.overrides, **overrides}
  budget = merged.pop(BUDGET_KEY, None)
  args = tokenizer_args + [f"{key}={_format_value(value)}" for key, value in merged.items()]
  config = config_lib.load_config(sweep.base, args)
  if budget is not None:
    t, m = config.train, config.model
    tokens_per_step = t.batch_size * m.context_length
    step_flops = flops.flops_per_token(m) * tokens_per_step
    steps = int(budget // step_flops)
    if steps < 1:
      raise UserError(f"flops_budget={budget:.3g} is smaller than one step of this model "
                      f"({step_flops:.3g} FLOPs); raise the budget or shrink the model.")
    warmup = min(steps, max(1, round(sweep.warmup_fraction * steps)))
    args += [f"train.steps={steps}", f"train.warmup_steps={warmup}"]
    config_lib.apply_override(config, args[-2])
    config_lib.apply_override(config, args[-1])
  config_lib.validate(config, num_devices)
  return Member(name, overrides, args, config, sweep_dir / name)


# ---------------------------------------------------------------------------------------------
# State of members on disk and the summary table.


def _newest_checkpoint_step(workdir: pathlib.Path) -> int:
  # Step directory names, as Orbax publishes them once complete; opening a Checkpointer just
  # to list them would create directories and start its background threads.
  steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps, default=0)


def _attempts(workdir: pathlib.Path) -> list[dict]:
  path = workdir / ATTEMPTS_FILE
  lines = path.read_text().splitlines() if path.exists() else []
  return [json.loads(line) for line in lines if line.strip()]


def _last_metrics(workdir: pathlib.Path) -> dict:
  """The newest logged train loss and validation loss in the member's metrics.jsonl."""
  from llm_jax.train.metrics import read_metrics
  rows = read_metrics(workdir) if (workdir / "metrics.jsonl").exists() else []
  return {key: row[key] for row in rows for key in ("loss", "val_loss") if key in row}


def member_row(member: Member) -> dict:
  """The member's sweep.jsonl row: its result if finished, else its state so far."""
  result = member.workdir / RESULT_FILE
  if result.exists():
    return json.loads(result.read_text())
  attempts = _attempts(member.workdir)
  done = _newest_checkpoint_step(member.workdir)
  status = "pending" if not attempts and not done else (
      attempts[-1]["status"] if attempts else "interrupted")
  metrics = _last_metrics(member.workdir)
  return {"name": member.name, "status": status, "overrides": member.overrides,
          **member.cost(), "steps": member.config.train.steps, "steps_done": done,
          "train_loss": metrics.get("loss"), "val_loss": metrics.get("val_loss"),
          "wall_s": sum(a["wall_s"] for a in attempts)}


def write_table(sweep_dir: pathlib.Path, members: list[Member]) -> pathlib.Path:
  """Rewrites SWEEP_DIR/sweep.jsonl atomically from the members' workdirs."""
  path = sweep_dir / "sweep.jsonl"
  paths.write_atomically(path, "".join(json.dumps(member_row(m)) + "\n" for m in members))
  return path


# --- running, dry runs and commands ---------------------------------------------------------

def train_command(member: Member, base: str | None) -> str:
  """The `llm-jax train` command that trains this member on its own."""
  parts = ["llm-jax", "train"]
  if base is not None:
    parts += ["--config", base]
  parts += [f"--config.{arg}" for arg in member.override_args]
  parts += ["--workdir", str(member.workdir)]
  return " ".join(shlex.quote(p) for p in parts)


def tokenizer_command(sweep: Sweep, sweep_dir: pathlib.Path) -> str | None:
  """The command that trains the shared tokenizer, or None if the sweep names its own."""
  if _base_sets_tokenizer(sweep):
    return None
  config = config_lib.load_config(sweep.base, [
      f"{k}={_format_value(v)}" for k, v in sweep.overrides.items() if k.startswith("data.")])
  parts = ["llm-jax", "tokenizer", "train", "--source", config.data.source,
           "--vocab_size", str(config.model.vocab_size), "--out",
           str(sweep_dir / "tokenizer.model"), "--sample_bytes",
           str(config.data.tokenizer_sample_bytes), "--text_key", config.data.text_key,
           "--seed", str(config.train.seed)]
  return " ".join(shlex.quote(p) for p in parts)


def _prepare_shared_tokenizer(sweep: Sweep, members: list[Member],
                              sweep_dir: pathlib.Path) -> None:
  """Trains SWEEP_DIR/tokenizer.model once, so every member reads the same token stream."""
  path = sweep_dir / "tokenizer.model"
  if _base_sets_tokenizer(sweep) or path.exists():
    return
  from llm_jax.data import sources, tokenizer
  config = members[0].config
  print(f"Training the sweep's shared {config.model.vocab_size}-piece tokenizer", file=sys.stderr)
  tokenizer.train_on_sources(sources.open_sources(config.data), config.model.vocab_size,
                             config.data.tokenizer_sample_bytes, config.train.seed).save(path)


def describe(members: list[Member]) -> str:
  """A table of the members: name, parameters, steps, tokens, FLOPs, tokens per parameter."""
  lines = [f"{'member':<28} {'params':>10} {'steps':>7} {'tokens':>11} {'FLOPs':>9} "
           f"{'tok/param':>9}  status"]
  total = 0.0
  for member in members:
    cost, row = member.cost(), member_row(member)
    total += cost["flops"]
    lines.append(f"{member.name:<28} {cost['params']:>10,} {member.config.train.steps:>7} "
                 f"{cost['tokens']:>11,} {cost['flops']:>9.2e} "
                 f"{cost['tokens'] / cost['params']:>9.1f}  {row['status']}")
  lines.append(f"{len(members)} members, {total:.3g} training FLOPs in all")
  return "\n".join(lines)


def run(sweep: Sweep, members: list[Member], sweep_dir: pathlib.Path,
        only: list[str] = ()) -> list[dict]:
  """Trains the members (those named in `only`, if given) in order, skipping finished ones.

  Returns the sweep.jsonl rows of all members; the table always lists every member. A member
  that raises UserError (e.g. a non-finite loss) is recorded as failed and the
  sweep goes on; a member stopped by SIGTERM/SIGINT (checkpoint saved) stops the sweep.
  """
  from llm_jax.train.loop import train  # heavy import, only when training
  sweep_dir.mkdir(parents=True, exist_ok=True)
  _prepare_shared_tokenizer(sweep, members, sweep_dir)
  write_table(sweep_dir, members)
  chosen = select(members, only)
  for index, member in enumerate(chosen):
    if (member.workdir / RESULT_FILE).exists():
      print(f"[{index + 1}/{len(chosen)}] {member.name}: finished, skipped", file=sys.stderr)
      continue
    start_step = _newest_checkpoint_step(member.workdir)
    print(f"[{index + 1}/{len(chosen)}] {member.name}: "
          f"{'resuming from step ' + str(start_step) if start_step else 'starting'} "
          f"({member.config.train.steps} steps)", file=sys.stderr)
    started = time.perf_counter()
    error = None
    try:
      summary = train(member.config, member.workdir)
    except UserError as e:
      summary, error = {}, str(e)
    wall_s = time.perf_counter() - started
    done = _newest_checkpoint_step(member.workdir)
    finished = error is None and done == member.config.train.steps
    status = "finished" if finished else ("failed" if error else "interrupted")
    attempt = {"start_step": start_step, "end_step": done, "wall_s": wall_s, "status": status}
    if error:
      attempt["error"] = error
    member.workdir.mkdir(parents=True, exist_ok=True)
    with (member.workdir / ATTEMPTS_FILE).open("a") as f:
      f.write(json.dumps(attempt) + "\n")
    if finished:
      _write_result(member, summary)
    write_table(sweep_dir, members)
    if error:
      print(f"[{index + 1}/{len(chosen)}] {member.name} failed: {error}", file=sys.stderr)
    elif not finished:
      print(f"Sweep stopped during {member.name} at step {done}; run the same command again "
            "to resume it.", file=sys.stderr)
      break
  return [member_row(m) for m in chosen]


def _write_result(member: Member, summary: dict) -> None:
  metrics = _last_metrics(member.workdir)
  row = member_row(member)  # cost, steps and summed wall time of every attempt
  row.update(status="finished", steps_done=member.config.train.steps,
             train_loss=summary["loss"] if "loss" in summary else metrics.get("loss"),
             val_loss=summary["val_loss"] if "val_loss" in summary else metrics.get("val_loss"))
  paths.write_atomically(member.workdir / RESULT_FILE, json.dumps(row, indent=1) + "\n")


def default_sweep_dir(path: str) -> pathlib.Path:
  return pathlib.Path("runs") / "sweeps" / pathlib.Path(path).stem

