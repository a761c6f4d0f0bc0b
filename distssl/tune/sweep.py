"""The sweep's driver, in the process that runs ``launch/tune.py``: Ray started (or joined), one Tune
experiment per round of trials (:func:`distssl.tune.sweep_record.sweep_rounds`), each trial a
:func:`distssl.tune.trial.trial_driver`, a killed sweep restored from its Tune state, and the results
written. The Ray Train V2 API throughout: no environment switch, no deprecated call."""
from __future__ import annotations

import math
import os
from pathlib import Path

from distssl.config import dump_yaml, to_dict
from distssl.config.coerce import ConfigError
from distssl.tune.results import write_outputs
from distssl.tune.space import ray_space
from distssl.tune.storage import storage_for
from distssl.tune.sweep_record import Sweep, _write_settings, check_resumable, sweep_rounds
from distssl.tune.trial import trial_driver

DRIVER_MEMORY = 256 * 2**20  # bytes: a trial driver's Python process with Ray and Train imported


def run_sweep(sweep: Sweep) -> dict:
    """Run (or resume, or grow) the sweep in ``sweep.out_dir``; returns the summary of its results."""
    import ray

    _require_train_v2()
    t = sweep.tune
    sweep_dir = str(Path(sweep.out_dir).resolve())
    check_resumable(sweep, sweep_dir)  # a rerun with other settings must not replay the old sweep
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    rounds = sweep_rounds(sweep_dir, t.num_samples)
    _write_settings(sweep, sweep_dir)
    if not ray.is_initialized():
        if t.address:
            ray.init(address=t.address)
        else:
            # "local": a Ray of its own, even where another one runs on this machine (ray.init() alone
            # joins the newest `ray start` cluster it finds: another user's, or one a test left behind)
            ray.init(address="local", num_cpus=t.num_cpus or os.cpu_count(), include_dashboard=False,
                     log_to_driver=True)
    need, have = t.workers_per_trial * t.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
    if need > have:  # the trial's workers would wait for resources forever
        raise ConfigError(f"tune.workers_per_trial={t.workers_per_trial} x tune.cpus_per_worker={t.cpus_per_worker} "
                          f"needs {need:g} CPUs but the Ray cluster has {have:g}: lower them, or add nodes "
                          f"(tune.address)")
    dump_yaml(sweep.base, Path(sweep_dir) / "base_config.yaml")
    return _fit(sweep, sweep_dir, rounds, cluster_cpus=have)


def _require_train_v2() -> None:
    """The trials are Train V2 runs started from a Tune function (the V1 way, a TorchTrainer handed to
    the Tuner, is deprecated): a cluster image that switched V2 off must say so, not fail in a trial."""
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        raise ConfigError(f"{V2_ENABLED_ENV_VAR}={os.environ.get(V2_ENABLED_ENV_VAR)!r} switches Ray Train V2 off, "
                          f"and the sweep's trials are Train V2 runs: unset {V2_ENABLED_ENV_VAR} (V2 is Ray's "
                          f"default since 2.51)")


def _fit(sweep: Sweep, sweep_dir: str, rounds: list[tuple[str, int]], cluster_cpus: float) -> dict:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t, base = sweep.tune, sweep.base
    storage, filesystem = storage_for(t.storage_path, sweep_dir)
    # The trial's config is the searched values only (what Tune prints and keeps per trial); the base
    # config and the plan reach each driver through the object store (tune.with_parameters), given
    # again on restore since the object store lives as long as the Ray session.
    plan = {"sweep_dir": sweep_dir, "storage_url": t.storage_path, "metric": t.metric, "workers": t.workers_per_trial,
            "cpus_per_worker": t.cpus_per_worker, "gpus_per_worker": t.gpus_per_worker,
            "max_failures": t.max_failures, "timeout_s": int(60 * base.deepspeed.timeout_minutes)}
    base_tree, param_space = to_dict(base), ray_space(sweep.space)

    def trainable(round_name: str):
        # The driver only waits on its Train run: it takes no CPU, so every CPU goes to workers (a 2-CPU
        # machine runs a 2-worker trial). Ray refuses a request of nothing, so it asks for the memory
        # its process holds.
        driver = tune.with_parameters(trial_driver, base=base_tree, plan={**plan, "round": round_name})
        return tune.with_resources(driver, {"CPU": 0, "memory": DRIVER_MEMORY})

    # Drivers take no CPU, so without a cap Tune would start them all at once, each waiting for workers.
    concurrent = t.max_concurrent_trials or max(1, int(cluster_cpus // (t.workers_per_trial * t.cpus_per_worker)))
    evals = max(1, math.ceil(base.train.steps / max(1, base.train.eval_every or base.train.steps)))
    results = []
    for name, num_samples in rounds:
        path = f"{storage}/{name}"
        if tune.Tuner.can_restore(path, storage_filesystem=filesystem):  # a killed or finished sweep
            tuner = tune.Tuner.restore(path, trainable=trainable(name), param_space=param_space, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=filesystem)
        else:
            # max_t one past the last eval: ASHA must not stop a trial at its final report (it would be
            # stopped before writing its summary and plot)
            scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=evals + 1,
                                       grace_period=min(t.grace_period, evals), reduction_factor=t.reduction_factor)
                         if t.scheduler == "asha" else FIFOScheduler())
            tuner = tune.Tuner(
                trainable(name), param_space=param_space,
                tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, scheduler=scheduler,
                                            num_samples=num_samples, max_concurrent_trials=concurrent),
                run_config=tune.RunConfig(name=name, storage_path=storage, storage_filesystem=filesystem,
                                          verbose=1, failure_config=tune.FailureConfig(max_failures=t.max_failures)))
        results.extend(tuner.fit())
    return write_outputs(sweep, results, sweep_dir)
