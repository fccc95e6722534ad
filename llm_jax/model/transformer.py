"""A Llama-style decoder in Flax linen: RMSNorm, rotary positions, GQA, SwiGLU.

Pure functional: `Transformer(ModelConfig).init/apply`, parameters in, logits out. Every
parameter and every large activation carries logical axis names (`batch`, `length`, `embed`,
`heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`); `llm_jax.parallel.sharding` maps them to
the mesh. Shape suffixes: B batch, T query length, S key length, D d_model, N query heads,
K kv heads, G = N/K queries per kv head, H head_dim, P = H/2 rotary pairs, F mlp_dim,
V vocab.

Packed sequences: `segment_ids` (0 = padding) keep documents from attending to each other,
and `positions` restart at each document, so a packed document sees exactly what it would
see alone.
"""

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model import flops
from llm_jax.model.kernels import blocked_causal_attention, head_major_attention, project

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The `model` section of a config, with every platform choice already made.

  `llm_jax.config.resolve` turns the config's `auto` values into plain ones for the platform
  the run is on; the model never looks at the platform itself.
  """
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  context_length: int
  head_dim: int = 0  # 0: d_model / num_heads; always the effective width once built
  rope_theta: float = 10_000.0
  rope_scaling: str = "none"  # none, or llama3 (Llama 3.1's long-context frequencies)
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_context: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "xla"  # xla, xla_blocked or cudnn
  attention_block_size: int = 64
  scan_unroll: int = 1  # layers per iteration of the scanned stack
  matmul_precision: str = "float32"  # float32, or bfloat16 operands with float32 results
  reward_head: bool = False  # a scalar reward per position instead of next-token logits

  def __post_init__(self):
    unresolved = [name for name in ("attention", "matmul_precision", "scan_unroll")
                  if getattr(self, name) in ("auto", 0)]
    if unresolved:
      raise ValueError(f"model.{unresolved[0]} is still 'auto'; build the model from "
                       "llm_jax.config.resolve(config).model.")
    object.__setattr__(self, "head_dim", flops.head_dim(self))  # frozen: set once, here

  @classmethod
  def from_config(cls, model_config) -> "ModelConfig":
    """Builds from the `model` section of a resolved config (an ml_collections ConfigDict)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in model_config.items() if k in fields})

  @property
  def bf16_operands(self) -> bool:
    """Whether float32 matmuls round their operands to bfloat16 (`kernels.bf16_matmul`);
    bfloat16 models have their own matmuls."""
    return self.matmul_precision == "bfloat16" and self.dtype == "float32"

  @property
  def matmul_dtype(self):
    """The dtype weights enter their matmuls in (`MATMUL_WEIGHTS`, and a tied embedding as
    the output head): decoding casts them to it once per call instead of once per step."""
    return jnp.dtype(jnp.bfloat16 if self.bf16_operands else self.dtype)


MATMUL_WEIGHTS = ("query", "key", "value", "out", "gate", "up", "down", "lm_head")


def _dense_init(in_axis, out_axis, scale=1.0):
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                          in_axis=in_axis, out_axis=out_axis)


def _param(module, name, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(module.config.param_dtype))


def _dense(x, w, num_contracted: int, config: ModelConfig, transpose_w: bool = False):
  """`x` contracted with the weight `w`, in the config's dtype and matmul precision."""
  return project(x, w.astype(config.dtype), num_contracted, config.bf16_operands, transpose_w)


class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    scale_D = _param(self, "scale", nn.initializers.ones, (x_BTD.shape[-1],), ("embed",))
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.config.norm_eps)
    return (x * scale_D.astype(jnp.float32)[None, None, :]).astype(self.config.dtype)


