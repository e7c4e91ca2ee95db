"""Distillation across two tokenizers: alignment by offsets, the cross-vocabulary losses, runs, cache, export, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import make_llama, make_tokenizer, tiny_rows
from neobench.core.errors import NeobenchError
from neobench.data.alignment import VocabPairing, align_positions, boundary_starts
from neobench.data.examples import IGNORE_INDEX, tokenize_rows
from neobench.training.fused_loss import LogitHead, LossSpec, TeacherHidden, fused_loss
from neobench.training.losses import CROSS_VOCABULARY


@pytest.fixture(scope="module")
def xvocab(tmp_path_factory) -> dict:
    """A tiny teacher on one 300-token BPE and a tiny student on another (400 tokens, other merges)."""
    root = tmp_path_factory.mktemp("xvocab")
    # Each learns merges the other lacks: where either is coarser, the two split a text differently.
    teacher_tok = make_tokenizer(root / "tok_teacher", 300, corpus_extra=" xylophone" * 40)
    student_tok = make_tokenizer(root / "tok_student", 400, corpus_extra="naïve café 😀 " * 8 + "and 日本語 text " * 8)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows(24)))
    return {
        "teacher_tok": teacher_tok, "student_tok": student_tok, "data": data, "root": root,
        "teacher": make_llama(root / "teacher", root / "tok_teacher", layers=4, vocab_rows=320, seed=1),
        "student": make_llama(root / "student", root / "tok_student", layers=2, vocab_rows=len(student_tok), seed=2),
    }


def xcfg(xvocab, tmp_path, **changes):
    from neobench.runs.config import RunConfig

    base = RunConfig(
        preset="tiny", teacher=str(xvocab["teacher"]), student=str(xvocab["student"]), train_data=str(xvocab["data"]),
        seq_len=64, batch_size=4, grad_accum=1, max_steps=3, lr=1e-3, rank=4, runs_dir=str(tmp_path / "runs"),
        eval_tasks="none", dtype="float32", method="neo", loss="uld",
    )
    return dataclasses.replace(base, **changes)


# --- alignment -----------------------------------------------------------------------------------


def test_a_multi_byte_character_split_across_tokens_is_no_boundary():
    # "<|im_start|>" "x" " " + the two tokens of one 4-byte emoji (overlapping spans) + "!"
    offsets = [(0, 12), (12, 13), (13, 14), (14, 16), (15, 16), (16, 17)]
    assert boundary_starts(offsets) == {12: 1, 13: 2, 14: 3, 16: 5}
    # A student that keeps the emoji whole aligns before and after it, never inside.
    student = [(0, 12), (12, 13), (13, 14), (14, 16), (16, 17)]
    assert align_positions(student, offsets, scored=[0, 1, 2, 3]) == ([0, 1, 2, 3], [0, 1, 2, 4])


@pytest.mark.parametrize("text", [
    "<|im_start|>user\nA xylophone? What is  two plus   three?<|im_end|>\n<|im_start|>assistant\nnaïve café 😀 is five.<|im_end|>\n",
    "<|im_start|>assistant\n  spaces\t\ttabs\n\nand 日本語 xylophone text<|im_end|>\n",
])
def test_aligned_positions_have_read_the_same_text_and_predict_the_same_offset(xvocab, text):
    """On hand-made strings the two tokenizers split differently (spaces, multi-byte characters, the
    chat template's special tokens): every aligned pair has read exactly text[:c] and predicts at c."""
    s_tok, t_tok = xvocab["student_tok"], xvocab["teacher_tok"]
    s_enc = s_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    t_enc = t_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert s_enc["input_ids"] != t_enc["input_ids"], "the two tokenizers must split this text differently"
    s_off, t_off = s_enc["offset_mapping"], t_enc["offset_mapping"]
    student_positions, teacher_positions = align_positions(s_off, t_off, scored=list(range(len(s_off) - 1)))
    assert 0 < len(student_positions) < len(s_off) - 1, "some positions align, some do not"
    for p, q in zip(student_positions, teacher_positions):
        c = s_off[p + 1][0]
        assert t_off[q + 1][0] == c
        assert s_tok.decode(s_enc["input_ids"][: p + 1]) == t_tok.decode(t_enc["input_ids"][: q + 1]) == text[:c]
    assert student_positions == sorted(student_positions) and teacher_positions == sorted(teacher_positions)
    # The special tokens are one token on both sides, so the position after each aligns.
    after_special = [p for p in range(len(s_off) - 1) if text[s_off[p][0]:s_off[p][1]] in ("<|im_start|>", "<|im_end|>")]
    assert after_special and set(after_special) <= set(student_positions)


def test_one_tokenizer_aligns_every_response_position_with_itself(xvocab):
    tok = xvocab["student_tok"]
    data = tokenize_rows(tok, tiny_rows(6), 64, "tiny", teacher_tokenizer=tok)
    for ex in data.examples:
        scored = [p for p in range(len(ex.labels) - 1) if ex.labels[p + 1] != IGNORE_INDEX]
        assert list(ex.aligned_positions) == scored == list(ex.teacher_positions)
        assert ex.teacher_input_ids == ex.input_ids[: scored[-1] + 1]
    assert data.aligned_tokens == data.scored_tokens


def test_two_tokenizers_align_most_response_tokens_and_hash_the_alignment(xvocab):
    plain = tokenize_rows(xvocab["student_tok"], tiny_rows(24), 64, "tiny")
    cross = tokenize_rows(xvocab["student_tok"], tiny_rows(24), 64, "tiny", teacher_tokenizer=xvocab["teacher_tok"])
    assert [ex.input_ids for ex in plain.examples] == [ex.input_ids for ex in cross.examples]
    assert 0.5 < cross.aligned_tokens / cross.scored_tokens < 1
    # data_hash is the student's alone (an sft run, which reads no teacher, shares it); the alignment has its own.
    assert cross.data_hash == plain.data_hash and cross.examples_hash == plain.examples_hash
    assert cross.alignment_hash and plain.alignment_hash is None and plain.aligned_tokens is None


# --- the losses reduce to their definitions with one tokenizer -----------------------------------


@pytest.mark.parametrize("loss,reference", [("uld", "uld"), ("shared_vocab_kl", "forward_kl")])
def test_the_cross_vocabulary_path_with_one_tokenizer_is_the_plain_loss(xvocab, loss, reference):
    """Every row aligned and a pairing of a vocabulary with itself: uld is its definition and the
    shared-token KL is forward KL, in value and gradient."""
    torch.manual_seed(0)
    tok = xvocab["student_tok"]
    n, hidden, vocab = 21, 16, len(tok)
    head = LogitHead(torch.randn(vocab, hidden, dtype=torch.float64) * 0.5, None, vocab)
    teacher_hidden = torch.randn(n, hidden, dtype=torch.float64)
    student = torch.randn(n, hidden, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,))
    results = []
    for name, teacher in (
        (reference, TeacherHidden(teacher_hidden, head)),
        (loss, TeacherHidden(teacher_hidden, head, torch.ones(n, dtype=torch.bool), VocabPairing.of(tok, tok))),
    ):
        x = student.clone().requires_grad_(True)
        parts = fused_loss(x, head, targets, teacher, LossSpec(0.5, 0.5, name, chunk_tokens=8), torch.float64)
        parts["loss"].backward()
        results.append((parts["kd_sum"], x.grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-12) and results[0][0] > 0
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-10, atol=1e-14)


