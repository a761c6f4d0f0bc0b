"""SSL algorithms behind one seam (distssl.ssl.algorithm): ``ssl.algorithm`` picks one by name."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from distssl.distributed.collectives import sum_over_ranks
from distssl.ssl import component
from distssl.ssl.algorithm import Algorithm, RunShape, is_strong, views_of
from distssl.ssl.distalign import DistributionAlignment
from distssl.ssl.fixmatch import FixMatch
from distssl.ssl.flexmatch import FlexMatch
from distssl.ssl.freematch import FreeMatch
from distssl.ssl.meanteacher import MeanTeacher
from distssl.ssl.mixmatch import MixMatch
from distssl.ssl.pimodel import PiModel
from distssl.ssl.remixmatch import ReMixMatch
from distssl.ssl.softmatch import SoftMatch
from distssl.ssl.temporal_ensembling import TemporalEnsembling
from distssl.ssl.uda import UDA
from distssl.ssl.vat import VAT

ALGORITHMS: dict[str, type[Algorithm]] = {a.name: a for a in (
    FixMatch, FlexMatch, FreeMatch, SoftMatch, UDA,  # pseudo-label rules (ThresholdRule)
    PiModel, TemporalEnsembling, MeanTeacher, VAT,  # consistency methods (Consistency)
    MixMatch, ReMixMatch)}  # mixing methods (their own step, in mixmatch.py)


def config_sections() -> dict[str, type]:
    """Each algorithm's and each component's own keys by its name: the ``ssl.<name>`` sections of the tree."""
    return {**{name: a.Config for name, a in ALGORITHMS.items() if a.Config is not None}, **component.SECTIONS}


def build_components(ssl_cfg, num_classes: int, total_steps: int, label_histogram: Optional[list] = None) -> list:
    """The components ``ssl.open_set`` and ``ssl.imbalance`` name, with their ``ssl.<name>`` keys."""
    out = []
    for chosen, table in ((ssl_cfg.open_set, component.OPEN_SET), (ssl_cfg.imbalance, component.IMBALANCE)):
        if chosen != "none":
            cls, _ = table[chosen]
            out.append(cls(num_classes, getattr(ssl_cfg, chosen), threshold=ssl_cfg.tau, total_steps=total_steps,
                           reduce=sum_over_ranks, label_histogram=label_histogram))
    return out


def build(ssl_cfg, num_classes: int, da: Optional[DistributionAlignment], num_unlabeled: Optional[int],
          shape: Optional[RunShape] = None, components: Sequence = ()) -> Algorithm:
    """The algorithm ``ssl_cfg.algorithm`` names, with its own keys (the ``ssl.<name>`` section); ``shape``:
    the run it is in, which its null keys are derived from."""
    name = ssl_cfg.algorithm
    own = getattr(ssl_cfg, name, None)
    own = dataclasses.asdict(own) if dataclasses.is_dataclass(own) else {}
    return ALGORITHMS[name](num_classes, tau=ssl_cfg.tau, lambda_u=ssl_cfg.lambda_u, da=da,
                            num_unlabeled=num_unlabeled, shape=shape, components=components, **own)


__all__ = ["ALGORITHMS", "Algorithm", "RunShape", "build", "config_sections", "is_strong", "views_of"]
