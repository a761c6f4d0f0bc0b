"""Ray Tune sweeps over any training key (τ, λ, μ, lr, ...) with ASHA, each trial a real engine run,
on Ray Train V2. What runs where:

- :mod:`~distssl.tune.space` reads the tune YAML into a :class:`Sweep` and checks every value of the
  space before Ray starts; :mod:`~distssl.tune.sweep_record` keeps the sweep's settings and rounds beside it.
- :mod:`~distssl.tune.sweep` (the process of ``launch/tune.py``) runs one Tune experiment per round;
  each trial is :func:`~distssl.tune.trial.trial_driver`, a 0-CPU Tune function that starts a Train
  ``TorchTrainer`` whose workers are the trial's DeepSpeed ranks (:func:`~distssl.tune.trial.worker_loop`).
- :mod:`~distssl.tune.results` writes results.csv, best_config.yaml and the plot.
"""
from distssl.tune.results import trial_status, write_outputs  # noqa: F401
from distssl.tune.space import apply, check_space, load_sweep  # noqa: F401
from distssl.tune.sweep import run_sweep  # noqa: F401
from distssl.tune.sweep_record import (  # noqa: F401 - the sweep's record
    SETTINGS_NAME,
    Sweep,
    TuneSettings,
    _write_settings,
    check_resumable,
    sweep_rounds,
    sweep_settings,
)
