"""`neobench ablate`: study files, trials as runs, workers sharing one storage, resuming, tables."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neobench.ablation.samplers import PRUNERS, SAMPLERS
from neobench.ablation.spec import load_spec, parse_spec, study_files, with_dtype
from neobench.core.errors import NeobenchError


def neobench(*args, cwd=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "neobench.cli", *args], capture_output=True, text=True, cwd=cwd, **kwargs)


@pytest.fixture
def tiny_preset(tiny, tmp_path) -> Path:
    """A preset on the tiny models whose trials take a few seconds and score neo_heldout_nll."""
    preset = {
        "preset": "tiny", "teacher": str(tiny["teacher"]), "student": str(tiny["student"]), "train_data": str(tiny["data"]),
        "seq_len": 64, "batch_size": 4, "max_steps": 4, "lr": 1e-3, "rank": 4, "runs_dir": str(tmp_path / "runs"),
        "eval_tasks": "neo_heldout_nll", "eval_data": str(tiny["data"]), "eval_split": "train", "eval_limit": 6,
        "eval_batch_size": 4,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def write_study(tmp_path: Path, name: str, preset: Path, **changes) -> Path:
    study = {
        "preset": str(preset), "objective": "neo_heldout_nll/nll", "sampler": "grid", "trials": 3,
        "fixed": {"method": "neo"}, "space": {"rank": {"type": "int", "low": 2, "high": 16, "log": True, "grid": [2, 4, 8]}},
        "pruner": "none", "intermediate": {"every": 2, "prompts": 4}, **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def trials_in(storage: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{storage}").get_trials(deepcopy=False)


def run_configs(runs: Path) -> list[dict]:
    return [yaml.safe_load((r / "config.yaml").read_text()) for r in sorted(runs.iterdir()) if (r / "metrics.json").is_file()]


# --- study files ---------------------------------------------------------------------------------


def test_every_shipped_study_parses_and_builds_its_sampler_and_pruner():
    names = list(study_files())
    assert {"rank", "kd_ratio", "lr", "variant", "temperature", "neo-hparams"} <= set(names)
    for name in names:
        spec = load_spec(name)
        assert spec.objective == "neo_heldout_nll/nll"
        SAMPLERS.get(spec.sampler)(spec, 0)
        PRUNERS.get(spec.pruner)(spec)
    assert load_spec("rank").space[0].grid_points() == [8, 16, 32, 48, 64, 96, 128, 256]


def test_every_sampler_and_pruner_entry_is_usable(tiny_preset, tmp_path):
    import optuna

    for sampler in SAMPLERS:
        for pruner in PRUNERS:
            spec = parse_spec(
                yaml.safe_load(write_study(tmp_path, "s", tiny_preset, sampler=sampler, pruner=pruner).read_text()), "s", "s.yaml"
            )
            study = optuna.create_study(sampler=SAMPLERS.get(sampler)(spec, 0), pruner=PRUNERS.get(pruner)(spec))
            study.optimize(lambda t: float(spec.space[0].suggest(t)), n_trials=3)
            assert len(study.trials) == 3 and {t.params["rank"] for t in study.trials} <= set(range(2, 17))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"space": {"ranks": {"type": "int", "low": 2, "high": 8}}}, "space.ranks"),
        ({"space": {"rank": {"type": "int", "low": 16, "high": 2, "grid": [2]}}}, "space.rank.high"),
        ({"space": {"kd_ratio": {"type": "float", "low": 0.0, "high": 1.5, "grid": [0.5]}}}, "space.kd_ratio.high"),
        ({"space": {"rank": {"type": "int", "low": 2, "high": 8, "grid": [2, 32]}}}, "space.rank.grid"),
        ({"space": {"rank": {"type": "int", "low": 2, "high": 8}}}, "space.rank.grid"),  # grid sampler, no points
        ({"space": {"lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "sampler": "tpe"}, "space.lr.low"),
        ({"space": {"rank": {"type": "integer", "low": 2, "high": 8}}}, "space.rank.type"),
        ({"objective": "neo_heldout_nll/accuracy"}, "objective"),
        ({"objective": "neo_heldout_match/acc"}, "objective"),  # not among the trials' eval_tasks
        ({"sampler": "cmaes"}, "sampler"),
        ({"pruner": "hyperband"}, "pruner"),
        ({"budget": {"lr": 0.1}}, "budget.lr"),
        ({"fixed": {"methods": "neo"}}, "fixed.methods"),
        ({"trial": 3}, "trial"),
    ],
)
def test_a_malformed_study_file_fails_in_one_line_naming_the_field(tiny_preset, tmp_path, changes, field):
    path = write_study(tmp_path, "bad", tiny_preset, **changes)
    with pytest.raises(NeobenchError, match=f"field '{field}'") as err:
        load_spec(str(path))
    assert "\n" not in str(err.value)


def test_the_cli_reports_a_malformed_study_in_one_line_and_starts_nothing(tiny_preset, tmp_path, cli):
    cases = {
        "space.ranks": {"space": {"ranks": {"type": "int", "low": 2, "high": 8}}},
        "space.rank.high": {"space": {"rank": {"type": "int", "low": 16, "high": 2, "grid": [2]}}},
        "objective": {"objective": "neo_heldout_nll/accuracy"},
    }
    for field, changes in cases.items():
        path = write_study(tmp_path, "bad", tiny_preset, **changes)
        code, stderr = cli("ablate", str(path), "--runs-dir", str(tmp_path / "runs"))
        assert code == 2
        lines = [l for l in stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and f"'{field}'" in lines[0], stderr[-2000:]
        assert not (tmp_path / "runs").exists(), "a bad study file must not start anything"


def test_an_unknown_study_name_lists_the_valid_ones(cli):
    code, stderr = cli("ablate", "ranks")
    assert code == 2
    assert "unknown study 'ranks'" in stderr and "kd_ratio" in stderr


# --- running studies -----------------------------------------------------------------------------


def test_a_three_trial_study_runs_end_to_end_and_writes_its_table(tiny_preset, tmp_path, cli):
    study = write_study(tmp_path, "tinyrank", tiny_preset)
    runs, out = tmp_path / "runs", tmp_path / "leaderboards"
    code, stderr = cli("ablate", str(study), "--out", str(out))  # each trial still trains in its own process
    assert code == 0, stderr[-3000:]

    trials = trials_in(runs / "ablations.db", "tinyrank")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert sorted(t.params["rank"] for t in trials) == [2, 4, 8]
    assert all(len(t.intermediate_values) == 2 for t in trials), "held-out NLL reported at steps 2 and 4"
    configs = run_configs(runs)
    assert sorted((c["study"], c["trial"], c["rank"]) for c in configs) == sorted(("tinyrank", t.number, t.params["rank"]) for t in trials)
    for t in trials:  # the objective is the trial's stored lm-eval score
        run_dir = runs / t.user_attrs["run_ids"][0]
        rows = json.loads(next((run_dir / "evaluations").glob("*.json")).read_text())["evaluations"][0]["rows"]
        assert t.value == next(r["value"] for r in rows if r["metric"] == "nll")

    folder = out / "tiny" / "ablations"
    md = (folder / "tinyrank.md").read_text()
    assert "Trials, best first" in md and "Parameter importances" in md
    best = min(trials, key=lambda t: t.value)
    assert f"Trial {best.number}: **rank = {best.params['rank']}**" in md
    table = [l for l in md.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert len(table) == 3 and [float(l.split(" | ")[3]) for l in table] == sorted(round(t.value, 4) for t in trials)
    for kind in ("history", "slice", "importances", "intermediate"):
        assert (folder / f"tinyrank_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `neobench report` collects the trials as runs (left out of the main tables) and rebuilds the
    # ablation files from the stored trials alone, byte for byte.
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, stderr = cli("report", "--runs", str(runs), "--out", str(out), "--format", "md")
    assert code == 0, stderr[-3000:]
    assert "tiny: only ablation trials" in stderr and "ablations: 1 study" in stderr
    collected = [json.loads(l) for l in (out / "tiny" / "results.jsonl").read_text().splitlines()]
    assert {(r["study"], r["trial"]) for r in collected if r["model"] == "student"} == {("tinyrank", t.number) for t in trials}
    (runs / "ablations.db").rename(tmp_path / "elsewhere.db")
    code, stderr = cli("report", "--runs", str(tmp_path / "nothing"), "--out", str(out), "--format", "md")
    assert code == 0, stderr[-3000:]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    # Asking again for the same number of trials finds the study done: nothing more is trained.
    (tmp_path / "elsewhere.db").rename(runs / "ablations.db")
    code, stderr = cli("ablate", str(study), "--no-report")
    assert code == 0 and "3 of 3 trials already there" in " ".join(stderr.split())
    assert len(run_configs(runs)) == 3


@pytest.mark.processes
@pytest.mark.skipif(not os.environ.get("NEOBENCH_TEST_PROCESSES"), reason="a minute or more of worker processes: `make test-processes`")
def test_two_workers_on_one_storage_finish_exactly_n_trials(tiny_preset, tmp_path, cli):
    study = write_study(
        tmp_path, "pair", tiny_preset, sampler="random", trials=3,
        space={"kd_ratio": {"type": "float", "low": 0.0, "high": 1.0}},
    )
    runs = tmp_path / "runs"
    code, stderr = cli("ablate", str(study), "--workers", "2", "--no-report")
    assert code == 0, stderr[-3000:]
    trials = trials_in(runs / "ablations.db", "pair")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3
    assert all(t.state.name == "COMPLETE" or t.user_attrs.get("surplus") for t in trials), "none lost, none left running"
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2, "both workers took trials"
    configs = run_configs(runs)
    assert sorted(c["trial"] for c in configs) == sorted(t.number for t in complete), "one run per trial, none duplicated"
    assert len({c["kd_ratio"] for c in configs}) == 3


@pytest.mark.processes
@pytest.mark.skipif(not os.environ.get("NEOBENCH_TEST_PROCESSES"), reason="a minute or more of worker processes: `make test-processes`")
def test_an_interrupted_study_resumes_and_reruns_the_killed_trial(tiny_preset, tmp_path, cli):
    # save_every 4: the killed trial's run has a checkpoint (step 4 of 24), and its retry continues from it.
    study = write_study(tmp_path, "resume", tiny_preset, budget={"max_steps": 24}, fixed={"method": "neo", "save_every": 4})
    runs = tmp_path / "runs"
    storage = runs / "ablations.db"
    # Worker and trial process are killed together, as a lost machine would, right after the second
    # trial's step-4 checkpoint (injected there: no polling, no race with the trial's end).
    killed = neobench("ablate", str(study), "--no-report",
                      env={**os.environ, "NEOBENCH_INJECT_FAULT": "kill-worker-after-step:4:trial:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    trials = trials_in(storage, "resume")
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING"], "killed while the second trial trained"
    killed_params = trials[1].params

    code, stderr = cli("ablate", str(study), "--no-report")
    assert code == 0, stderr[-3000:]
    assert "re-queued trial" in stderr and "from its checkpoint" in stderr
    trials = trials_in(storage, "resume")
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1 and "RUNNING" not in states
    retried = next(t for t in trials if t.system_attrs.get("failed_trial") is not None)
    assert retried.state.name == "COMPLETE" and retried.params == killed_params
    assert sorted(t.params["rank"] for t in trials if t.state.name == "COMPLETE") == [2, 4, 8]
    assert len(run_configs(runs)) == 3, "the killed trial's run was continued by its retry"
    resumed = [json.loads((r / "metrics.json").read_text()) for r in runs.glob("tiny-*")]
    assert sum("resumed_from_step" in m for m in resumed) == 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_behind_the_median_is_pruned_from_its_intermediate_nll(tiny, tiny_cfg, tmp_path):
    """The trial process reports held-out NLL to the storage, and stops when the pruner says so."""
    import dataclasses

    import optuna

    from neobench.ablation.storage import create_study
    from neobench.ablation.trial import trial_reporter
    from neobench.training.loop import build_student
    from neobench.training.workspace import prepare

    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(dataclasses.replace(tiny_cfg, eval_tasks="neo_heldout_nll").to_dict()))
    path = write_study(tmp_path, "prune", preset, sampler="random", pruner={"type": "median", "startup_trials": 1, "warmup_steps": 0})
    spec = load_spec(str(path))
    storage = f"sqlite:///{tmp_path / 'prune.db'}"
    study, _ = create_study(spec, "prune", storage, "minimize", "test")
    dist = optuna.distributions.IntDistribution(2, 16, log=True)
    study.add_trial(optuna.trial.create_trial(value=0.0, params={"rank": 4}, distributions={"rank": dist}, intermediate_values={2: 0.0}))
    trial = study.ask()
    ws = prepare(tiny_cfg, need_teacher=False)
    student = build_student(tiny_cfg, ws)
    after_step = trial_reporter({"storage": storage, "study": "prune", "spec": str(path), "trial_id": trial._trial_id, "report": True})
    after_step(1, student, ws)  # not a reporting step (every 2)
    with pytest.raises(optuna.TrialPruned):
        after_step(2, student, ws)  # a random student's NLL (~5.7) trails the completed trial's 0.0
    reported = study.get_trials(deepcopy=False)[-1].intermediate_values
    assert list(reported) == [2] and 3 < reported[2] < 10


def test_committed_ablations_regenerate_byte_for_byte(tmp_path):
    from neobench.reporting.ablations import render

    repo = Path(__file__).resolve().parent.parent
    exports = sorted((repo / "leaderboards").glob("*/ablations/*.trials.json"))
    if not exports:
        pytest.skip("no committed ablation yet")
    for export in exports:
        out = tmp_path / export.parent.parent.name
        for path in render(json.loads(export.read_text()), out):
            assert path.read_bytes() == (export.parent / path.name).read_bytes(), f"{export.parent}/{path.name} differs"


def test_rendering_a_study_leaves_matplotlibs_style_alone(tmp_path):
    """Optuna's plots switch to the ggplot style; the leaderboard plots drawn after must not change."""
    import matplotlib

    from neobench.reporting.ablations import render

    export = {"study": "s", "direction": "minimize", "attrs": {}, "trials": [
        {"number": i, "state": "COMPLETE", "value": float(i), "params": {"rank": 2 ** i}, "intermediate": {"1": float(i)},
         "distributions": {"rank": {"name": "IntDistribution", "attributes": {"low": 1, "high": 64, "log": True, "step": 1}}},
         "user_attrs": {}} for i in range(1, 4)]}
    def style() -> dict:  # render() selects the Agg backend itself; the rest must not move
        return {k: v for k, v in matplotlib.rcParams.items() if not k.startswith("backend")}

    before = style()
    render(export, tmp_path)
    assert style() == before


