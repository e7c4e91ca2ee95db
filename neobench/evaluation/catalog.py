"""What to evaluate: the offline suite's task catalog, EvalSpec, and the tasks checked and loaded.

    EvalSpec (tasks, limit, few-shot, batch size)
      -> load_tasks   names checked, data loaded (a missing data set fails here, in one line),
                      and every leaf task hashed (its config and documents), so a score says
                      exactly what was measured
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from neobench.core.errors import NeobenchError
from neobench.core.registry import Registry

TASK_DIR = Path(__file__).parent / "tasks"
SUITE_ALIAS = "neo_suite"
FIDELITY = "neo_fidelity"
FIDELITY_VERSION = 1
FIDELITY_MAX_TOKENS = 1024
FIDELITY_HIGHER_IS_BETTER = {"kl": False, "top1_agreement": True}


@dataclass(frozen=True)
class SuiteTask:
    description: str
    metrics: tuple[str, ...]
    via_lm_eval: bool
    """False for neo_fidelity, which neobench computes itself."""
    in_suite: bool = True
    """Part of neo_suite (the default evaluation); others are asked for by name."""


TASKS: Registry[SuiteTask] = Registry("task")
TASKS.add("neo_heldout_nll", SuiteTask("per-token NLL of held-out teacher responses given their prompts", ("nll", "perplexity"), True))
TASKS.add("neo_heldout_match", SuiteTask("pick a held-out prompt's response among 4 (3 from other prompts)", ("acc", "acc_norm"), True))
TASKS.add("neo_heldout_rougeL", SuiteTask("the student's greedy answer to a held-out prompt vs the teacher's: ROUGE-L F x100", ("rougeL", "response_tokens", "at_cap"), True))
TASKS.add("neo_pydoc_bpb", SuiteTask("bits per byte on 32 windows of the stdlib's pydoc_data.topics", ("bits_per_byte",), True))
TASKS.add(FIDELITY, SuiteTask("KL(teacher||student) per response token and top-1 agreement", ("kl", "top1_agreement"), False))
TASKS.add("neo_heldout_bpb", SuiteTask(
    "neo_heldout_nll as bits per UTF-8 byte of the response: compares students with different tokenizers",
    ("bits_per_byte",), True, in_suite=False))
TASKS.add("neo_heldout_rougeL_sampled", SuiteTask(
    "neo_heldout_rougeL under the MiniLLM protocol: 3 samples at T=1, top-p 1, <=256 tokens, averaged",
    ("rougeL", "response_tokens", "at_cap"), True, in_suite=False))
SUITE = tuple(name for name in TASKS if TASKS.get(name).in_suite)

# Column titles for the terminal table; any other task shows as task/metric.
SHORT_NAMES = {
    ("neo_heldout_nll", "nll"): "NLL", ("neo_heldout_nll", "perplexity"): "PPL",
    ("neo_heldout_match", "acc"): "match", ("neo_heldout_match", "acc_norm"): "m_norm",
    ("neo_pydoc_bpb", "bits_per_byte"): "pydoc", ("neo_heldout_bpb", "bits_per_byte"): "BPB", ("neo_heldout_rougeL", "rougeL"): "ROUGE-L",
    ("neo_heldout_rougeL", "response_tokens"): "len", ("neo_heldout_rougeL", "at_cap"): "at cap", (FIDELITY, "kl"): "KL", (FIDELITY, "top1_agreement"): "top-1",
}


def parse_task_list(text: str) -> tuple[str, ...]:
    """"neo_suite,arc_easy" -> the suite's tasks then arc_easy; "none" -> no evaluation."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["none"] or not names:
        return ()
    expanded: list[str] = []
    for name in names:
        for task in SUITE if name == SUITE_ALIAS else (name,):
            if task not in expanded:
                expanded.append(task)
    return tuple(expanded)


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...] = SUITE
    limit: Optional[int] = None
    """Documents per task (the first N); None: all."""
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    generation_batch_size: int = 32
    """Batch of generate_until requests (see RunConfig.eval_generation_batch_size)."""
    chat_template: bool = True
    """Wrap prompts in the model's chat template (when it has one), as in training."""
    heldout_data: str = "magpie-smollm2"
    heldout_split: str = "test"
    bootstrap_iters: int = 1000
    """lm-eval's bootstrap draws for stderrs without a closed form (perplexity)."""

    @classmethod
    def from_config(cls, cfg) -> "EvalSpec":
        return cls(
            tasks=parse_task_list(cfg.eval_tasks), limit=cfg.eval_limit, num_fewshot=cfg.eval_num_fewshot,
            batch_size=cfg.eval_batch_size, generation_batch_size=cfg.eval_generation_batch_size,
            chat_template=cfg.eval_chat_template,
            heldout_data=cfg.eval_data, heldout_split=cfg.eval_split,
        )

    @property
    def lm_eval_tasks(self) -> list[str]:
        """The tasks lm-eval runs: every standard task, and the suite's tasks marked via_lm_eval."""
        return [t for t in self.tasks if t not in TASKS or TASKS.get(t).via_lm_eval]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tasks": list(self.tasks)}


