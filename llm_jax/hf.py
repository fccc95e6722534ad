"""Hugging Face Llama-family checkpoints in and out: `llm-jax hf import` and `hf export`.

Our model is a Llama: the tensors differ only in name and layout. Per layer (stacked on a
leading `layers` axis here), with N heads, K key/value heads, H = head_dim:

    model.layers.i.self_attn.q_proj [N*H, D]  ->  layers/attention/query [D, N, H]
    ...k_proj, v_proj [K*H, D]                ->  layers/attention/key, value [D, K, H]
    ...o_proj [D, N*H]                        ->  layers/attention/out [N, H, D]
    ...mlp.gate_proj, up_proj [F, D]          ->  layers/mlp/gate, up [D, F]
    ...mlp.down_proj [D, F]                   ->  layers/mlp/down [F, D]
    ...input_layernorm, post_attention_layernorm [D] -> layers/attention_norm, mlp_norm/scale
    model.embed_tokens [V, D] -> embedding;  model.norm [D] -> final_norm/scale
    lm_head [V, D] -> lm_head [D, V] (absent when the embeddings are tied)

Both sides rotate (i, i + H/2) pairs, so the query and key weights need no permutation.

Import streams: every device's shard of every parameter is read from the memory-mapped
safetensors files (`llm_jax.safetensors_files`), only the rows and columns it owns, so the
host never holds a second full copy, and on several hosts each process reads only its own
devices' shards. Export writes one tensor at a time into shards of at most 5 GB.
"""

import json
import math
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from llm_jax.parallel import checkpoint, sharding
from llm_jax import config as config_lib, safetensors_files
from llm_jax.data.hf_tokenizer import load_hf_tokenizer
from llm_jax.parallel.distributed import log
from llm_jax.errors import UserError
from llm_jax.model.transformer import ModelConfig, Transformer

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MAX_SHARD_BYTES = 5 * 10**9
DEFAULT_MAX_CONTEXT = 8192  # an import's context length unless asked: the KV cache's cap


# --- the tensors --------------------------------------------------------------------------

def _layer_names(i: int) -> dict[tuple[str, ...], str]:
  prefix = f"model.layers.{i}."
  return {("attention", "query"): prefix + "self_attn.q_proj.weight",
          ("attention", "key"): prefix + "self_attn.k_proj.weight",
          ("attention", "value"): prefix + "self_attn.v_proj.weight",
          ("attention", "out"): prefix + "self_attn.o_proj.weight",
          ("mlp", "gate"): prefix + "mlp.gate_proj.weight",
          ("mlp", "up"): prefix + "mlp.up_proj.weight",
          ("mlp", "down"): prefix + "mlp.down_proj.weight",
          ("attention_norm", "scale"): prefix + "input_layernorm.weight",
          ("mlp_norm", "scale"): prefix + "post_attention_layernorm.weight"}


def _ours_from_hf(path: tuple[str, ...], hf, index: tuple[slice, ...], head_dim: int):
  """Our parameter `path`'s block `index`, read from the HF tensor `hf` (a lazy slice)."""
  name = _kind(path)
  if name in ("query", "key", "value"):  # [D, heads, H] from [heads*H, D]
    d, n, _ = index
    rows = hf[n.start * head_dim:n.stop * head_dim, d]
    return rows.reshape(n.stop - n.start, head_dim, -1).transpose(2, 0, 1)
  if name == "out":  # [N, H, D] from [D, N*H]
    n, _, d = index
    columns = hf[d, n.start * head_dim:n.stop * head_dim]
    return columns.reshape(d.stop - d.start, n.stop - n.start, head_dim).transpose(1, 2, 0)
  if name in ("gate", "up", "down", "lm_head"):  # transposed
    return hf[index[1], index[0]].T
  return hf[index]  # embedding, norms: as they are


