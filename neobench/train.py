"""The one training loop. Methods differ only in data: which weights train and which objective.

    setup  : resolve teacher/student, tokenize data, check the shared vocabulary   (Workspace)
    train  : for each optimizer step, for each micro-batch: forward, objective, backward
    record : budget actually consumed + cost (time, memory, parameters) + final losses
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from neobench.adapters import apply_adapter
from neobench.config import RunConfig
from neobench.data import TokenizedData, collate, example_order, load_training_data, resolve_data_file
from neobench.errors import NeobenchError
from neobench.fused_loss import LogitHead, LossSpec, TeacherHidden, check_head, fused_loss, scored_hidden
from neobench.losses import TeacherLogProbs, next_token_targets
from neobench.methods import METHODS, Method
from neobench.models import check_shared_vocabulary, load_causal_lm, load_tokenizer, output_rows, pick_device, resolve_model
from neobench.precision import autocast, dtype_name, pick_dtype
from neobench.prune import parse_pruned_spec, pruned_student_dir


@dataclass
class Workspace:
    """Everything a run needs besides its student: resolved model paths, tokenized data, the teacher (loaded lazily)."""

    teacher_path: str
    student_path: str
    tokenizer: object
    data: TokenizedData
    vocab_size: int
    device: str
    dtype: torch.dtype
    _teacher: Optional[torch.nn.Module] = field(default=None, repr=False)
    _teacher_head: Optional[LogitHead] = field(default=None, repr=False)

    def teacher(self) -> torch.nn.Module:
        """The frozen teacher, held in the run's compute dtype (it needs no fp32 master copy)."""
        if self._teacher is None:
            self._teacher = load_causal_lm(self.teacher_path, self.dtype, self.device).eval().requires_grad_(False)
            self._teacher_head = LogitHead.of(self._teacher, self.vocab_size)
            check_head(self._teacher, self._teacher_head, self.teacher_path)
        return self._teacher

    def teacher_head(self) -> LogitHead:
        self.teacher()
        return self._teacher_head


def prepare(cfg: RunConfig, need_teacher: bool = True) -> Workspace:
    """Resolve models, tokenize the data and check that teacher and student share a vocabulary.

    Cheap checks (device, data file, student path) come before anything slow (dequantizing
    or pruning), so a typo fails in a second, not after minutes.
    """
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    resolve_data_file(cfg.train_data, cfg.train_split)
    keep = parse_pruned_spec(cfg.student)
    student_path = resolve_model(cfg.student) if keep is None else None
    teacher_path = resolve_model(cfg.teacher)
    if keep is not None:
        student_path = str(pruned_student_dir(teacher_path, keep, cfg.train_data, cfg.train_split))
    tokenizer = load_tokenizer(student_path)
    data = load_training_data(tokenizer, cfg.train_data, cfg.train_split, cfg.seq_len, cfg.max_examples)
    ws = Workspace(teacher_path, student_path, tokenizer, data, len(tokenizer), device, dtype)
    if need_teacher:
        # Checked on tokenizers and configs, before any weights are loaded or steps taken.
        ws.vocab_size = check_shared_vocabulary(
            load_tokenizer(teacher_path), tokenizer, output_rows(teacher_path), output_rows(student_path),
            cfg.teacher, cfg.student,
        )
    return ws


class PeakMemory:
    """Peak memory of a block: CUDA max allocated on GPU, process peak RSS (VmHWM) on CPU.

    Writing 5 to /proc/self/clear_refs resets the kernel's RSS high-water mark, so the CPU
    figure covers only the block, not model loading before it.
    """

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_allocated" if device.startswith("cuda") else "rss"

    def __enter__(self):
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.kind = "rss_process_lifetime"  # no reset possible: report the lifetime peak
        return self

    def __exit__(self, *exc):
        return False

    def peak_bytes(self) -> int:
        if self.kind == "cuda_max_allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def lr_multiplier(step: int, n_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay towards 0, as a factor of the peak learning rate.

    transformers' get_cosine_schedule_with_warmup gives step 0 a learning rate of exactly 0,
    which throws away the first step: 8% of a 12-step budget. Here warm-up step i (0-based) gets
    (i + 1) / (warmup_steps + 1) of the peak, so every step trains.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, n_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def planned_steps(cfg: RunConfig, n_examples: int) -> int:
    per_step = cfg.batch_size * cfg.grad_accum
    return cfg.max_steps or max(1, math.ceil(n_examples / per_step))


