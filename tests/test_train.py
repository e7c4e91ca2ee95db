"""The training loop on tiny models: every method x variant learns; adapters behave."""

import contextlib
import dataclasses
import math

import pytest
import torch

from neobench.data.examples import collate
from neobench.models.adapters import VARIANTS, apply_adapter, merged_copy
from neobench.models.loading import load_causal_lm
from neobench.training.loop import WEIGHTS_FILE, build_student, load_trained_student, train
from neobench.training.methods import METHODS, objective
from neobench.training.workspace import prepare

CASES = [(m, None) for m, spec in METHODS.items() if spec.trains == "all"] + [
    (m, v) for m, spec in METHODS.items() if spec.trains == "adapter" for v in VARIANTS
]


@pytest.fixture(scope="module")
def workspace(tiny, tmp_path_factory):
    from neobench.runs.config import RunConfig

    cfg = RunConfig(
        preset="tiny", teacher=str(tiny["teacher"]), student=str(tiny["student"]), train_data=str(tiny["data"]),
        seq_len=64, batch_size=4, max_examples=4, max_steps=6, lr=3e-3, adapter_lr=1e-2, rank=4,
        runs_dir=str(tmp_path_factory.mktemp("runs")), dtype="float32",  # fp32 on every CPU: the bounds below are fp32's
    )
    return cfg, prepare(cfg)


def fixed_batch_loss(cfg, ws, student):
    batch = collate(ws.data.examples, ws.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = ws.teacher()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return objective(METHODS.get(cfg.method), logits, batch["labels"], teacher_logits,
                     kd_ratio=cfg.kd_ratio, vocab_size=ws.vocab_size)["loss"].item()


@pytest.mark.parametrize("method,variant", CASES, ids=[f"{m}-{v or 'full'}" for m, v in CASES])
def test_every_method_and_variant_lowers_its_loss(workspace, method, variant, tmp_path):
    base, ws = workspace
    cfg = dataclasses.replace(base, method=method, variant=variant)
    before = fixed_batch_loss(cfg, ws, build_student(cfg, ws).eval())
    trained = train(cfg, ws)
    student, log, record = trained.student, trained.log, trained.record
    after = fixed_batch_loss(cfg, ws, student.eval())
    assert after < before - 0.05, f"{method}+{variant}: loss {before:.4f} -> {after:.4f}"
    assert len(log) == 6 and record["budget"]["steps"] == 6
    trainable, total = record["cost"]["trainable_params"], record["cost"]["total_params"]
    if METHODS.get(method).trains == "adapter":
        assert 0 < trainable < total / 2
    else:
        assert trainable == total
    assert (record["final"]["kd"] > 0) == METHODS.get(method).uses_teacher

    # The stored weights rebuild the same student (what `neobench eval --run` relies on).
    from safetensors.torch import save_file

    weights = tmp_path / WEIGHTS_FILE
    save_file(trained.weights, str(weights))
    reloaded = load_trained_student(cfg, ws, weights)
    batch = collate(ws.data.examples, ws.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=batch["input_ids"]).logits, student(input_ids=batch["input_ids"]).logits, atol=1e-5)


def test_moslora_starts_unchanged_and_merges_to_the_same_outputs(tiny):
    base = load_causal_lm(str(tiny["student"]), torch.float32, "cpu").eval()
    x = torch.randint(0, tiny["vocab"], (2, 12))
    with torch.no_grad():
        reference = base(input_ids=x).logits
    model = apply_adapter(load_causal_lm(str(tiny["student"]), torch.float32, "cpu"), "moslora", 4, 8.0, 0.0, "all-linear", 0)
    mixers = [n for n, p in model.named_parameters() if n.endswith(".mixer") and p.requires_grad]
    assert mixers, "MoSLoRA mixers must be trainable"
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, reference)
        for name, p in model.named_parameters():  # move B and M away from their init
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)
        adapted = model(input_ids=x).logits
        merged = merged_copy(model)(input_ids=x).logits
    assert not torch.allclose(adapted, reference, atol=1e-3)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [4, 8])
