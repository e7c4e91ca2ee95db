"""The one training loop. Methods differ only in data: which weights train and which objective.

    setup  : resolve teacher/student, tokenize data, check the shared vocabulary   (training.workspace)
    train  : for each optimizer step, for each micro-batch: forward, objective, backward
    record : budget actually consumed + cost (time, memory, parameters) + final losses
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch

from neobench.core.errors import NeobenchError
from neobench.core.stopping import STOP, Interrupted, injected_fault, signal_point
from neobench.data.examples import collate, example_order
from neobench.models.adapters import apply_adapter
from neobench.models.loading import load_causal_lm
from neobench.models.precision import autocast, cpu_bf16_kernel, dtype_name
from neobench.training.distributed import World
from neobench.training.fused_loss import LogitHead, LossSpec, check_head, fused_loss
from neobench.training.losses import next_token_targets
from neobench.training.memory import PeakMemory, allocator
from neobench.training.methods import METHODS, Method
from neobench.training.optimizers import OPTIMIZERS
from neobench.training.workspace import Workspace

if TYPE_CHECKING:  # the loop reads a RunConfig's fields; the runs stage above defines and validates it
    from neobench.runs.config import RunConfig


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


def planned_steps(cfg: RunConfig, n_examples: int, world_size: int = 1) -> int:
    per_step = cfg.batch_size * cfg.grad_accum * world_size
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


def cached_teacher(cache, ws: Workspace, batch: dict, mask: torch.Tensor, picks: list[int], counts: dict):
    """The micro-batch's teacher outputs from the cache, running the teacher for missing examples.

    A TeacherHidden (hidden-state cache: the loss projects it as if the teacher had run) or the
    cached TeacherLogProbs (dense, top-k). Missing examples go through the teacher as the cache's
    fill does (neobench.training.teacher_cache.run_teacher), not in this micro-batch, so what is
    stored does not depend on the examples it was first met with. A sharded teacher (FSDP) is the
    exception: its forward is collective, so it runs on the micro-batch on every rank.
    """
    from neobench.training.teacher_cache import concat, run_teacher, store_from_hidden

    entries = [cache.load(i, ws.data.examples[i]) for i in picks]
    missing = [j for j, entry in enumerate(entries) if entry is None]
    counts["hits"] += len(picks) - len(missing)
    counts["misses"] += len(missing)
    if missing and not ws.shards_teacher:
        for j, entry in zip(missing, run_teacher(cache, ws, [picks[j] for j in missing])):
            entries[j] = entry
        missing = []
    head = cache.load_head(ws.device) if cache.holds_hidden else None
    need = bool(missing) or (cache.holds_hidden and head is None)
    if ws.shards_teacher:  # a sharded teacher's forward is collective: every rank runs it if any rank must
        from neobench.training.distributed import all_sum

        need = all_sum([1.0 if need else 0.0], ws.world, ws.device)[0] > 0
    if need:
        teacher = ws.teacher_hidden(batch, mask)
        head = teacher.head
        per_example = torch.split(teacher.hidden, mask.sum(1).tolist())
        for j in missing:
            entries[j] = store_from_hidden(cache, picks[j], ws.data.examples[picks[j]], per_example[j], head, ws.dtype)
        if cache.holds_hidden:
            cache.store_head(head)
    if cache.holds_hidden:
        return ws.as_teacher(torch.cat(entries).to(ws.device), head, batch, mask)
    merged = concat(entries)
    return type(merged)(*(None if x is None else x.to(ws.device) for x in (merged.log_probs, merged.ids, merged.rest)))


def loss_spec(cfg: RunConfig, method: Method) -> LossSpec:
    """The method's objective as weights of the summed CE and divergence terms."""
    chunk = cfg.loss_chunk_tokens  # 0: one chunk
    if not method.uses_teacher:
        return LossSpec(1.0, 0.0, chunk_tokens=chunk)
    return LossSpec(1 - cfg.kd_ratio, cfg.kd_ratio, cfg.loss, cfg.temperature, cfg.loss_param(), chunk)