def test_every_worker_of_a_grid_study_reads_grid_ids_alike(tiny_preset, tmp_path):
    """A grid sampler shuffles the grid with its seed; workers with different seeds would give one
    grid id different points, so two workers could train the same point and skip another."""
    from neobench.ablation.spec import load_spec
    from neobench.ablation.storage import create_study, load_study

    spec = load_spec(str(write_study(tmp_path, "g", tiny_preset, space={"rank": {"type": "int", "low": 2, "high": 64, "log": True, "grid": [2, 4, 8, 16, 32, 64]}})))
    url = f"sqlite:///{tmp_path / 'g.db'}"
    create_study(spec, "g", url, "minimize", "test")
    grids = [load_study(spec, "g", url, worker)[0].sampler._all_grids for worker in (1, 2, 3)]
    assert grids[0] == grids[1] == grids[2]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_diverged_trial_is_failed_with_its_reason_and_never_run_again(tiny_preset, tmp_path, monkeypatch):
    """The trial process exits 4 (diverged) and leaves failure.json: FAIL, reason kept, no retry."""
    from neobench.ablation.storage import create_study
    from neobench.ablation.worker import work
    from neobench.core.errors import DIVERGED_EXIT

    launched = []

    def diverging_run(cfg, run_id, extra_args=(), nproc=1, resolved=True):
        launched.append(cfg.rank)
        unfinished = Path(cfg.runs_dir) / f".tmp-{run_id}"
        unfinished.mkdir(parents=True)
        (unfinished / "failure.json").write_text(json.dumps({"reason": "diverged", "message": f"rank {cfg.rank} diverged at step 3"}))
        return DIVERGED_EXIT

    monkeypatch.setattr("neobench.runs.execute.run_in_child", diverging_run)
    spec = load_spec(str(write_study(tmp_path, "nan", tiny_preset, trials=2, space={"rank": {"type": "int", "low": 2, "high": 8, "grid": [2, 8]}})))
    storage = f"sqlite:///{tmp_path / 'nan.db'}"
    create_study(spec, "nan", storage, "minimize", "test")
    work(spec, "nan", storage, 2, str(tmp_path / "runs"))
    trials = trials_in(tmp_path / "nan.db", "nan")
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"], "diverged trials count as done: none is queued again"
    assert sorted(launched) == [2, 8]
    assert {t.user_attrs["diverged"] for t in trials} == {"rank 2 diverged at step 3", "rank 8 diverged at step 3"}


