"""Training: optimizer and schedule, train state, the pure train/eval steps, the loop."""