def offline_objective(cfg, ws, method, scorer, student_head_of, batch, picks, cache, cache_counts) -> dict:
    """CE (+ divergence) on the micro-batch's response tokens, as sums over those tokens.

    ``scorer`` is the student as the loop calls it (neobench.training.distributed.ScoredHidden, maybe wrapped);
    ``student_head_of()`` its output head, read after the forward (FSDP gathers it there).
    """
    mask, targets = next_token_targets(batch["labels"])
    with autocast(ws.device, ws.dtype), adapter_inputs_uncast(scorer, ws.dtype, cfg.effective_variant()):
        hidden = scorer(batch["input_ids"], batch["attention_mask"], mask)
    teacher = None
    if method.uses_teacher:
        teacher = cached_teacher(cache, ws, batch, mask, picks, cache_counts) if cache is not None else ws.teacher_hidden(batch, mask, cfg.compile)
    parts = fused_loss(hidden, student_head_of(), targets[mask], teacher, loss_spec(cfg, method), ws.dtype)
    ws.release_teacher_shards()
    return {**parts, "tokens": int(mask.sum())}


def adapter_inputs_uncast(model: torch.nn.Module, dtype: torch.dtype, variant: Optional[str]):
    """Under bf16 autocast, leave the adapters' inputs in bf16.

    peft casts a LoRA layer's input to its adapter's dtype (fp32) and autocast casts it straight
    back to bf16 for the matmul: the same values, two copies of every adapter input and of its
    gradient (6% of a neo step on 2 AMX-BF16 cores). Without the casts the numbers are bit for bit
    the same (a test in tests/test_train.py pins it), except for DoRA, which keeps them.
    """
    from neobench.models.adapters import VARIANTS

    if dtype == torch.float32 or variant is None or VARIANTS.get(variant).fp32_inputs:
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


class Diverged(NeobenchError):
    """A non-finite loss or gradient norm: the run stops at that step and stores no result."""


def divergence_message(cfg: RunConfig, step: int, loss: float, norm: float, last_finite: Optional[tuple[int, float]]) -> str:
    from neobench.training.labels import run_label

    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm} (loss {loss:.4f})"
    before = f"last finite loss {last_finite[1]:.4f} at step {last_finite[0]}" if last_finite else "no finite step before it"
    hint = (
        "reverse KL is +inf where the student puts mass on a token the teacher rules out (a -inf teacher logit); "
        "use --loss skew_reverse_kl or jsd, which stay finite"
        if cfg.loss == "reverse_kl" or METHODS.get(cfg.method).on_policy else "lower the learning rate or check the data"
    )
    return f"{run_label(cfg)} seed {cfg.seed} diverged at step {step}: {what}; {before}; no result stored ({hint})"


WEIGHTS_FILE = "trained_weights.safetensors"


def changed_names(student: torch.nn.Module, cfg: RunConfig) -> set[str]:
    """Names of the tensors training changed: trainable ones, plus base weights an adapter's init rewrote (PiSSA).

    Saving these (not a merged model) keeps adapter runs small: megabytes, not the whole student.
    """
    from neobench.models.adapters import VARIANTS

    variant = cfg.effective_variant()
    rewrites_base = variant is not None and VARIANTS.get(variant).rewrites_base
    return {name for name, p in student.named_parameters() if p.requires_grad or (rewrites_base and ".base_layer." in name)}


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


def stop_requested(world: World, device: str) -> bool:
    """Whether any rank got a stop signal: every rank must leave the loop at the same step."""
    if not world.distributed:
        return STOP.requested
    from neobench.training.distributed import all_sum

    return bool(all_sum([1.0 if STOP.requested else 0.0], world, device)[0])