# --- validation / test isolation and the tuned protocol -------------------------------------------


def test_a_study_may_not_select_on_the_test_split(tiny_preset, tmp_path):
    for split in ("test", "heldout"):
        path = write_study(tmp_path, "peek", tiny_preset, fixed={"method": "neo", "eval_split": split})
        with pytest.raises(NeobenchError, match=f"fixed.eval_split.*may not be '{split}'"):
            load_spec(str(path))


def test_tuning_reads_only_validation_documents_and_the_tuned_protocol_uses_its_choice(tiny, tmp_path, cli):
    from neobench.evaluation.catalog import EvalSpec, load_tasks

    # Held-out data in two splits (distinct prompts), and a preset that scores the test split...
    from conftest import tiny_rows

    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps({"test": tiny_rows(12)[:4], "validation": tiny_rows(12)[8:12]}))
    preset = {
        "preset": "tiny", "teacher": str(tiny["teacher"]), "student": str(tiny["student"]), "train_data": str(tiny["data"]),
        "seq_len": 64, "batch_size": 4, "max_steps": 2, "lr": 1e-3, "rank": 4, "runs_dir": str(tmp_path / "runs"),
        "eval_tasks": "neo_heldout_nll", "eval_data": str(heldout), "eval_split": "test", "eval_limit": 4,
        "eval_batch_size": 4,
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(preset))
    study = write_study(tmp_path, "tune-lr", tmp_path / "tiny.yaml", trials=1, fixed={"method": "neo"},
                        space={"lr_scale": {"type": "float", "low": 1.0, "high": 3.16, "log": True, "grid": [3.16]}},
                        intermediate={"every": 1, "prompts": 2})
    runs = tmp_path / "runs"
    code, stderr = cli("run", "--preset", str(tmp_path / "tiny.yaml"), "--method", "neo", "--protocol", "tuned")
    assert code == 2 and "needs the 'tune-lr' study" in stderr and "neobench ablate tune-lr --runs-dir" in stderr
    code, stderr = cli("ablate", str(study), "--no-report")
    assert code == 0, stderr[-3000:]

    # ...but every trial (its intermediate reports and its objective) read the validation split.
    hashes = {split: load_tasks(EvalSpec(tasks=("neo_heldout_nll",), limit=4, heldout_data=str(heldout), heldout_split=split),
                                str(tiny["student"])).hashes["neo_heldout_nll"] for split in ("validation", "test")}
    trials = trials_in(runs / "ablations.db", "tune-lr")
    for trial in trials:
        run_dir = runs / trial.user_attrs["run_ids"][0]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["eval_split"] == "validation"
        stored = json.loads(next((run_dir / "evaluations").glob("*.json")).read_text())["evaluations"][0]
        assert stored["task_hashes"]["neo_heldout_nll"] == hashes["validation"] != hashes["test"]
        assert len(stored["per_doc"]["neo_heldout_nll"]["docs"]) == 4

    best = min(trials, key=lambda t: (t.value, t.params["lr_scale"])).params["lr_scale"]
    assert best == 3.16
    code, stderr = cli("run", "--preset", str(tmp_path / "tiny.yaml"), "--method", "neo", "--protocol", "tuned", "--skip-done")
    assert code == 0, stderr[-3000:]
    assert f"tuned protocol: neo at lr_scale {best:g}" in stderr
    tuned = [c for c in run_configs(runs) if c["study"] is None]
    assert [(c["lr_scale"], c["eval_split"]) for c in tuned] == [(3.16, "test")]  # trained at the choice, scored on test
    code, stderr = cli("run", "--preset", str(tmp_path / "tiny.yaml"), "--method", "neo", "--protocol", "tuned", "--skip-done")
    assert code == 0 and len([c for c in run_configs(runs) if c["study"] is None]) == 1
    assert "neo+lora seed 0: already finished in" in " ".join(stderr.split())


