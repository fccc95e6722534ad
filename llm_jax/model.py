"""A Llama-style decoder in Flax linen: RMSNorm, rotary positions, GQA, SwiGLU.

Pure functional: `Transformer(ModelConfig).init/apply`, parameters in, logits out. Every
parameter and every large activation carries logical axis names (`batch`, `length`, `embed`,
`heads`, `kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`); `llm_jax.sharding` maps them to
the mesh. Shape suffixes: B batch, T query length, S key length, D d_model, N query heads,
K kv heads, G = N/K queries per kv head, H head_dim, F mlp_dim, V vocab.

Packed sequences: `segment_ids` (0 = padding) keep documents from attending to each other,
and `positions` restart at each document, so a packed document sees exactly what it would
see alone.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax import hardware

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  context_length: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "auto"
  attention_block_size: int = 64
  scan_unroll: int = 0
  matmul_precision: str = "auto"

  @classmethod
  def from_config(cls, model_config) -> "ModelConfig":
    """Builds from the `model` section of a config (an ml_collections ConfigDict)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in model_config.items() if k in fields})

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def _dense_init(in_axis, out_axis, scale=1.0):
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                          in_axis=in_axis, out_axis=out_axis)


def project(x, w, num_contracted: int, bf16_operands: bool = False, transpose_w: bool = False):
  """Contracts the last `num_contracted` axes of x with the first ones of w (last ones of w
  if `transpose_w`).

  Written as one 2-D matmul over flattened axes: XLA:CPU runs the backward pass of this form
  about twice as fast as the equivalent multi-axis einsum, and it is the same op elsewhere.
  With `bf16_operands`, float32 x and w go through `bf16_matmul`.
  """
  lead = x.shape[:x.ndim - num_contracted]
  x_MK = x.reshape(math.prod(lead), -1)
  if transpose_w:
    w_KN = w.reshape(-1, x_MK.shape[1])
    out = w.shape[:w.ndim - num_contracted]
  else:
    w_KN = w.reshape(x_MK.shape[1], -1)
    out = w.shape[num_contracted:]
  if bf16_operands:
    y = bf16_matmul(x_MK, w_KN, transpose_w)
  else:
    y = x_MK @ (w_KN.T if transpose_w else w_KN)
  return y.reshape(*lead, *out)


def bf16_operands(config: ModelConfig) -> bool:
  """Whether the model's float32 matmuls round their operands to bfloat16 (`bf16_matmul`).

  `matmul_precision` 'auto' does so on CPUs with bfloat16 dot instructions, where it about
  doubles matmul speed; accelerators have their own fast paths ('auto' leaves them alone).
  """
  precision = config.matmul_precision
  if precision == "auto":
    precision = "bfloat16" if hardware.cpu_has_bf16_dot() else "float32"
  return precision == "bfloat16" and config.dtype == "float32"


def _bf16_dot(a, b, contract_a: int, contract_b: int):
  dims = (((contract_a,), (contract_b,)), ((), ()))
  return jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
                             preferred_element_type=jnp.float32)


def _transposed(x_MK):
  """x.T as a real copy. XLA would fold a plain transpose into the consuming matmul, which
  XLA:CPU then runs as a slow float32 dot; through a 3-D transpose it stays a bf16 one."""
  M, K = x_MK.shape
  return jnp.transpose(x_MK.reshape(M, K, 1), (1, 0, 2)).reshape(K, M)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_matmul(x_MK, w, transpose_w: bool = False):
  """x @ w (x @ w.T if `transpose_w`) for float32 x and w, with operands rounded to bfloat16
  and a float32 result.

  This is a TPU's default float32 matmul precision. The gradient's matmuls round their
  operands the same way (the incoming gradient too) and also accumulate in float32; the
  parameter and input gradients come back as float32. CPUs with bfloat16 dot instructions
  (AVX512-BF16, AMX) run these about twice as fast as float32 matmuls, while the model's
  activations, gradients and optimizer stay float32. Every matmul here is in a layout that
  XLA:CPU's fast bf16 kernels take (contracting the left operand's last axis).
  """
  return _bf16_matmul_forward(x_MK, w, transpose_w)[0]


def _bf16_matmul_forward(x_MK, w, transpose_w):
  x16, w16 = x_MK.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return _bf16_dot(x16, w16, 1, 1 if transpose_w else 0), (x16, w16)


def _bf16_matmul_backward(transpose_w, residuals, g_MN):
  x16, w16 = residuals
  g16 = g_MN.astype(jnp.bfloat16)
  if transpose_w:  # w is [N, K]
    return _bf16_dot(g16, w16, 1, 0), _bf16_dot(_transposed(g16), x16, 1, 0)
  return _bf16_dot(g16, w16, 1, 1), _bf16_dot(_transposed(x16), g16, 1, 0)


