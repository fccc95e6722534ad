"""IsoFLOP sweep on the built-in corpus, sized for about 45 minutes on a shared 2-core CPU.

Four compute budgets, three times apart, each trained at five to seven model sizes around
the best size, so every IsoFLOP curve has its minimum inside it. Sizes come from one ladder
(about 1.5-2x parameters per rung); each budget takes consecutive rungs, moving up with the
budget as Hoffmann et al. (2022) did. Every member's steps follow from its budget
(llm_jax.model.flops), and its cosine schedule spans those steps.

  llm-jax sweep configs/sweeps/isoflop_cpu.py --dry-run     # the table of members
  llm-jax sweep configs/sweeps/isoflop_cpu.py               # train (resumable)
  llm-jax scaling fit runs/sweeps/isoflop_cpu --out experiments/scaling --overwrite
"""

from llm_jax.tools import sweep

# (d_model, num_layers, num_heads, num_kv_heads, mlp_dim): head_dim 16, MLP ~2.7x d_model.
LADDER = [
    (16, 1, 1, 1, 48),
    (24, 1, 2, 1, 64),
    (32, 1, 2, 1, 96),
    (32, 2, 2, 1, 96),
    (48, 2, 4, 2, 128),
    (64, 3, 4, 2, 176),
    (96, 3, 6, 3, 256),
    (128, 4, 8, 4, 352),
    (160, 5, 10, 5, 432),
]
# (training FLOPs per member, first rung, last rung). The first run of this file (budgets
# 4e11..3.6e12 from rung 2) showed the optimum far above 20 tokens per parameter, at the
# smallest rung for 4e11, so rungs 0-1 and the 1.3e11 budget were added; finished members
# were skipped when the sweep was rerun.
BUDGETS = [(4e11 / 3, 0, 4), (4e11, 0, 6), (1.2e12, 2, 6), (3.6e12, 3, 7)]


def get_sweep() -> sweep.Sweep:
  members = []
  for budget, first, last in BUDGETS:
    members += sweep.product([{sweep.BUDGET_KEY: budget}],
                             sweep.model_shapes(LADDER[first:last + 1]))
  return sweep.Sweep(
      members=sweep.named(members, "C{flops_budget:.1e}-d{d_model}-L{num_layers}"),
      overrides={
          "train.batch_size": 16,
          "train.learning_rate": 3e-3,
          "train.eval_every": 0,  # evaluate once, at the end
          "train.eval_tokens": 32_768,
          "train.log_every": 25,
          "train.checkpoint_every": 0,  # at the end, and every 2 minutes for resuming
          "train.checkpoint_minutes": 2.0,
          "train.keep_checkpoints": 1,
          "train.sample_tokens": 0,
      },
      warmup_fraction=0.05,
  )
