"""Training methods: which weights train and which objective they minimise.

A method is data, not a subclass: the one training loop in :mod:`neobench.training.loop` asks it
whether to attach an adapter and whether to run the teacher, then calls :func:`objective`.

| method | trains            | objective                                   |
|--------|-------------------|---------------------------------------------|
| sft    | all weights       | CE                                          |
| lora   | adapter (variant) | CE                                          |
| kd     | all weights       | (1 - kd_ratio) * CE + kd_ratio * D(t || s)  |
| neo    | adapter (variant) | (1 - kd_ratio) * CE + kd_ratio * D(t || s)  |
| minillm| adapter with --variant, else all weights | reverse KL(s || t) on student-sampled responses + minillm_ce_weight * CE on gold |

CE is on response tokens only; D is the divergence chosen by ``loss`` (forward KL by default,
as in LLM-Neo; see ``neobench list``), per response token, averaged over response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from neobench.core.registry import Registry
from neobench.training.losses import DEFAULT_CHUNK_TOKENS, TeacherLogProbs, cross_entropy, distillation_loss, next_token_targets


@dataclass(frozen=True)
class Method:
    name: str
    trains: str
    """"all" (every student weight), "adapter" (only adapter weights; the base is frozen), or
    "either" (an adapter when --variant is given, all weights otherwise)."""
    uses_teacher: bool
    """Whether the objective has a distillation term (and so the teacher runs)."""
    description: str
    on_policy: bool = False
    """Whether the distillation term is computed on responses the student samples (see neobench.training.onpolicy)."""


METHODS: Registry[Method] = Registry("method")
for _m in (
    Method("sft", "all", False, "full fine-tuning on the responses (CE)"),
    Method("lora", "adapter", False, "adapter fine-tuning on the responses (CE)"),
    Method("kd", "all", True, "full fine-tuning, (1-kd_ratio)*CE + kd_ratio*KL(teacher||student)"),
    Method("neo", "adapter", True, "LLM-Neo: adapter, (1-kd_ratio)*CE + kd_ratio*KL(teacher||student)"),
    Method("minillm", "either", True, "MiniLLM-style: reverse KL on student samples + weighted CE on gold", on_policy=True),
):
    METHODS.add(_m.name, _m)

# What `neobench run` trains when neither --method nor --variant is given.
DEFAULT_MATRIX = ("sft", "lora", "kd", "neo")


def objective(
    method: Method,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor | TeacherLogProbs] = None,
    *,
    kd_ratio: float = 0.5,
    temperature: float = 1.0,
    loss: str = "forward_kl",
    loss_param: float = 0.0,
    chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS,
    vocab_size: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """The method's loss on one batch, from materialised logits: the reference definition.

    Training does not call this: it computes the same objective from hidden states without ever
    holding [B, T, V] logits (neobench.training.fused_loss, through loop.offline_objective); tests pin the
    two against each other.

    student_logits, teacher_logits: [B, T, V]; labels: [B, T] with IGNORE_INDEX outside responses.
    teacher_logits may instead be a TeacherLogProbs from the teacher cache, already at the response tokens.
    loss, loss_param: the divergence (see neobench.training.losses.DIVERGENCES) and its beta/alpha, if any.
    chunk_tokens: tokens per chunk of the divergence (bounds its fp32 memory; same value and gradient).
    vocab_size: the shared tokenizer vocabulary; logit rows past it (embedding padding) are dropped.
    Returns {"loss", "ce", "kd"} as fp32 scalars ("kd" is 0 for methods without a teacher) and
    "tokens", the number of response tokens the means are over.
    """
    mask, targets = next_token_targets(labels)
    vocab = slice(None, vocab_size)
    # Select response positions first so the fp32 upcasts below cover only those tokens.
    s = student_logits[mask][:, vocab]
    ce = cross_entropy(s, targets[mask])
    if not method.uses_teacher:
        return {"loss": ce, "ce": ce, "kd": torch.zeros_like(ce), "tokens": mask.sum()}
    # Teacher logits [B, T, V'] are selected like the student's; a cached teacher arrives already
    # selected (TeacherLogProbs over the response tokens, in the same order).
    t = teacher_logits if isinstance(teacher_logits, TeacherLogProbs) else teacher_logits[mask][:, vocab]
    kd = distillation_loss(loss, s, t, temperature, loss_param, chunk_tokens)
    return {"loss": (1 - kd_ratio) * ce + kd_ratio * kd, "ce": ce, "kd": kd, "tokens": mask.sum()}