def test_dtype_pins_every_trial_and_is_part_of_the_study(tiny_preset, tmp_path, cli):
    study = write_study(tmp_path, "pinned", tiny_preset, trials=1)
    spec = load_spec(str(study))
    pinned = with_dtype(spec, "float32")
    assert dict(pinned.fixed) == {"method": "neo", "dtype": "float32"}
    assert pinned.fingerprint() != spec.fingerprint(), "an fp32 study is not continued as an auto one"
    assert with_dtype(spec, None) is spec
    with pytest.raises(NeobenchError, match="unknown dtype 'fp8'"):
        with_dtype(spec, "fp8")
    searched = load_spec(str(write_study(tmp_path, "bydtype", tiny_preset, space={"dtype": {"type": "categorical", "choices": ["float32", "bfloat16"]}})))
    with pytest.raises(NeobenchError, match="searches over dtype"):
        with_dtype(searched, "float32")

    runs = tmp_path / "runs"
    code, stderr = cli("ablate", str(study), "--dtype", "float32", "--no-report")
    assert code == 0, stderr[-3000:]
    assert [c["dtype"] for c in run_configs(runs)] == ["float32"]
    code, stderr = cli("ablate", str(study), "--dtype", "bfloat16", "--no-report")
    assert code == 2 and "trains in dtype float32, not bfloat16; continue it with --dtype float32" in " ".join(stderr.split())
    assert len(run_configs(runs)) == 1


