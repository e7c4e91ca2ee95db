"""Teacher fidelity (neo_fidelity) and held-out NLL, computed directly on encoded conversations.

neo_fidelity needs teacher and student at once, which lm-eval's one-model API cannot give: per
held-out response, the mean token KL(p_teacher || p_student) and top-1 agreement. heldout_nll is
neo_heldout_nll's definition, cheap enough for a study to report between steps.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch

from neobench.evaluation.catalog import DOC_KEY_CHARS, FIDELITY, FIDELITY_HIGHER_IS_BETTER, FIDELITY_MAX_TOKENS, FIDELITY_VERSION, EvalSpec


def fidelity_scores(
    student, teacher, tokenizer, pairs: list[dict[str, str]], batch_size: int, vocab_size: Optional[int]
) -> dict[str, list[float]]:
    """Per held-out response: mean token KL(p_teacher || p_student) and top-1 agreement.

    Conversations are encoded exactly as in training (chat template, assistant-only positions).
    """
    from neobench.core.progress import CountProgress

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
    from neobench.data.examples import Example, encode_chat

    examples = []
    for pair in pairs:
        ids, labels = encode_chat(tokenizer, [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["response"]}])
        examples.append(Example(tuple(ids[:FIDELITY_MAX_TOKENS]), tuple(labels[:FIDELITY_MAX_TOKENS])))
    return examples


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, pad_id: int, examples: list, batch_size: int = 8) -> float:
    """Mean over responses of each response's per-token NLL: neo_heldout_nll's definition, computed
    directly on encoded examples so a training loop can report it between steps in seconds."""
    from neobench.data.examples import collate
    from neobench.training.losses import next_token_targets

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
    from neobench.data.examples import collate
    from neobench.training.losses import next_token_targets, token_forward_kl

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

    from neobench.evaluation.suite import heldout_pairs

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