def test_unaligned_rows_get_no_distillation_term(xvocab):
    torch.manual_seed(1)
    n, hidden = 10, 8
    s_head = LogitHead(torch.randn(40, hidden, dtype=torch.float64), None, 40)
    t_head = LogitHead(torch.randn(50, hidden, dtype=torch.float64), None, 50)
    aligned = torch.tensor([True, False] * 5)
    student = torch.randn(n, hidden, dtype=torch.float64, requires_grad=True)
    teacher = TeacherHidden(torch.randn(n, hidden, dtype=torch.float64), t_head, aligned)
    parts = fused_loss(student, s_head, torch.zeros(n, dtype=torch.long), teacher, LossSpec(0.0, 1.0, "uld"), torch.float64)
    only_aligned = fused_loss(student[aligned], s_head, torch.zeros(5, dtype=torch.long), TeacherHidden(teacher.hidden[aligned], t_head),
                              LossSpec(0.0, 1.0, "uld"), torch.float64)
    assert torch.allclose(parts["kd_sum"], only_aligned["kd_sum"])
    parts["loss"].backward()
    assert (student.grad[~aligned] == 0).all() and (student.grad[aligned] != 0).any()


# --- runs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", CROSS_VOCABULARY)
@pytest.mark.parametrize("method", ["kd", "neo"])
def test_kd_and_neo_train_across_tokenizers_and_the_loss_decreases(xvocab, tmp_path, method, loss):
    from neobench.training.loop import train
    from neobench.training.workspace import prepare

    # The distillation term alone, on 4 examples, so that its descent shows in a few steps.
    cfg = xcfg(xvocab, tmp_path, method=method, loss=loss, kd_ratio=1.0, max_steps=12, max_examples=4, warmup_ratio=0.0,
               lr=1e-2 if method == "kd" else 1e-1)
    ws = prepare(cfg)
    assert ws.cross_vocabulary and ws.teacher_vocab == len(xvocab["teacher_tok"]) and ws.vocab_size == len(xvocab["student_tok"])
    trained = train(cfg, ws)
    kd = [row["kd"] for row in trained.log]
    # Every step sees the same 4 examples: without a working gradient the term would not move at all.
    assert kd[-1] < kd[0] and sum(kd[-3:]) < sum(kd[:3]), kd
    assert trained.record["data"]["aligned_tokens"] < trained.record["data"]["scored_tokens"]


