"""The names of the views a loader makes of each unlabeled image, and the order their random choices are drawn
in: ``weak``, ``strong``, then ``weak_2``, ``strong_2``, ... up to ``weak_16`` / ``strong_16`` (MixMatch's K
guesses, ReMixMatch's K strong views). An algorithm names the views it needs; the data layer makes them."""
from __future__ import annotations

VIEW_KINDS = ("weak", "strong", "weak_2")  # the first views; any ``weak_K`` / ``strong_K`` (K >= 2) too
MAX_VIEWS = 16  # K at most, per kind


def view_order(name: str) -> tuple[int, int]:
    """A view's place in the loader's draw order: weak, strong, weak_2, strong_2, weak_3 ... (the order the
    first three always had), so adding views to an algorithm leaves the earlier ones' draws as they were."""
    kind, _, k = name.partition("_")
    if kind not in ("weak", "strong") or (k and not (k.isdigit() and 2 <= int(k) <= MAX_VIEWS)):
        raise ValueError(f"unknown unlabeled view {name!r}: weak, strong, or weak_K / strong_K with 2 <= K <= "
                         f"{MAX_VIEWS}")
    return (int(k) if k else 1, 0 if kind == "weak" else 1)


def is_strong(name: str) -> bool:
    return name.split("_", 1)[0] == "strong"


def views_of(kind: str, k: int) -> tuple[str, ...]:
    """K views of a kind by name: ``views_of("weak", 3)`` = (weak, weak_2, weak_3)."""
    return tuple(kind if i == 1 else f"{kind}_{i}" for i in range(1, k + 1))
