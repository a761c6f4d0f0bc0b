"""SSL algorithms behind one seam (distssl.ssl.algorithm): ``ssl.algorithm`` picks one by name."""
from __future__ import annotations

from typing import Optional

from distssl.ssl.algorithm import Algorithm
from distssl.ssl.distalign import DistributionAlignment
from distssl.ssl.fixmatch import FixMatch
from distssl.ssl.flexmatch import FlexMatch
from distssl.ssl.freematch import FreeMatch
from distssl.ssl.softmatch import SoftMatch

ALGORITHMS = {a.name: a for a in (FixMatch, FlexMatch, FreeMatch, SoftMatch)}


def build(ssl_cfg, num_classes: int, da: Optional[DistributionAlignment], num_unlabeled: Optional[int]) -> Algorithm:
    """The algorithm ``ssl_cfg.algorithm`` names, with its own keys (ssl.flexmatch.*, ...)."""
    name = ssl_cfg.algorithm
    common = dict(tau=ssl_cfg.tau, lambda_u=ssl_cfg.lambda_u, da=da, num_unlabeled=num_unlabeled)
    own = {"flexmatch": {"warmup": ssl_cfg.flexmatch.warmup},
           "freematch": {"momentum": ssl_cfg.freematch.momentum, "fairness_weight": ssl_cfg.freematch.fairness_weight},
           "softmatch": {"momentum": ssl_cfg.softmatch.momentum, "n_sigma": ssl_cfg.softmatch.n_sigma}}.get(name, {})
    return ALGORITHMS[name](num_classes, **common, **own)


__all__ = ["ALGORITHMS", "Algorithm", "build"]