def _hf_from_ours(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """The HF layout of our (one layer's) parameter `value`."""
  name = _kind(path)
  if name in ("query", "key", "value"):
    return value.reshape(value.shape[0], -1).T
  if name == "out":
    return value.reshape(-1, value.shape[-1]).T
  if name in ("gate", "up", "down", "lm_head"):
    return value.T
  return value


def _tensor_names(model_config: ModelConfig) -> dict[tuple[str, ...], list[str]]:
  """{our parameter path: the HF names of its tensors (one per layer for stacked ones)}."""
  names = {("embedding",): ["model.embed_tokens.weight"],
           ("final_norm", "scale"): ["model.norm.weight"]}
  if not model_config.tie_embeddings:
    names[("lm_head",)] = ["lm_head.weight"]
  for path in _layer_names(0):
    names[("layers", *path)] = [_layer_names(i)[path] for i in range(model_config.num_layers)]
  return names


# --- config -------------------------------------------------------------------------------

def _read_json(path: pathlib.Path, what: str) -> dict:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise UserError(f"{path.parent} has no {path.name}; give a Hugging Face model directory "
                    f"({what}).") from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise UserError(f"{path} is not valid JSON; give an intact Hugging Face model "
                    "directory.") from None


def _rope(hf: dict) -> dict:
  """Our rotary keys from either layout transformers writes: rope_theta + rope_scaling, or
  rope_parameters."""
  parameters = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or parameters
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  keys = {"model.rope_theta": float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  if kind == "llama3":
    keys.update({"model.rope_scaling": "llama3",
                 "model.rope_scaling_factor": float(scaling["factor"]),
                 "model.rope_low_freq_factor": float(scaling["low_freq_factor"]),
                 "model.rope_high_freq_factor": float(scaling["high_freq_factor"]),
                 "model.rope_original_context": int(scaling["original_max_position_embeddings"])})
  elif kind != "default":
    raise UserError(f"rope_type {kind!r} is not supported; llm-jax imports Llama and Mistral "
                    "models with default or llama3 rotary scaling.")
  return keys


def config_from_hf(hf: dict, context_length: int | None, param_dtype: str):
  """Our config for an HF Llama/Mistral `config.json`; refuses what our model cannot be."""
  architectures = hf.get("architectures") or [hf.get("model_type", "unknown")]
  if architectures[0] not in ARCHITECTURES:
    raise UserError(f"{architectures[0]} is not supported; llm-jax imports "
                    f"{' and '.join(ARCHITECTURES)} checkpoints.")
  for key, what in (("attention_bias", "attention biases"), ("mlp_bias", "MLP biases"),
                    ("quantization_config", "quantized weights")):
    if hf.get(key):
      raise UserError(f"This checkpoint has {what}, which the Llama model of llm-jax does not; "
                      "import an unquantized Llama or Mistral checkpoint without biases.")
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"hidden_act={hf['hidden_act']!r} is not supported; llm-jax's MLP is "
                    "SwiGLU (silu).")
  context = min(hf.get("max_position_embeddings", DEFAULT_MAX_CONTEXT), DEFAULT_MAX_CONTEXT)
  context = context_length or context
  window = hf.get("sliding_window")
  if window and window < context:
    raise UserError(f"The checkpoint's sliding window of {window} tokens is shorter than the "
                    f"context of {context}; import with --context_length {window} or less.")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  overrides = {
      "model.vocab_size": hf["vocab_size"], "model.d_model": hf["hidden_size"],
      "model.num_layers": hf["num_hidden_layers"], "model.num_heads": heads,
      "model.num_kv_heads": hf.get("num_key_value_heads") or heads,
      "model.mlp_dim": hf["intermediate_size"], "model.context_length": context,
      "model.norm_eps": hf.get("rms_norm_eps", 1e-6),
      "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      "model.head_dim": 0 if head_dim * heads == hf["hidden_size"] else head_dim,
      "model.param_dtype": param_dtype, **_rope(hf)}
  config = config_lib.load_config(None, [f"{k}={v}" for k, v in overrides.items()])
  return config


def config_to_hf(config, tokenizer, dtype: str) -> dict:
  """The HF `config.json` of our config (Llama layout, rope_theta + rope_scaling)."""
  m = ModelConfig.from_config(config_lib.resolve(config, "cpu").model)
  hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim, "max_position_embeddings": m.context_length,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id, "torch_dtype": dtype}
  if m.rope_scaling == "llama3":
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                          "low_freq_factor": m.rope_low_freq_factor,
                          "high_freq_factor": m.rope_high_freq_factor,
                          "original_max_position_embeddings": m.rope_original_context}
  return hf