def test_the_teacher_cache_serves_a_cross_vocabulary_run_without_the_teacher(xvocab, tmp_path):
    from neobench.training.loop import train
    from neobench.training.workspace import prepare

    cfg = xcfg(xvocab, tmp_path, teacher_cache="hidden", loss="shared_vocab_kl")
    online = train(dataclasses.replace(cfg, teacher_cache="off"), prepare(cfg))
    first = train(cfg, prepare(cfg))
    ws = prepare(cfg)
    second = train(cfg, ws)
    assert first.record["cost"]["teacher_cache"]["misses"] > 0 and second.record["cost"]["teacher_cache"]["misses"] == 0
    assert not ws.teacher_loaded
    for a, b, c in zip(online.log, first.log, second.log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and b["loss"] == c["loss"]


def test_a_cross_vocabulary_export_loads_with_the_students_own_tokenizer(xvocab, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neobench.runs.execute import execute
    from neobench.runs.export import export_run

    cfg = xcfg(xvocab, tmp_path)
    execute(cfg, run_id="xrun")
    out = tmp_path / "merged"
    export_run("xrun", cfg.runs_dir, out, merged=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.get_vocab() == xvocab["student_tok"].get_vocab() != xvocab["teacher_tok"].get_vocab()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is two plus one?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert model(ids).logits.shape[-1] == len(xvocab["student_tok"])


def test_a_cross_vocabulary_run_resumes_exactly(xvocab, tmp_path):
    from neobench.training import checkpoint as ckpt
    from neobench.training.loop import train
    from neobench.training.workspace import prepare

    cfg = xcfg(xvocab, tmp_path, max_steps=4, save_every=2)
    straight = train(cfg, prepare(cfg))
    run_tmp = tmp_path / "partial"
    run_tmp.mkdir()
    def killed_in_step_3(step, _student):  # after step 2's checkpoint
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, prepare(cfg), after_step=killed_in_step_3, run_tmp=run_tmp)
    resumed = train(cfg, prepare(cfg), run_tmp=run_tmp, resume=ckpt.latest(run_tmp))
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in straight.log[2:]]
    assert all(torch.equal(resumed.weights[k], straight.weights[k]) for k in straight.weights)


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,expected", [
    ({"loss": "forward_kl"}, "use a cross-vocabulary loss: " + ", ".join(CROSS_VOCABULARY)),
    ({"method": "minillm"}, "needs one vocabulary; use --method kd or neo"),
    ({"teacher_cache": "topk:8"}, "use --teacher-cache hidden or off"),
    ({"eval_tasks": "neo_suite"}, "neo_fidelity compares the two models token by token"),
])
def test_what_cannot_cross_vocabularies_fails_in_one_line(xvocab, tmp_path, changes, expected):
    from neobench.runs.execute import execute

    with pytest.raises(NeobenchError, match="use different tokenizers") as err:
        execute(xcfg(xvocab, tmp_path, **changes))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_sft_and_lora_need_no_teacher_and_no_alignment(xvocab, tmp_path):
    from neobench.training.workspace import prepare

    ws = prepare(xcfg(xvocab, tmp_path, method="lora", loss="forward_kl"), need_teacher=False)
    assert not ws.cross_vocabulary and not ws.data.examples[0].teacher_input_ids