def content_sha(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


# --- tasks ---------------------------------------------------------------------------------


@dataclass
class TaskSet:
    """Tasks checked and loaded once; ``hashes`` maps every leaf task to a hash of its config and docs."""

    spec: EvalSpec
    manager: Any
    hashes: dict[str, str]


def load_tasks(spec: EvalSpec, tokenizer_path: str) -> TaskSet:
    """Check the task names and load their data; fail in one line if a data set is unavailable."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    names = spec.lm_eval_tasks
    standard = [n for n in names if n not in TASKS]
    manager = None
    hashes: dict[str, str] = {}
    if names:
        from lm_eval.tasks import TaskManager

        # lm-eval's own index (14k tasks) takes ~15 s to build: only when a standard task is asked for.
        manager = TaskManager(
            include_path=str(TASK_DIR), include_defaults=bool(standard),
            metadata={"tokenizer": tokenizer_path, "heldout_data": spec.heldout_data, "heldout_split": spec.heldout_split},
        )
        for name in standard:
            if name not in manager.all_tasks:
                close = difflib.get_close_matches(name, manager.all_tasks, n=3)
                parts = [f"unknown task {name!r}"] + ([f"did you mean {', '.join(close)}?"] if close else []) + [
                    f"neobench's own: {', '.join(TASKS)} ({SUITE_ALIAS} = {', '.join(SUITE)}); any lm-eval task name "
                    "also works (`lm-eval ls tasks` lists them)"
                ]
                raise NeobenchError("; ".join(parts))
        for name in names:
            try:
                loaded = manager.load([name])
            except Exception as err:  # datasets raises many types for "no network" / "not cached"
                raise _data_error(manager, name, err) from None
            for leaf, task in loaded["tasks"].items():
                hashes[leaf] = task_hash(task)
    if FIDELITY in spec.tasks:
        from neobench.evaluation.suite import heldout_pairs

        hashes[FIDELITY] = content_sha({"version": FIDELITY_VERSION, "pairs": heldout_pairs(spec.heldout_data, spec.heldout_split)})
    return TaskSet(spec, manager, hashes)


def task_hash(task) -> str:
    """sha256 of an lm-eval task's config (functions by source) and its evaluation documents."""
    config = task.dump_config()
    config.pop("metadata", None)  # holds the tokenizer path: where, not what
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for doc in task.eval_docs:
        digest.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _dataset_of(manager, name: str, depth: int = 0) -> tuple[Optional[str], Optional[str]]:
    """(dataset_path, dataset_name) of a task, or of a group's first task that has one."""
    entry = manager.task_index.get(name)
    cfg = (entry.cfg or {}) if entry else {}
    if cfg.get("dataset_path"):
        return cfg["dataset_path"], cfg.get("dataset_name")
    children = cfg.get("task") or []
    for child in children if isinstance(children, list) and depth < 4 else []:
        child_name = child if isinstance(child, str) else (child.get("task") if isinstance(child, dict) else None)
        if isinstance(child_name, str):
            found = _dataset_of(manager, child_name, depth + 1)
            if found[0]:
                return found
    return None, None


def _data_error(manager, name: str, err: Exception) -> NeobenchError:
    path, config = _dataset_of(manager, name)
    reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}".rstrip(": ")
    if not path or name in TASKS:
        return NeobenchError(f"task {name!r} could not be loaded ({reason})")
    args = f"'{path}'" + (f", '{config}'" if config else "")
    return NeobenchError(
        f"task {name!r} needs the data set {path}" + (f" (config {config})" if config else "")
        + f", which is not available here ({reason}); where there is network, run "
        f"`python -c \"import datasets; datasets.load_dataset({args})\"` to fill the Hugging Face datasets cache "
        "(or copy that cache here), then run again"
    )


DOC_KEY_CHARS = 16
"""Documents are keyed by the first 16 hex digits of their sha256: unique within any task here."""