# --- import -------------------------------------------------------------------------------

class _Weights:
  """The tensors of an HF directory's safetensors files, memory-mapped."""

  def __init__(self, directory: pathlib.Path):
    index = directory / "model.safetensors.index.json"
    if index.exists():
      files = sorted(set(_read_json(index, "model.safetensors.index.json")["weight_map"]
                         .values()))
    elif (directory / "model.safetensors").exists():
      files = ["model.safetensors"]
    else:
      raise UserError(f"{directory} has no model.safetensors (or sharded files with "
                      "model.safetensors.index.json); give a directory saved with "
                      "save_pretrained.")
    self.tensors = {}
    for name in files:
      self.tensors.update(safetensors_files.read(directory / name))

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.tensors:
      raise UserError(f"The checkpoint has no tensor {name}; give a complete Llama or "
                      "Mistral checkpoint.")
    tensor = self.tensors[name]
    if tensor.shape != shape:
      raise UserError(f"Tensor {name} has shape {tensor.shape}, but config.json implies "
                      f"{shape}; the checkpoint and its config do not match.")
    return tensor


def _kind(path: tuple[str, ...]) -> str:
  return path[-2] if path[-1] == "scale" else path[-1]


def _hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape of (one layer of) our parameter `path` of `shape`."""
  kind = _kind(path)
  if kind in ("query", "key", "value"):
    return (shape[1] * shape[2], shape[0])
  if kind == "out":
    return (shape[2], shape[0] * shape[1])
  if kind in ("gate", "up", "down", "lm_head"):
    return shape[::-1]
  return shape


def _read_params(weights: _Weights, model: Transformer, mesh) -> dict:
  """The model's parameters, each device's shard read from the files on its own."""
  m = model.config
  names = _tensor_names(m)
  out = {}
  for path, leaf in traverse_util.flatten_dict(sharding.abstract_params(model, mesh)).items():
    stacked = path[0] == "layers"
    layer_shape = leaf.shape[1:] if stacked else leaf.shape
    tensors = [weights.get(n, _hf_shape(path, layer_shape)) for n in names[path]]

    def block(index, path=path, tensors=tensors, layer_shape=layer_shape, leaf=leaf):
      if path[0] != "layers":
        return _ours_from_hf(path, tensors[0], _full(index, layer_shape), m.head_dim).astype(
            leaf.dtype)
      rest = _full(index[1:], layer_shape)
      return np.stack([_ours_from_hf(path, tensors[i], rest, m.head_dim)
                       for i in range(*index[0].indices(len(tensors)))]).astype(leaf.dtype)

    out[path] = jax.make_array_from_callback(leaf.shape, leaf.sharding, block)
  return traverse_util.unflatten_dict(out)


def _full(index, shape) -> tuple[slice, ...]:
  """`index` with every slice's start and stop made explicit."""
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _new_directory(path: pathlib.Path, option: str) -> pathlib.Path:
  """A staging directory beside `path`, which must not exist or be empty; renamed onto it
  only when complete, so nothing is ever half-written at `path`."""
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise UserError(f"{option} {path} exists and is not empty; choose a new {option} "
                    "(nothing was written).")
  staging = path.with_name(f".{path.name}.partial")
  shutil.rmtree(staging, ignore_errors=True)  # left by an import or export that was killed
  staging.mkdir(parents=True)
  return staging


def _publish(staging: pathlib.Path, path: pathlib.Path) -> None:
  if path.exists():
    path.rmdir()  # empty, as _new_directory checked
  staging.rename(path)