# --- a student with a vocabulary of its own, built from the teacher ---------------------------------


def test_a_pruned_student_gets_its_own_bpe_and_an_embedding_built_from_the_teachers(tiny, tmp_path):
    """pruned:N+bpe:V: the teacher's layers, a BPE trained on the data, embedding rows from the teacher."""
    from safetensors.torch import load_file

    from neobench.core.errors import NeobenchError
    from neobench.models.loading import load_tokenizer
    from neobench.runs.config import RunConfig
    from neobench.training.loop import train
    from neobench.training.revocab import parse_student_spec
    from neobench.training.workspace import prepare

    assert parse_student_spec("pruned:15+bpe:16384") == ("pruned:15", 16384) and parse_student_spec("x/y") == ("x/y", None)
    with pytest.raises(NeobenchError, match="bpe:V"):
        parse_student_spec("pruned:15+vocab")
    cfg = RunConfig(
        preset="tiny", teacher=str(tiny["teacher"]), student="pruned:2+bpe:520", train_data=str(tiny["data"]),
        seq_len=64, batch_size=4, grad_accum=1, max_steps=2, lr=1e-3, rank=4, runs_dir=str(tmp_path / "runs"),
        eval_tasks="none", dtype="float32", method="neo", loss="shared_vocab_kl",
    )
    ws = prepare(cfg)
    student_dir = Path(ws.student_path)
    card = json.loads((student_dir / "vocabulary_card.json").read_text())
    teacher_tok, student_tok = load_tokenizer(str(tiny["teacher"])), ws.tokenizer
    assert ws.cross_vocabulary and card["vocab_size"] == len(student_tok) > len(teacher_tok)
    assert card["shared_with_teacher"] == len(ws.pairing) and card["embedding_parameters"]["after"] == len(student_tok) * 32
    assert student_tok.chat_template == teacher_tok.chat_template
    for name in ("bos", "eos", "pad"):
        assert getattr(student_tok, f"{name}_token_id") == getattr(teacher_tok, f"{name}_token_id")
    # A token both spell alike keeps the teacher's row.
    teacher_rows = load_file(str(tiny["teacher"] / "model.safetensors"))["model.embed_tokens.weight"]
    student_rows = load_file(str(student_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert student_rows.shape == (len(student_tok), 32)
    for s_id, t_id in list(zip(ws.pairing.student_ids.tolist(), ws.pairing.teacher_ids.tolist()))[:50]:
        assert torch.equal(student_rows[s_id], teacher_rows[t_id])
    assert len(train(cfg, ws).log) == 2
    assert prepare(cfg).student_path == ws.student_path, "built once, then read from the cache"
