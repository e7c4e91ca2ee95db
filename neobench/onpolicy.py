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

from neobench.data import Example, collate
from neobench.losses import IGNORE_INDEX, cross_entropy, distillation_loss, next_token_targets


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
    cfg, student, teacher_forward, tokenizer, gold_batch: dict, examples: list[Example], step_seed: int, vocab_size: int
) -> tuple[dict[str, torch.Tensor], float]:
    """MiniLLM's loss on one micro-batch; returns (parts as from methods.objective, generation seconds).

    ``teacher_forward(batch) -> logits`` runs the teacher without gradients. ``parts["tokens"]`` counts
    the gold response tokens, like every other method, so budgets and accumulation weights match.
    """
    device = gold_batch["input_ids"].device
    generator = torch.Generator().manual_seed(step_seed)
    n_gold = round(cfg.minillm_gold_fraction * len(examples))
    gold_positions = set(torch.randperm(len(examples), generator=generator)[:n_gold].tolist())
    started = time.perf_counter()
    sequences = sample_responses(
        student, tokenizer, examples, [i in gold_positions for i in range(len(examples))],
        cfg.minillm_max_new_tokens, cfg.minillm_temperature, step_seed,
    )
    generation_seconds = time.perf_counter() - started

    vocab = slice(None, vocab_size)
    gold_logits = student(input_ids=gold_batch["input_ids"], attention_mask=gold_batch["attention_mask"]).logits
    gold_mask, gold_targets = next_token_targets(gold_batch["labels"])
    ce = cross_entropy(gold_logits[gold_mask][:, vocab], gold_targets[gold_mask])

    batch = {k: v.to(device) for k, v in collate(sequences, tokenizer.pad_token_id).items()}
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    teacher_logits = teacher_forward(batch)
    mask, _ = next_token_targets(batch["labels"])
    reverse_kl = distillation_loss(
        "reverse_kl", logits[mask][:, vocab], teacher_logits[mask][:, vocab], cfg.temperature,
        chunk_tokens=cfg.loss_chunk_tokens or None,
    )
    loss = reverse_kl + cfg.minillm_ce_weight * ce
    return {"loss": loss, "ce": ce, "kd": reverse_kl, "tokens": gold_mask.sum()}, generation_seconds