def test_gradient_accumulation_matches_one_big_batch(workspace, n):
    base, ws = workspace
    # Responses of different lengths per micro-batch: a per-micro-batch mean would differ.
    # A small loss chunk makes the chunked KD path part of the check.
    one = dataclasses.replace(base, method="kd", batch_size=n, grad_accum=1, max_steps=2, loss_chunk_tokens=16)
    four = dataclasses.replace(one, batch_size=1, grad_accum=n)
    run1, run4 = train(one, ws), train(four, ws)
    s1, log1, s4, log4 = run1.student, run1.log, run4.student, run4.log
    for a, b in zip(log1, log4):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for p1, p4 in zip(s1.parameters(), s4.parameters()):
        torch.testing.assert_close(p1, p4, atol=1e-5, rtol=1e-4)


def test_wall_clock_cap_stops_early_and_says_so(workspace):
    base, ws = workspace
    cfg = dataclasses.replace(base, method="sft", max_steps=50, max_wall_seconds=1e-9)
    run = train(cfg, ws)
    log, record = run.log, run.record
    assert len(log) == 1
    assert record["budget"]["stopped_by"] == "max_wall_seconds" and record["budget"]["planned_steps"] == 50


def test_lr_schedule_warms_up_then_decays_and_never_wastes_a_step():
    from neobench.training.loop import lr_multiplier

    factors = [lr_multiplier(s, 12, 2) for s in range(12)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))  # cosine decay after the peak
    assert min(factors) > 0, "every step must train"
    assert lr_multiplier(0, 10, 0) == 1.0  # no warm-up: start at the peak


def test_every_step_changes_the_weights(workspace):
    base, ws = workspace
    cfg = dataclasses.replace(base, method="sft", max_steps=1)  # one step, and it is a warm-up step
    before = [p.detach().clone() for p in build_student(cfg, ws).parameters()]
    student = train(cfg, ws).student
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_minillm_samples_its_own_responses_and_learns(workspace):
    from neobench.training.onpolicy import prompt_of, sample_responses

    base, ws = workspace
    examples = ws.data.examples[:3]
    student = build_student(dataclasses.replace(base, method="minillm"), ws)
    out = sample_responses(student, ws.tokenizer, examples, [False, True, False], max_new_tokens=5, temperature=1.0, seed=0)
    assert out[1] == examples[1], "a gold example keeps its response"
    for ex, new in zip(examples, out):
        prompt = prompt_of(ex)
        assert list(new.input_ids[: len(prompt)]) == prompt
        reply = [t for t in new.labels if t != -100]
        assert reply == list(new.input_ids[len(prompt):])
        if new is not examples[1]:
            assert 1 <= len(reply) <= 5

    for variant in (None, "lora"):
        cfg = dataclasses.replace(base, method="minillm", variant=variant, max_steps=4)
        run = train(cfg, ws)
        student, log, record = run.student, run.log, run.record
        assert record["cost"]["generation_seconds"] > 0
        assert record["cost"]["update_seconds"] == pytest.approx(record["cost"]["train_seconds"] - record["cost"]["generation_seconds"])
        assert all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in log)
        trainable, total = record["cost"]["trainable_params"], record["cost"]["total_params"]
        assert (trainable < total / 2) if variant else (trainable == total)
        assert log[-1]["loss"] < log[0]["loss"], f"minillm+{variant}: {[r['loss'] for r in log]}"


def test_micro_batches_group_a_steps_examples_by_length():
    from neobench.training.loop import group_by_length

    lengths = {0: 30, 1: 10, 2: 30, 3: 20, 4: 10, 5: 40, 6: 20, 7: 5}
    picks = [5, 2, 7, 0, 1, 6, 3, 4]  # the seeded order of one step
    groups = group_by_length(picks, lengths, 4)
    assert groups == [[7, 1, 4, 6], [3, 2, 0, 5]]  # ties keep the seeded order (1 before 4, 2 before 0)
    assert sorted(i for g in groups for i in g) == sorted(picks)  # the step sees the same examples