@dataclass
class Trained:
    """What :func:`train` returns: the student (whole on rank 0), its log, its record, and its changed weights."""

    student: Optional[torch.nn.Module]
    log: list[dict]
    record: dict
    weights: dict[str, torch.Tensor]


def train(
    cfg: RunConfig, ws: Workspace, on_step: Optional[Callable[[dict], None]] = None,
    after_step: Optional[Callable[[int, torch.nn.Module], None]] = None, run_tmp: Optional[Path] = None,
    resume: Optional[Path] = None,
) -> Trained:
    """Train one student (on every rank of the world).

    ``on_step(row)`` gets each step's log row (rank 0); ``after_step(step, student)`` may inspect
    the student between steps (an ablation's intermediate held-out NLL) or raise to stop the run.
    ``run_tmp`` is the unfinished run's directory, where checkpoints go (``cfg.save_every``, and on
    SIGTERM/SIGINT); ``resume`` a checkpoint to continue from. Raises :class:`Diverged` on a
    non-finite loss or gradient norm, and :class:`neobench.core.stopping.Interrupted` at the start of
    the first step after a stop signal (see neobench.core.stopping).
    """
    from neobench.training import checkpoint as ckpt
    from neobench.training.distributed import all_gather_int, all_sum, full_state, grad_norm, sync_gradients, wrap_student

    world = ws.world
    method = METHODS.get(cfg.method)
    student = build_student(cfg, ws)
    cache = None
    if method.uses_teacher and not method.on_policy and cfg.teacher_cache != "off":
        from neobench.training.teacher_cache import CacheMode, TeacherCache

        cache = TeacherCache.for_run(
            CacheMode.parse(cfg.teacher_cache), ws.teacher_path, ws.data.data_hash, cfg.seq_len, cfg.temperature, ws.teacher_vocab,
            ws.dtype, ws.tokenizer_fingerprints,
        )
    # With a cache, the teacher is loaded only if some example of the run is not cached yet.
    # minillm always needs it: the sequences it distils on are sampled fresh at every step.
    if method.uses_teacher and (cache is None or method.on_policy):
        ws.load_teacher_for_training()
    counters = {"tokens": 0, "response_tokens": 0, "generation_seconds": 0.0, "hits": 0, "misses": 0}
    student.train()
    check_head(student, LogitHead.of(student, ws.vocab_size), ws.student_path)
    scorer = wrap_student(student, cfg.strategy, world, ws.device, ws.dtype, cfg.compile)
    # Read per micro-batch: under FSDP the head's weight is whole only between forward and backward.
    student_head_of = lambda: LogitHead.of(student, ws.vocab_size)  # noqa: E731
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    n_steps = planned_steps(cfg, len(ws.data.examples), world.size)
    per_step = cfg.batch_size * cfg.grad_accum * world.size  # the global batch
    order = example_order(len(ws.data.examples), n_steps * per_step, cfg.seed)
    lengths = [len(ex.input_ids) for ex in ws.data.examples]
    optimizer = OPTIMIZERS.get(cfg.optimizer)(trainable, cfg)
    warmup_steps = math.ceil(cfg.warmup_ratio * n_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, n_steps, warmup_steps))
    pad_id = ws.tokenizer.pad_token_id

    first_step, resumed_from = 0, None
    if resume is not None:
        saved = ckpt.load(resume, scorer, optimizer, scheduler, world)
        first_step = resumed_from = saved["step"]
        counters.update(saved["counters"])
        ckpt.restore_rng(resume, world)
    tokens_at_start = counters["tokens"]

    log: list[dict] = []
    stopped_by = "max_steps" if cfg.max_steps else "epoch"
    last_finite: Optional[tuple[int, float]] = None
    memory = PeakMemory(ws.device)
    saved_step = first_step if resume is not None else None  # the step of the run's newest checkpoint
    with memory, STOP.watching("training"):
        start = time.perf_counter()
        for step in range(first_step, n_steps):
            signal_point("before-step", step + 1)
            # The one place a stop request is acted on in training: a step boundary, agreed by every rank.
            if stop_requested(world, ws.device):
                if run_tmp is not None and cfg.save_every and step > 0 and step != saved_step:
                    ckpt.save(run_tmp, step, scorer, optimizer, scheduler, counters, world, cfg.strategy)
                raise Interrupted(step, ckpt.latest(run_tmp) if run_tmp is not None and cfg.save_every else None)
            step_micro = group_by_length(order[step * per_step : (step + 1) * per_step], lengths, cfg.batch_size)
            # Micro-batch j of the step goes to rank j % world: every world size sees the same micro-batches.
            micro_picks = step_micro[world.rank :: world.size]
            micro_batches = [collate([ws.data.examples[i] for i in mp], pad_id, ws.teacher_pad_id) for mp in micro_picks]
            # Every loss term is summed over tokens and divided by the global batch's response-token
            # count, so the accumulated gradient is the token mean over the whole step (1x8 == 8x1 == 2 ranks x 4).
            local_targets = sum(int(next_token_targets(b["labels"])[0].sum()) for b in micro_batches)
            step_targets = max(1.0, all_sum([local_targets], world, ws.device)[0])
            sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, ce, kd, tokens, response tokens (this rank)
            cache_before = (counters["hits"], counters["misses"])
            for k, (batch, batch_picks) in enumerate(zip(micro_batches, micro_picks)):
                batch = {name: v.to(ws.device) for name, v in batch.items()}
                with sync_gradients(scorer, last_micro_step=k == len(micro_batches) - 1):
                    if method.on_policy:  # minillm: the student samples the responses it is taught on
                        from neobench.training.onpolicy import minillm_objective

                        parts, seconds = minillm_objective(
                            cfg, ws, student, scorer, student_head_of(), batch, [ws.data.examples[i] for i in batch_picks],
                            cfg.seed * 1_000_003 + step * 1_009 + k * world.size + world.rank,
                        )
                        counters["generation_seconds"] += seconds
                    else:
                        parts = offline_objective(cfg, ws, method, scorer, student_head_of, batch, batch_picks, cache, counters)
                    if k == 0:
                        signal_point("inside-step", step + 1)
                    # x world: DDP and FSDP average gradients over ranks; the sum over ranks is wanted.
                    (parts["loss"] * world.size / step_targets).backward()  # (x * 1) / n == x / n: one process as before
                sums[0] += float(parts["loss"].detach())
                sums[1] += float(parts["ce_sum"])
                sums[2] += float(parts["kd_sum"])
                sums[3] += int(batch["attention_mask"].sum())
                sums[4] += parts["tokens"]
            # Each process reads and writes the cache entries of its own examples: count them all.
            cache_step = [counters["hits"] - cache_before[0], counters["misses"] - cache_before[1]]
            loss, ce, kd, step_tokens, step_response, hits, misses = all_sum(sums + cache_step, world, ws.device)
            counters["hits"], counters["misses"] = cache_before[0] + int(hits), cache_before[1] + int(misses)
            norm = grad_norm(trainable, cfg.max_grad_norm)
            loss, ce, kd = loss / step_targets, ce / step_targets, kd / step_targets
            if injected_fault("nan-at-step", step + 1):
                loss = float("nan")
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise Diverged(divergence_message(cfg, step + 1, loss, norm, last_finite))
            last_finite = (step + 1, loss)
            counters["tokens"] += int(step_tokens)
            counters["response_tokens"] += int(step_response)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            row = {
                "step": step + 1, "loss": loss, "ce": ce, "kd": kd, "lr": lr,
                "grad_norm": norm if cfg.max_grad_norm else float("nan"),
                "tokens": counters["tokens"], "elapsed_s": elapsed, "tokens_per_s": (counters["tokens"] - tokens_at_start) / elapsed,
            }
            log.append(row)
            if on_step and world.main:
                on_step(row)
            if after_step:
                # Time spent inspecting the student is not training time: shift the clock past it.
                paused = time.perf_counter()
                after_step(step + 1, student)
                start += time.perf_counter() - paused
            due = cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < n_steps
            if run_tmp is not None and due:
                ckpt.save(run_tmp, step + 1, scorer, optimizer, scheduler, counters, world, cfg.strategy)
                saved_step = step + 1
            injected_fault("kill-after-step", step + 1)
            injected_fault("kill-worker-after-step", step + 1, cfg.trial)
            if cfg.max_wall_seconds and elapsed >= cfg.max_wall_seconds and step + 1 < n_steps:
                stopped_by = "max_wall_seconds"
                break
        wall = time.perf_counter() - start
    STOP.phase = "writing"  # training is over: a stop now lets the run be gathered and written
    peaks = all_gather_int(memory.peak_bytes(), world, ws.device)
    weights = full_state(scorer, changed_names(student, cfg))
    if world.distributed and cfg.strategy == "fsdp":
        # Rank 0 carries on alone (evaluation): rebuild a whole student from the gathered weights.
        student = None
        if world.main:
            student = build_student(cfg, ws)
            student.load_state_dict({k: v.to(ws.device) for k, v in weights.items()}, strict=False)

    steps_done = first_step + len(log)
    last = log[-min(5, len(log)):] if log else []
    record = {
        "budget": {
            "steps": steps_done, "planned_steps": n_steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "world_size": world.size, "global_batch": per_step,
            "seq_len": cfg.seq_len, "examples_seen": steps_done * per_step, "tokens": counters["tokens"],
            "response_tokens": counters["response_tokens"], "data_hash": ws.data.data_hash, "stopped_by": stopped_by,
            "examples_hash": ws.data.examples_hash,
        },
        "cost": {
            "train_seconds": wall, "seconds_per_step": wall / max(1, len(log)),
            "tokens_per_second": (counters["tokens"] - tokens_at_start) / wall,
            "generation_seconds": counters["generation_seconds"], "update_seconds": wall - counters["generation_seconds"],
            "peak_memory_bytes": max(peaks), "peak_memory_bytes_per_rank": peaks, "memory_kind": memory.kind,
            "trainable_params": sum(p.numel() for p in trainable),  # a DTensor counts its whole, not its shard
            "total_params": sum(p.numel() for p in (student.parameters() if student is not None else ())),
            "device": ws.device, "dtype": dtype_name(ws.dtype), "torch_threads": torch.get_num_threads(),
            "allocator": allocator() if ws.device == "cpu" else None,
            "bf16_kernel": cpu_bf16_kernel() if ws.device == "cpu" and ws.dtype == torch.bfloat16 else None,
            "world_size": world.size, "strategy": cfg.strategy if world.distributed else "single",
            "teacher_cache": {"mode": cfg.teacher_cache, "hits": counters["hits"], "misses": counters["misses"],
                              "rebuilt": cache.rebuilt if cache else 0, "teacher_loaded": ws.teacher_loaded},
        },
        "final": {
            "loss": log[-1]["loss"], "ce": log[-1]["ce"], "kd": log[-1]["kd"],
            "loss_last5_mean": sum(r["loss"] for r in last) / len(last),
            "ce_last5_mean": sum(r["ce"] for r in last) / len(last),
            "kd_last5_mean": sum(r["kd"] for r in last) / len(last),
        },
        "data": {"report": ws.data.report.__dict__, "data_hash": ws.data.data_hash,
                 # Across two vocabularies: the response tokens the teacher is compared at, of all scored.
                 **({"aligned_tokens": ws.data.aligned_tokens, "scored_tokens": ws.data.scored_tokens} if ws.cross_vocabulary else {})},
        "lr": cfg.effective_lr(),
        "pid": os.getpid(),
    }
    if resumed_from is not None:
        record["resumed_from_step"] = resumed_from
    return Trained(student, log, record, weights)
