"""Loss functions: pure functions of tensors, computed in fp32.

Shapes: ``N`` tokens, ``V`` vocabulary entries. Callers pass only the response tokens (the
positions whose next token is an assistant token), already aligned so that ``logits[i]``
predicts ``labels[i]``; :func:`next_token_targets` does that alignment.

Every loss returns the *mean over the given tokens* and 0 (with a gradient path) when no token
is given, so an all-masked micro-batch never produces NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from neobench.core.registry import Registry
from neobench.data.examples import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align labels [B, T] with logits [B, T, V]: position t predicts token t+1.

    Returns (mask [B, T] bool, targets [B, T] long), where the last position is always masked.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets != IGNORE_INDEX, targets


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for softmaxes and reductions; fp32 and float64 (tests' references) stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy. logits [N, V] (any float dtype), targets [N] long -> scalar fp32."""
    if targets.numel() == 0:
        return at_least_fp32(logits).sum() * 0.0
    return F.cross_entropy(at_least_fp32(logits), targets, reduction="mean")


# --- divergences between teacher and student next-token distributions -----------------------
#
# Each takes log-probabilities [N, V] (fp32) and returns one value per token [N]. The registry
# entries are called through :func:`distillation_loss`, which applies the temperature, computes
# in fp32 chunk by chunk, and averages over tokens.


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities, with 0 log 0 = 0.

    Outcomes p excludes (log p = -inf, e.g. a teacher's masked vocabulary rows) add nothing, even
    where q excludes them too. Where q excludes an outcome that p does not, KL is +inf, exactly
    as defined: that is what reverse KL gives for a student that puts mass on a token the
    teacher rules out (the training loop then stops with an error naming the finite options).
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q), stably."""
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def forward_kl_tokens(log_s: torch.Tensor, log_t: torch.Tensor, param: float = 0.0) -> torch.Tensor:
    """KL(p_t || p_s): mode-covering; the student spreads mass wherever the teacher has it."""
    return _kl(log_t, log_s)


def reverse_kl_tokens(log_s: torch.Tensor, log_t: torch.Tensor, param: float = 0.0) -> torch.Tensor:
    """KL(p_s || p_t): mode-seeking; the student concentrates on the teacher's large modes (MiniLLM)."""
    return _kl(log_s, log_t)


