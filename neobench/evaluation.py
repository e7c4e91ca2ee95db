"""Evaluation: lm-evaluation-harness on in-memory models, plus teacher-fidelity metrics.

    EvalSpec (tasks, limit, few-shot, batch size)
      -> load_tasks   names checked, data loaded (a missing data set fails here, in one line)
      -> evaluate     lm-eval's simple_evaluate on an HFLM wrapping the model as it is in memory,
                      and neo_fidelity computed directly (it needs teacher and student at once)
      -> rows         one per task x metric: value, stderr as lm-eval reports it, task hash, ...

Reference rows (the teacher and the untrained student) are cached in the neobench cache, keyed
by model fingerprint, task hashes and the spec, so a matrix pays for them once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from neobench.errors import NeobenchError
from neobench.registry import Registry

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
TASKS.add("neo_heldout_rougeL_sampled", SuiteTask(
    "neo_heldout_rougeL under the MiniLLM protocol: 3 samples at T=1, top-p 1, <=256 tokens, averaged",
    ("rougeL", "response_tokens", "at_cap"), True, in_suite=False))
SUITE = tuple(name for name in TASKS if TASKS.get(name).in_suite)

# Column titles for the terminal table; any other task shows as task/metric.
SHORT_NAMES = {
    ("neo_heldout_nll", "nll"): "NLL", ("neo_heldout_nll", "perplexity"): "PPL",
    ("neo_heldout_match", "acc"): "match", ("neo_heldout_match", "acc_norm"): "m_norm",
    ("neo_pydoc_bpb", "bits_per_byte"): "pydoc", ("neo_heldout_rougeL", "rougeL"): "ROUGE-L",
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


def _sha(payload: Any) -> str:
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
        from neobench.suite import heldout_pairs

        hashes[FIDELITY] = _sha({"version": FIDELITY_VERSION, "pairs": heldout_pairs(spec.heldout_data, spec.heldout_split)})
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


# --- evaluating one model ------------------------------------------------------------------


def evaluate(
    model: torch.nn.Module, tokenizer, taskset: TaskSet, *, teacher: Optional[torch.nn.Module] = None,
    vocab_size: Optional[int] = None, role: str = "student",
) -> dict[str, Any]:
    """Score ``model`` (as it is in memory) on every task of ``taskset``.

    ``teacher`` is needed for neo_fidelity unless ``role`` is "teacher" (which skips it).
    Returns {"role", "rows", "seconds", "spec", "lm_eval_version", "task_hashes"}.
    """
    spec = taskset.spec
    started = time.perf_counter()
    model.eval()
    rows: list[dict[str, Any]] = []
    per_doc: dict[str, dict] = {}
    if spec.lm_eval_tasks:
        lm_rows, lm_docs = _lm_eval_rows(model, tokenizer, taskset, role)
        rows += lm_rows
        per_doc.update(lm_docs)
    if FIDELITY in spec.tasks and role != "teacher":
        if teacher is None:
            raise NeobenchError(f"{FIDELITY} needs the teacher; drop it from --tasks to evaluate without one")
        fid_rows, per_doc[FIDELITY] = fidelity_rows(model, teacher, tokenizer, spec, vocab_size, taskset.hashes[FIDELITY])
        rows += fid_rows
    return {
        "role": role, "rows": rows, "seconds": time.perf_counter() - started, "spec": spec.to_dict(),
        "lm_eval_version": lm_eval_version(), "task_hashes": taskset.hashes, "per_doc": per_doc,
    }


def _lm_eval_rows(model, tokenizer, taskset: TaskSet, role: str) -> list[dict[str, Any]]:
    import contextlib
    import io

    from lm_eval import simple_evaluate

    from neobench.progress import console

    spec = taskset.spec
    lm = per_task_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    lm.generation_batch_size = spec.generation_batch_size
    console.print(f"[dim]{role}: lm-eval on {', '.join(spec.lm_eval_tasks)}[/dim]", highlight=False)
    # In a terminal lm-eval's own progress bars stay (they show the ETA); elsewhere they are off
    # and PerTaskLM's one line per task is the progress. Its "bootstrapping for stddev" lines go
    # to stdout, which neobench keeps for results. Its environment report is skipped: neobench
    # records versions itself, and the report costs seconds per call and runs `git describe`,
    # whose "fatal: not a git repository" would reach the terminal outside a checkout.
    # DISABLE_MULTIPROC: lm-eval bootstraps each stderr in this process, not in a pool it forks
    # from a process full of torch threads (the same seeded chunks, so the same values). A pool
    # worker still starting when the pool is torn down could miss its SIGTERM and hang the run.
    from unittest import mock

    with contextlib.redirect_stdout(io.StringIO()), tqdm_off_unless(console.is_terminal), \
            mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}), \
            mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None), \
            mock.patch("lm_eval.evaluator.add_env_info", lambda results: None):
        results = simple_evaluate(
            model=lm, tasks=spec.lm_eval_tasks, task_manager=taskset.manager, limit=spec.limit,
            num_fewshot=spec.num_fewshot, apply_chat_template=spec.chat_template and bool(tokenizer.chat_template),
            bootstrap_iters=spec.bootstrap_iters, log_samples=True,
        )
    return rows_from_results(results, taskset.hashes, spec), per_doc_from_samples(results)


DOC_KEY_CHARS = 16
"""Documents are keyed by the first 16 hex digits of their sha256: unique within any task here."""


def per_doc_from_samples(results: dict) -> dict[str, dict]:
    """lm-eval's logged samples -> {task: {"docs": [doc key], "metrics": {metric: [value per doc]}}},
    documents in lm-eval's doc_id order; generation tasks also keep each answer ("answers")."""
    per_doc = {}
    for task, samples in (results.get("samples") or {}).items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        names = list(dict.fromkeys(m for s in samples for m in s["metrics"]))
        entry: dict[str, Any] = {
            "docs": [s["doc_hash"][:DOC_KEY_CHARS] for s in samples],
            "metrics": {m: [_scalar(s.get(m)) for s in samples] for m in names},
        }
        if samples and all(isinstance(r, str) for s in samples for r in _flat(s["filtered_resps"])):
            entry["answers"] = [_flat(s["filtered_resps"]) for s in samples]
        per_doc[task] = entry
    return per_doc


