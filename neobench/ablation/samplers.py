"""The samplers and pruners a study file may name; each is built from the study's spec.

Optuna is imported only when one is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from neobench.core.registry import Registry

if TYPE_CHECKING:
    from neobench.ablation.spec import StudySpec


# Each sampler takes the spec and a seed: the spec's seed for the first worker, another for each
# further worker, which would otherwise propose exactly what the first one does.
def _grid(spec: StudySpec, seed: int):
    import optuna

    return optuna.samplers.GridSampler({p.name: p.grid_points() for p in spec.space}, seed=seed)


def _tpe(spec: StudySpec, seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, spec.trials))


def _random(spec: StudySpec, seed: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


SAMPLERS: Registry = Registry("sampler")
SAMPLERS.add("tpe", _tpe)
SAMPLERS.add("random", _random)
SAMPLERS.add("grid", _grid)


def _median(spec: StudySpec):
    import optuna

    return optuna.pruners.MedianPruner(
        n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=spec.pruner_warmup_steps, interval_steps=1
    )


def _no_pruner(spec: StudySpec):
    import optuna

    return optuna.pruners.NopPruner()


PRUNERS: Registry = Registry("pruner")
PRUNERS.add("none", _no_pruner)
PRUNERS.add("median", _median)