def rotary_inv_freq(c: ModelConfig):
  """Angular frequency of each rotated pair (i, i + H/2): 1 / rope_theta^(2i/H), or with
  `rope_scaling='llama3'` Llama 3.1's, which stretches the long wavelengths for long contexts.

  Computed on the host in float32 in transformers' order of operations, so that they equal
  transformers' bit for bit wherever torch's float32 pow is correctly rounded, as libm's is
  (angles are position * frequency: a last-bit difference grows with position)."""
  f32 = np.float32
  inv_freq_P = 1 / f32(c.rope_theta) ** (np.arange(0, c.head_dim, 2, dtype=f32) / f32(c.head_dim))
  if c.rope_scaling == "none":
    return inv_freq_P
  # Wavelengths (2 pi / frequency) shorter than rope_original_context / high_freq_factor
  # keep their frequency, ones longer than rope_original_context / low_freq_factor have it
  # divided by the factor, and those between are blended linearly in context / wavelength.
  # (torch divides a number by a tensor as the tensor's reciprocal times the number.)
  context, low, high = c.rope_original_context, c.rope_low_freq_factor, c.rope_high_freq_factor
  factor = f32(c.rope_scaling_factor)
  wavelength_P = (1 / inv_freq_P) * f32(2 * np.pi)
  kept_P = ((1 / wavelength_P) * f32(context) - f32(low)) / f32(high - low)
  blended_P = (1 - kept_P) * inv_freq_P / factor + kept_P * inv_freq_P
  return np.where(wavelength_P > f32(context / low), inv_freq_P / factor,
                  np.where(wavelength_P < f32(context / high), inv_freq_P, blended_P))


def apply_rotary(x_BTNH, positions_BT, inv_freq_P):
  """Rotates pairs (i, i + H/2) of each head by angle position * inv_freq_P[i]."""
  angles_BTP = positions_BT.astype(jnp.float32)[..., None] * inv_freq_P[None, None, :]
  sin, cos = jnp.sin(angles_BTP)[:, :, None, :], jnp.cos(angles_BTP)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)


def attention_mask(segment_ids_BT):
  """True where query t may attend key s: causal and within the same segment."""
  length = segment_ids_BT.shape[1]
  causal_TS = jnp.tril(jnp.ones((length, length), dtype=bool))
  same_segment_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_TS[None] & same_segment_BTS


class Attention(nn.Module):
  """Grouped-query causal attention.

  Training and scoring attend within the call's own tokens, masked by segment. Decoding
  (`decode=True`) also writes each token's key and value into a per-row cache of
  `context_length` slots at its position (the `cache` collection) and attends to every slot
  up to that position; a row's slots below its current position always hold its own tokens.
  The kernel of training and scoring is `config.attention` (`kernels` has the blocked one);
  decoding uses `kernels.head_major_attention` on the cache, which is kept in the layouts its
  two matmuls read without a copy: keys [B, K, H, S], values [B, K, S, H].
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, decode: bool = False):
    c = self.config
    D, N, K, H = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    residual_scale = 1.0 / (2 * c.num_layers)  # GPT-2: keep the residual stream's variance flat
    wq_DNH = _param(self, "query", _dense_init(0, (1, 2)), (D, N, H),
                    ("embed", "heads", "head_dim"))
    wk_DKH = _param(self, "key", _dense_init(0, (1, 2)), (D, K, H),
                    ("embed", "kv_heads", "head_dim"))
    wv_DKH = _param(self, "value", _dense_init(0, (1, 2)), (D, K, H),
                    ("embed", "kv_heads", "head_dim"))
    wo_NHD = _param(self, "out", _dense_init((0, 1), 2, residual_scale), (N, H, D),
                    ("heads", "head_dim", "embed"))
    q_BTNH = _dense(x_BTD, wq_DNH, 1, c)
    k_BSKH = _dense(x_BTD, wk_DKH, 1, c)
    v_BSKH = _dense(x_BTD, wv_DKH, 1, c)
    q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "length", "heads", "head_dim"))
    k_BSKH = nn.with_logical_constraint(k_BSKH, ("batch", "length", "kv_heads", "head_dim"))
    v_BSKH = nn.with_logical_constraint(v_BSKH, ("batch", "length", "kv_heads", "head_dim"))
    inv_freq_P = rotary_inv_freq(c)
    q_BTNH = apply_rotary(q_BTNH, positions_BT, inv_freq_P)
    k_BSKH = apply_rotary(k_BSKH, positions_BT, inv_freq_P)

    if decode:
      k_BKHS, v_BKSH = self._write_cache(k_BSKH, v_BSKH, positions_BT)
      mask_BTS = jnp.arange(v_BKSH.shape[2])[None, None, :] <= positions_BT[:, :, None]
      B, T = positions_BT.shape
      q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
      out_BKGTH = head_major_attention(q_BKGTH, k_BKHS, v_BKSH, mask_BTS, keys_transposed=True)
      out_BTNH = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    elif c.attention == "xla_blocked":
      out_BTNH = blocked_causal_attention(q_BTNH, k_BSKH, v_BSKH,
                                          attention_mask(segment_ids_BT), c.attention_block_size)
    else:
      # Training masks are causal too; saying so lets cuDNN skip the masked-out half.
      out_BTNH = jax.nn.dot_product_attention(
          q_BTNH, k_BSKH, v_BSKH, mask=attention_mask(segment_ids_BT)[:, None], is_causal=True,
          implementation=c.attention)
    out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "length", "heads", "head_dim"))
    return _dense(out_BTNH, wo_NHD, 2, c)

  def _write_cache(self, k_BTKH, v_BTKH, positions_BT):
    """Stores this call's keys/values at their positions; returns the whole cache: keys
    [B, K, H, S] and values [B, K, S, H]."""
    c = self.config
    B, K, S, H = k_BTKH.shape[0], c.num_kv_heads, c.context_length, c.head_dim
    rows_B1 = jnp.arange(B)[:, None]
    caches = []
    # Indices split by slices put their [B, T] axes first: either update is [B, T, K, H].
    for name, new_BTKH, shape, axes, at in (
        ("key", k_BTKH, (B, K, H, S), ("batch", "kv_heads", "head_dim", "length"),
         (rows_B1, slice(None), slice(None), positions_BT)),
        ("value", v_BTKH, (B, K, S, H), ("batch", "kv_heads", "length", "head_dim"),
         (rows_B1, slice(None), positions_BT))):
      cache = self.variable("cache", name, jnp.zeros, shape, new_BTKH.dtype)
      cache.value = nn.with_logical_constraint(cache.value.at[at].set(new_BTKH), axes)
      caches.append(cache.value)
    return caches


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    c = self.config
    D, F = c.d_model, c.mlp_dim
    w_gate_DF = _param(self, "gate", _dense_init(0, 1), (D, F), ("embed", "mlp"))
    w_up_DF = _param(self, "up", _dense_init(0, 1), (D, F), ("embed", "mlp"))
    w_down_FD = _param(self, "down", _dense_init(0, 1, 1.0 / (2 * c.num_layers)), (F, D),
                       ("mlp", "embed"))
    gate_BTF = _dense(x_BTD, w_gate_DF, 1, c)
    up_BTF = _dense(x_BTD, w_up_DF, 1, c)
    hidden_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
    return _dense(hidden_BTF, w_down_FD, 1, c)


class Block(nn.Module):
  """Pre-norm block; the (carry, output) signature lets nn.scan stack it over layers."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, decode: bool = False):
    h = Attention(self.config, name="attention")(
        RMSNorm(self.config, name="attention_norm")(x_BTD), segment_ids_BT, positions_BT,
        decode)
    x_BTD = x_BTD + h
    x_BTD = x_BTD + MLP(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x_BTD))
    return nn.with_logical_constraint(x_BTD, ("batch", "length", "embed")), None


