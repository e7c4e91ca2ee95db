"""README.md's commands cannot rot: every `neobench ...` and `make ...` line of its code blocks is
checked, and those of run, eval, report, ablate, list and export are run on the tiny models.

A failure names the README line the command came from.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# Placeholders the README uses in commands, and what stands for them here. V takes every value
# its comment lists ("V = dora, pissa, rslora, moslora").
PLACEHOLDERS = {"RUN_ID": "RUN_ID", "V": ["dora", "pissa", "rslora", "moslora"]}


def readme_commands() -> list[tuple[int, list[str]]]:
    """(line number, argv) of every neobench/make command in README.md's fenced code blocks
    (shell blocks: a ```text block shows output, not commands)."""
    commands, fenced, shell = [], False, False
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            shell = fenced and line.strip("`").strip() in ("", "bash", "sh", "shell", "console")
            continue
        if shell and re.match(r"\s*(neobench|make)\s", line + " "):
            argv = shlex.split(line, comments=True)
            if "V" in argv:
                commands += [(number, [v if a == "V" else a for a in argv]) for v in PLACEHOLDERS["V"]]
            else:
                commands.append((number, argv))
    return commands


COMMANDS = readme_commands()


def where(number: int, argv: list[str]) -> str:
    return f"README.md line {number}: {shlex.join(argv)}"


def test_the_readme_has_commands_of_every_kind():
    kinds = {(argv[0], argv[1]) for _, argv in COMMANDS}
    for kind in [("make", "demo"), ("make", "test"), ("neobench", "run"), ("neobench", "eval"), ("neobench", "report"),
                 ("neobench", "ablate"), ("neobench", "list"), ("neobench", "export")]:
        assert kind in kinds, f"README.md shows no `{' '.join(kind)}` in a code block"


class Reached(Exception):
    """Raised where a command would start its real work: everything before it (parsing, config, registries) ran."""


# Where each command stops when only its parsing and checking are under test.
STOP_AT = {
    "run": ["neobench.runs.execute.execute_many", "neobench.runs.execute.execute", "neobench.commands.run.resume_run",
            "neobench.ablation.tuned.tuned_lr_scales_by_budget"],
    "eval": ["neobench.runs.rescore.evaluate_run", "neobench.runs.rescore.evaluate_model"],
    "report": ["neobench.runs.results.load_results"],
    "ablate": ["neobench.ablation.worker.run_study"],
    "export": ["neobench.runs.export.export_run"],
}


@pytest.mark.parametrize("number,argv", COMMANDS, ids=[f"line{n}-{'-'.join(a[:3])}" for n, a in COMMANDS])
def test_every_readme_command_parses_and_passes_its_checks(number, argv, monkeypatch, tmp_path):
    if argv[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert argv[1] in targets, f"{where(number, argv)}: the Makefile has no target {argv[1]!r}"
        return
    from typer.testing import CliRunner

    from neobench.cli import app

    def stop(*args, **kwargs):
        raise Reached

    for target in STOP_AT.get(argv[1], []):
        monkeypatch.setattr(target, stop)
    monkeypatch.chdir(tmp_path)  # nothing a command writes lands in the repository
    result = CliRunner().invoke(app, argv[1:])
    if argv[1] in STOP_AT and "--help" not in argv:
        assert isinstance(result.exception, Reached), f"{where(number, argv)}:\n{result.output}{result.exception!r}"
    else:
        assert result.exit_code == 0, f"{where(number, argv)}:\n{result.output}{result.exception!r}"


# --- on the tiny models -------------------------------------------------------------------------

# README commands that need what a test cannot have (the network, a PostgreSQL server, a killed
# run to resume, the memory of 8B-shape models) or that only multiply the work (seeds, workers,
# trials, budgets, the 16-trial learning-rate search and the runs it chooses) are only checked above;
# tests/test_scale.py runs resume and random: models, tests/test_ablation.py the tuned protocol,
# tests/test_cli.py --budgets.
# The rest run with the tiny preset added; on the tiny teacher (4 layers) pruned:15 becomes pruned:2.
NOT_RUN = ("arc_easy", "postgresql://", "HuggingFaceTB/", "--seeds", "--workers", "--trials", "--resume", "random:",
           "tune-lr", "--protocol", "--budgets")



def on_tiny(argv: list[str], preset: Path, run_id: str | None) -> list[str]:
    argv = ["pruned:2" if a == "pruned:15" else (run_id if a == "RUN_ID" else a) for a in argv]
    if argv[1] in ("run", "eval") and "--run" not in argv:
        argv += ["--preset", str(preset)]
    return argv


def test_readme_commands_run_on_tiny_models(tiny, tmp_path, monkeypatch):
    """Each README command of run, eval, report, ablate, list and export, as written, on the tiny models.

    Commands run in this process (typer's CliRunner), and so do the runs they would start in
    child processes: the process boundary is tested on its own in test_cli.py, and here each
    command costs its work, not two interpreter start-ups.
    """
    import tempfile

    from typer.testing import CliRunner

    from neobench.cli import app
    from neobench.core.errors import NeobenchError

    def run_in_this_process(cfg, run_id, extra_args=(), nproc=1, resolved=True):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=tmp_path, delete=False) as f:
            yaml.safe_dump(cfg.to_dict(), f)
        what = ["--preset", f.name, "--run-id", run_id] if resolved else []
        try:
            code = app(["run", *what, *extra_args], standalone_mode=False)
        except NeobenchError:
            return 2
        return code if isinstance(code, int) else 0

    monkeypatch.setattr("neobench.runs.execute.run_in_child", run_in_this_process)
    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({
        "preset": "tiny", "teacher": str(tiny["teacher"]), "student": str(tiny["student"]), "train_data": str(tiny["data"]),
        "seq_len": 64, "batch_size": 4, "grad_accum": 1, "max_steps": 2, "lr": 1e-3, "rank": 4,
        "minillm_max_new_tokens": 8, "eval_tasks": "neo_heldout_nll,neo_fidelity", "eval_data": str(tiny["data"]),
        "eval_split": "train", "eval_limit": 6, "eval_batch_size": 4,
    }))
    (tmp_path / "ablations").mkdir()
    study = yaml.safe_load((REPO / "ablations" / "rank.yaml").read_text())  # the shipped study, at tiny scale
    study.update(preset=str(preset), trials=1, budget={"max_steps": 2}, space={"rank": {"type": "int", "low": 2, "high": 8, "grid": [4]}},
                 intermediate={"every": 1, "prompts": 2})
    (tmp_path / "ablations" / "rank.yaml").write_text(yaml.safe_dump(study))

    chosen, seen = [], set()
    for number, argv in COMMANDS:
        line = " ".join(argv)
        if argv[0] != "neobench" or argv[1] not in ("run", "eval", "report", "ablate", "list", "export") or any(s in line for s in NOT_RUN):
            continue
        if "--help" in argv:
            continue
        # One command per shape: its flags (not --runs-dir) and its method. So the leaderboard's
        # variant loop is run for one variant, a command shown again with --runs-dir is not rerun.
        flags = [a for a in argv if a.startswith("--") and a != "--runs-dir"]
        key = (argv[1], *flags, argv[argv.index("--method") + 1] if "--method" in argv else "")
        if key not in seen:
            seen.add(key)
            chosen.append((number, argv))
    chosen.sort(key=lambda c: c[1][1] != "run")  # runs first: eval and report need one
    run_id = None
    for number, argv in chosen:
        command = on_tiny(argv, preset, run_id)
        result = CliRunner().invoke(app, command[1:])
        assert result.exit_code == 0 and result.exception is None, (
            f"{where(number, argv)} (on tiny: {shlex.join(command)}):\n{result.output[-3000:]}{result.exception!r}"
        )
        if argv[1] == "run" and run_id is None:
            run_id = next(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    ran = {argv[1] for _, argv in chosen}
    assert ran == {"run", "eval", "report", "ablate", "list", "export"}, f"README commands run here cover only {sorted(ran)}"
    assert (tmp_path / "leaderboards" / "tiny" / "main.md").is_file()  # the report of runs/leaderboard-smol-cpu


def test_every_leaderboard_table_the_readme_quotes_is_the_committed_one():
    """A README table with a `model` column quotes the committed leaderboards: its header and each
    of its rows (a quote may leave rows out) are rows of a generated file under leaderboards/, cell
    for cell, so no figure there is typed in."""

    def cells(line: str) -> tuple[str, ...]:
        return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))

    def is_rule(line: str) -> bool:
        return set(line) <= set("|:- ")

    generated = {cells(line) for path in (REPO / "leaderboards").rglob("*.md")
                 for line in path.read_text().splitlines() if line.startswith("|") and not is_rule(line)}
    tables, current = [], None
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("| model"):
            current = []
            tables.append((number, current))
        if current is not None and line.startswith("|"):
            current += [] if is_rule(line) else [line]
        elif current is not None:
            current = None
    assert len(tables) >= 4
    for number, lines in tables:
        missing = [line for line in lines if cells(line) not in generated]
        assert not missing, f"README.md line {number}: table rows found in no leaderboards/**/*.md: {missing[:2]}"
