"""`neobench run`, once its flags are parsed: plan the runs, apply the protocol, skip finished
ones, and train each here, under torchrun, or in its own process; a resumed run; a run process's
one run (a matrix's child, or an ablation trial). Stops and divergence become exit codes here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer

from neobench.core.errors import DIVERGED_EXIT, NeobenchError
from neobench.core.progress import console

PROTOCOLS = ("paper", "tuned")


def run_command(given: dict, choices: tuple, protocol: str, skip_done: bool, nproc: int, resume: Optional[str],
                runs_dir: Optional[str], run_id: Optional[str], optuna_trial: Optional[str], budgets: Optional[str] = None) -> None:
    """`neobench run`: from here on a signal takes the one stop path (neobench.core.stopping)."""
    from neobench.core.stopping import STOP

    with STOP.watching("setup"):
        run_plan(given, choices, protocol, skip_done, nproc, resume, runs_dir, run_id, optuna_trial, budgets)


def parse_budgets(spec: str) -> list[int]:
    """'12,48,192,E' -> [12, 48, 192, 0]: optimizer steps per budget, 0 (E) for one epoch; in the order given."""
    steps = []
    for part in (p.strip() for p in spec.split(",")):
        if part.upper() == "E":
            steps.append(0)
        elif part.isdigit() and int(part) > 0:
            steps.append(int(part))
        else:
            raise NeobenchError(f"--budgets takes optimizer steps and E (one epoch), comma-separated, e.g. 12,48,192,E; got {part!r}")
    if len(set(steps)) < len(steps):
        raise NeobenchError(f"--budgets names a budget twice: {spec!r}")
    return steps


def run_plan(given: dict, choices: tuple, protocol: str, skip_done: bool, nproc: int, resume: Optional[str],
             runs_dir: Optional[str], run_id: Optional[str], optuna_trial: Optional[str], budgets: Optional[str] = None) -> None:
    """`neobench run` once its flags are parsed: a resumed run, a run process's one run, or the plan."""
    from neobench.core.stopping import STOPPED_EXIT, Stopped
    from neobench.runs.config import apply_overrides, load_preset
    from neobench.runs.execute import ChildDiverged, execute, execute_many, matrix_scores, plan, summary_table
    from neobench.training.distributed import close, launched_world
    from neobench.training.loop import Diverged

    method, variant, seeds, preset = choices
    under_torchrun = launched_world().distributed
    if nproc > 1 and under_torchrun:
        raise NeobenchError("--nproc launches torchrun itself; under torchrun, leave it out (torchrun's --nproc-per-node sets it)")
    if budgets is not None and "max_steps" in given:
        raise NeobenchError("--budgets sets --max-steps for each budget; leave --max-steps out")
    if budgets is not None and (resume is not None or run_id is not None):
        raise NeobenchError("--budgets plans new runs; it does not go with --resume")
    steps_per_budget = parse_budgets(budgets) if budgets is not None else None
    if resume is not None:
        base, world = None, launched_world()
    else:
        base, world = apply_overrides(load_preset(preset), given, "command-line flags"), launched_world()
        if base.compile and (nproc > 1 or under_torchrun):  # before any process starts (ranks check it too)
            from neobench.training.distributed import COMPILE_IN_ONE_PROCESS

            raise NeobenchError(COMPILE_IN_ONE_PROCESS)
    try:
        if resume is not None:
            resume_run(resume, runs_dir or "runs", given, choices, nproc)
            return
        if run_id is not None:  # a child of execute_many or an ablation: the preset file is the resolved config
            run_child(plan(base, base.method, base.variant)[0], run_id, optuna_trial)
            return
        if steps_per_budget is None:
            cfgs = plan(base, method, variant, seeds)
        else:  # every budget is its own runs: a schedule of its own, never a prefix of a longer run
            cfgs = [c for steps in steps_per_budget for c in plan(dataclasses.replace(base, max_steps=steps), method, variant, seeds)]
        if protocol not in PROTOCOLS:
            raise NeobenchError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
        if protocol == "tuned":
            from neobench.ablation.tuned import tuned_configs

            cfgs = tuned_configs(cfgs, given)
            if not cfgs:
                return
        if skip_done:
            cfgs = not_done(cfgs)
            if not cfgs:
                console.print(f"every planned run already finished under {base.runs_dir}/", highlight=False)
                return
        if under_torchrun:  # every rank runs the plan in this process
            results = [r for cfg in cfgs if (r := execute(cfg))]
        elif len(cfgs) == 1 and nproc == 1:
            # One run: this process is fresh, so it trains here (a child would cost its start-up again).
            results = [execute(cfgs[0])]
        else:  # several runs: each in its own process, so each peak memory is its own
            results = execute_many(cfgs, nproc)
    except Stopped as stop:  # at a safe point; the line says what was kept
        if world.main:
            console.print(str(stop), highlight=False)
        raise typer.Exit(STOPPED_EXIT) from None
    except KeyboardInterrupt:  # a second signal: stopped at once
        if run_id is None and world.main:  # the parent speaks for both
            where = base.runs_dir if base is not None else runs_dir or "runs"
            console.print(f"interrupted; finished runs stay in {where}/", highlight=False)
        raise typer.Exit(STOPPED_EXIT) from None
    except Diverged as err:
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(DIVERGED_EXIT) from None
    except ChildDiverged as stop:
        if stop.finished:
            console.print(f"the {stop.finished} runs finished before it stay in {base.runs_dir}/", highlight=False)
        raise typer.Exit(DIVERGED_EXIT) from None
    finally:
        close(world)
    if not world.main:
        return
    console.print(summary_table(results))
    for r in results:
        console.print(f"  {r['run_dir']}", highlight=False)
    if len(results) > 1:
        scores = matrix_scores(results)
        if scores:
            console.print(scores)


