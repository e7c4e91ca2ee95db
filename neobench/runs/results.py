"""Tidy results: one row per model x task x metric, read from run directories.

    runs/<run_id>/{config.yaml, metrics.json, evaluations/*.json}  ->  load_results(runs_dir)  ->  DataFrame

Student rows carry their run's method, variant, seed, budget and cost; the reference models
(teacher, untrained student) appear as rows of their own, once per preset and evaluation.
Tables and plots (:mod:`neobench.reporting`) are derived from these rows only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from neobench.core.errors import NeobenchError

COLUMNS = [
    "preset", "run_id", "model", "model_fingerprint", "method", "variant", "loss", "seed", "config_key",
    "steps", "tokens", "data_hash", "seq_len", "batch_size", "grad_accum", "stopped_by",
    "task", "metric", "value", "stderr", "higher_is_better", "n_docs", "limit", "num_fewshot", "task_hash", "evaluator",
    "trainable_params", "peak_memory_bytes", "memory_kind", "train_seconds", "wall_seconds", "tokens_per_second",
    "device", "dtype", "rank", "kd_ratio", "temperature", "lr", "lr_scale", "study", "trial", "student", "examples_hash",
]
REFERENCE_METHODS = {"teacher": "teacher", "untrained_student": "untrained"}
# Config fields that do not change what a run learns: runs differing only in these are seeds of one setting.
NOT_IN_CONFIG_KEY = {"seed", "runs_dir", "save_weights", "device", "dtype", "preset", "loss_chunk_tokens", "log_to"} | {
    "study", "trial", "strategy", "save_every"}
# Fields added after runs were stored: left out of the key at their default, so those runs keep theirs.
# compile among them: a compiled run learns the same thing, but its train time (the compiling
# included) is not an eager run's, and a report must not average the two as seeds of one setting.
KEY_ONLY_IF_NOT = {"optimizer": "adamw", "lr_scale": 1.0, "akl_mu": 0.5, "compile": False}


def config_key(config: dict[str, Any], device: str, dtype: str, world_size: int = 1) -> str:
    """Hash of everything that shapes a run's result except its seed (the device and dtype it actually used).

    grad_accum counts micro-batches per step over all ``world_size`` processes: 2 processes x 1 and
    1 process x 2 are one budget (see neobench.training.distributed).

    Fields a run's config.yaml lacks (it predates them) take today's defaults, so adding a config
    field does not split earlier runs from later ones.
    """
    from neobench.runs.config import RunConfig

    config = {**RunConfig().to_dict(), **config}
    kept = {k: v for k, v in config.items() if k not in NOT_IN_CONFIG_KEY and not k.startswith("eval_")}
    kept = {k: v for k, v in kept.items() if KEY_ONLY_IF_NOT.get(k, object()) != v}
    if world_size > 1:
        kept["grad_accum"] = kept["grad_accum"] * world_size
    kept["device"], kept["dtype"] = device.split(":")[0], dtype
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every tidy row of one run directory: its student's scores and the references stored with them."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    budget, cost = metrics["budget"], metrics["cost"]
    base = {
        "preset": metrics["preset"], "run_id": metrics["run_id"], "steps": budget["steps"], "tokens": budget["tokens"],
        "data_hash": budget["data_hash"], "seq_len": budget["seq_len"], "batch_size": budget["batch_size"],
        # Micro-batches per step over all processes: the budget, whatever the process count.
        "grad_accum": budget["grad_accum"] * budget.get("world_size", 1), "stopped_by": budget["stopped_by"],
        "study": config.get("study"), "trial": config.get("trial"),
        # Which student (its spec) trained, and a tokenizer-independent hash of the examples it saw:
        # a board may hold students of two vocabularies (neobench.reporting.vocabularies).
        "student": config.get("student"), "examples_hash": budget.get("examples_hash"),
    }
    student = {
        **base, "model": "student", "method": metrics["method"], "variant": metrics["variant"], "loss": metrics["loss"],
        "seed": metrics["seed"], "config_key": config_key(config, cost["device"], cost["dtype"], budget.get("world_size", 1)),
        "trainable_params": cost["trainable_params"], "peak_memory_bytes": cost["peak_memory_bytes"],
        "memory_kind": cost["memory_kind"], "train_seconds": cost["train_seconds"], "wall_seconds": metrics["wall_seconds"],
        "tokens_per_second": cost["tokens_per_second"], "device": cost["device"], "dtype": cost["dtype"],
        "rank": config.get("rank"), "kd_ratio": config.get("kd_ratio"), "temperature": config.get("temperature"),
        "lr": metrics.get("lr"), "lr_scale": config.get("lr_scale", 1.0),
    }
    rows = []
    for path in sorted((run_dir / "evaluations").glob("*.json")):
        for evaluation in json.loads(path.read_text())["evaluations"]:
            role = evaluation["role"]
            who = student if role == "student" else {
                **base, "model": role, "method": REFERENCE_METHODS.get(role, role),
                "model_fingerprint": (evaluation.get("model_fingerprint") or "")[:16] or None,
                "dtype": cost["dtype"],  # references are scored in the run's dtype
            }
            for r in evaluation["rows"]:
                rows.append({**who, **{k: r.get(k) for k in (
                    "task", "metric", "value", "stderr", "higher_is_better", "n_docs", "limit", "num_fewshot", "task_hash", "evaluator",
                )}})
    return rows


def run_dirs(runs_dir: str | Path) -> list[Path]:
    """Finished run directories (a .tmp-* directory is an unfinished run and is skipped)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "metrics.json").is_file())