def test_the_tuned_protocol_reads_the_methods_and_the_variants_studies_together(tmp_path):
    import dataclasses

    import optuna

    from neobench.ablation.tuned import TUNING_STUDIES
    from neobench.ablation.tuned import tuned_lr_scales
    from neobench.ablation.tuned import tuned_configs
    from neobench.runs.config import load_preset

    runs = tmp_path / "runs"
    runs.mkdir()
    storage = f"sqlite:///{runs / 'ablations.db'}"
    scale = optuna.distributions.FloatDistribution(0.316, 10.0, log=True)

    def study(name: str, fixed: dict, space: dict, trials: list[tuple[dict, float]]) -> None:
        s = optuna.create_study(study_name=name, storage=storage, direction="minimize")
        s.set_user_attr("preset", "smol-cpu")
        s.set_user_attr("budget", {"max_steps": 12})
        s.set_user_attr("fixed", fixed)
        for params, value in trials:
            s.add_trial(optuna.trial.create_trial(params=params, distributions={**space, "lr_scale": scale}, value=value))

    base = dataclasses.replace(load_preset("smol-cpu"), runs_dir=str(runs))
    with pytest.raises(NeobenchError, match=r"needs the 'tune-lr' study \(and 'tune-lr-variants' for adapter variants\), and .* does not exist"):
        tuned_lr_scales(str(runs))
    methods = optuna.distributions.CategoricalDistribution(["lora", "neo"])
    study("tune-lr", {}, {"method": methods},
          [({"method": m, "lr_scale": s}, v) for m, s, v in [("lora", 1.0, 4.4), ("lora", 10.0, 4.2), ("neo", 1.0, 4.1), ("neo", 10.0, 4.3)]])
    assert tuned_lr_scales(str(runs)) == {"lora": 10.0, "neo": 1.0}
    with pytest.raises(NeobenchError, match=r"neo\+dora .*run `neobench ablate tune-lr-variants`"):
        tuned_configs([dataclasses.replace(base, method="neo", variant="dora")], {})
    with pytest.raises(NeobenchError, match=r"lora\+dora .*no shipped study searches it"):
        tuned_configs([dataclasses.replace(base, method="lora", variant="dora")], {})

    variants = optuna.distributions.CategoricalDistribution(["dora", "pissa"])
    study(TUNING_STUDIES[1], {"method": "neo"}, {"variant": variants},
          [({"variant": v, "lr_scale": s}, x) for v, s, x in [("dora", 1.0, 4.0), ("dora", 10.0, 3.9), ("pissa", 1.0, 3.8)]])
    # pissa tried one multiple of two: its search is unfinished, so nothing is chosen for it yet
    assert tuned_lr_scales(str(runs)) == {"lora": 10.0, "neo": 1.0, "neo+dora": 10.0}
    (cfg,) = tuned_configs([dataclasses.replace(base, method="neo", variant="dora")], {})
    assert (cfg.method, cfg.variant, cfg.lr_scale) == ("neo", "dora", 10.0)


