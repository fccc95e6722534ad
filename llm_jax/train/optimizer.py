"""AdamW with linear warmup, cosine decay and global-norm clipping, all from Optax."""

import jax
import optax


def learning_rate_schedule(train_config, updates_per_step: int = 1) -> optax.Schedule:
  """The rate of each optimizer update; a step of several updates (GRPO's passes) stretches
  warmup and decay by that many, so they still span `warmup_steps` and `steps` steps."""
  t, u = train_config, updates_per_step
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps * u,
      # Warmup through the last step (allowed) leaves Optax's cosine no steps, which it refuses.
      decay_steps=max(t.steps, t.warmup_steps + 1) * u,
      end_value=t.learning_rate * t.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices and embeddings, never on RMSNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(train_config, updates_per_step: int = 1) -> optax.GradientTransformation:
  t = train_config
  adamw = optax.adamw(learning_rate_schedule(t, updates_per_step), b1=t.b1, b2=t.b2, eps=t.eps,
                      weight_decay=t.weight_decay, mask=_decay_mask)
  if t.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
  return adamw
