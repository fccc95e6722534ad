"""AdamW with linear warmup, cosine decay and global-norm clipping, all from Optax."""

import jax
import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
  t = train_config
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=t.learning_rate * t.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices and embeddings, never on RMSNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  t = train_config
  adamw = optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                      weight_decay=t.weight_decay, mask=_decay_mask)
  if t.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
  return adamw