def test_a_contour_is_drawn_over_numeric_parameters_only(tmp_path):
    """Interpolating between unordered categories (method, variant) draws a surface that means nothing."""
    from neobench.reporting.ablations import render

    scale = {"name": "FloatDistribution", "attributes": {"low": 0.1, "high": 10.0, "log": True, "step": None}}
    method = {"name": "CategoricalDistribution", "attributes": {"choices": ["lora", "neo"]}}
    rank = {"name": "IntDistribution", "attributes": {"low": 1, "high": 64, "log": True, "step": 1}}

    def export(name: str, distributions: dict, params: list[dict]) -> dict:
        return {"study": name, "direction": "minimize", "attrs": {}, "trials": [
            {"number": i, "state": "COMPLETE", "value": float(i), "params": p, "intermediate": {},
             "distributions": distributions, "user_attrs": {}} for i, p in enumerate(params)]}

    by_method = export("bymethod", {"method": method, "lr_scale": scale},
                       [{"method": m, "lr_scale": s} for m in ("lora", "neo") for s in (0.3, 1.0, 3.0)])
    numeric = export("numeric", {"rank": rank, "lr_scale": scale},
                     [{"rank": r, "lr_scale": s} for r in (4, 16) for s in (0.3, 1.0, 3.0)])
    assert not any("contour" in p.name for p in render(by_method, tmp_path))
    assert (tmp_path / "numeric_contour.png") in render(numeric, tmp_path)


