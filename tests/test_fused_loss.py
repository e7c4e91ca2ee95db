"""The fused projection + loss against the materialised reference, and the mixed-precision choices."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from neobench.core.errors import NeobenchError
from neobench.training.fused_loss import LogitHead, LossSpec, TeacherHidden, check_head, fused_loss
from neobench.training.losses import DIVERGENCES, TeacherLogProbs, distillation_loss

N, H, H_T, V, V_PADDED = 23, 12, 20, 40, 44
PARAMS = {"jsd": 0.3, "skew_forward_kl": 0.1, "skew_reverse_kl": 0.2, "akl": 0.5}
TEACHERS = ("hidden", "dense", "topk", "topk_all")


def make_case(dtype, teacher_kind, temperature, *, bias=True, seed=0, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    hidden, weight = rand(N, H).requires_grad_(), rand(V_PADDED, H).requires_grad_()
    b = rand(V_PADDED).requires_grad_() if bias else None
    # A teacher that rules tokens out does so with -inf logits: here through its head's bias.
    teacher_bias = torch.zeros(V_PADDED + 3, dtype=dtype)
    if neg_inf:
        teacher_bias[: V // 4] = -math.inf
    teacher_head = LogitHead(rand(V_PADDED + 3, H_T), teacher_bias, V)
    teacher_hidden = rand(N, H_T)
    targets = torch.randint(0, V, (N,), generator=g)
    z_t = teacher_head.transform(teacher_hidden @ teacher_head.weight.t() + teacher_bias)
    log_t = F.log_softmax(z_t / temperature, -1)
    if teacher_kind == "hidden":
        teacher, reference_teacher = TeacherHidden(teacher_hidden, teacher_head), z_t
    elif teacher_kind == "dense":
        teacher = reference_teacher = TeacherLogProbs(log_t)
    else:
        k = V if teacher_kind == "topk_all" else 7
        values, ids = log_t.topk(k, -1)
        teacher = reference_teacher = TeacherLogProbs(values, ids.int(), (1 - values.exp().sum(-1)).clamp_min(0))
    return hidden, weight, b, targets, teacher, reference_teacher


def reference(hidden, weight, bias, targets, reference_teacher, spec):
    """The materialised computation: full logits, then neobench.training.losses."""
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    z = logits[:, :V]
    ce = F.cross_entropy(z.to(torch.promote_types(z.dtype, torch.float32)), targets, reduction="sum")
    kd = distillation_loss(spec.divergence, z, reference_teacher, spec.temperature, spec.param, chunk_tokens=None) * len(targets)
    return spec.ce_weight * ce + spec.kd_weight * kd


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("teacher_kind", TEACHERS)
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_equals_materialised_in_value_and_gradient(name, teacher_kind, dtype, tol):
    for temperature, closed_form, bias in ((1.0, True, True), (2.0, True, False), (1.0, False, False), (0.7, False, True)):
        hidden, weight, b, targets, teacher, ref_teacher = make_case(dtype, teacher_kind, temperature, bias=bias)
        spec = LossSpec(0.4, 0.6, name, temperature, PARAMS.get(name, 0.0), chunk_tokens=5, closed_form=closed_form)
        got = fused_loss(hidden, LogitHead(weight, b, V), targets, teacher, spec, dtype)
        want = reference(hidden, weight, b, targets, ref_teacher, spec)
        assert got["loss"].item() == pytest.approx(want.item(), rel=tol, abs=tol)
        for g_fused, g_ref in zip(grads_of(got["loss"], (hidden, weight, b)), grads_of(want, (hidden, weight, b))):
            assert torch.allclose(g_fused, g_ref, rtol=tol, atol=tol), (name, teacher_kind, temperature, closed_form)


def test_closed_form_and_autograd_paths_agree_and_ce_only_works():
    for kd_weight in (0.0, 0.5):
        results = []
        for closed_form in (True, False):
            hidden, weight, b, targets, teacher, _ = make_case(torch.float64, "hidden", 1.5)
            spec = LossSpec(1 - kd_weight, kd_weight, "forward_kl", 1.5, chunk_tokens=4, closed_form=closed_form)
            out = fused_loss(hidden, LogitHead(weight, b, V), targets, teacher if kd_weight else None, spec, torch.float64)
            results.append((out["loss"].item(), out["ce_sum"].item(), out["kd_sum"].item(), *grads_of(out["loss"], (hidden, weight, b))))
        (l1, c1, k1, *g1), (l2, c2, k2, *g2) = results
        assert (l1, c1, k1) == pytest.approx((l2, c2, k2), rel=1e-12)
        assert all(torch.allclose(a, b_, atol=1e-12) for a, b_ in zip(g1, g2))


def test_scaling_and_softcapping_heads_match_reference():
    hidden, weight, b, targets, teacher, ref_teacher = make_case(torch.float64, "dense", 1.0)
    head = LogitHead(weight, b, V, scale=0.5, softcap=3.0)
    spec = LossSpec(0.5, 0.5, "forward_kl", chunk_tokens=6)
    got = fused_loss(hidden, head, targets, teacher, spec, torch.float64)
    z = head.transform(hidden @ weight.t() + b)
    want = 0.5 * F.cross_entropy(z, targets, reduction="sum") + 0.5 * distillation_loss("forward_kl", z, ref_teacher, chunk_tokens=None) * N
    assert got["loss"].item() == pytest.approx(want.item(), rel=1e-10)
    for a, b_ in zip(grads_of(got["loss"], (hidden, weight)), grads_of(want, (hidden, weight))):
        assert torch.allclose(a, b_, atol=1e-10)


def test_bf16_inputs_stay_close_to_the_fp32_reference():
    """bf16 hidden states and weights, bf16 matmuls, fp32 softmax: within 1% of fp32 in value and gradient."""
    hidden, weight, b, targets, teacher, ref_teacher = make_case(torch.float32, "hidden", 1.0)
    spec = LossSpec(0.5, 0.5, "forward_kl", chunk_tokens=8)
    want = reference(hidden, weight, b, targets, ref_teacher, spec)
    h16 = hidden.detach().bfloat16().requires_grad_()
    teacher16 = TeacherHidden(teacher.hidden.bfloat16(), LogitHead(teacher.head.weight.bfloat16(), None, V))
    got = fused_loss(h16, LogitHead(weight, b, V), targets, teacher16, spec, torch.bfloat16)
    assert got["loss"].dtype == torch.float32
    assert got["loss"].item() == pytest.approx(want.item(), rel=1e-2)
    (g16,) = torch.autograd.grad(got["loss"], h16)
    (g32,) = torch.autograd.grad(want, hidden)
    assert g16.dtype == torch.bfloat16
    assert ((g16.float() - g32).norm() / g32.norm()).item() < 2e-2


def test_no_scored_token_gives_zero_with_a_gradient_path():
    weight = torch.randn(V, H, requires_grad=True)
    hidden = torch.zeros(0, H, requires_grad=True)
    out = fused_loss(hidden, LogitHead(weight, None, V), torch.zeros(0, dtype=torch.long), None, LossSpec())
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    out["loss"].backward()


@pytest.mark.parametrize("teacher_kind", ["hidden", "dense"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_teacher_minus_inf_logits_give_exact_divergences(name, teacher_kind):
    """0 log 0 = 0: a teacher that rules tokens out (-inf) gives finite divergences, except reverse KL
    (and AKL, whose tail term is reverse KL)."""
    hidden, weight, b, targets, teacher, ref_teacher = make_case(torch.float64, teacher_kind, 1.0, neg_inf=True)
    spec = LossSpec(0.0, 1.0, name, 1.0, PARAMS.get(name, 0.0), chunk_tokens=5)
    out = fused_loss(hidden, LogitHead(weight, b, V), targets, teacher, spec, torch.float64)
    if name in ("reverse_kl", "akl"):
        # The student puts mass everywhere, the teacher none on the first V/4 tokens: +inf by definition.
        assert out["kd_sum"].item() == math.inf
        return
    assert math.isfinite(out["kd_sum"].item())
    # Against a float64 computation from probabilities, where 0 log 0 = 0 is spelled out.
    z = (hidden @ weight.t() + b)[:, :V]
    p_s = torch.softmax(z, -1)
    z_t = teacher.head.transform(teacher.hidden @ teacher.head.weight.t() + teacher.head.bias) if teacher_kind == "hidden" else None
    p_t = torch.softmax(z_t, -1) if z_t is not None else teacher.log_probs.exp()
    assert (p_t[:, : V // 4] == 0).all() and (p_t[:, V // 4 :] > 0).all()

    def kl(p, q):
        return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)

    beta = PARAMS.get(name, 0.0)
    expected = {
        "forward_kl": lambda: kl(p_t, p_s),
        "jsd": lambda: beta * kl(p_t, beta * p_t + (1 - beta) * p_s) + (1 - beta) * kl(p_s, beta * p_t + (1 - beta) * p_s),
        "skew_forward_kl": lambda: kl(p_t, beta * p_t + (1 - beta) * p_s),
        "skew_reverse_kl": lambda: kl(p_s, beta * p_s + (1 - beta) * p_t),
        "tvd": lambda: 0.5 * (p_t - p_s).abs().sum(-1),
        "uld": lambda: (p_s.sort(-1, descending=True).values - p_t.sort(-1, descending=True).values).abs().sum(-1),
        "shared_vocab_kl": lambda: kl(p_t, p_s),  # one vocabulary: forward KL
    }[name]().sum()
    assert out["kd_sum"].item() == pytest.approx(expected.item(), rel=1e-9)
    (grad,) = torch.autograd.grad(out["loss"], hidden)
    assert torch.isfinite(grad).all()


def test_an_infinite_loss_is_reported_with_the_finite_options():
    from neobench.runs.config import RunConfig
    from neobench.training.loop import divergence_message

    line = divergence_message(RunConfig(method="neo", loss="reverse_kl"), 3, math.inf, 1.0, (2, 1.25))
    assert line.startswith("neo+lora seed 0 diverged at step 3: loss inf; last finite loss 1.2500 at step 2; no result stored")
    assert "skew_reverse_kl or jsd" in line and "\n" not in line
    line = divergence_message(RunConfig(method="kd"), 1, 2.0, math.nan, None)
    assert "gradient norm nan (loss 2.0000); no finite step before it" in line and "lower the learning rate" in line


def _rss_peak_growth(fn) -> int:
    from neobench.training.memory import PeakMemory

    with PeakMemory("cpu") as memory:
        if memory.kind != "rss":
            pytest.skip("peak RSS cannot be reset on this system")
        baseline = memory.peak_bytes()
        fn()
        return memory.peak_bytes() - baseline


def test_no_full_logits_tensor_is_ever_allocated():
    """Peak RSS growth of the fused loss stays far below one [N x V] fp32 tensor; materialising one shows up."""
    # A narrow hidden size keeps the weights (which BLAS may copy while packing) small beside the logits.
    n, h, v = 1024, 16, 200_000
    full_logits = n * v * 4  # 819 MB
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    student_w, teacher_w = torch.randn(v, h) / 4, torch.randn(v, h) / 4
    teacher_hidden, targets = torch.randn(n, h), torch.randint(0, v, (n,))

    def fused():
        out = fused_loss(hidden, LogitHead(student_w, None, v), targets,
                         TeacherHidden(teacher_hidden, LogitHead(teacher_w, None, v)), LossSpec(0.5, 0.5, chunk_tokens=16))
        out["loss"].backward()

    def materialised():
        (hidden.detach() @ student_w.t()).sum()

    growth = _rss_peak_growth(fused)
    print(f"fused loss: peak RSS growth {growth / 2**20:.0f} MiB; one [N x V] fp32 tensor: {full_logits / 2**20:.0f} MiB")
    assert growth < 0.25 * full_logits
    assert _rss_peak_growth(materialised) > 0.9 * full_logits  # the probe does see a full tensor


# --- the model side: heads, decoders, and the step through real (tiny) models --------------------


def test_tied_head_step_equals_the_materialised_objective(tiny):
    """Through the real tiny models: loss and every parameter's gradient, tied embedding included."""
    from neobench.data.examples import collate
    from neobench.runs.config import RunConfig
    from neobench.training.distributed import ScoredHidden
    from neobench.training.loop import build_student, offline_objective
    from neobench.training.losses import next_token_targets
    from neobench.training.methods import METHODS, objective
    from neobench.training.workspace import prepare

    for method, variant in (("kd", None), ("neo", "dora")):
        cfg = RunConfig(preset="tiny", teacher=str(tiny["teacher"]), student=str(tiny["student"]), train_data=str(tiny["data"]),
                        seq_len=64, max_examples=4, method=method, variant=variant, rank=4, kd_ratio=0.3, temperature=1.5,
                        loss_chunk_tokens=7, dtype="float32")
        ws = prepare(cfg)
        student = build_student(cfg, ws)
        head = LogitHead.of(student, ws.vocab_size)
        assert head.weight is student.get_input_embeddings().weight  # tied: one tensor, one gradient
        batch = collate(ws.data.examples, ws.tokenizer.pad_token_id)
        parts = offline_objective(cfg, ws, METHODS.get(method), ScoredHidden(student), lambda: head, batch, list(range(4)), None, None)
        params = [p for p in student.parameters() if p.requires_grad]
        fused_grads = torch.autograd.grad(parts["loss"], params)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            teacher_logits = ws.teacher()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = objective(METHODS.get(method), logits, batch["labels"], teacher_logits, kd_ratio=0.3, temperature=1.5,
                        vocab_size=ws.vocab_size)
        n = int(next_token_targets(batch["labels"])[0].sum())
        assert parts["tokens"] == n
        assert parts["loss"].item() == pytest.approx(ref["loss"].item() * n, rel=1e-5)
        assert (parts["ce_sum"] / n).item() == pytest.approx(ref["ce"].item(), rel=1e-5)
        for g_fused, g_ref in zip(fused_grads, torch.autograd.grad(ref["loss"] * n, params)):
            assert torch.allclose(g_fused, g_ref, rtol=1e-4, atol=1e-6)