def resume_run(run: str, runs_dir: str, given: dict, choices: tuple, nproc: int) -> None:
    """`neobench run --resume RUN_ID`: continue an unfinished run as it was configured."""
    from neobench.core.stopping import STOP, STOPPED_EXIT
    from neobench.runs.config import load_preset, validate
    from neobench.runs.execute import execute, run_in_child, summary_table
    from neobench.runs.store import unfinished_run
    from neobench.training.distributed import launched_world

    extra = sorted(k for k in given if k != "runs_dir")
    method, variant, seeds, preset = choices
    if extra or method or variant or seeds != 1 or preset != "smol-cpu":
        what = extra[0].replace("_", "-") if extra else "method/variant/seeds/preset"
        raise NeobenchError(f"--resume continues a run as it was configured; drop --{what} (only --runs-dir and --nproc go with it)")
    tmp = unfinished_run(runs_dir, run)
    cfg = validate(load_preset(str(tmp / "config.yaml")))
    run_id = tmp.name.removeprefix(".tmp-")
    world = launched_world()
    if nproc > 1:
        code = run_in_child(cfg, run_id, ("--resume", run_id, "--runs-dir", runs_dir), nproc=nproc, resolved=False)
        if code != 0 and STOP.requested:  # its process 0 said what it kept
            raise typer.Exit(STOPPED_EXIT)
        if code != 0:
            raise typer.Exit(code)
        return
    metrics = execute(cfg, run_id=run_id, resume=True)
    if world.main:
        console.print(summary_table([metrics]))
        console.print(f"  {metrics['run_dir']} (resumed from step {metrics['resumed_from_step']})", highlight=False)


def run_child(cfg, run_id: str, optuna_trial: Optional[str]) -> None:
    from neobench.runs.execute import execute

    if optuna_trial is None:
        execute(cfg, run_id=run_id)
        return
    import json

    import optuna

    from neobench.ablation.trial import PRUNED_EXIT, trial_reporter

    try:
        execute(cfg, run_id=run_id, after_step=trial_reporter(json.loads(optuna_trial)))
    except optuna.TrialPruned as pruned:
        console.print(f"trial {cfg.trial}: {pruned}; its run was discarded", highlight=False)
        raise typer.Exit(PRUNED_EXIT) from None


def not_done(cfgs: list) -> list:
    """The planned runs that have no finished twin under their runs directory (--skip-done)."""
    from neobench.runs.store import finished_like
    from neobench.training.labels import run_label

    todo = []
    for cfg in cfgs:
        twin = finished_like(cfg)
        if twin is None:
            todo.append(cfg)
        else:
            console.print(f"{run_label(cfg)} seed {cfg.seed}: already finished in {twin}", highlight=False)
    return todo
