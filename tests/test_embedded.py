"""The real embedded default end to end: GGUF teacher, pruned student, shipped data.

Slow (one to two minutes: dequantize the GGUF once, prune, two training steps, the offline
suite on 4 documents for student, teacher and untrained student), still part of `make test`. Uses the real neobench cache, so a later `make demo` reuses what it built.
"""

import json
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.embedded]


def test_embedded_default_trains_neo_dora_for_two_steps(tmp_path, cli):
    # fp32 on every CPU (auto is bf16 where it is native): the exported student is compared in fp32 below
    code, stderr = cli("run", "--variant", "dora", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
                       "--limit", "4", "--dtype", "float32", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["method"], metrics["variant"], metrics["preset"]) == ("neo", "dora", "smol-cpu")
    assert metrics["budget"]["steps"] == 2
    assert metrics["data"]["report"]["used"] >= 2000
    # The student is the teacher pruned to 15 of its 30 layers, sharing its 49,152-token vocabulary.
    prune_card = json.loads(open(os.path.join(metrics["student_path"], "prune_card.json")).read())
    assert len(prune_card["kept_layers"]) == 15 and len(prune_card["block_influence"]) == 30
    assert metrics["final"]["kd"] > 0 and metrics["final"]["ce"] > 0
    (evaluation,) = (run / "evaluations").glob("*.json")
    roles = {e["role"]: e for e in json.loads(evaluation.read_text())["evaluations"]}
    assert set(roles) == {"student", "teacher", "untrained_student"}
    scores = {(r["task"], r["metric"]): r["value"] for r in roles["student"]["rows"]}
    assert len(scores) == 10 and all(r["n_docs"] == 4 for r in roles["student"]["rows"])  # 5 tasks, 10 metrics
    assert "scores (± stderr)" in stderr

    # Exported as a peft adapter with its pruned base beside it, it loads without neobench and is the run's student.
    import torch
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from neobench.runs.config import load_preset
    from neobench.runs.export import export_run
    from neobench.training.loop import WEIGHTS_FILE, load_trained_student
    from neobench.training.workspace import prepare

    export_run(run.name, str(tmp_path / "runs"), tmp_path / "student")
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student" / "base_model"), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "student")).eval()
    cfg = load_preset(str(run / "config.yaml"))
    ours = load_trained_student(cfg, prepare(cfg, need_teacher=False), run / WEIGHTS_FILE)
    ids = torch.tensor([[1, 4093, 314, 253, 1231, 30, 2]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ours(ids).logits, atol=1e-4)
    card = ModelCard((tmp_path / "student" / "README.md").read_text())
    assert {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results} == scores


def test_every_method_and_variant_takes_a_fused_step_on_the_embedded_default():
    """One step of each method and each variant on the real models, in-process; step 1's loss (before any
    update) equals the materialised reference objective of the old training step to 1e-4."""
    import dataclasses

    import torch

    from neobench.data.examples import collate
    from neobench.models.adapters import VARIANTS
    from neobench.runs.config import load_preset, validate
    from neobench.training.loop import build_student, group_by_length, train
    from neobench.training.methods import METHODS, objective
    from neobench.training.workspace import prepare

    cfg = validate(dataclasses.replace(load_preset("smol-cpu"), max_steps=1, batch_size=2, grad_accum=1, max_examples=16,
                                       seq_len=128, eval_tasks="none", dtype="float32", minillm_max_new_tokens=8))
    ws = prepare(cfg)
    # Every variant once, on neo (lora builds its adapters through the same code); lora with plain LoRA.
    cases = [(m, None) for m in ("sft", "kd", "minillm")] + [("lora", "lora")] + [("neo", v) for v in VARIANTS]
    for method, variant in cases:
        run_cfg = dataclasses.replace(cfg, method=method, variant=variant)
        trained = train(run_cfg, ws)
        log, record = trained.log, trained.record
        assert record["budget"]["steps"] == 1 and torch.isfinite(torch.tensor(log[0]["loss"])), (method, variant)
        if method in ("kd", "neo") and variant in (None, "lora"):
            from neobench.data.examples import example_order

            picks = example_order(len(ws.data.examples), cfg.batch_size * cfg.grad_accum, cfg.seed)
            lengths = [len(ex.input_ids) for ex in ws.data.examples]
            student = build_student(run_cfg, ws)
            total = tokens = 0.0
            for micro in group_by_length(picks, lengths, cfg.batch_size):
                batch = collate([ws.data.examples[i] for i in micro], ws.tokenizer.pad_token_id)
                with torch.no_grad():
                    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    teacher = ws.teacher()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    parts = objective(METHODS.get(method), logits, batch["labels"], teacher, kd_ratio=cfg.kd_ratio,
                                      vocab_size=ws.vocab_size)
                total += parts["loss"].item() * int(parts["tokens"])
                tokens += int(parts["tokens"])
            assert abs(log[0]["loss"] - total / tokens) <= 1e-4, (method, log[0]["loss"], total / tokens)
