"""Loading, overriding, validating and resolving configs.

A config is an `ml_collections.ConfigDict` returned by `get_config(variant)` in a Python
file. Every key must be declared in `configs/base.py`; `--config.a.b=value` overrides are
parsed to the declared type. `validate` runs before anything compiles and raises `UserError`
with one sentence naming the key, the bad value and what would be valid.
"""

import ast
import difflib
import json
import math
import pathlib

import ml_collections

from llm_jax.model import flops
from llm_jax.configs import base
from llm_jax import paths
from llm_jax.errors import UserError

_BUNDLED_CONFIGS = pathlib.Path(base.__file__).parent
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "xla_blocked", "cudnn")
MATMUL_PRECISIONS = ("auto", "float32", "bfloat16")
ROPE_SCALINGS = ("none", "llama3")
MESH_AXES = ("data", "fsdp", "tensor")
OBJECTIVES = ("next_token", "reward", "dpo", "grpo")


def load_config(spec: str | None = None, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:variant]` (default: configs/base.py) and applies overrides.

  A path that does not exist relative to the working directory is looked up among the
  configs shipped with the package, so `configs/llama.py:llama3-8b` works from anywhere.
  With `train.init_from` and `train.model_from_init` set, the model keys (but execution-only
  ones and `reward_head`) are first those of the run it starts from, then the overrides
  apply: post-training needs no model keys, and `--config.model.context_length=...` still
  sets one.
  """
  config = base.get_config() if spec is None else _load_config_file(spec)
  _check_declared(config, base.get_config())
  for override in overrides:
    apply_override(config, override)
  if config.train.init_from and config.train.model_from_init:
    init_model = _model_of_run(config.train.init_from)
    if init_model.get("reward_head", False) and not config.model.reward_head:
      raise UserError(f"train.init_from={config.train.init_from} is a reward model, which has "
                      "no next-token head to start a language model from; start from the run "
                      "the reward model started from.")
    config = base.get_config() if spec is None else _load_config_file(spec)
    for key, value in init_model.items():
      if key in config.model and key not in EXECUTION_ONLY_MODEL_KEYS + ("reward_head",):
        config.model[key] = value  # the objective's preset decides whether the head is a reward
    for override in overrides:
      apply_override(config, override)
  return config


def _model_of_run(init_from: str) -> ml_collections.ConfigDict:
  """The model keys in the config.json of the run `init_from` names (or of the run whose
  checkpoints/STEP it names)."""
  path = pathlib.Path(init_from)
  saved = (path.parent.parent if path.parent.name == "checkpoints" else path) / "config.json"
  if not saved.is_file():
    raise UserError(f"train.init_from={init_from} is not a run directory with checkpoints; "
                    "point it at the --workdir of a finished run (or its checkpoints/STEP).")
  try:
    return from_json(saved.read_text()).model
  except (json.JSONDecodeError, TypeError, AttributeError):
    raise UserError(f"{saved} is not a readable config, so train.model_from_init cannot take "
                    "its model keys; set them yourself with train.model_from_init=false.") \
        from None


def _load_config_file(spec: str) -> ml_collections.ConfigDict:
  path_text, _, variant = spec.partition(":")
  path = pathlib.Path(path_text)
  if not path.exists() and (_BUNDLED_CONFIGS / path.name).exists():
    path = _BUNDLED_CONFIGS / path.name
  if not path.is_file():
    raise UserError(f"Config file {path_text!r} does not exist; pass --config PATH.py[:variant].")
  module = paths.import_file(path, f"_llm_jax_config_{path.stem}")
  if not hasattr(module, "get_config"):
    raise UserError(f"Config file {path} defines no get_config(); add one returning a ConfigDict.")
  try:
    config = module.get_config(variant or None)
  except ValueError as e:  # a config file's own message for an unknown variant
    raise UserError(str(e)) from None
  return config


def _check_declared(config, declared, prefix=""):
  for key, value in config.items():
    name = prefix + key
    if key not in declared:
      raise UserError(f"Config key {name!r} is not declared in configs/base.py; {_suggest(name)}")
    if isinstance(value, ml_collections.ConfigDict):
      _check_declared(value, declared[key], name + ".")


def _all_keys(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _all_keys(value, prefix + key + ".")
    else:
      yield prefix + key


def _suggest(name: str) -> str:
  close = difflib.get_close_matches(name, list(_all_keys(base.get_config())), n=3)
  if close:
    return "did you mean " + " or ".join(close) + "?"
  return "see configs/base.py for the declared keys."


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Applies one `a.b.c=value` override, parsing value to the declared type."""
  if "=" not in override:
    raise UserError(f"Override {override!r} has no value; write --config.KEY=VALUE.")
  name, text = override.split("=", 1)
  name = name.removeprefix("--").removeprefix("config.")
  *parents, leaf = name.split(".")
  node = config
  for part in parents:
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node or isinstance(
      node[leaf], ml_collections.ConfigDict):
    raise UserError(f"Unknown config key {name!r}; {_suggest(name)}")
  node[leaf] = _parse_value(name, text, node[leaf])


def _parse_value(name: str, text: str, current):
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError
    if isinstance(current, int):
      return int(float(text)) if float(text).is_integer() else int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    return type(current)(ast.literal_eval(text))
  except (ValueError, SyntaxError, TypeError):
    raise UserError(
        f"Config key {name!r} expects a {type(current).__name__}, got {text!r}."
    ) from None


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises UserError for the first problem found; run before building anything."""
  m, t, x = config.model, config.train, config.mesh
  positive = ["model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
              "model.num_kv_heads", "model.mlp_dim", "model.context_length", "train.steps",
              "train.batch_size", "train.grad_accum_steps", "train.log_every",
              "train.eval_tokens", "train.keep_checkpoints", "model.rope_theta",
              "train.learning_rate", "model.norm_eps", "model.attention_block_size",
              "model.rope_scaling_factor", "model.rope_low_freq_factor",
              "model.rope_high_freq_factor", "model.rope_original_context"]
  for name in positive:
    value = _get(config, name)
    if not value > 0:
      raise UserError(f"{name}={value} must be positive.")
  non_negative = ["train.warmup_steps", "train.eval_every", "train.checkpoint_every",
                  "model.scan_unroll", "model.head_dim",
                  "train.checkpoint_minutes",
                  "train.weight_decay", "train.grad_clip", "train.sample_tokens",
                  "train.sample_temperature", "train.min_lr_ratio", "train.seed"]
  for name in non_negative:
    value = _get(config, name)
    if value < 0:
      raise UserError(f"{name}={value} must be zero or positive.")
  if not m.head_dim and m.d_model % m.num_heads:
    raise UserError(f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; "
                    f"valid head counts are {_divisors(m.d_model)}, or set model.head_dim.")
  if m.head_dim % 2:
    raise UserError(f"model.head_dim={m.head_dim} must be even for rotary embeddings.")
  if flops.head_dim(m) % 2:
    raise UserError(f"head_dim = model.d_model / model.num_heads = {flops.head_dim(m)} "
                    "must be even for rotary embeddings; change num_heads or d_model, or set "
                    "model.head_dim.")
  if m.rope_high_freq_factor <= m.rope_low_freq_factor:
    raise UserError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
                    f"model.rope_low_freq_factor={m.rope_low_freq_factor}.")
  if m.num_heads % m.num_kv_heads:
    raise UserError(f"model.num_kv_heads={m.num_kv_heads} does not divide "
                    f"model.num_heads={m.num_heads}; valid values are {_divisors(m.num_heads)}.")
  for name, valid in (("model.dtype", DTYPES), ("model.param_dtype", DTYPES),
                      ("model.remat_policy", REMAT_POLICIES),
                      ("model.attention", ATTENTION_IMPLEMENTATIONS),
                      ("model.matmul_precision", MATMUL_PRECISIONS),
                      ("model.rope_scaling", ROPE_SCALINGS),
                      ("train.on_nonfinite", ("stop", "skip")),
                      ("objective.name", OBJECTIVES),
                      ("rl.reward_errors", ("stop", "zero"))):
    if _get(config, name) not in valid:
      raise UserError(f"{name}={_get(config, name)!r} is not one of {', '.join(valid)}.")
  if t.warmup_steps > t.steps:
    raise UserError(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}; "
                    "lower warmup_steps.")
  if not all(isinstance(s, int) and s > 0 for s in t.keep_steps):
    raise UserError(f"train.keep_steps={list(t.keep_steps)} must list positive step numbers, "
                    "e.g. [1000,5000].")
  if t.min_lr_ratio > 1:
    raise UserError(f"train.min_lr_ratio={t.min_lr_ratio} must be at most 1.")
  if not 0 < config.data.val_fraction < 1:
    raise UserError(f"data.val_fraction={config.data.val_fraction} must be between 0 and 1.")
  _validate_objective(config)

  shape = resolve_mesh_shape(x, num_devices)
  dp = shape["data"] * shape["fsdp"]
  if t.batch_size % t.grad_accum_steps:
    raise UserError(f"train.batch_size={t.batch_size} does not divide into "
                    f"train.grad_accum_steps={t.grad_accum_steps} microbatches.")
  micro = t.batch_size // t.grad_accum_steps
  if micro % dp:
    raise UserError(f"train.batch_size={t.batch_size} gives microbatches of {micro} sequences, "
                    f"which do not divide over mesh.data*mesh.fsdp={dp} devices; use a batch "
                    f"size that is a multiple of {dp * t.grad_accum_steps}.")
  tensor = shape["tensor"]
  for name in ("model.num_heads", "model.num_kv_heads", "model.mlp_dim", "model.vocab_size"):
    if _get(config, name) % tensor:
      raise UserError(f"{name}={_get(config, name)} does not divide over mesh.tensor={tensor}; "
                      "choose a tensor size that divides it.")
  if m.d_model % shape["fsdp"]:
    raise UserError(f"model.d_model={m.d_model} does not divide over mesh.fsdp={shape['fsdp']}; "
                    "choose an fsdp size that divides it.")


def _validate_objective(config) -> None:
  o, m = config.objective, config.model
  if (o.name == "reward") != m.reward_head:
    raise UserError(f"objective.name={o.name!r} with model.reward_head={m.reward_head}: a reward "
                    "model has the reward head and only it; set both (configs/posttrain.py:"
                    "reward does) or neither.")
  if o.name == "dpo" and not config.train.init_from:
    raise UserError("objective.name='dpo' needs train.init_from: the model DPO starts from is "
                    "also its reference.")
  if not o.dpo_beta > 0 or o.reward_centering < 0:
    raise UserError(f"objective.dpo_beta={o.dpo_beta} must be positive and "
                    f"objective.reward_centering={o.reward_centering} zero or positive.")
  if o.name == "grpo":
    _validate_rl(config)


def _validate_rl(config) -> None:
  r, t, context = config.rl, config.train, config.model.context_length
  if not r.reward:
    raise UserError("objective.name='grpo' needs rl.reward: 'module:function', "
                    "'file.py:function' or a reward-model run directory.")
  if r.group_size < 2:
    raise UserError(f"rl.group_size={r.group_size} must be at least 2: GRPO compares the "
                    "completions of a prompt with each other.")
  if t.batch_size % r.group_size:
    raise UserError(f"train.batch_size={t.batch_size} (completions per step) is not a multiple "
                    f"of rl.group_size={r.group_size}; use a multiple of it.")
  if not 1 <= r.max_completion_tokens < context:
    raise UserError(f"rl.max_completion_tokens={r.max_completion_tokens} must be at least 1 "
                    f"and leave room for a prompt in model.context_length={context}.")
  if r.kl_beta > 0 and not t.init_from:
    raise UserError(f"rl.kl_beta={r.kl_beta} holds the policy near its reference, "
                    "train.init_from; set init_from, or rl.kl_beta=0.")
  for name, ok, valid in (("rl.passes", r.passes >= 1, "at least 1"),
                          ("rl.clip_epsilon", r.clip_epsilon > 0, "positive"),
                          ("rl.kl_beta", r.kl_beta >= 0, "zero (no reference) or positive"),
                          ("rl.temperature", r.temperature > 0, "positive"),
                          ("rl.top_p", 0 < r.top_p <= 1, "in (0, 1]"),
                          ("rl.eval_prompts", r.eval_prompts >= 0, "zero or positive")):
    if not ok:
      raise UserError(f"{name}={_get(config, name)} must be {valid}.")


# Model keys whose 'auto' is decided by the platform the run is on (`resolve`).
PLATFORM_KEYS = ("attention", "matmul_precision", "scan_unroll")


def resolve(config: ml_collections.ConfigDict, platform: str | None = None
            ) -> ml_collections.ConfigDict:
  """A copy of `config` with every `auto` choice made for `platform` (default: JAX's backend).

  - `model.attention`: cuDNN flash attention on GPUs for bfloat16 models (it takes only 16-bit
    inputs), the causal-block kernel on CPUs (it skips the masked-out half of the scores,
    which XLA:CPU otherwise computes), XLA's fused attention elsewhere.
  - `model.matmul_precision`: bfloat16 operands on CPUs with bfloat16 dot instructions, where
    they about double matmul speed (a TPU's default float32 precision); float32 elsewhere.
  - `model.scan_unroll` 0: every layer unrolled on CPU, where the scan's bookkeeping (zero-
    filled stacks of saved activations, dynamic slices) is about a fifth of a small model's
    step; rolled on accelerators, where the matmuls dwarf it and compiles of deep models stay
    short. Parameters stay stacked either way.

  Only the model is built from the result; saved configs keep `auto`, so a run resumed on
  other hardware decides again.
  """
  if platform is None:
    import jax  # only here: importing this module must not start JAX
    platform = jax.default_backend()
  resolved = config.copy_and_resolve_references()
  m = resolved.model
  if m.attention == "auto":
    m.attention = ("cudnn" if platform == "gpu" and m.dtype == "bfloat16"
                   else "xla_blocked" if platform == "cpu" else "xla")
  if m.matmul_precision == "auto":
    from llm_jax.parallel import hardware
    m.matmul_precision = ("bfloat16" if platform == "cpu" and hardware.cpu_has_bf16_dot()
                          else "float32")
  if m.scan_unroll == 0:
    m.scan_unroll = m.num_layers if platform == "cpu" else 1
  m.scan_unroll = min(m.scan_unroll, m.num_layers)
  return resolved


def describe_resolved(resolved: ml_collections.ConfigDict) -> str:
  """The platform choices of a resolved config, for the log."""
  return ", ".join(f"model.{key}={resolved.model[key]}" for key in PLATFORM_KEYS)


def resolve_mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Returns {axis: size} with a -1 axis filled by the remaining devices."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise UserError(f"mesh.{axis}={size} must be positive or -1 (fill remaining devices).")
  if len(fill) > 1:
    raise UserError(f"Only one mesh axis may be -1, got {', '.join('mesh.' + a for a in fill)}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % fixed:
      raise UserError(f"The fixed mesh axes multiply to {fixed}, which does not divide the "
                      f"{num_devices} available devices; choose sizes whose product divides it.")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(f"mesh.data*mesh.fsdp*mesh.tensor = {fixed} but {num_devices} devices are "
                    "available; make the product equal the device count or set one axis to -1.")
  return sizes


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _divisors(n: int) -> str:
  return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


def objective_name(config: ml_collections.ConfigDict) -> str:
  """The objective a config trains, also of one saved before objectives had names."""
  return config.get("objective", {}).get("name", base.get_config().objective.name)


# Model keys that change how the parameters are computed with, not what they are or compute;
# they may change between runs of one workdir, and between a run and its init_from.
EXECUTION_ONLY_MODEL_KEYS = ("dtype", "remat_policy", "attention", "attention_block_size",
                             "scan_unroll", "matmul_precision")


def model_differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
  """Model keys whose values differ, as 'model.key: a -> b' strings, leaving out the
  execution-only ones. A key missing from one side (a config saved before the key existed)
  has its default there."""
  defaults = base.get_config().model
  keys = sorted((set(a.model.keys()) | set(b.model.keys())) - set(EXECUTION_ONLY_MODEL_KEYS))
  values = [(k, a.model.get(k, defaults.get(k)), b.model.get(k, defaults.get(k))) for k in keys]
  return [f"model.{k}: {x!r} -> {y!r}" for k, x, y in values if x != y]