def test_a_head_that_does_not_explain_the_logits_is_refused(tiny):
    from neobench.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny["student"]), torch.float32, "cpu")
    head = LogitHead.of(model, tiny["vocab"])
    check_head(model, head, "tiny")  # a plain Llama: logits are lm_head(hidden)
    capped = dataclasses.replace(head, softcap=0.5)  # what a config claiming soft-capping would give
    with pytest.raises(NeobenchError, match="differ from lm_head\\(last hidden state\\).*not supported"):
        check_head(model, capped, "tiny")


def test_logit_transforms_are_read_from_the_config(tiny):
    from neobench.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny["student"]), torch.float32, "cpu")
    model.config.final_logit_softcapping = 30.0
    model.config.logit_scale = 0.25
    head = LogitHead.of(model, tiny["vocab"])
    assert (head.softcap, head.scale) == (30.0, 0.25)


# --- dtype resolution ----------------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_where_it_is_native(native, monkeypatch):
    from neobench.models import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.pick_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert precision.pick_dtype("float32", "cpu") == torch.float32
    assert precision.pick_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    assert precision.pick_dtype("auto", "cuda") == (torch.bfloat16 if native else torch.float32)


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch):
    from neobench.models import precision

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not precision.cpu_has_native_bf16()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert precision.cpu_has_native_bf16()
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.cpu_has_native_bf16()


