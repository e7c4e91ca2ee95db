"""benchmarks/peers.py: neobench and TRL train on the same token ids, in the same steps.

Skipped where TRL is absent (it is the optional extra `neobench[peers]`, not a test dependency).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import peers  # noqa: E402
from conftest import make_llama, make_tokenizer, tiny_rows  # noqa: E402


@pytest.fixture
def tiny_preset(tmp_path) -> Path:
    """A preset on tiny models that share their vocabulary row for row, as TRL's losses need."""
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows(24)))
    teacher = make_llama(tmp_path / "teacher", tmp_path / "tokenizer", layers=3, vocab_rows=len(tokenizer), seed=1)
    student = make_llama(tmp_path / "student", tmp_path / "tokenizer", layers=2, vocab_rows=len(tokenizer), seed=2)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"teacher: {teacher}\nstudent: {student}\ntrain_data: {data}\nseq_len: 64\nbatch_size: 2\n"
                      f"grad_accum: 2\nlr: 1.0e-3\nrank: 4\neval_tasks: none\n")
    return preset


def seen_by_teacher(trainer) -> list[tuple[int, ...]]:
    """The unpadded token ids of every sequence the trainer's teacher runs on, in order."""
    seen = []

    def record(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else args[1]
        seen.extend(tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask))

    # The decoder under the head: GKD calls the whole model, DistillationTrainer its backbone alone
    trainer.teacher_model.model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    return seen


@pytest.mark.parametrize("trainer_name", ["gkd", "distillation"])
@pytest.mark.parametrize("training", ["lora", "full"])
def test_trl_sees_neobench_token_ids_step_by_step(tiny_preset, tmp_path, cli, trainer_name, training):
    method = "neo" if training == "lora" else "kd"
    work = peers.build_workload(peers.workload_config(str(tiny_preset), method, 2, "float32"))
    assert len(work.examples) == 2 * work.per_step == 8
    spec = {"trainer": trainer_name, "training": training, "precision": "float32", "output_dir": str(tmp_path / "out")}
    seen = seen_by_teacher(peers.build_trl_trainer(spec, work))

    expected = [ex.input_ids for ex in work.examples]
    assert sorted(seen[:4]) == sorted(expected[:4]) and sorted(seen[4:]) == sorted(expected[4:])  # step by step
    assert len(seen) == 8

    # neobench's own run of the same preset: the same examples per step (its log counts their tokens)
    code, err = cli("run", "--preset", str(tiny_preset), "--method", method, "--max-steps", "2",
                    "--max-examples", "8", "--dtype", "float32", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    run = next((tmp_path / "runs").iterdir())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [row["tokens"] for row in log] == [sum(map(len, expected[:4])), sum(map(len, expected))]


def test_trl_rows_split_each_example_at_its_first_response_token(tiny_preset):
    from neobench.data.examples import IGNORE_INDEX

    work = peers.build_workload(peers.workload_config(str(tiny_preset), "neo", 2, "float32"))
    for ex, row in zip(work.examples, work.trl_rows()):
        assert row["prompt_ids"] + row["completion_ids"] == list(ex.input_ids) == row["input_ids"]
        scored = [i for i, label in enumerate(ex.labels) if i > 0 and label != IGNORE_INDEX]
        # TRL scores every completion token; neobench's response span starts where the completion does
        assert len(row["prompt_ids"]) == scored[0] == row["completion_mask"].index(1)
        # on-policy, TRL tokenizes the prompt text itself
        assert work.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] == row["prompt_ids"]
    assert work.response_tokens(1) + work.response_tokens(2) == sum(
        sum(1 for label in ex.labels[1:] if label != IGNORE_INDEX) for ex in work.examples)


@pytest.mark.parametrize("trainer_name", ["gkd", "distillation"])
def test_trl_default_precision_computes_in_bf16(tiny_preset, tmp_path, trainer_name):
    """TRL's bf16=True reaches the matmuls of both trainers (DistillationTrainer's through the
    benchmark's autocast subclass: its bare forwards escape accelerate's wrapper), and float32 stays fp32."""
    work = peers.build_workload(peers.workload_config(str(tiny_preset), "neo", 1, "float32"))
    seen = {}
    for precision in ("default", "float32"):
        spec = {"trainer": trainer_name, "training": "lora", "precision": precision, "output_dir": str(tmp_path / precision)}
        trainer = peers.build_trl_trainer(spec, work)
        seen[precision] = (peers.watch_compute_dtype(trainer.model), peers.watch_compute_dtype(trainer.teacher_model))
        trainer.train()
    assert seen["default"] == ({"bfloat16"}, {"bfloat16"})
    assert seen["float32"] == ({"float32"}, {"float32"})
