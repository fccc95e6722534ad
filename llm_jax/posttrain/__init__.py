"""What post-training needs beyond a loss: preference pairs and DPO's reference pass, RL's
rollouts and judges. Losses live in `llm_jax.objectives`; file formats in `llm_jax.data`.
"""
