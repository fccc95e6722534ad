"""Post-training presets: a trained run (`train.init_from`) carried further on the same trainer.

    llm-jax train --config configs/posttrain.py:sft --config.train.init_from=runs/default \
        --config.data.source='chat:data/conversations/*.jsonl' --workdir runs/sft

- `sft`: supervised fine-tuning on conversations: next-token loss on the assistant's turns
  only (`chat:` data through the chat template), from the parameters, tokenizer and model
  keys of `train.init_from`.

Every key stays overridable. The learning rate is the one choice that depends on the model:
practitioners fine-tune 7B models at 1e-5 to 2e-5, a twentieth to a thirtieth of their
pretraining rate (3e-4); small models take a larger share. For the CPU-sized default
(pretrained at 3e-3) the preset's 5e-4 gave the best held-out answers of the SFT
demonstration (experiments/sft/README.md: 1.5e-4, 5e-4 and 1.5e-3 tried); a large model's
fine-tuning should set `train.learning_rate` to about 1e-5.
"""

import ml_collections

from llm_jax.configs import base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  if variant != "sft":
    raise ValueError(f"configs/posttrain.py has no preset {variant!r}; choose sft.")
  c = base.get_config()
  t = c.train
  t.model_from_init = True  # the architecture is the starting model's
  t.learning_rate = 5e-4  # a sixth of the default's pretraining rate (see above)
  t.warmup_steps = 10  # short: the model is trained already
  t.min_lr_ratio = 0.0  # cosine down to zero by the last step
  t.weight_decay = 0.0  # as TRL's SFT default; a few epochs barely move the weights
  t.steps = 200  # about 3 epochs of the SFT demonstration's 1,100 packed rows at batch 16
  t.eval_every = 50
  t.checkpoint_every = 100
  t.sample_prompt = "What does `json.dumps` do?"  # asked as a user turn at the end of the run
  t.sample_temperature = 0.0
  c.data.source = "chat:data/conversations/*.jsonl"  # set to your conversations
  return c
