"""Losses against hand computations on small tensors."""

import math

import pytest
import torch

from neobench.training.losses import IGNORE_INDEX, cross_entropy, forward_kl, next_token_targets
from neobench.training.methods import METHODS, objective


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


# --- the divergence family ----------------------------------------------------------------------

from neobench.training.losses import DIVERGENCES, distillation_loss, token_divergence  # noqa: E402


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def mix(p, q, w):
    return [w * a + (1 - w) * b for a, b in zip(p, q)]


HAND = {  # name -> (param, per-token formula on probability lists p_s, p_t)
    "forward_kl": (0.0, lambda s, t: kl(t, s)),
    "reverse_kl": (0.0, lambda s, t: kl(s, t)),
    "jsd": (0.3, lambda s, t: 0.3 * kl(t, mix(t, s, 0.3)) + 0.7 * kl(s, mix(t, s, 0.3))),
    "skew_forward_kl": (0.1, lambda s, t: kl(t, mix(t, s, 0.1))),
    "skew_reverse_kl": (0.1, lambda s, t: kl(s, mix(s, t, 0.1))),
    "tvd": (0.0, lambda s, t: 0.5 * sum(abs(a - b) for a, b in zip(t, s))),
    "akl": (0.5, lambda s, t: akl(s, t, 0.5)),
    "uld": (0.0, lambda s, t: uld(s, t)),
    # One vocabulary: every token is shared, so this is forward KL itself.
    "shared_vocab_kl": (0.0, lambda s, t: kl(t, s)),
}


def akl(s, t, mu):
    """Wu et al.'s AKL from its definition, in Python floats (float64)."""
    order = sorted(range(len(t)), key=lambda i: -t[i])
    head_gap = tail_gap = cumulative = 0.0
    for rank, i in enumerate(order):
        cumulative += t[i]
        if rank == 0 or cumulative <= mu:
            head_gap += abs(t[i] - s[i])
        else:
            tail_gap += abs(t[i] - s[i])
    w_head = head_gap / (head_gap + tail_gap)
    return w_head * kl(t, s) + (1 - w_head) * kl(s, t)


def uld(s, t):
    """Boizard et al.'s ULD from its definition: both sorted, the shorter padded with zeros, L1."""
    width = max(len(s), len(t))
    s_sorted = sorted(s, reverse=True) + [0.0] * (width - len(s))
    t_sorted = sorted(t, reverse=True) + [0.0] * (width - len(t))
    return sum(abs(a - b) for a, b in zip(s_sorted, t_sorted))


def test_every_registered_divergence_has_a_hand_computation():
    assert set(HAND) == set(DIVERGENCES)


@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_matches_hand_computation(name, temperature):
    torch.manual_seed(1)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    param, formula = HAND[name]
    expected = sum(formula(softmax(sr, temperature), softmax(tr, temperature)) for sr, tr in zip(s.tolist(), t.tolist()))
    expected = expected / 3 * temperature**2
    assert distillation_loss(name, s, t, temperature, param).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", sorted(HAND))
def test_divergence_edges(name):
    x = torch.randn(4, 9)
    param = HAND[name][0]
    assert distillation_loss(name, x, x.clone(), 1.0, param).item() == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(0, 9, requires_grad=True)
    value = distillation_loss(name, empty, torch.zeros(0, 9), 1.0, param)
    assert value.item() == 0.0 and value.requires_grad
    assert distillation_loss(name, x.bfloat16(), torch.randn(4, 9).bfloat16(), 1.0, param).dtype == torch.float32
    assert (token_divergence(name, x, torch.randn(4, 9), 1.0, param) >= -1e-6).all()


def test_jsd_and_skew_reduce_at_their_ends():
    torch.manual_seed(2)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    fkl, rkl = distillation_loss("forward_kl", s, t), distillation_loss("reverse_kl", s, t)
    assert torch.allclose(distillation_loss("jsd", s, t, 1.0, 0.0), fkl)
    assert torch.allclose(distillation_loss("jsd", s, t, 1.0, 1.0), rkl)
    assert torch.allclose(distillation_loss("skew_forward_kl", s, t, 1.0, 0.0), fkl)
    assert torch.allclose(distillation_loss("skew_reverse_kl", s, t, 1.0, 0.0), rkl)
    # JSD is bounded by log 2 (beta = 1/2) and symmetric there.
    half = distillation_loss("jsd", s, t, 1.0, 0.5)
    assert 0 < half.item() <= math.log(2) and torch.allclose(half, distillation_loss("jsd", t, s, 1.0, 0.5))
    assert 0 < distillation_loss("tvd", s, t).item() <= 1