def build_student(cfg: RunConfig, ws: Workspace) -> torch.nn.Module:
    """The student to train: weights that train are fp32 (master copies); an adapter's frozen base
    is held in the compute dtype, and peft keeps the adapter itself in fp32."""
    torch.manual_seed(cfg.seed)
    base_dtype = ws.dtype if cfg.effective_variant() is not None else torch.float32
    student = load_causal_lm(ws.student_path, base_dtype, ws.device)
    student.config.use_cache = False
    if cfg.effective_variant() is not None:
        student = apply_adapter(
            student, cfg.effective_variant(), cfg.rank, cfg.effective_alpha(), cfg.dropout, cfg.target_modules, cfg.seed
        )
    return student


def group_by_length(picks: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """A step's examples as micro-batches of similar length, so little compute goes to padding.

    Sorting within the step (stable, so ties keep the seeded order) changes which examples share
    a micro-batch, never which examples the step sees: the step's gradient is the same sum, every
    method gets the same micro-batches, and the order stays determined by the seed.
    """
    ordered = sorted(picks, key=lambda i: lengths[i])
    return [ordered[k : k + batch_size] for k in range(0, len(ordered), batch_size)]


def teacher_hidden(ws: Workspace, batch: dict, mask: torch.Tensor) -> TeacherHidden:
    """The teacher's last hidden states at the scored positions; no logits, no autograd record."""
    teacher = ws.teacher()
    with torch.inference_mode(), autocast(ws.device, ws.dtype):
        hidden = scored_hidden(teacher, batch, mask)
    return TeacherHidden(hidden.clone(), ws.teacher_head())  # clone: a normal tensor autograd may see


def cached_teacher(cache, ws: Workspace, batch: dict, mask: torch.Tensor, picks: list[int], counts: dict) -> TeacherLogProbs:
    """The micro-batch's teacher distributions from the cache, running the teacher for missing examples."""
    from neobench.fused_loss import project
    from neobench.teacher_cache import concat

    entries = [cache.load(i, ws.data.examples[i]) for i in picks]
    missing = [j for j, entry in enumerate(entries) if entry is None]
    if missing:
        teacher = teacher_hidden(ws, batch, mask)
        per_example = torch.split(teacher.hidden, mask.sum(1).tolist())
        for j in missing:
            with torch.no_grad():
                logits = teacher.head.transform(project(per_example[j], teacher.head, ws.dtype))
            entries[j] = cache.store(picks[j], ws.data.examples[picks[j]], logits.cpu())
    counts["hits"] += len(picks) - len(missing)
    counts["misses"] += len(missing)
    merged = concat(entries)
    return type(merged)(*(None if x is None else x.to(ws.device) for x in (merged.log_probs, merged.ids, merged.rest)))


def loss_spec(cfg: RunConfig, method: Method) -> LossSpec:
    """The method's objective as weights of the summed CE and divergence terms."""
    chunk = cfg.loss_chunk_tokens  # 0: one chunk
    if not method.uses_teacher:
        return LossSpec(1.0, 0.0, chunk_tokens=chunk)
    return LossSpec(1 - cfg.kd_ratio, cfg.kd_ratio, cfg.loss, cfg.temperature, cfg.loss_param(), chunk)


def offline_objective(cfg, ws, method, student, student_head, batch, picks, cache, cache_counts) -> dict:
    """CE (+ divergence) on the micro-batch's response tokens, as sums over those tokens."""
    mask, targets = next_token_targets(batch["labels"])
    with autocast(ws.device, ws.dtype):
        hidden = scored_hidden(student, batch, mask)
    teacher = None
    if method.uses_teacher:
        teacher = cached_teacher(cache, ws, batch, mask, picks, cache_counts) if cache is not None else teacher_hidden(ws, batch, mask)
    parts = fused_loss(hidden, student_head, targets[mask], teacher, loss_spec(cfg, method), ws.dtype)
    return {**parts, "tokens": int(mask.sum())}


def check_finite(parts: dict, cfg: RunConfig, step: int) -> None:
    value = float(parts["loss"].detach())
    if math.isfinite(value):
        return
    hint = (
        "reverse KL is +inf where the student puts mass on a token the teacher rules out (a -inf teacher logit); "
        "use --loss skew_reverse_kl or jsd, which stay finite"
        if cfg.loss == "reverse_kl" or METHODS.get(cfg.method).on_policy else "lower the learning rate or check the data"
    )
    raise NeobenchError(f"the loss became {value} at step {step}: {hint}")


WEIGHTS_FILE = "trained_weights.safetensors"


def changed_weights(student: torch.nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The tensors training changed: trainable ones, plus base weights an adapter's init rewrote (PiSSA).

    Saving these (not a merged model) keeps adapter runs small: megabytes, not the whole student.
    """
    from neobench.adapters import VARIANTS

    variant = cfg.effective_variant()
    rewrites_base = variant is not None and VARIANTS.get(variant).rewrites_base
    return {
        name: p.detach().cpu().contiguous()
        for name, p in student.named_parameters()
        if p.requires_grad or (rewrites_base and ".base_layer." in name)
    }


def load_trained_student(cfg: RunConfig, ws: Workspace, weights_file) -> torch.nn.Module:
    """Rebuild a run's student (base + adapter as configured) and load the weights it stored."""
    from safetensors.torch import load_file

    student = build_student(cfg, ws)
    state = load_file(str(weights_file), device=ws.device)
    missing = set(state) - {name for name, _ in student.named_parameters()}
    if missing:
        raise NeobenchError(f"{weights_file} does not fit this run's student (e.g. {sorted(missing)[0]!r}); was the run's config edited?")
    student.load_state_dict(state, strict=False)
    return student.eval()


def train(
    cfg: RunConfig, ws: Workspace, on_step: Optional[Callable[[dict], None]] = None,
    after_step: Optional[Callable[[int, torch.nn.Module], None]] = None,
) -> tuple[torch.nn.Module, list[dict], dict]:
    """Train one student; returns (student, per-step log rows, run record).

    ``on_step(row)`` gets each step's log row; ``after_step(step, student)`` may inspect the
    student between steps (an ablation's intermediate held-out NLL) or raise to stop the run.
    """
    method = METHODS.get(cfg.method)
    student = build_student(cfg, ws)
    cache = None
    if method.uses_teacher and not method.on_policy and cfg.teacher_cache != "off":
        from neobench.teacher_cache import CacheMode, TeacherCache

        cache = TeacherCache.for_run(
            CacheMode.parse(cfg.teacher_cache), ws.teacher_path, ws.data.data_hash, cfg.seq_len, cfg.temperature, ws.vocab_size
        )
    # With a cache, the teacher is loaded only if some example of the run is not cached yet.
    # minillm always needs it: the sequences it distils on are sampled fresh at every step.
    teacher = ws.teacher() if method.uses_teacher and (cache is None or method.on_policy) else None
    cache_counts = {"hits": 0, "misses": 0}
    generation_seconds = 0.0
    student.train()
    student_head = LogitHead.of(student, ws.vocab_size)
    check_head(student, student_head, ws.student_path)
    trainable = [p for p in student.parameters() if p.requires_grad]
    n_steps = planned_steps(cfg, len(ws.data.examples))
    per_step = cfg.batch_size * cfg.grad_accum
    order = example_order(len(ws.data.examples), n_steps * per_step, cfg.seed)
    lengths = [len(ex.input_ids) for ex in ws.data.examples]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.effective_lr(), weight_decay=cfg.weight_decay)
    warmup_steps = math.ceil(cfg.warmup_ratio * n_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, n_steps, warmup_steps))
    pad_id = ws.tokenizer.pad_token_id

    log: list[dict] = []
    tokens = response_tokens = 0
    stopped_by = "max_steps" if cfg.max_steps else "epoch"
    memory = PeakMemory(ws.device)
    with memory:
        start = time.perf_counter()
        for step in range(n_steps):
            micro_picks = group_by_length(order[step * per_step : (step + 1) * per_step], lengths, cfg.batch_size)
            micro_batches = [collate([ws.data.examples[i] for i in mp], pad_id) for mp in micro_picks]
            # Every loss term is summed over tokens and divided by the step's response-token count,
            # so the accumulated gradient is that of the token mean over the whole step (1x8 == 8x1).
            step_targets = max(1, sum(int(next_token_targets(b["labels"])[0].sum()) for b in micro_batches))
            totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
            for k, (batch, batch_picks) in enumerate(zip(micro_batches, micro_picks)):
                batch = {name: v.to(ws.device) for name, v in batch.items()}
                if method.on_policy:  # minillm: the student samples the responses it is taught on
                    from neobench.onpolicy import minillm_objective

                    parts, seconds = minillm_objective(
                        cfg, ws, student, student_head, batch, [ws.data.examples[i] for i in batch_picks],
                        cfg.seed * 1_000_003 + step * 1_009 + k,
                    )
                    generation_seconds += seconds
                else:
                    parts = offline_objective(cfg, ws, method, student, student_head, batch, batch_picks, cache, cache_counts)
                check_finite(parts, cfg, step + 1)
                (parts["loss"] / step_targets).backward()
                totals["loss"] += float(parts["loss"].detach()) / step_targets
                totals["ce"] += float(parts["ce_sum"]) / step_targets
                totals["kd"] += float(parts["kd_sum"]) / step_targets
                tokens += int(batch["attention_mask"].sum())
                response_tokens += parts["tokens"]
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)) if cfg.max_grad_norm else float("nan")
            )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            row = {
                "step": step + 1, **totals, "lr": lr, "grad_norm": grad_norm,
                "tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed,
            }
            log.append(row)
            if on_step:
                on_step(row)
            if after_step:
                # Time spent inspecting the student is not training time: shift the clock past it.
                paused = time.perf_counter()
                after_step(step + 1, student)
                start += time.perf_counter() - paused
            if cfg.max_wall_seconds and elapsed >= cfg.max_wall_seconds and step + 1 < n_steps:
                stopped_by = "max_wall_seconds"
                break
        wall = time.perf_counter() - start
    peak = memory.peak_bytes()

    last = log[-min(5, len(log)):]
    record = {
        "budget": {
            "steps": len(log), "planned_steps": n_steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "seq_len": cfg.seq_len, "examples_seen": len(log) * per_step, "tokens": tokens,
            "response_tokens": response_tokens, "data_hash": ws.data.data_hash, "stopped_by": stopped_by,
        },
        "cost": {
            "train_seconds": wall, "seconds_per_step": wall / len(log), "tokens_per_second": tokens / wall,
            "generation_seconds": generation_seconds, "update_seconds": wall - generation_seconds,
            "peak_memory_bytes": peak, "memory_kind": memory.kind,
            "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in student.parameters()),
            "device": ws.device, "dtype": dtype_name(ws.dtype), "torch_threads": torch.get_num_threads(),
            "teacher_cache": {"mode": cfg.teacher_cache, **cache_counts, "rebuilt": cache.rebuilt if cache else 0},
        },
        "final": {
            "loss": log[-1]["loss"], "ce": log[-1]["ce"], "kd": log[-1]["kd"],
            "loss_last5_mean": sum(r["loss"] for r in last) / len(last),
            "ce_last5_mean": sum(r["ce"] for r in last) / len(last),
            "kd_last5_mean": sum(r["kd"] for r in last) / len(last),
        },
        "data": {"report": ws.data.report.__dict__, "data_hash": ws.data.data_hash},
        "lr": cfg.effective_lr(),
        "pid": os.getpid(),
    }
    return student, log, record