def test_every_trial_is_compared_with_the_best_on_the_same_documents(tmp_path):
    from neobench.ablation.export import objective_per_doc
    from neobench.reporting.ablations import render
    from neobench.runs.results import tidy_per_doc

    # Per-document scores of the trials' runs, as load_per_doc reads them; trial 2 has two seeds.
    rows = [{"preset": "p", "run_id": run, "task": "t", "metric": "nll", "doc": f"d{i}", "value": v}
            for run, values in {"best": [1, 2, 3, 4], "worse": [2, 3, 4, 5], "same-a": [1, 2, 3, 4], "same-b": [1, 2, 3, 4],
                                "elsewhere": [9, 9, 9]}.items() for i, v in enumerate(values)]
    per_doc = tidy_per_doc(rows)
    assert objective_per_doc(["worse"], per_doc, "t", "nll") == {"docs": ["d0", "d1", "d2", "d3"], "values": [[2, 3, 4, 5]]}
    assert objective_per_doc(["best", "elsewhere"], per_doc, "t", "nll") is None, "runs on other documents cannot be paired"
    assert objective_per_doc(["best"], per_doc, "t", "acc") is None

    rank = {"name": "IntDistribution", "attributes": {"low": 1, "high": 64, "log": True, "step": 1}}
    trials = [(0, 2.5, ["best"], 8), (1, 3.5, ["worse"], 4), (2, 2.5, ["same-a", "same-b"], 16), (3, 3.0, ["elsewhere"], 2)]
    exported = {"study": "s", "direction": "minimize", "attrs": {"objective": "t/nll"}, "trials": [
        {"number": n, "state": "COMPLETE", "value": v, "params": {"rank": r}, "intermediate": {}, "distributions": {"rank": rank},
         "user_attrs": {"run_ids": runs}, **({"per_doc": objective_per_doc(runs, per_doc, "t", "nll")} if n != 3 else {})}
        for n, v, runs, r in trials]}
    render(exported, tmp_path)
    table = {int(cells[1]): cells for cells in (l.strip("| ").split(" | ") for l in (tmp_path / "s.md").read_text().splitlines()
                                                if l.startswith("| ") and l[2].isdigit())}
    assert table[0][5:7] == ["—", ""]  # the best itself
    # +1 on every document: every resample gives +1, so p = 1/10001, times 2 comparisons (Holm)
    assert table[1][5:7] == ["+1.0000 [+1.0000, +1.0000]*", "<0.001"]
    assert table[2][5:7] == ["+0.0000 [+0.0000, +0.0000]", "1"]  # the same scores on both seeds: Δ 0, p 1
    assert table[3][5:7] == ["–", ""]  # nothing exported to pair with
    assert "Without *, this study cannot tell that trial from the best." in (tmp_path / "s.md").read_text()