def load_results(runs_dir: str | Path) -> pd.DataFrame:
    """Tidy rows of every run under ``runs_dir``; reference rows appear once per preset and evaluation."""
    rows = [row for run in run_dirs(runs_dir) for row in run_rows(run)]
    return tidy(rows)


# Training curves: one row per run x optimizer step, from train_log.jsonl. Kept beside
# results.jsonl as curves.jsonl, so the plots regenerate from committed rows like the tables.
CURVE_COLUMNS = ["preset", "run_id", "step", "loss", "ce", "kd"]


def load_curves(runs_dir: str | Path) -> pd.DataFrame:
    """Per-step loss, CE and KD of every run under ``runs_dir``."""
    rows = []
    for run in run_dirs(runs_dir):
        metrics = json.loads((run / "metrics.json").read_text())
        log = run / "train_log.jsonl"
        for line in log.read_text().splitlines() if log.is_file() else []:
            step = json.loads(line)
            kd = step.get("kd") if metrics.get("loss") else None  # sft and lora log kd = 0: they have no KD term
            rows.append({"preset": metrics["preset"], "run_id": run.name, "step": step["step"], "loss": step.get("loss"),
                         "ce": step.get("ce"), "kd": kd})
    return tidy_curves(rows)


# Per-document scores of every student: what the paired comparisons of the report resample.
# Kept beside results.jsonl as per_doc.csv (compact: a leaderboard holds tens of thousands).
PER_DOC_COLUMNS = ["preset", "run_id", "task", "metric", "doc", "value"]


def load_per_doc(runs_dir: str | Path) -> pd.DataFrame:
    """One row per run x task x metric x document, from the student evaluations under ``runs_dir``."""
    rows = []
    for run in run_dirs(runs_dir):
        preset = json.loads((run / "metrics.json").read_text())["preset"]
        for path in sorted((run / "evaluations").glob("*.json")):
            for evaluation in json.loads(path.read_text())["evaluations"]:
                if evaluation["role"] != "student":
                    continue
                for task, entry in (evaluation.get("per_doc") or {}).items():
                    for metric, values in entry["metrics"].items():
                        rows += [{"preset": preset, "run_id": run.name, "task": task, "metric": metric, "doc": doc, "value": v}
                                 for doc, v in zip(entry["docs"], values) if v is not None]
    return tidy_per_doc(rows)


def tidy_per_doc(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=PER_DOC_COLUMNS)
    frame["value"] = frame["value"].astype(float)
    return frame.sort_values(["preset", "run_id", "task", "metric", "doc"]).reset_index(drop=True)


def write_per_doc(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.9g", lineterminator="\n")


def read_per_doc(path: Path) -> pd.DataFrame:
    """A leaderboard's per_doc.csv; no file gives no rows (boards made before per-document scores were kept)."""
    if not path.is_file():
        return tidy_per_doc([])
    return tidy_per_doc(pd.read_csv(path, dtype={"doc": str}).to_dict("records"))


def tidy_curves(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=CURVE_COLUMNS)
    frame["step"] = frame["step"].astype("Int64")
    return frame.sort_values(["preset", "run_id", "step"]).reset_index(drop=True)


def write_curves(frame: pd.DataFrame, path: Path) -> None:
    _write_jsonl(frame, CURVE_COLUMNS, path)


def read_curves(path: Path) -> pd.DataFrame:
    """A leaderboard's curves.jsonl; no file gives no rows (boards made before curves were kept)."""
    return tidy_curves(_read_jsonl(path) if path.is_file() else [])


def replace_runs(old: pd.DataFrame, new: pd.DataFrame, tidy_rows) -> pd.DataFrame:
    """``old`` rows with every run of ``new`` replaced by its rows there (a run collected again wins)."""
    kept = old[~old["run_id"].isin(set(new["run_id"]))]
    return tidy_rows([*kept.to_dict("records"), *new.to_dict("records")])


INTEGER_COLUMNS = ["seed", "steps", "tokens", "seq_len", "batch_size", "grad_accum", "n_docs", "limit", "num_fewshot",
                   "trainable_params", "peak_memory_bytes", "rank", "trial"]


def tidy(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame with the standard columns, references de-duplicated, in a stable order."""
    frame = pd.DataFrame(list(rows), columns=COLUMNS)
    # Nullable integers: a reference row has no seed, and 0 must not turn into 0.0 on the way.
    frame[INTEGER_COLUMNS] = frame[INTEGER_COLUMNS].astype("Int64")
    if frame.empty:
        return frame
    refs = frame["model"] != "student"
    # The same reference model scored with the same task hash and limit is one row, whichever run stored it.
    ref_key = ["preset", "model", "model_fingerprint", "task", "metric", "task_hash", "limit", "num_fewshot", "dtype"]
    deduped = frame[refs].sort_values("run_id").drop_duplicates(ref_key, keep="first")
    frame = pd.concat([frame[~refs], deduped])
    frame = frame.sort_values(["preset", "model", "method", "variant", "seed", "run_id", "task", "metric"], na_position="first")
    return frame.reset_index(drop=True)


def write_rows(frame: pd.DataFrame, path: Path) -> None:
    """JSON Lines, one object per row, keys in COLUMNS order: the committed, diffable source of a leaderboard."""
    _write_jsonl(frame, COLUMNS, path)


def read_rows(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise NeobenchError(f"no results file {path}; run `neobench report --runs RUNS_DIR` after `neobench run`")
    return tidy(_read_jsonl(path))


def _write_jsonl(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({c: _plain(row[c]) for c in columns}) for _, row in frame.iterrows()]
    path.write_text("".join(line + "\n" for line in lines))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    """pandas/numpy scalars -> JSON scalars (NaN -> null)."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value.item() if hasattr(value, "item") else value