class Transformer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, decode: bool = False):
    """Logits [B, T, V] for next-token prediction at every position; with
    `config.reward_head`, a reward model's scalar score [B, T] (float32) at every position.

    With `decode=True` (apply with `mutable=["cache"]`), keys and values are also cached, and
    attention covers every cached position up to each token's own (see `Attention`).
    """
    c = self.config
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embedding_VD = _param(self, "embedding", nn.initializers.normal(c.d_model**-0.5),
                          (c.vocab_size, c.d_model), ("vocab", "embed"))
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(c.dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))

    block = Block
    if c.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat_policy],
                       prevent_cse=not c.scan_layers, static_argnums=(4,))
    if c.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers,
                      unroll=c.scan_unroll,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTD, _ = stack(c, name="layers")(x_BTD, segment_ids_BT, positions_BT, decode)
    else:
      for i in range(c.num_layers):
        x_BTD, _ = block(c, name=f"layers_{i}")(x_BTD, segment_ids_BT, positions_BT, decode)

    x_BTD = RMSNorm(c, name="final_norm")(x_BTD)
    if c.reward_head:  # starts at zero: every answer scores 0 until training says otherwise
      head_D = _param(self, "reward_head", nn.initializers.zeros, (c.d_model,), ("embed",))
      rewards_BT = jnp.einsum("btd,d->bt", x_BTD.astype(jnp.float32), head_D.astype(jnp.float32))
      return nn.with_logical_constraint(rewards_BT, ("batch", "length"))
    if c.tie_embeddings:
      logits_BTV = _dense(x_BTD, embedding_VD, 1, c, transpose_w=True)
    else:
      head_DV = _param(self, "lm_head", _dense_init(0, 1), (c.d_model, c.vocab_size),
                       ("embed", "vocab"))
      logits_BTV = _dense(x_BTD, head_DV, 1, c)
    return nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))
