"""Platform kernels the model calls: CPU-friendly matmul forms and blocked causal attention.

Each is numerically the plain operation it replaces (up to summation order, or bfloat16
operand rounding where asked for); they exist because XLA:CPU runs these forms much faster.
Shape suffixes as in `llm_jax.model.transformer`; M, K, N are a 2-D matmul's rows, contraction, columns.
"""

import functools
import math

import jax
import jax.numpy as jnp


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


MAX_ATTENTION_BLOCKS = 16  # each block is its own ops in the compiled step


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
    blocks.append(head_major_attention(q_BKGTH[:, :, :, start:end], k_BKTH[:, :, :end],
                                       v_BKTH[:, :, :end], mask_BTT[:, start:end, :end]))
  out_BKGTH = jnp.concatenate(blocks, axis=3)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def head_major_attention(q_BKGTH, k, v_BKSH, mask_BTS, keys_transposed: bool = False):
  """Attention of queries grouped by kv head (G = N/K per head) to head-major keys `k`
  ([B, K, S, H], or [B, K, H, S] if `keys_transposed`) and values; where `mask_BTS` is False
  a query ignores a key. Returns [B, K, G, T, H].

  Head-major keys and values are what the two matmuls contract without a transpose, so a
  key/value cache kept in these layouts is read once per decode step, not copied first. A
  decode cache keeps its keys transposed: XLA:CPU runs that score matmul (contracting the
  keys' second-to-last axis) 2.7 times as fast as one contracting their last axis at batch 8.
  """
  H = q_BKGTH.shape[-1]
  scores_BKGTS = jnp.einsum("bkgth,bkhs->bkgts" if keys_transposed else "bkgth,bksh->bkgts",
                            q_BKGTH, k, preferred_element_type=jnp.float32)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS * H**-0.5,
                           jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSH.dtype)
  return jnp.einsum("bkgts,bksh->bkgth", probs_BKGTS, v_BKSH)