def test_tuned_configs_take_the_rate_tuned_at_the_nearest_budget(tmp_path):
    """tune-lr at 12 steps and tune-lr-epoch (an epoch of 250 steps): 48 steps take 12's choice, 192 and E the epoch's."""
    import dataclasses
    import json

    import optuna

    from neobench.ablation.tuned import TunedBudget, nearest_tuned, tuned_configs, tuned_lr_scales_by_budget
    from neobench.runs.config import load_preset

    runs = tmp_path / "runs"
    (runs / "epoch-run").mkdir(parents=True)
    (runs / "epoch-run" / "metrics.json").write_text(json.dumps({"budget": {"steps": 250}}))
    storage = f"sqlite:///{runs / 'ablations.db'}"
    space = {"method": optuna.distributions.CategoricalDistribution(["lora", "kd"]),
             "lr_scale": optuna.distributions.FloatDistribution(0.316, 10.0, log=True)}
    for name, max_steps, best in (("tune-lr", 12, 10.0), ("tune-lr-epoch", 0, 1.0)):
        s = optuna.create_study(study_name=name, storage=storage, direction="minimize")
        for key, value in {"preset": "smol-cpu", "budget": {"max_steps": max_steps}, "fixed": {}}.items():
            s.set_user_attr(key, value)
        for method in ("lora", "kd"):
            for scale in (1.0, 10.0):
                s.add_trial(optuna.trial.create_trial(params={"method": method, "lr_scale": scale}, distributions=space,
                                                      value=4.0 if scale == best else 4.5, user_attrs={"run_ids": ["epoch-run"]}))
    by_budget = tuned_lr_scales_by_budget(str(runs))
    assert by_budget == {TunedBudget(12, 12): {"lora": 10.0, "kd": 10.0}, TunedBudget(0, 250): {"lora": 1.0, "kd": 1.0}}
    assert nearest_tuned(48, 48, list(by_budget)) == TunedBudget(12, 12)  # log distance 1.4 against 1.7
    assert nearest_tuned(192, 192, list(by_budget)) == TunedBudget(0, 250)
    base = dataclasses.replace(load_preset("smol-cpu"), runs_dir=str(runs), method="kd")
    planned = [dataclasses.replace(base, max_steps=steps) for steps in (12, 48, 192, 0)]
    tuned = tuned_configs(planned, {})
    assert [(c.max_steps, c.lr_scale) for c in tuned] == [(12, 10.0), (48, 10.0)], "at 192 and E the paper runs serve"


def test_without_a_tuning_study_the_committed_leaderboards_trials_choose(tmp_path):
    """A fresh clone has no ablations.db: `--protocol tuned` takes the rates the committed tuning trials chose."""
    import dataclasses
    import json

    import optuna

    from neobench.ablation.tuned import TunedBudget, committed_tuning, tuned_configs
    from neobench.runs.config import load_preset

    runs, boards = tmp_path / "runs", tmp_path / "leaderboards"
    base = dataclasses.replace(load_preset("smol-cpu"), runs_dir=str(runs), method="kd")
    planned = [dataclasses.replace(base, max_steps=steps) for steps in (12, 0)]
    with pytest.raises(NeobenchError, match="needs the 'tune-lr' study"):
        tuned_configs(planned, {}, leaderboards=boards)  # neither a study nor a committed board

    def trial(study, steps, stopped_by, method, scale, value, task="neo_heldout_nll"):
        return {"model": "student", "study": study, "task": task, "metric": "nll", "value": value, "steps": steps,
                "stopped_by": stopped_by, "method": method, "variant": None, "loss": "forward_kl", "lr_scale": scale}

    rows = [trial("tune-lr", 12, "max_steps", "kd", s, v) for s, v in ((1.0, 4.5), (10.0, 4.0))]
    rows += [trial("tune-lr-epoch", 250, "epoch", "kd", s, v) for s, v in ((3.16, 2.6), (10.0, 2.7))]
    rows += [trial("tune-lr", 12, "max_steps", "kd", 1.0, 0.1, task="neo_fidelity"),  # not the objective
             trial(None, 12, "max_steps", "kd", 1.0, 0.1)]                            # not a trial
    (boards / "smol-cpu").mkdir(parents=True)
    (boards / "smol-cpu" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert committed_tuning("smol-cpu", boards)[1] == {TunedBudget(12, 12): {"kd": 10.0}, TunedBudget(0, 250): {"kd": 3.16}}
    assert [(c.max_steps, c.lr_scale) for c in tuned_configs(planned, {}, leaderboards=boards)] == [(12, 10.0), (0, 3.16)]

    # A study of its own that has not chosen yet is never overridden by the committed board's choice.
    runs.mkdir()
    own = optuna.create_study(study_name="tune-lr", storage=f"sqlite:///{runs / 'ablations.db'}", direction="minimize")
    for key, value in {"preset": "smol-cpu", "budget": {"max_steps": 12}, "fixed": {}}.items():
        own.set_user_attr(key, value)
    with pytest.raises(NeobenchError, match="has a finished trial yet"):
        tuned_configs(planned, {}, leaderboards=boards)
