"""On-policy distillation, the minillm method: the student writes the responses it is taught on.

For each micro-batch, the student gets each prompt (everything before the first response token)
and samples up to ``minillm_max_new_tokens`` tokens at ``minillm_temperature``. A
``minillm_gold_fraction`` of the examples keep their gold response instead (teacher-forced).
The distillation term is the token-level reverse KL(p_student || p_teacher) over the full
vocabulary on those sequences (MiniLLM, Gu et al., 2024, without its policy-gradient
refinements); CE on the gold responses is added with ``minillm_ce_weight``.

The teacher-logit cache does not apply: sampled sequences are new at every step.
"""

from __future__ import annotations

import time

import torch

from neobench.data.examples import Example, collate
from neobench.training.losses import IGNORE_INDEX, next_token_targets


def prompt_of(example: Example) -> list[int]:
    """The tokens before the first response token: the chat template through the assistant header."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return list(example.input_ids[:first])


def eos_ids(model, tokenizer) -> set[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def sample_responses(
    student, tokenizer, examples: list[Example], use_gold: list[bool], max_new_tokens: int, temperature: float, seed: int
) -> list[Example]:
    """Each example with its response replaced by the student's sample (unless ``use_gold``)."""
    to_sample = [ex for ex, gold in zip(examples, use_gold) if not gold]
    sampled: list[Example] = []
    if to_sample:
        prompts = [prompt_of(ex) for ex in to_sample]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        # Decoder-only generation needs the prompts left-padded.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        device = next(student.parameters()).device
        was_training = student.training
        student.eval()
        torch.manual_seed(seed)
        out = student.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), max_new_tokens=max_new_tokens,
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad, use_cache=True,
        )
        student.train(was_training)
        stop = eos_ids(student, tokenizer)
        for prompt, row in zip(prompts, out[:, width:].tolist()):
            reply = []
            for token in row:
                reply.append(token)
                if token in stop:
                    break
            sampled.append(Example(tuple(prompt + reply), tuple([IGNORE_INDEX] * len(prompt) + reply)))
    it = iter(sampled)
    return [ex if gold else next(it) for ex, gold in zip(examples, use_gold)]


def minillm_objective(
    cfg, ws, student, scorer, student_head, gold_batch: dict, examples: list[Example], step_seed: int
) -> tuple[dict, float]:
    """MiniLLM's loss on one micro-batch; returns (parts as from loop.offline_objective, generation seconds).

    Like every method's, the loss is in units of the gold response tokens: ``parts["tokens"]``
    counts them and the loop divides by the step's count, so budgets and accumulation weights
    match. It is minillm_ce_weight * (sum of CE on gold) + n_gold * (mean reverse KL on the samples).
    ``student`` samples (no gradient); ``scorer`` is the student as training calls it (maybe DDP-wrapped).
    """
    from neobench.models.precision import autocast
    from neobench.training.fused_loss import LossSpec, fused_loss

    generator = torch.Generator().manual_seed(step_seed)
    n_gold = round(cfg.minillm_gold_fraction * len(examples))
    gold_positions = set(torch.randperm(len(examples), generator=generator)[:n_gold].tolist())
    started = time.perf_counter()
    with autocast(ws.device, ws.dtype):
        sequences = sample_responses(
            student, ws.tokenizer, examples, [i in gold_positions for i in range(len(examples))],
            cfg.minillm_max_new_tokens, cfg.minillm_temperature, step_seed,
        )
    generation_seconds = time.perf_counter() - started
    chunk = cfg.loss_chunk_tokens  # 0: one chunk

    gold_mask, gold_targets = next_token_targets(gold_batch["labels"])
    with autocast(ws.device, ws.dtype):
        gold_hidden = scorer(gold_batch["input_ids"], gold_batch["attention_mask"], gold_mask)
    gold = fused_loss(gold_hidden, student_head, gold_targets[gold_mask], None,
                      LossSpec(cfg.minillm_ce_weight, 0.0, chunk_tokens=chunk), ws.dtype)

    batch = {k: v.to(ws.device) for k, v in collate(sequences, ws.tokenizer.pad_token_id).items()}
    mask, targets = next_token_targets(batch["labels"])
    n_gold_tokens, n_sampled = int(gold_mask.sum()), max(1, int(mask.sum()))
    with autocast(ws.device, ws.dtype):
        hidden = scorer(batch["input_ids"], batch["attention_mask"], mask)
    sampled = fused_loss(
        hidden, student_head, targets[mask], ws.teacher_hidden(batch, mask, cfg.compile),
        LossSpec(0.0, n_gold_tokens / n_sampled, "reverse_kl", cfg.temperature, chunk_tokens=chunk), ws.dtype,
    )
    parts = {
        "loss": gold["loss"] + sampled["loss"], "ce_sum": gold["ce_sum"],
        "kd_sum": sampled["kd_sum"] * (n_gold_tokens / n_sampled), "tokens": n_gold_tokens,
    }
    return parts, generation_seconds