def import_model(source, workdir, context_length: int | None = None) -> dict:
  """Imports the HF model directory `source` as the run directory `workdir`.

  The run holds config.json, the tokenizer and a checkpoint of the parameters at step 0
  (`train.init_from` and every inference command take it). Returns a summary.
  """
  source, workdir = pathlib.Path(source), pathlib.Path(workdir)
  if not source.is_dir():
    raise UserError(f"{source} is not a directory; give a local Hugging Face model directory.")
  hf = _read_json(source / "config.json", "config.json")
  weights = _Weights(source)
  dtypes = {t.dtype for t in weights.tensors.values()}
  # bfloat16 stays bfloat16; float16 widens to float32, which holds it exactly.
  param_dtype = "bfloat16" if dtypes == {np.dtype(ml_dtypes.bfloat16)} else "float32"
  config = config_from_hf(hf, context_length, param_dtype)
  tokenizer = load_hf_tokenizer(source)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise UserError(f"The tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
                    f"{config.model.vocab_size} rows; the checkpoint and tokenizer do not match.")
  config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  model = checkpoint.model_of(config)
  staging = _new_directory(workdir, "--workdir")
  try:
    with sharding.activate(mesh):
      params = _read_params(weights, model, mesh)
    saver = checkpoint.Checkpointer(staging / "checkpoints")
    saver.save_params(0, params, config_lib.to_json(config), tokenizer.to_bytes())
    saver.close()
    tokenizer.save(staging)
    (staging / "config.json").write_text(config_lib.to_json(config))
    _publish(staging, workdir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return {"params": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
          "param_dtype": param_dtype, "context_length": config.model.context_length,
          "tokenizer_size": tokenizer.vocab_size}


# --- export -------------------------------------------------------------------------------

def _shards(tensors: list[tuple], itemsize: int, max_bytes: int) -> list[list[tuple]]:
  """`tensors` (name, ..., shape) in order, cut into files of at most `max_bytes` each."""
  shards, size = [[]], 0
  for tensor in tensors:
    nbytes = math.prod(tensor[-1]) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(tensor)
    size += nbytes
  return shards


def export_model(workdir, out, step: int | None = None, dtype: str | None = None,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
  """Writes the run in `workdir` (its newest readable checkpoint, or `step`) to `out` as an
  HF Llama directory: config.json, safetensors shards with an index, tokenizer files."""
  from llm_jax.inference.run import load_run  # the run level: loads a checkpoint for use
  if dtype not in (None, *safetensors_files.DTYPES):
    raise UserError(f"--dtype={dtype} is not one of {', '.join(safetensors_files.DTYPES)}.")
  out = pathlib.Path(out)
  staging = _new_directory(out, "--out")
  try:
    run = load_run(workdir, step=step)
    if run.model.config.reward_head:
      raise UserError(f"{workdir} is a reward model; Hugging Face export writes causal "
                      "language models (LlamaForCausalLM), which have no reward head.")
    params = traverse_util.flatten_dict(run.params)
    target = np.dtype(safetensors_files.DTYPES[dtype or run.config.model.param_dtype])
    tensors = []  # (HF name, our path, layer or None, HF shape)
    for path, names in _tensor_names(run.model.config).items():
      stacked = path[0] == "layers"
      shape = _hf_shape(path, params[path].shape[1:] if stacked else params[path].shape)
      tensors += [(name, path, i if stacked else None, shape) for i, name in enumerate(names)]
    shards = _shards(tensors, target.itemsize, max_shard_bytes)

    def arrays(shard):  # one tensor at a time, as the file is written
      for _, path, layer, _ in shard:
        value = params[path] if layer is None else params[path][layer]
        yield _hf_from_ours(path, np.asarray(jax.device_get(value))).astype(target)

    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, shard in zip(files, shards):
      safetensors_files.write(staging / file, [(n, s, target) for n, _, _, s in shard],
                              arrays(shard))
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(math.prod(t[3]) for t in tensors)
                            * target.itemsize},
               "weight_map": {t[0]: f for f, shard in zip(files, shards) for t in shard}}
      (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config_to_hf(run.config, run.tokenizer, str(target))
    (staging / "config.json").write_text(json.dumps(hf, indent=2))
    run.tokenizer.export_hf(staging)
    _publish(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  log(f"Exported step {run.step} of {workdir} to {out}: {len(files)} safetensors file(s)")
  return {"step": run.step, "files": len(files), "dtype": str(target)}
