"""Loss functions: pure functions of tensors, computed in fp32.

Shapes: ``N`` tokens, ``V`` vocabulary entries. Callers pass only the response tokens (the
positions whose next token is an assistant token), already aligned so that ``logits[i]``
predicts ``labels[i]``; :func:`next_token_targets` does that alignment.

Every loss returns the *mean over the given tokens* and 0 (with a gradient path) when no token
is given, so an all-masked micro-batch never produces NaN.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from neobench.registry import Registry

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align labels [B, T] with logits [B, T, V]: position t predicts token t+1.

    Returns (mask [B, T] bool, targets [B, T] long), where the last position is always masked.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets != IGNORE_INDEX, targets


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy. logits [N, V] (any float dtype), targets [N] long -> scalar fp32."""
    if targets.numel() == 0:
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), targets, reduction="mean")


def token_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) of each token, in fp32. [N, V], [N, V] -> [N] (no T^2 scaling)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student) over the full vocabulary, times T^2.

    student_logits, teacher_logits: [N, V]. Softmax at temperature T in fp32. Scaling by T^2
    keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015); at the
    default T = 1 it changes nothing.
    """
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    return token_forward_kl(student_logits, teacher_logits, temperature).mean() * temperature**2


Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
DIVERGENCES: Registry[Divergence] = Registry("loss")
DIVERGENCES.add("forward_kl", forward_kl)