@pytest.mark.parametrize("variant", sorted(VARIANTS.names()))
def test_adapter_inputs_left_in_bf16_change_no_bit(tiny, variant):
    """peft's cast of each adapter input to fp32 (undone at once by autocast) only costs copies:
    without it, a bf16 step's loss and every adapter gradient are bit for bit the same. DoRA
    depends on it, so the guard leaves DoRA's casts in place (and a plain LoRA shows the test bites)."""
    from neobench.models.precision import autocast
    from neobench.training.loop import adapter_inputs_uncast

    ids = torch.arange(3, 43).reshape(2, 20) % tiny["vocab"]
    results = []
    for uncast in (False, True):
        model = apply_adapter(load_causal_lm(str(tiny["student"]), torch.bfloat16, "cpu"), variant, 4, 8.0, 0.0, "all-linear", 0)
        with torch.no_grad():  # B = 0 at init would hide the path through B
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        guard = adapter_inputs_uncast(model, torch.bfloat16, variant) if uncast else contextlib.nullcontext()
        with autocast("cpu", torch.bfloat16), guard:
            loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_cast, grads_cast), (loss_uncast, grads_uncast) = results
    assert torch.equal(loss_cast, loss_uncast)
    assert grads_cast.keys() == grads_uncast.keys() and grads_cast
    for name in grads_cast:
        assert torch.equal(grads_cast[name], grads_uncast[name]), name


def test_dora_numbers_depend_on_its_fp32_inputs(tiny):
    """Why DoRA keeps peft's casts: forced off, its bf16 loss moves."""
    from peft.helpers import disable_input_dtype_casting

    from neobench.models.precision import autocast

    ids = torch.arange(3, 43).reshape(2, 20) % tiny["vocab"]
    losses = []
    for uncast in (False, True):
        model = apply_adapter(load_causal_lm(str(tiny["student"]), torch.bfloat16, "cpu"), "dora", 4, 8.0, 0.0, "all-linear", 0)
        guard = disable_input_dtype_casting(model) if uncast else contextlib.nullcontext()
        with torch.no_grad(), autocast("cpu", torch.bfloat16), guard:
            losses.append(model(input_ids=ids).logits.float().logsumexp(-1).mean())
    assert not torch.equal(*losses)


@pytest.mark.parametrize("method", ["neo", "kd"])
def test_compiled_decoders_train_as_the_eager_ones(workspace, method):
    """--compile: the same losses and weights as eager in fp32 (adapters and full weights, teacher online),
    saved under the eager model's names, and the compiled graphs really ran."""
    from torch._dynamo.utils import counters

    base, ws = workspace
    cfg = dataclasses.replace(base, method=method, max_steps=3)
    eager = train(cfg, ws)
    counters.clear()
    compiled = train(dataclasses.replace(cfg, compile=True), ws)
    assert counters["stats"]["unique_graphs"] >= 1  # the student's decoder (the teacher's is the workspace's, kept)
    assert ws._teacher_compiled is not None
    for a, b in zip(eager.log, compiled.log):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6) and b["kd"] == pytest.approx(a["kd"], rel=1e-5, abs=1e-6)
    assert eager.weights.keys() == compiled.weights.keys()
    for name, tensor in eager.weights.items():
        assert torch.allclose(compiled.weights[name], tensor, atol=1e-5), name


def test_compile_refuses_several_processes(tiny):
    from neobench.core.errors import NeobenchError
    from neobench.training.distributed import World, wrap_student

    model = load_causal_lm(str(tiny["student"]), torch.float32, "cpu")
    with pytest.raises(NeobenchError, match="single process"):
        wrap_student(model, "ddp", World(rank=0, size=2), "cpu", torch.float32, compiled=True)