bf16_matmul.defvjp(_bf16_matmul_forward, _bf16_matmul_backward)


def _param(module, name, init, shape, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(module.config.param_dtype))


class RMSNorm(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    scale_D = _param(self, "scale", nn.initializers.ones, (x_BTD.shape[-1],), ("embed",))
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.config.norm_eps)
    return (x * scale_D.astype(jnp.float32)).astype(self.config.dtype)


def apply_rotary(x_BTNH, positions_BT, theta: float):
  """Rotates pairs (i, i + H/2) of each head by angle position * theta^(-2i/H)."""
  half = x_BTNH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  sin, cos = jnp.sin(angles_BTF)[:, :, None, :], jnp.cos(angles_BTF)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)


def attention_mask(segment_ids_BT):
  """True where query t may attend key s: causal and within the same segment."""
  length = segment_ids_BT.shape[1]
  causal_TS = jnp.tril(jnp.ones((length, length), dtype=bool))
  same_segment_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_TS[None] & same_segment_BTS


def scan_unroll(unroll: int, num_layers: int) -> int:
  """Layers per iteration of the scanned stack; 0 picks by platform.

  Unrolled, XLA sees straight-line code: no zero-filled stacks of saved activations, no
  dynamic slices of stacked weights and gradients. On CPU that bookkeeping is about a fifth
  of a small model's step, so 0 unrolls every layer there; on accelerators the matmuls
  dwarf it and a rolled loop keeps compiles of deep models short. The parameters stay
  stacked either way, so checkpoints do not depend on it.
  """
  if unroll == 0:
    unroll = num_layers if jax.default_backend() == "cpu" else 1
  return min(unroll, num_layers)


MAX_ATTENTION_BLOCKS = 16  # each block is its own ops in the compiled step


def attention_implementation(name: str, dtype: str) -> str:
  """The attention kernel `name` stands for: 'auto' picks by platform and dtype.

  cuDNN flash attention on GPUs (it takes only 16-bit inputs), the causal-block form on
  CPUs (it skips the masked-out half of the scores, which XLA:CPU otherwise computes), and
  XLA's fused dot-product attention elsewhere (TPU).
  """
  if name != "auto":
    return name
  backend = jax.default_backend()
  if backend == "gpu" and dtype == "bfloat16":
    return "cudnn"
  return "xla_blocked" if backend == "cpu" else "xla"


