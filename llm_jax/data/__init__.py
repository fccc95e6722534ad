"""Input: text sources, the SentencePiece tokenizer, and the Grain packing pipeline."""
