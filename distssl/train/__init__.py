"""Training: the loop (trainer.py), the forwards an algorithm asks for (forward.py), the optimizer,
lr schedule and DeepSpeed config (optim.py, schedule.py), the EMA weights (ema.py), BatchNorm
statistics shared between forwards (bnstats.py) and the checks before a launch (preflight.py)."""