def blocked_causal_attention(q_BTNH, k_BTKH, v_BTKH, mask_BTT, block_size: int):
  """Self-attention over the same T positions, one block of queries at a time.

  Query block [i, i + block_size) only scores keys before its end: the keys after it are
  masked out by causality anyway, so about half of the score and value matmuls (and their
  softmax and gradients) are never computed, and each block's scores stay cache-sized.
  `mask_BTT` (causal and within-segment) still applies inside each block. Blocks grow past
  `block_size` where needed to keep at most MAX_ATTENTION_BLOCKS of them (compile time).
  """
  B, T, N, H = q_BTNH.shape
  block_size = max(block_size, -(-T // MAX_ATTENTION_BLOCKS))
  K = k_BTKH.shape[2]
  q_BKGTH = q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
  k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
  blocks = []
  for start in range(0, T, block_size):
    end = min(start + block_size, T)
    scores_BKGtS = jnp.einsum("bkgth,bksh->bkgts", q_BKGTH[:, :, :, start:end],
                              k_BKTH[:, :, :end], preferred_element_type=jnp.float32)
    scores_BKGtS = jnp.where(mask_BTT[:, None, None, start:end, :end], scores_BKGtS * H**-0.5,
                             jnp.finfo(jnp.float32).min)
    probs_BKGtS = jax.nn.softmax(scores_BKGtS, axis=-1).astype(v_BTKH.dtype)
    blocks.append(jnp.einsum("bkgts,bksh->bkgth", probs_BKGtS, v_BKTH[:, :, :end]))
  out_BKGTH = jnp.concatenate(blocks, axis=3)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


class Attention(nn.Module):
  """Grouped-query causal attention.

  Training and scoring attend within the call's own tokens, masked by segment. Decoding
  (`decode=True`) also writes each token's key and value into a per-row cache of
  `context_length` slots at its position (the `cache` collection) and attends to every slot
  up to that position; a row's slots below its current position always hold its own tokens.
  The kernel of training and scoring is `config.attention` (see `attention_implementation`);
  decoding always uses XLA's, whose mask covers the cache.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, decode: bool = False):
    c = self.config
    D, N, K, H = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    residual_scale = 1.0 / (2 * c.num_layers)  # GPT-2: keep the residual stream's variance flat
    wq_DNH = _param(self, "query", _dense_init(0, (1, 2)), (D, N, H), ("embed", "heads", "head_dim"))
    wk_DKH = _param(self, "key", _dense_init(0, (1, 2)), (D, K, H), ("embed", "kv_heads", "head_dim"))
    wv_DKH = _param(self, "value", _dense_init(0, (1, 2)), (D, K, H), ("embed", "kv_heads", "head_dim"))
    wo_NHD = _param(self, "out", _dense_init((0, 1), 2, residual_scale), (N, H, D),
                    ("heads", "head_dim", "embed"))
    dtype = c.dtype
    bf16 = bf16_operands(c)
    q_BTNH = project(x_BTD, wq_DNH.astype(dtype), 1, bf16)
    k_BSKH = project(x_BTD, wk_DKH.astype(dtype), 1, bf16)
    v_BSKH = project(x_BTD, wv_DKH.astype(dtype), 1, bf16)
    q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "length", "heads", "head_dim"))
    k_BSKH = nn.with_logical_constraint(k_BSKH, ("batch", "length", "kv_heads", "head_dim"))
    v_BSKH = nn.with_logical_constraint(v_BSKH, ("batch", "length", "kv_heads", "head_dim"))
    q_BTNH = apply_rotary(q_BTNH, positions_BT, c.rope_theta)
    k_BSKH = apply_rotary(k_BSKH, positions_BT, c.rope_theta)

    if decode:
      k_BSKH, v_BSKH = self._write_cache(k_BSKH, v_BSKH, positions_BT)
      slots_S = jnp.arange(k_BSKH.shape[1])
      mask_BTS = slots_S[None, None, :] <= positions_BT[:, :, None]
    else:
      mask_BTS = attention_mask(segment_ids_BT)

    implementation = "xla" if decode else attention_implementation(c.attention, c.dtype)
    if implementation == "xla_blocked":
      out_BTNH = blocked_causal_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS,
                                          c.attention_block_size)
    else:
      # Training masks are causal too; saying so lets cuDNN skip the masked-out half.
      out_BTNH = jax.nn.dot_product_attention(
          q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], is_causal=not decode,
          implementation=implementation)
    out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "length", "heads", "head_dim"))
    return project(out_BTNH, wo_NHD.astype(dtype), 2, bf16)

  def _write_cache(self, k_BTKH, v_BTKH, positions_BT):
    """Stores this call's keys/values at their positions; returns the whole cache."""
    c = self.config
    B = k_BTKH.shape[0]
    shape = (B, c.context_length, c.num_kv_heads, c.head_dim)
    axes = ("batch", "length", "kv_heads", "head_dim")
    rows_B1 = jnp.arange(B)[:, None]
    caches = []
    for name, new_BTKH in (("key", k_BTKH), ("value", v_BTKH)):
      cache = self.variable("cache", name, jnp.zeros, shape, k_BTKH.dtype)
      cache.value = nn.with_logical_constraint(
          cache.value.at[rows_B1, positions_BT].set(new_BTKH), axes)
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
    bf16 = bf16_operands(c)
    gate_BTF = project(x_BTD, w_gate_DF.astype(c.dtype), 1, bf16)
    up_BTF = project(x_BTD, w_up_DF.astype(c.dtype), 1, bf16)
    hidden_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
    return project(hidden_BTF, w_down_FD.astype(c.dtype), 1, bf16)


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
    """Logits [B, T, V] for next-token prediction at every position.

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
                      unroll=scan_unroll(c.scan_unroll, c.num_layers),
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTD, _ = stack(c, name="layers")(x_BTD, segment_ids_BT, positions_BT, decode)
    else:
      for i in range(c.num_layers):
        x_BTD, _ = block(c, name=f"layers_{i}")(x_BTD, segment_ids_BT, positions_BT, decode)

    x_BTD = RMSNorm(c, name="final_norm")(x_BTD)
    if c.tie_embeddings:
      logits_BTV = project(x_BTD, embedding_VD.astype(c.dtype), 1, bf16_operands(c),
                           transpose_w=True)
    else:
      head_DV = _param(self, "lm_head", _dense_init(0, 1), (c.d_model, c.vocab_size),
                       ("embed", "vocab"))
      logits_BTV = project(x_BTD, head_DV.astype(c.dtype), 1, bf16_operands(c))
    return nn.with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))
