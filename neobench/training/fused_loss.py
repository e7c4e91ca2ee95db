"""CE and distillation straight from hidden states: the output projection is fused into the loss.

The training loop never asks a model for its logits. Student and teacher run their decoder to
the last hidden state; only the ``N`` positions whose next token is a response token are kept;
this module projects them through each model's output head (``lm_head``) a chunk of tokens at a
time and reduces every chunk to its loss terms at once:

    student_hidden [N, H_s] --(chunk of n rows)--> student logits [n, V] (fp32) --+
    teacher_hidden [N, H_t] --(same rows)-------> teacher log-probs [n, V] (fp32) -+-> CE, D(t || s)
    or cached TeacherLogProbs [N, V] / top-k [N, K] (same rows) -------------------+

No ``[N, V]`` tensor of either model exists: at most one chunk's ``[n, V]`` tiles are alive, in
the forward and in the backward pass. The chunk's terms are the very functions of
:mod:`neobench.training.losses` (fp32 log-softmax, every registered divergence, the top-k form), so the
fused value equals the materialised one; ``tests/test_fused_loss.py`` pins both against each other.

Why the gradient is computed in the forward pass. The result is a scalar loss that is only ever
multiplied by a scalar on its way back, so the gradient with respect to the hidden states (and
to ``lm_head`` when it trains) is known up to that factor as soon as a chunk's terms are known.
Each chunk therefore runs its fp32 forward and backward right away and keeps only
``d loss / d hidden`` ([N, H], small) and ``d loss / d W`` ([V, H], only for a trainable head);
``backward`` scales them. This is what Liger-Kernel's fused linear cross-entropy does. The other
way, recomputing every chunk's logits in ``backward`` (TRL's ``chunked_divergence``), would pay
both models' projections and the element-wise fp32 work twice for the same memory bound; on a
CPU, where the element-wise work is about as costly as the matmuls, that is a third more time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from neobench.core.errors import NeobenchError
from neobench.data.alignment import restrict_to_shared
from neobench.training.losses import DIVERGENCES, TeacherLogProbs, over_teacher_outcomes

DEFAULT_CHUNK_TOKENS = 256
"""Tokens per chunk: [256 x 49,152] fp32 is 50 MB a tile. Each chunk streams both heads once
more (113 MB each for SmolLM2 in fp32), so smaller chunks cost time: 128 was 10% slower here."""


@dataclass(frozen=True)
class LogitHead:
    """How a model turns its last hidden state into next-token logits.

        logits = softcap * tanh(scale * (h @ weight.T + bias) / softcap)      (softcap: Gemma 2/3)
        logits = scale * (h @ weight.T + bias)                                (otherwise)

    ``weight`` [V', H] is ``lm_head.weight`` (the input embedding for tied models: its gradient
    then reaches the embedding as well); only its first ``vocab_size`` rows are real tokens, the
    rest is padding and never scored.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    vocab_size: int
    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def of(cls, model: torch.nn.Module, vocab_size: int) -> "LogitHead":
        """The head of a transformers causal LM (peft-wrapped or not), with its logit transform.

        Cohere's ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides, Gemma's
        ``final_logit_softcapping`` caps; :func:`check_head` verifies the result on the model itself.
        """
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise NeobenchError(
                f"{type(model).__name__} has no linear output head ({type(head).__name__}); neobench's fused loss needs one"
            )
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        if getattr(config, "logits_scaling", None):
            scale /= float(config.logits_scaling)
        softcap = getattr(config, "final_logit_softcapping", None)
        return cls(head.weight, head.bias, vocab_size, scale, float(softcap) if softcap else None)

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """raw = h @ W.T + b, fp32 [n, V'] -> the model's logits over the real vocabulary [n, V]."""
        z = raw[:, : self.vocab_size]
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its output head: returns ``last_hidden_state`` (peft adapters stay in it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        raise NeobenchError(f"{type(base).__name__} does not expose its decoder (get_decoder); neobench's fused loss needs it")
    return decoder


def scored_hidden(model: torch.nn.Module, batch: dict, mask: torch.Tensor, decoder=None) -> torch.Tensor:
    """Last hidden states [N, H] of ``model`` at the positions ``mask`` [B, T] selects, in row-major order.

    ``decoder``: what computes them instead of ``model``'s own decoder (a compiled view of it)."""
    decoder = decoder if decoder is not None else decoder_of(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden[mask]


def check_head(model: torch.nn.Module, head: LogitHead, name: str) -> None:
    """Refuse, in one line, a model whose logits are not ``head(decoder(x))``: one 8-token forward.

    Guards the fused loss against an architecture that transforms logits in a way :class:`LogitHead`
    does not know (it would otherwise train on the wrong distribution without a word).
    """
    device = head.weight.device
    ids = torch.arange(8, device=device)[None] % head.vocab_size
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = model(**batch).logits[0, :, : head.vocab_size].float()
        hidden = scored_hidden(model, batch, torch.ones_like(ids, dtype=torch.bool))
        got = head.transform(project(hidden, head, hidden.dtype))
    tolerance = 1e-3 if hidden.dtype == torch.float32 else 0.25
    if not torch.allclose(got, expected, atol=tolerance, rtol=tolerance):
        err = (got - expected).abs().max().item()
        raise NeobenchError(
            f"{name}: its logits differ from lm_head(last hidden state) by up to {err:.3g}; neobench's fused loss "
            f"knows logit scaling and soft-capping only, so {type(model).__name__} is not supported"
        )


def project(hidden: torch.Tensor, head: LogitHead, compute_dtype: torch.dtype) -> torch.Tensor:
    """h @ W.T + b in ``compute_dtype`` (bf16 on bf16 runs), returned as fp32 [n, V'] (float64 stays float64)."""
    weight = head.weight if head.weight.dtype == compute_dtype else head.weight.to(compute_dtype)
    raw = hidden.to(compute_dtype) @ weight.t()
    if head.bias is not None:
        raw = raw + head.bias.to(compute_dtype)
    return raw.to(accumulation_dtype(compute_dtype))


def accumulation_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 compute; float64 for float64 (the tests' reference precision)."""
    return torch.promote_types(compute_dtype, torch.float32)


@dataclass
class TeacherHidden:
    """The teacher as its hidden states at the scored positions [N, H_t] and its head (no gradient).

    Across two vocabularies (neobench.data.alignment): ``aligned`` [N] marks the student rows the
    teacher is compared at (the others hold zeros and get no distillation term), and ``pairing``
    says which tokens the two vocabularies share (for losses over the shared tokens).
    """

    hidden: torch.Tensor
    head: LogitHead
    aligned: Optional[torch.Tensor] = None
    pairing: Optional[object] = None
    """A neobench.data.alignment.VocabPairing, or None."""

    def __getitem__(self, rows: slice) -> "TeacherHidden":
        return TeacherHidden(self.hidden[rows], self.head, None if self.aligned is None else self.aligned[rows], self.pairing)


@dataclass(frozen=True)
class LossSpec:
    """What :func:`fused_loss` computes: ``ce_weight * sum CE + kd_weight * T^2 * sum D`` over tokens."""

    ce_weight: float = 1.0
    kd_weight: float = 0.0
    divergence: str = "forward_kl"
    temperature: float = 1.0
    param: float = 0.0
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    closed_form: bool = True
    """Use :func:`closed_form_terms` where it applies (False: always autograd; the tests compare both)."""


def chunk_terms(
    raw_student: torch.Tensor, student_head: LogitHead, targets: torch.Tensor,
    teacher: Optional[TeacherHidden | TeacherLogProbs], spec: LossSpec, compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum CE, T^2 * sum D) of one chunk, fp32 scalars, from the student's raw projection [n, V'].

    CE is at temperature 1 (it scores the model itself); D at ``spec.temperature``, exactly as
    :func:`neobench.training.losses.distillation_loss` computes it. At T = 1 both share one log-softmax.
    """
    log_s1 = F.log_softmax(student_head.transform(raw_student), dim=-1)
    ce = -log_s1.gather(1, targets[:, None]).sum()
    if teacher is None or not spec.kd_weight:
        return ce, log_s1.new_zeros(())
    temperature = spec.temperature
    log_s = log_s1 if temperature == 1.0 else F.log_softmax(student_head.transform(raw_student) / temperature, dim=-1)
    aligned, pairing = None, None
    if isinstance(teacher, TeacherHidden):
        aligned, pairing = teacher.aligned, teacher.pairing
        with torch.no_grad():
            z_t = teacher.head.transform(project(teacher.hidden, teacher.head, compute_dtype))
            teacher = TeacherLogProbs(F.log_softmax(z_t if temperature == 1.0 else z_t / temperature, dim=-1))
    log_s, log_t = over_teacher_outcomes(log_s, teacher)
    divergence = DIVERGENCES.get(spec.divergence)
    if divergence.outcomes == "shared":
        log_s, log_t = restrict_to_shared(log_s, log_t, pairing)
    per_token = divergence.per_token(log_s, log_t, spec.param)
    if aligned is not None:  # rows without a teacher position: no term (and no gradient)
        per_token = torch.where(aligned, per_token, 0.0)
    kd = per_token.sum() * temperature**2
    return ce, kd


def has_closed_form(student_head: LogitHead, teacher, spec: LossSpec) -> bool:
    """Whether :func:`closed_form_terms` applies: CE alone, or CE + forward KL against a dense teacher,
    on a head without logit scaling or soft-capping. Everything else takes the autograd path."""
    plain_head = student_head.scale == 1.0 and student_head.softcap is None
    if isinstance(teacher, TeacherHidden) and teacher.aligned is not None:
        return False  # two vocabularies: the autograd path, with its alignment mask
    dense = teacher is None or not spec.kd_weight or isinstance(teacher, TeacherHidden) or teacher.ids is None
    return plain_head and dense and (teacher is None or not spec.kd_weight or spec.divergence == "forward_kl")


def closed_form_terms(
    z_s: torch.Tensor, targets: torch.Tensor, teacher, spec: LossSpec, compute_dtype: torch.dtype, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(sum CE, T^2 * sum KL(p_t || p_s), d total / d z_s) of one chunk, with the gradient written out.

    The same values as :func:`chunk_terms` (the tests pin them), without autograd's extra passes
    over [n, V]: for the default objective these element-wise passes cost as much as the matmuls.
    ``z_s`` [n, V] fp32 is overwritten. With p = softmax, T the temperature, s_t = sum p_t
    (1 up to the rounding of a cached teacher):

        KL          = sum p_t (log p_t - z_s / T) + s_t * logsumexp(z_s / T)
        d CE / d z  = p_s(1) - onehot(target)
        d KL / d z  = (s_t * p_s(T) - p_t) / T          (times T^2 for the term's scaling)
    """
    temperature = spec.temperature
    lse1 = torch.logsumexp(z_s, dim=-1)
    ce = (lse1 - z_s.gather(1, targets[:, None]).squeeze(1)).sum()
    kd = z_s.new_zeros(())
    p_t = mass_t = lse_t = None
    if teacher is not None and spec.kd_weight:
        if isinstance(teacher, TeacherHidden):
            with torch.no_grad():
                z_t = teacher.head.transform(project(teacher.hidden, teacher.head, compute_dtype))
                log_t = F.log_softmax(z_t if temperature == 1.0 else z_t / temperature, -1)  # / 1 would be a pass over [n, V]
                del z_t
        else:
            log_t = teacher.log_probs.to(z_s.dtype, copy=True)  # ours to overwrite below
        p_t = log_t.exp()
        # 0 log 0 = 0 where the teacher rules a token out (-inf), without a where() over [n, V].
        log_t.nan_to_num_(neginf=torch.finfo(log_t.dtype).min)
        mass_t = p_t.sum(-1)
        z_over_t = z_s if temperature == 1.0 else z_s / temperature
        lse_t = lse1 if temperature == 1.0 else torch.logsumexp(z_over_t, dim=-1)
        # sum p_t (log p_t - z/T) per row, then + s_t * lse: one subtraction of row totals that are
        # each about the size of lse (a BLAS row dot over V terms lost 1e-4 relative here, in fp32).
        kd = (log_t.sub_(z_over_t).mul_(p_t).sum(-1) + mass_t * lse_t).sum() * temperature**2
        del log_t, z_over_t
    if not need_grad:
        return ce, kd, None
    w_ce, w_kd = spec.ce_weight, spec.kd_weight
    if p_t is None or temperature == 1.0:
        row_weight = w_ce if p_t is None else w_ce + w_kd * temperature * mass_t[:, None]
        grad = z_s.sub_(lse1[:, None]).exp_().mul_(row_weight)
        if p_t is not None:
            grad.sub_(p_t, alpha=w_kd * temperature)
    else:
        p_s_t = (z_s / temperature).sub_(lse_t[:, None]).exp_().mul_(w_kd * temperature * mass_t[:, None]).sub_(p_t, alpha=w_kd * temperature)
        grad = z_s.sub_(lse1[:, None]).exp_().mul_(w_ce).add_(p_s_t)
    grad[torch.arange(len(targets), device=grad.device), targets] -= w_ce
    return ce, kd, grad


class _FusedLoss(torch.autograd.Function):
    """Chunked projection + loss; gradients are formed chunk by chunk in forward (see module docstring)."""

    @staticmethod
    def forward(ctx, student_hidden, weight, bias, student_head, targets, teacher, spec, compute_dtype):
        n_tokens = student_hidden.shape[0]
        ctx.dtypes = (student_hidden.dtype, weight.dtype)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_any = need_hidden or need_weight or need_bias
        acc = accumulation_dtype(compute_dtype)
        grad_hidden = torch.zeros(student_hidden.shape, dtype=acc, device=student_hidden.device) if need_hidden else None
        grad_weight = None  # [V', H]: the first chunk's product, then each later one added in place
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        weight_c = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)  # cast once, not per chunk
        head_c = LogitHead(weight_c, bias, student_head.vocab_size, student_head.scale, student_head.softcap)
        ce_sum = torch.zeros((), dtype=acc, device=student_hidden.device)  # on the device: no sync per chunk
        kd_sum = torch.zeros((), dtype=acc, device=student_hidden.device)
        step = max(1, spec.chunk_tokens or n_tokens)
        closed_form = spec.closed_form and has_closed_form(student_head, teacher, spec)
        for start in range(0, n_tokens, step):
            rows = slice(start, min(start + step, n_tokens))
            h = student_hidden[rows].to(compute_dtype)
            raw = project(h, head_c, compute_dtype)
            teacher_rows = None if teacher is None else teacher[rows]
            if closed_form:
                ce, kd, grad_raw = closed_form_terms(raw[:, : student_head.vocab_size], targets[rows], teacher_rows, spec, compute_dtype, need_any)
                if grad_raw is not None and raw.shape[1] > student_head.vocab_size:  # padding rows get no gradient
                    grad_raw = F.pad(grad_raw, (0, raw.shape[1] - student_head.vocab_size))
            else:
                with torch.enable_grad():
                    raw.requires_grad_(need_any)
                    ce, kd = chunk_terms(raw, student_head, targets[rows], teacher_rows, spec, compute_dtype)
                    total = spec.ce_weight * ce + spec.kd_weight * kd
                    (grad_raw,) = torch.autograd.grad(total, raw) if need_any else (None,)
            ce_sum += ce.detach()
            kd_sum += kd.detach()
            if grad_raw is None:
                continue
            grad_c = grad_raw.to(compute_dtype)
            if need_hidden:
                grad_hidden[rows] = (grad_c @ weight_c).to(acc)
            if need_weight:
                part = grad_c.t() @ h
                # add_ reads a bf16 product as it adds: no fp32 copy of [V', H] per chunk
                grad_weight = part.to(acc) if grad_weight is None else grad_weight.add_(part)
                del part
            if need_bias:
                grad_bias.add_(grad_raw.sum(0))
            del raw, grad_raw, grad_c
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        total = spec.ce_weight * ce_sum + spec.kd_weight * kd_sum
        return total, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        hidden_dtype, weight_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else (grad_hidden * grad_total).to(hidden_dtype),
            None if grad_weight is None else grad_weight.mul_(grad_total).to(weight_dtype),  # ours: scaled in place
            None if grad_bias is None else (grad_bias * grad_total).to(weight_dtype),
            None, None, None, None, None,
        )


