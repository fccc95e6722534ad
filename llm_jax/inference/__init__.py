"""A trained model in use: KV-cache decoding and beam search, samplers, scoring (perplexity,
bits per byte) and `Run`, a run loaded for generation, chat, scoring and rewards.
"""