def _flat(responses: list) -> list:
    """filtered_resps: one entry per request, each a string (generate_until) or a tuple/list."""
    out = []
    for r in responses:
        out.extend(r if isinstance(r, list) else [r])
    return out


def _scalar(value: Any) -> Optional[float]:
    """A per-document metric value as a float (lm-eval's perplexity items are plain floats too)."""
    if isinstance(value, (list, tuple)):  # e.g. a (prediction, reference) pair of corpus metrics: not per-document
        return None
    return None if value is None else float(value)


@functools.cache
def per_task_lm_class():
    """lm-eval's HFLM, running each task's requests on their own and reporting each in one line.

    lm-eval hands a model all tasks' requests of one kind at once. Split by task, they give a
    time per task; the split is the same in a terminal and in a log, so scores never depend on
    where the output goes. It moved the untrained student's smol-cpu scores by at most 1.4e-8
    (other batch shapes), far below any printed digit.
    """
    from lm_eval.models.huggingface import HFLM

    from neobench.progress import console

    class PerTaskLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._per_task("loglikelihood", requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._per_task("loglikelihood_rolling", requests, disable_tqdm)

        generation_batch_size: Optional[int] = None

        def generate_until(self, requests, disable_tqdm: bool = False):
            if not self.generation_batch_size:
                return self._per_task("generate_until", requests, disable_tqdm)
            # HFLM batches by its batch_size property, which reads batch_size_per_gpu: larger for generation only.
            kept, self.batch_size_per_gpu = self.batch_size_per_gpu, self.generation_batch_size
            try:
                return self._per_task("generate_until", requests, disable_tqdm)
            finally:
                self.batch_size_per_gpu = kept

        def _per_task(self, kind: str, requests, disable_tqdm: bool):
            by_task: dict[str, list[int]] = {}
            for i, request in enumerate(requests):
                by_task.setdefault(request.task_name, []).append(i)
            answers: list[Any] = [None] * len(requests)
            for task, positions in by_task.items():
                started = time.perf_counter()
                run = getattr(super(), kind)
                for i, answer in zip(positions, run([requests[i] for i in positions], disable_tqdm=disable_tqdm)):
                    answers[i] = answer
                console.print(
                    f"  {task}: {len(positions)} {kind} requests in {time.perf_counter() - started:.1f} s", highlight=False
                )
            return answers

    return PerTaskLM


@contextlib.contextmanager
def tqdm_off_unless(interactive: bool):
    """Outside a terminal, every tqdm bar is disabled: in a log its carriage returns are noise.

    lm-eval creates bars with an explicit ``disable=False`` in places no argument reaches
    (building a task's contexts, bootstrapping), so the switch is tqdm's own constructor.
    """
    if interactive:
        yield
        return
    from unittest import mock

    import tqdm.std

    original = tqdm.std.tqdm.__init__

    def quiet(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    with mock.patch.object(tqdm.std.tqdm, "__init__", quiet):
        yield


def rows_from_results(results: dict, hashes: dict[str, str], spec: EvalSpec) -> list[dict[str, Any]]:
    """lm-eval's results dict -> one row per task x metric ("acc,none" -> acc; other filters kept)."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            n = results.get("n-samples", {}).get(task, {})
            rows.append({
                "task": task, "metric": metric if filt == "none" else f"{metric},{filt}",
                "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": results.get("higher_is_better", {}).get(task, {}).get(metric),
                "n_docs": n.get("effective"), "num_fewshot": results.get("n-shot", {}).get(task),
                "limit": spec.limit, "task_version": results.get("versions", {}).get(task),
                "task_hash": hashes.get(task), "evaluator": f"lm-eval {lm_eval_version()}",
            })
    return rows


def fidelity_scores(
    student, teacher, tokenizer, pairs: list[dict[str, str]], batch_size: int, vocab_size: Optional[int]
) -> dict[str, list[float]]:
    """Per held-out response: mean token KL(p_teacher || p_student) and top-1 agreement.

    Conversations are encoded exactly as in training (chat template, assistant-only positions).
    """
    from neobench.progress import CountProgress

    examples = encode_pairs(tokenizer, pairs)
    keys = [pair_key(p) for p in pairs]
    device = next(student.parameters()).device
    vocab = slice(None, vocab_size)
    scores: dict[str, list] = {"kl": [], "top1_agreement": [], "docs": []}
    with CountProgress("neo_fidelity", log_fraction=None) as bar:  # in a log: one line, like lm-eval's tasks
        bar.start(len(examples))
        for start in range(0, len(examples), batch_size):
            batch = slice(start, start + batch_size)
            _fidelity_batch(student, teacher, tokenizer.pad_token_id, examples[batch], keys[batch], vocab, device, scores)
            bar.update(min(start + batch_size, len(examples)))
    return scores


def pair_key(pair: dict[str, str]) -> str:
    """A held-out pair's document key for neo_fidelity (sha256 of the pair, like lm-eval's doc_hash)."""
    return hashlib.sha256(json.dumps(pair, sort_keys=True).encode()).hexdigest()[:DOC_KEY_CHARS]


def encode_pairs(tokenizer, pairs: list[dict[str, str]]) -> list:
    """Held-out pairs as training examples (chat template, assistant-only labels), capped in length."""
    from neobench.data import Example, encode_chat

    examples = []
    for pair in pairs:
        ids, labels = encode_chat(tokenizer, [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["response"]}])
        examples.append(Example(tuple(ids[:FIDELITY_MAX_TOKENS]), tuple(labels[:FIDELITY_MAX_TOKENS])))
    return examples


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, pad_id: int, examples: list, batch_size: int = 8) -> float:
    """Mean over responses of each response's per-token NLL: neo_heldout_nll's definition, computed
    directly on encoded examples so a training loop can report it between steps in seconds."""
    from neobench.data import collate
    from neobench.losses import next_token_targets

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_response: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        mask, targets = next_token_targets(batch["labels"])
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        for i in range(mask.shape[0]):
            if mask[i].any():
                per_response.append(float(token_nll[i][mask[i]].mean()))
    model.train(was_training)
    return sum(per_response) / max(len(per_response), 1)


@torch.no_grad()
def _fidelity_batch(student, teacher, pad_id: int, examples: list, keys: list[str], vocab: slice, device, scores: dict) -> None:
    """Append each example's mean token KL, top-1 agreement and document key to ``scores``."""
    from neobench.data import collate
    from neobench.losses import next_token_targets, token_forward_kl

    batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_logits, t_logits = student(**inputs).logits, teacher(**inputs).logits
    mask, _ = next_token_targets(batch["labels"])
    for i in range(mask.shape[0]):
        s, t = s_logits[i][mask[i]][:, vocab], t_logits[i][mask[i]][:, vocab]
        if s.shape[0] == 0:
            continue
        scores["kl"].append(float(token_forward_kl(s, t).mean()))
        scores["top1_agreement"].append(float((s.argmax(-1) == t.argmax(-1)).float().mean()))
        scores["docs"].append(keys[i])


def fidelity_rows(student, teacher, tokenizer, spec: EvalSpec, vocab_size: Optional[int], task_hash_: str) -> tuple[list[dict], dict]:
    """(one row per metric, the per-document values in the layout of per_doc_from_samples)."""
    from lm_eval.api.metrics import mean_stderr

    from neobench.suite import heldout_pairs

    pairs = heldout_pairs(spec.heldout_data, spec.heldout_split)[: spec.limit]
    scores = fidelity_scores(student, teacher, tokenizer, pairs, spec.batch_size, vocab_size)
    docs = scores.pop("docs")
    better = FIDELITY_HIGHER_IS_BETTER
    return [
        {
            "task": FIDELITY, "metric": metric, "value": sum(values) / len(values),
            "stderr": mean_stderr(values) if len(values) > 1 else None, "higher_is_better": better[metric],
            "n_docs": len(values), "num_fewshot": 0, "limit": spec.limit, "task_version": FIDELITY_VERSION,
            "task_hash": task_hash_, "evaluator": "neobench",
        }
        for metric, values in scores.items()
    ], {"docs": docs, "metrics": scores}


# --- reference rows and stored results -----------------------------------------------------


def model_evaluation(
    role: str, model_path: str, taskset: TaskSet, device: str, dtype: torch.dtype, *,
    model: Optional[torch.nn.Module] = None, teacher_path: Optional[str] = None,
    teacher: Optional[torch.nn.Module] = None, vocab_size: Optional[int] = None,
) -> dict[str, Any]:
    """Evaluate a stored model (teacher, untrained student, any --model), cached by content.

    ``model`` may pass the one already loaded from ``model_path`` (the teacher of a KD run).

    The cache key covers the model's fingerprint, the task hashes, the spec and lm-eval's version
    (and the teacher's fingerprint when neo_fidelity is scored against it).
    """
    from neobench.models import cache_dir, load_causal_lm, load_tokenizer
    from neobench.prune import model_fingerprint

    needs_teacher = FIDELITY in taskset.spec.tasks and role != "teacher"
    fingerprint = model_fingerprint(model_path)
    key = _sha({
        "model": fingerprint, "tasks": taskset.hashes, "spec": taskset.spec.to_dict(),
        "lm_eval": lm_eval_version(), "teacher": model_fingerprint(teacher_path) if needs_teacher else None,
        "dtype": str(dtype),
    })
    path = cache_dir() / "evaluations" / f"{key[:24]}.json"
    if path.is_file():  # the same model under another role (--model pruned:15) reuses the scores
        return {**json.loads(path.read_text()), "role": role, "cached": True}
    model = model if model is not None else load_causal_lm(model_path, dtype, device)
    if needs_teacher and teacher is None:
        teacher = load_causal_lm(teacher_path, dtype, device).eval()
    result = evaluate(model, load_tokenizer(model_path), taskset, teacher=teacher, vocab_size=vocab_size, role=role)
    result["model"], result["model_fingerprint"] = model_path, fingerprint
    write_json_atomic(path, result)
    return {**result, "cached": False}


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def evaluation_file(run_dir: Path, spec: EvalSpec) -> Path:
    """Where a run keeps the results of one evaluation spec: evaluations/<spec hash>.json."""
    return Path(run_dir) / "evaluations" / f"{_sha(spec.to_dict())[:12]}.json"


TERMINAL_HIDDEN = {("neo_heldout_nll", "perplexity"), ("neo_heldout_match", "acc_norm"), ("neo_heldout_rougeL", "at_cap")}
"""Left out of the terminal table so that it fits 80 columns (exp of NLL, a variant of match, and a
share the length column hints at); the run's evaluations/ and the leaderboards have them."""


def scores_table(evaluations: list[tuple[str, list[dict]]], title: str = "scores (± stderr)"):
    """Rows = models, columns = task metrics; two lines per cell (value, ± stderr) to fit 80 columns."""
    from rich import box
    from rich.table import Table

    columns: list[tuple[str, str]] = []
    for _, rows in evaluations:
        for r in rows:
            if (r["task"], r["metric"]) not in columns and (r["task"], r["metric"]) not in TERMINAL_HIDDEN:
                columns.append((r["task"], r["metric"]))
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", no_wrap=True)
    for task, metric in columns:
        arrow = ""
        hib = next((r["higher_is_better"] for _, rows in evaluations for r in rows if (r["task"], r["metric"]) == (task, metric)), None)
        if hib is not None:
            arrow = " ↑" if hib else " ↓"
        table.add_column(SHORT_NAMES.get((task, metric), f"{task}/{metric}") + arrow, justify="right")
    for label, rows in evaluations:
        cells = {(r["task"], r["metric"]): r for r in rows}
        row = []
        for col in columns:
            r = cells.get(col)
            if r is None:
                row.append("-")
            else:
                digits = 2 if abs(r["value"]) >= 10 else 3  # ROUGE-L (x100) and lengths in tokens
                err = f"\n±{r['stderr']:.{digits}f}" if r["stderr"] is not None else ""
                row.append(f"{r['value']:.{digits}f}{err}")
        table.add_row(label, *row)
    return table
