"""Learning-rate schedule: linear warm-up, then FixMatch's cosine lr0 * cos(7 pi k / 16 K)."""
import math


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, cosine_fraction: float = 7 / 16) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    k = step - warmup_steps
    K = max(1, total_steps - warmup_steps)
    return math.cos(math.pi * cosine_fraction * min(k, K) / K)
