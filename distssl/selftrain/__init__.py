"""Self-training rounds (Noisy Student): plan (pure), the pseudo-labeled set, the loop."""
