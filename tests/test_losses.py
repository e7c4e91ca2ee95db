"""Losses against hand computations on small tensors."""

import math

import pytest
import torch

from neobench.losses import IGNORE_INDEX, cross_entropy, forward_kl, next_token_targets
from neobench.methods import METHODS, objective


def softmax(row, t=1.0):
    exps = [math.exp(x / t) for x in row]
    return [e / sum(exps) for e in exps]


def test_forward_kl_matches_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    for temperature in (1.0, 2.0):
        expected = 0.0
        for srow, trow in zip(s.tolist(), t.tolist()):
            p_t, p_s = softmax(trow, temperature), softmax(srow, temperature)
            expected += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        expected = expected / 3 * temperature**2
        assert forward_kl(s, t, temperature).item() == pytest.approx(expected, rel=1e-6)


def test_forward_kl_edges():
    x = torch.randn(4, 7)
    assert forward_kl(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)
    empty = torch.zeros(0, 7, requires_grad=True)
    value = forward_kl(empty, torch.zeros(0, 7))
    assert value.item() == 0.0 and value.requires_grad
    # Computed in fp32 whatever the input dtype.
    assert forward_kl(x.bfloat16(), x.bfloat16()).dtype == torch.float32


def test_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.1, 0.2, 3.0]])
    targets = torch.tensor([1, 2])
    expected = -(math.log(softmax([1.0, 2.0, 0.5])[1]) + math.log(softmax([0.1, 0.2, 3.0])[2])) / 2
    assert cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert cross_entropy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).item() == 0.0


def test_next_token_targets_shift():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6]])
    mask, targets = next_token_targets(labels)
    assert mask.tolist() == [[False, True, True, False]]
    assert targets[mask].tolist() == [5, 6]


def _batch():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 13)  # teacher has 2 padding rows
    labels = torch.randint(0, 11, (2, 6))
    labels[:, :2] = IGNORE_INDEX
    return student, teacher, labels


def test_kd_ratio_zero_is_exactly_the_sft_loss():
    student, teacher, labels = _batch()
    sft = objective(METHODS.get("sft"), student, labels, vocab_size=11)
    kd = objective(METHODS.get("kd"), student, labels, teacher, kd_ratio=0.0, vocab_size=11)
    assert torch.equal(kd["loss"], sft["loss"])


def test_objective_mixes_ce_and_kd_on_response_tokens_only():
    student, teacher, labels = _batch()
    parts = objective(METHODS.get("neo"), student, labels, teacher, kd_ratio=0.25, vocab_size=11)
    mask, targets = next_token_targets(labels)
    ce = cross_entropy(student[mask], targets[mask])
    kd = forward_kl(student[mask], teacher[mask][:, :11])
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert parts["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(0.75 * ce.item() + 0.25 * kd.item(), rel=1e-6)
    assert int(parts["tokens"]) == int(mask.sum())
    # Changing logits at prompt positions changes nothing.
    student2 = student.clone()
    student2[:, 0] += 100.0
    assert objective(METHODS.get("neo"), student2, labels, teacher, kd_ratio=0.25, vocab_size=11)["loss"].item() == pytest.approx(parts["loss"].item())
