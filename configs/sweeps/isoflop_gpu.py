"""The IsoFLOP study of isoflop_cpu.py at ~8,000x its compute, for one GPU host or TPU slice.

Same method, bigger everything: four budgets from 1e15 to 3e16 FLOPs per member (the CPU
sweep's are 1.3e11 to 3.6e12; 2.2e17 FLOPs in all against 2.7e13), a ladder of models from
0.6M to 82M parameters with head_dim 64, 512-token sequences, batches of 64, bfloat16
compute and an 8,192-piece tokenizer. The smallest models train on up to ~9e8 tokens: point
data.source at a corpus of that size (e.g. 'files:/data/corpus/*.jsonl' or a prepared
'tfds:NAME'), since the built-in corpus (~10M tokens) would be repeated many times over.

  llm-jax sweep configs/sweeps/isoflop_gpu.py --dry-run
  llm-jax sweep configs/sweeps/isoflop_gpu.py --sweep_dir /data/sweeps/isoflop_gpu
  llm-jax sweep configs/sweeps/isoflop_gpu.py --print-commands > members.sh  # for a scheduler
"""

from llm_jax.tools import sweep

# (d_model, num_layers, num_heads, num_kv_heads, mlp_dim): head_dim 64, MLP ~2.7x d_model.
LADDER = [
    (64, 2, 1, 1, 176),
    (128, 2, 2, 1, 352),
    (192, 3, 3, 1, 512),
    (256, 4, 4, 2, 704),
    (384, 6, 6, 2, 1024),
    (512, 8, 8, 4, 1376),
    (640, 10, 10, 5, 1728),
    (768, 12, 12, 4, 2048),
]
# (training FLOPs per member, first rung, last rung)
BUDGETS = [(1e15, 0, 4), (3e15, 1, 5), (1e16, 2, 6), (3e16, 3, 7)]


def get_sweep() -> sweep.Sweep:
  members = []
  for budget, first, last in BUDGETS:
    members += sweep.product([{sweep.BUDGET_KEY: budget}],
                             sweep.model_shapes(LADDER[first:last + 1]))
  return sweep.Sweep(
      members=sweep.named(members, "C{flops_budget:.1e}-d{d_model}-L{num_layers}"),
      overrides={
          "data.source": "builtin",  # replace with a corpus of ~1e9 tokens (see above)
          "model.vocab_size": 8192,
          "model.context_length": 512,
          "model.dtype": "bfloat16",
          "train.batch_size": 64,
          "train.learning_rate": 2e-3,
          "train.eval_every": 0,
          "train.eval_tokens": 1_048_576,
          "train.log_every": 50,
          "train.checkpoint_every": 0,
          "train.checkpoint_minutes": 10.0,
          "train.keep_checkpoints": 1,
          "train.sample_tokens": 0,
      },
      warmup_fraction=0.05,
  )