def jsd_tokens(log_s: torch.Tensor, log_t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD (GKD): beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s.

    beta = 0 is defined as forward KL and beta = 1 as reverse KL (as in GKD and TRL), which
    the mixture form itself would give as 0.
    """
    if beta <= 0.0:
        return _kl(log_t, log_s)
    if beta >= 1.0:
        return _kl(log_s, log_t)
    log_m = _log_mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def skew_forward_kl_tokens(log_s: torch.Tensor, log_t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(p_t || alpha p_t + (1 - alpha) p_s); alpha = 0 is forward KL."""
    return _kl(log_t, log_s if alpha <= 0.0 else _log_mix(log_t, log_s, alpha))


def skew_reverse_kl_tokens(log_s: torch.Tensor, log_t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(p_s || alpha p_s + (1 - alpha) p_t); alpha = 0 is reverse KL."""
    return _kl(log_s, log_t if alpha <= 0.0 else _log_mix(log_s, log_t, alpha))


def tvd_tokens(log_s: torch.Tensor, log_t: torch.Tensor, param: float = 0.0) -> torch.Tensor:
    """Total variation distance: (1/2) sum |p_t - p_s|, in [0, 1]."""
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)


def adaptive_kl_tokens(log_s: torch.Tensor, log_t: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """AKL (Wu et al., COLING 2025): forward and reverse KL weighted by where the student is off.

    The teacher's vocabulary, sorted by its probability, splits into a head (the most likely
    tokens while their cumulative probability is <= mu; the top token always) and the tail (the
    rest, the crossing token included, as in the authors' code, wutaiqiang/LLM_KD_AKL).
    g_head, g_tail = sum |p_t - p_s| over each part, and

        AKL = g_head / (g_head + g_tail) * KL(p_t || p_s) + g_tail / (g_head + g_tail) * KL(p_s || p_t)

    Forward KL fixes the head and reverse KL the tail, each in proportion to its gap. The weights
    carry no gradient (the authors detach them). Equal distributions (no gap) give 0.
    """
    with torch.no_grad():
        p_t_sorted, order = log_t.exp().sort(dim=-1, descending=True)
        gap = (p_t_sorted - log_s.exp().gather(-1, order)).abs()
        head = p_t_sorted.cumsum(-1) <= mu
        head[..., 0] = True
        g_head = torch.where(head, gap, 0.0).sum(-1)
        total = gap.sum(-1)
        w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return w_head * _kl(log_t, log_s) + (1 - w_head) * _kl(log_s, log_t)


def uld_tokens(log_s: torch.Tensor, log_t: torch.Tensor, param: float = 0.0) -> torch.Tensor:
    """ULD (Boizard et al., 2024): the Wasserstein-1 distance between the two next-token
    distributions with each sorted by probability, the smaller vocabulary padded with zeros:
    sum_i |p_s(i) - p_t(i)| over the i-th most likely token of each side. [N, V_s], [N, V_t] -> [N].

    It compares how confident the two models are, not which tokens they pick, so it needs no
    vocabulary mapping (the two sides may have different vocabularies and sizes).
    """
    p_s = log_s.exp().sort(dim=-1, descending=True).values
    p_t = log_t.exp().sort(dim=-1, descending=True).values
    common = min(p_s.shape[-1], p_t.shape[-1])
    longer = p_s if p_s.shape[-1] > common else p_t
    # Past the smaller vocabulary the padded side is 0: |p - 0| = p.
    return (p_s[..., :common] - p_t[..., :common]).abs().sum(-1) + longer[..., common:].sum(-1)


@dataclass(frozen=True)
class Divergence:
    per_token: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    """(log p_s [N, V_s], log p_t [N, V_t], param) -> [N]; V_s == V_t unless ``outcomes`` says otherwise."""
    description: str
    param: Optional[str] = None
    """Name of the config field holding this divergence's parameter (jsd_beta, skew_alpha), if any."""
    outcomes: str = "vocabulary"
    """What the two distributions must share:
    "vocabulary": one vocabulary (teacher and student tokenizers alike);
    "any": none (ULD compares sorted probabilities; any two vocabularies);
    "shared": computed over the tokens both vocabularies spell alike, each side renormalised there
    (neobench.data.alignment.VocabPairing); with one vocabulary that is all of it."""

    @property
    def cross_vocabulary(self) -> bool:
        return self.outcomes != "vocabulary"


DIVERGENCES: Registry[Divergence] = Registry("loss")
DIVERGENCES.add("forward_kl", Divergence(forward_kl_tokens, "KL(teacher || student), as in LLM-Neo"))
DIVERGENCES.add("reverse_kl", Divergence(reverse_kl_tokens, "KL(student || teacher), mode-seeking"))
DIVERGENCES.add("jsd", Divergence(jsd_tokens, "generalized Jensen-Shannon with jsd_beta (GKD)", "jsd_beta"))
DIVERGENCES.add("skew_forward_kl", Divergence(skew_forward_kl_tokens, "KL(t || a t + (1-a) s) with skew_alpha (DistiLLM)", "skew_alpha"))
DIVERGENCES.add("skew_reverse_kl", Divergence(skew_reverse_kl_tokens, "KL(s || a s + (1-a) t) with skew_alpha (DistiLLM)", "skew_alpha"))
DIVERGENCES.add("tvd", Divergence(tvd_tokens, "total variation distance, (1/2) sum |t - s|"))
DIVERGENCES.add("akl", Divergence(adaptive_kl_tokens, "adaptive KL: FKL and RKL weighted by head/tail gaps, head up to akl_mu (Wu et al.)", "akl_mu"))
DIVERGENCES.add("uld", Divergence(uld_tokens, "ULD: W1 between sorted distributions; any two vocabularies (Boizard et al.)", outcomes="any"))
DIVERGENCES.add("shared_vocab_kl", Divergence(
    forward_kl_tokens, "KL(t || s) over the tokens both vocabularies spell alike, renormalised there", outcomes="shared"))
CROSS_VOCABULARY = tuple(name for name in DIVERGENCES if DIVERGENCES.get(name).cross_vocabulary)
"""The losses that distil across two tokenizers."""

DEFAULT_CHUNK_TOKENS = 1024
MIN_MASS = 1e-12
"""Floor of the "rest of the vocabulary" bucket of a top-k teacher, so its log stays finite."""


@dataclass
class TeacherLogProbs:
    """A teacher distribution given as log-probabilities at the loss's temperature, not logits.

    Dense: ``log_probs`` [N, V]. Top-k: ``log_probs`` [N, K] of the token ``ids`` [N, K] and
    ``rest`` [N], the probability mass of the other V - K tokens (0 when K = V). A top-k teacher
    is compared with the student over K + 1 outcomes: the K tokens, and "any other token".
    """

    log_probs: torch.Tensor
    ids: Optional[torch.Tensor] = None
    rest: Optional[torch.Tensor] = None

    def __getitem__(self, rows: slice) -> "TeacherLogProbs":
        pick = (lambda x: None if x is None else x[rows])
        return TeacherLogProbs(self.log_probs[rows], pick(self.ids), pick(self.rest))

    @property
    def shape(self) -> torch.Size:
        return self.log_probs.shape


Teacher = torch.Tensor | TeacherLogProbs
"""Teacher logits [N, V], or a dense / top-k :class:`TeacherLogProbs`."""


def _log_probs(student_logits: torch.Tensor, teacher: Teacher, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_s, log p_t) in fp32 over the same outcomes: the vocabulary, or top-k + rest."""
    log_s = F.log_softmax(at_least_fp32(student_logits) / temperature, dim=-1)
    if isinstance(teacher, torch.Tensor):
        return log_s, F.log_softmax(at_least_fp32(teacher) / temperature, dim=-1)
    return over_teacher_outcomes(log_s, teacher)


def over_teacher_outcomes(log_s: torch.Tensor, teacher: TeacherLogProbs) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs [N, V] and a teacher's, over the outcomes the teacher is given on.

    Dense: the vocabulary. Top-k: the K tokens, plus "any other token" (the remaining mass).
    """
    log_t = teacher.log_probs.to(log_s.dtype)
    if teacher.ids is None:
        return log_s, log_t
    vocab = log_s.shape[-1]
    log_s = log_s.gather(-1, teacher.ids.long())
    if teacher.ids.shape[-1] == vocab:  # K = V: nothing else remains
        return log_s, log_t
    rest_s = (1 - log_s.exp().sum(-1)).clamp_min(MIN_MASS).log()
    rest_t = teacher.rest.to(log_s.dtype).clamp_min(MIN_MASS).log()
    return torch.cat([log_s, rest_s[:, None]], -1), torch.cat([log_t, rest_t[:, None]], -1)


def token_divergence(
    name: str, student_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0, param: float = 0.0
) -> torch.Tensor:
    """One divergence per token, [N, V] x teacher -> [N] fp32, softmax at temperature T (no T^2 scaling)."""
    log_s, log_t = _log_probs(student_logits, teacher, temperature)
    return DIVERGENCES.get(name).per_token(log_s, log_t, param)


def distillation_loss(
    name: str, student_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0,
    param: float = 0.0, chunk_tokens: Optional[int] = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean over tokens of divergence ``name`` between teacher and student, times T^2; fp32 scalar.

    student_logits: [N, V], response tokens only; teacher: logits [N, V] or TeacherLogProbs.
    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.,
    2015); at T = 1 it changes nothing. With ``chunk_tokens``, tokens are processed in chunks
    under activation checkpointing: the fp32 softmaxes of one chunk are alive at a time, in the
    forward and the backward pass, and the value and gradient equal the unchunked computation.
    Returns 0 (with a gradient path) when N = 0.
    """
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.float().sum() * 0.0

    def chunk_sum(s: torch.Tensor, t: Teacher) -> torch.Tensor:
        return token_divergence(name, s, t, temperature, param).sum()

    if not chunk_tokens or n <= chunk_tokens:
        total = chunk_sum(student_logits, teacher)
    else:
        from torch.utils.checkpoint import checkpoint

        total = sum(
            checkpoint(chunk_sum, student_logits[i : i + chunk_tokens], teacher[i : i + chunk_tokens], use_reentrant=False)
            for i in range(0, n, chunk_tokens)
        )
    return total / n * temperature**2


def token_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student) of each token, in fp32. [N, V], [N, V] -> [N] (no T^2 scaling)."""
    return token_divergence("forward_kl", student_logits, teacher_logits, temperature)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student) over the full vocabulary, times T^2 (unchunked)."""
    return distillation_loss("forward_kl", student_logits, teacher_logits, temperature, chunk_tokens=None)