def test_the_bf16_kernel_is_read_from_onednn_and_agrees_with_the_flags():
    """AMX or AVX-512 BF16 as oneDNN ran it; a CPU whose flags promise neither never reports either."""
    from neobench.models import precision

    kernel = precision.cpu_bf16_kernel()
    assert kernel in ("amx", "avx512_bf16", "emulated", "none")
    flags = precision.cpu_flags()
    if kernel == "amx":
        assert "amx_bf16" in flags
    if kernel == "avx512_bf16":
        assert "avx512_bf16" in flags
    if "amx_bf16" in flags and torch.backends.mkldnn.is_available():
        assert kernel == "amx"


@pytest.mark.parametrize("name,message", [("float16", "not supported.*use bfloat16"), ("fp8", "unknown dtype 'fp8'")])
def test_bad_dtypes_fail_in_one_line(name, message):
    from neobench.runs.config import RunConfig, validate

    with pytest.raises(NeobenchError, match=message):
        validate(RunConfig(dtype=name))


def test_a_bf16_run_keeps_fp32_masters_and_a_bf16_teacher(tiny_cfg):
    from neobench.training.loop import train
    from neobench.training.workspace import prepare

    for method, variant in (("kd", None), ("neo", "lora")):
        cfg = dataclasses.replace(tiny_cfg, method=method, variant=variant, dtype="bfloat16", max_steps=2)
        ws = prepare(cfg)
        trained = train(cfg, ws)
        student, log, record = trained.student, trained.log, trained.record
        assert record["cost"]["dtype"] == "bfloat16"
        assert {p.dtype for p in student.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for p in ws.teacher().parameters()} == {torch.bfloat16}
        frozen = {p.dtype for p in student.parameters() if not p.requires_grad}
        assert frozen == ({torch.bfloat16} if variant else set())
        fp32 = train(dataclasses.replace(cfg, dtype="float32"), prepare(dataclasses.replace(cfg, dtype="float32"))).log
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in fp32], rel=2e-2)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_freed_memory_is_kept_for_the_next_tile():
    """After keep_freed_memory, a freed 64 MB tensor stays in the process (its pages are reused by the
    next one instead of being faulted in again); glibc's default returns it to the system at once."""
    from neobench.training.memory import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc on Linux: the allocator is left as it is")
    tile = torch.ones(16 * 2**20)  # 64 MB, touched
    before_free = _rss_bytes()
    del tile
    assert _rss_bytes() > before_free - 16 * 2**20  # not unmapped (glibc's default drops all 64 MB)