@pytest.mark.parametrize("name", sorted(HAND))
def test_chunked_equals_unchunked_in_value_and_gradient(name):
    torch.manual_seed(3)
    base, teacher = torch.randn(37, 50), torch.randn(37, 50)
    results = []
    for chunk in (None, 8):
        s = base.clone().requires_grad_(True)
        value = distillation_loss(name, s, teacher, 2.0, HAND[name][0], chunk_tokens=chunk)
        value.backward()
        results.append((value.detach(), s.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


@pytest.mark.parametrize("name", sorted(set(HAND) - {"akl"}))  # AKL's weights are constants: see below
def test_divergence_gradients_pass_gradcheck(name):
    torch.manual_seed(4)
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)

    def fn(x):  # the fp32 upcast is part of the loss; gradcheck needs float64 throughout
        log_s, log_t = torch.log_softmax(x, -1), torch.log_softmax(t, -1)
        return DIVERGENCES.get(name).per_token(log_s, log_t, HAND[name][0]).mean()

    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("name", sorted(HAND))
def test_top_k_with_k_equal_to_the_vocabulary_equals_dense(name):
    from neobench.training.losses import TeacherLogProbs

    torch.manual_seed(5)
    s, t = torch.randn(6, 11), torch.randn(6, 11)
    param, temperature = HAND[name][0], 2.0
    dense = distillation_loss(name, s, t, temperature, param)
    log_t = torch.log_softmax(t / temperature, -1)
    values, ids = log_t.sort(-1, descending=True)
    as_dense = distillation_loss(name, s, TeacherLogProbs(log_t), temperature, param)
    as_topk = distillation_loss(name, s, TeacherLogProbs(values, ids.int(), torch.zeros(6)), temperature, param)
    assert as_dense.item() == pytest.approx(dense.item(), abs=1e-6)
    assert as_topk.item() == pytest.approx(dense.item(), abs=1e-6)
    # Top-k with a remainder bucket, chunked, keeps value and gradient of the unchunked computation.
    k_values, k_ids = values[:, :4], ids[:, :4]
    sparse = TeacherLogProbs(k_values, k_ids.int(), 1 - k_values.exp().sum(-1))
    grads = []
    for chunk in (None, 2):
        x = s.clone().requires_grad_(True)
        distillation_loss(name, x, sparse, temperature, param, chunk_tokens=chunk).backward()
        grads.append(x.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_top_k_of_a_peaked_teacher_approximates_dense():
    from neobench.training.losses import TeacherLogProbs

    torch.manual_seed(6)
    s, t = torch.randn(8, 50), torch.randn(8, 50) * 6  # most mass on a few tokens
    log_t = torch.log_softmax(t, -1)
    values, ids = log_t.topk(10, -1)
    sparse = TeacherLogProbs(values, ids.int(), 1 - values.exp().sum(-1))
    assert distillation_loss("forward_kl", s, sparse).item() == pytest.approx(distillation_loss("forward_kl", s, t).item(), rel=0.05)


def test_akl_gradient_is_its_weighted_kls_with_the_weights_held():
    """AKL's head/tail weights carry no gradient (as the authors detach them): its gradient is
    w_head * d FKL + w_tail * d RKL at this point's weights."""
    torch.manual_seed(6)
    s, t = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    log_t = torch.log_softmax(t, -1)
    x = s.clone().requires_grad_(True)
    DIVERGENCES.get("akl").per_token(torch.log_softmax(x, -1), log_t, 0.5).sum().backward()
    probs_s, probs_t = torch.softmax(s, -1).tolist(), torch.softmax(t, -1).tolist()
    expected = torch.zeros_like(s)
    for row in range(4):
        full = akl(probs_s[row], probs_t[row], 0.5)
        fkl, rkl = kl(probs_t[row], probs_s[row]), kl(probs_s[row], probs_t[row])
        w_head = (full - rkl) / (fkl - rkl)
        y = s[row].clone().requires_grad_(True)
        log_y = torch.log_softmax(y, -1)
        (w_head * (log_t[row].exp() * (log_t[row] - log_y)).sum() + (1 - w_head) * (log_y.exp() * (log_y - log_t[row])).sum()).backward()
        expected[row] = y.grad
    assert torch.allclose(x.grad, expected, atol=1e-10)


@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
def test_akl_matches_its_definition_for_every_head_size(mu):
    torch.manual_seed(7)
    s, t = torch.randn(5, 12, dtype=torch.float64) * 2, torch.randn(5, 12, dtype=torch.float64) * 2
    got = DIVERGENCES.get("akl").per_token(torch.log_softmax(s, -1), torch.log_softmax(t, -1), mu)
    expected = [akl(a, b, mu) for a, b in zip(torch.softmax(s, -1).tolist(), torch.softmax(t, -1).tolist())]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sizes", [(7, 12), (12, 7), (9, 9)])
def test_uld_across_vocabularies_of_any_sizes(sizes):
    """ULD needs no shared vocabulary: a [N, V_s] student and a [N, V_t] teacher, either larger."""
    torch.manual_seed(8)
    s, t = torch.randn(4, sizes[0], dtype=torch.float64), torch.randn(4, sizes[1], dtype=torch.float64)
    got = DIVERGENCES.get("uld").per_token(torch.log_softmax(s, -1), torch.log_softmax(t, -1), 0.0)
    expected = [uld(a, b) for a, b in zip(torch.softmax(s, -1).tolist(), torch.softmax(t, -1).tolist())]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    # A permutation of the teacher's vocabulary changes nothing: only the sorted values count.
    perm = torch.randperm(sizes[1])
    again = DIVERGENCES.get("uld").per_token(torch.log_softmax(s, -1), torch.log_softmax(t[:, perm], -1), 0.0)
    assert torch.allclose(got, again, atol=1e-14)