def fused_loss(
    student_hidden: torch.Tensor, student_head: LogitHead, targets: torch.Tensor,
    teacher: Optional[TeacherHidden | TeacherLogProbs], spec: LossSpec, compute_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Sums over the N scored tokens, from hidden states; the caller divides by its token count.

    student_hidden: [N, H_s] (the gradient flows into it, and into the head's weight and bias
    when they require it); targets: [N] next-token ids; teacher: TeacherHidden at the same N
    positions, a cached TeacherLogProbs over them, or None (CE only).
    Returns {"loss": ce_weight * ce_sum + kd_weight * kd_sum (differentiable),
    "ce_sum", "kd_sum" (fp32, detached)}. N = 0 gives zeros with a gradient path.
    """
    if student_hidden.shape[0] == 0:
        zero = student_hidden.float().sum() * 0.0
        return {"loss": zero, "ce_sum": zero.detach(), "kd_sum": zero.detach()}
    device_type = student_hidden.device.type
    with torch.autocast(device_type, enabled=False):  # dtypes here are chosen explicitly
        total, ce_sum, kd_sum = _FusedLoss.apply(
            student_hidden, student_head.weight, student_head.bias, student_head, targets, teacher, spec, compute_dtype
        )
    return {"loss": total, "ce_sum": ce_sum, "kd_sum": kd_sum}

