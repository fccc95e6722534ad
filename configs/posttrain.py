"""Post-training presets: a trained run (`train.init_from`) carried further on the same trainer.

    llm-jax train --config configs/posttrain.py:sft --config.train.init_from=runs/default \
        --config.data.source='chat:data/conversations/*.jsonl' --workdir runs/sft
    llm-jax train --config configs/posttrain.py:reward --config.train.init_from=runs/sft \
        --config.data.source='preferences:data/prefs/*.jsonl' --workdir runs/rm
    llm-jax train --config configs/posttrain.py:dpo --config.train.init_from=runs/sft \
        --config.data.source='preferences:data/prefs/*.jsonl' --workdir runs/dpo
    llm-jax train --config configs/posttrain.py:grpo --config.train.init_from=runs/sft \
        --config.data.source='prompts:data/problems/*.jsonl' \
        --config.rl.reward='mytask.rewards:exact_answer' --workdir runs/grpo

- `sft`: supervised fine-tuning on conversations: next-token loss on the assistant's turns
  only (`chat:` data through the chat template).
- `reward`: a reward model: the starting model with a scalar head in place of the next-token
  head, trained on preference pairs with the Bradley-Terry loss.
- `dpo`: Direct Preference Optimization on preference pairs, the starting model also the
  reference.
- `grpo`: RL from the model's own answers to prompts (`prompts:` data), judged by
  `rl.reward` (a function or a reward model): 8 completions a prompt at temperature 1, the
  clipped objective with ε = 0.2, a k3 KL penalty to the starting model with β = 0.04, one
  pass per batch (`llm_jax.objectives.grpo`).

Each takes the parameters, tokenizer and model keys of `train.init_from`
(`train.model_from_init`), and every key stays overridable. The learning rate is the choice
that depends on the model: practitioners fine-tune 7B models at 1e-5 to 2e-5 (SFT, reward
models), 5e-7 to 1e-6 (DPO) and about 1e-6 (GRPO), while small models take larger steps. The
rates here are those that worked best for the CPU-sized default (pretrained at 3e-3) in
experiments/sft, experiments/preferences and experiments/rl, where the alternatives tried are
listed; for a large model set
`train.learning_rate` to the practitioners' values above.
"""

import ml_collections

from llm_jax.configs import base

_VARIANTS = ("sft", "reward", "dpo", "grpo")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  if variant not in _VARIANTS:
    raise ValueError(f"configs/posttrain.py has no preset {variant!r}; choose one of "
                     f"{', '.join(_VARIANTS)}.")
  c = base.get_config()
  t = c.train
  t.model_from_init = True  # the architecture is the starting model's
  t.warmup_steps = 10  # short: the model is trained already
  t.min_lr_ratio = 0.0  # cosine down to zero by the last step
  t.weight_decay = 0.0  # as TRL's defaults; a few epochs barely move the weights
  t.steps = 200
  t.eval_every = 50
  t.checkpoint_every = 100
  t.sample_prompt = "What does `json.dumps` do?"  # asked as a user turn at the end of the run
  t.sample_temperature = 0.0
  if variant == "sft":
    t.learning_rate = 5e-4  # a sixth of the default's pretraining rate (see above)
    c.data.source = "chat:data/conversations/*.jsonl"  # set to your conversations
    return c
  c.objective.name = variant
  if variant == "grpo":
    c.data.source = "prompts:data/problems/*.jsonl"  # set to your prompts, and set rl.reward
    t.batch_size = 64  # completions a step: 8 prompts of rl.group_size 8 (configs/base.py: rl)
    t.learning_rate = 2e-4  # experiments/rl's best for the CPU-sized default (TRL's: 1e-6)
    t.steps, t.eval_every = 1000, 200  # RL learns from sparse rewards: more, cheaper steps
    return c
  c.data.source = "preferences:data/prefs/*.jsonl"  # set to your preference pairs
  if variant == "reward":
    c.model.reward_head = True
    c.objective.reward_centering = 0.01  # TRL's suggested center_rewards_coefficient
    t.learning_rate = 1e-3  # a third of the default's pretraining rate (see above)
    t.sample_tokens = 0  # a reward model scores text; it does not write any
  else:
    c.objective.dpo_beta = 0.1
    t.learning_rate = 1e-4  # a fifth of SFT's; 5e-4 lowered the chosen answers too (see above)
  return c
