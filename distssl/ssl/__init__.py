"""SSL algorithms behind one seam (distssl.ssl.algorithm): ``ssl.algorithm`` picks one by name."""
from __future__ import annotations

import dataclasses
from typing import Optional

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
    """Each algorithm's own keys by its name: the ``ssl.<name>`` sections of the config tree."""
    return {name: a.Config for name, a in ALGORITHMS.items() if a.Config is not None}


def build(ssl_cfg, num_classes: int, da: Optional[DistributionAlignment], num_unlabeled: Optional[int],
          shape: Optional[RunShape] = None) -> Algorithm:
    """The algorithm ``ssl_cfg.algorithm`` names, with its own keys (the ``ssl.<name>`` section); ``shape``:
    the run it is in, which its null keys are derived from."""
    name = ssl_cfg.algorithm
    own = getattr(ssl_cfg, name, None)
    own = dataclasses.asdict(own) if dataclasses.is_dataclass(own) else {}
    return ALGORITHMS[name](num_classes, tau=ssl_cfg.tau, lambda_u=ssl_cfg.lambda_u, da=da,
                            num_unlabeled=num_unlabeled, shape=shape, **own)


__all__ = ["ALGORITHMS", "Algorithm", "RunShape", "build", "config_sections", "is_strong", "views_of"]
