"""`neobench export`: what it writes loads through peft, transformers and the lm_eval CLI, and gives the run's student."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from neobench.core.errors import NeobenchError
from neobench.runs.execute import execute
from neobench.runs.export import BASE_DIR, export_run


def run_of(tiny_cfg, method: str, variant, **changes) -> str:
    cfg = dataclasses.replace(tiny_cfg, method=method, variant=variant, max_steps=2, dropout=0.0, **changes)
    return execute(cfg)["run_id"]


def tokens(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny["tokenizer"]))
    return tok(["What is two plus three?", "seven plus one is eight."], return_tensors="pt", padding=True)["input_ids"]


def students_logits(tiny_cfg, run_id: str, ids) -> torch.Tensor:
    """Logits of the run's student as neobench rebuilds it from the stored weights."""
    from neobench.runs.config import load_preset
    from neobench.training.loop import WEIGHTS_FILE, load_trained_student
    from neobench.training.workspace import prepare

    run_dir = f"{tiny_cfg.runs_dir}/{run_id}"
    cfg = load_preset(f"{run_dir}/config.yaml")
    ws = prepare(cfg, need_teacher=False)
    with torch.no_grad():
        return load_trained_student(cfg, ws, f"{run_dir}/{WEIGHTS_FILE}")(ids).logits


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("method,variant", [
    ("lora", "lora"), ("neo", "dora"), ("lora", "pissa"), ("neo", "rslora"), ("neo", "moslora"), ("minillm", "lora"),
    ("sft", None), ("kd", None), ("minillm", None),
])
def test_an_export_loads_elsewhere_and_is_the_runs_student(tiny, tiny_cfg, tmp_path, method, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_id = run_of(tiny_cfg, method, variant, minillm_max_new_tokens=8)
    ids = tokens(tiny)
    expected = students_logits(tiny_cfg, run_id, ids)

    merged = tmp_path / "merged"
    export_run(run_id, tiny_cfg.runs_dir, merged, merged=True)
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    assert torch.allclose(logits_of(model, ids), expected, atol=1e-5), "merged export != the run's student"
    assert model.config.use_cache and (merged / "tokenizer_config.json").is_file()

    untrained = AutoModelForCausalLM.from_pretrained(str(tiny["student"]), dtype=torch.float32)
    assert not torch.allclose(logits_of(untrained, ids), expected, atol=1e-4), "training must have changed the student"

    if variant is not None:
        adapter = tmp_path / "adapter"
        export_run(run_id, tiny_cfg.runs_dir, adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == BASE_DIR
        assert "mixer" not in (adapter / "adapter_model.safetensors").read_bytes()[:20000].decode("latin-1")
        base = AutoModelForCausalLM.from_pretrained(str(adapter / BASE_DIR), dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, str(adapter))
        assert torch.allclose(logits_of(loaded, ids), expected, atol=1e-5), "peft adapter export != the run's student"
        if variant == "pissa":
            assert config["r"] == 2 * tiny_cfg.rank  # peft's conversion: [A | A0], [B | -B0]


def test_the_model_card_parses_and_carries_the_runs_scores(tiny_cfg, tmp_path):
    from huggingface_hub import ModelCard

    run_id = run_of(tiny_cfg, "neo", "lora", eval_tasks="neo_heldout_nll")
    export_run(run_id, tiny_cfg.runs_dir, tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == BASE_DIR and front["library_name"] == "peft" and "neo" in front["tags"]
    (stored,) = (Path(tiny_cfg.runs_dir) / run_id / "evaluations").glob("*.json")
    student = next(e for e in json.loads(stored.read_text())["evaluations"] if e["role"] == "student")
    expected = {(r["metric"], r["value"], r["stderr"]) for r in student["rows"]}
    card = ModelCard(text)
    parsed = {(r.metric_type, r.metric_value, (r.metric_args or {}).get("stderr")) for r in card.data.eval_results}
    assert parsed == expected and len(parsed) == 2  # nll and perplexity
    assert "neobench run --preset neobench_config.yaml" in text
    config = yaml.safe_load((tmp_path / "out" / "neobench_config.yaml").read_text())
    assert (config["method"], config["variant"]) == ("neo", "lora")


def test_lm_eval_cli_scores_a_merged_export_as_neobench_did(tiny, tiny_cfg, tmp_path):
    """lm_eval in its own process, on the exported directory, reproduces the run's stored score."""
    run_id = run_of(tiny_cfg, "lora", "lora", eval_tasks="neo_heldout_nll", eval_limit=4)
    out = tmp_path / "merged"
    export_run(run_id, tiny_cfg.runs_dir, out, merged=True)
    from neobench.runs.export import student_scores

    stored = {r["metric"]: r["value"] for r in student_scores(Path(tiny_cfg.runs_dir) / run_id)}
    tasks = Path(__file__).resolve().parent.parent / "neobench" / "evaluation" / "tasks"
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--include_path", str(tasks), "--tasks", "neo_heldout_nll", "--model", "hf",
         "--model_args", f"pretrained={out},dtype=float32", "--device", "cpu", "--apply_chat_template", "--limit", "4",
         "--batch_size", "4", "--output_path", str(tmp_path / "lm_eval"),
         "--metadata", json.dumps({"heldout_data": str(tiny["data"]), "heldout_split": "train"})],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["neo_heldout_nll"]
    assert theirs["nll,none"] == pytest.approx(stored["nll"], abs=1e-4)


def test_export_errors_are_one_line(tiny_cfg, tmp_path):
    with pytest.raises(NeobenchError, match="no run 'nope'"):
        export_run("nope", tiny_cfg.runs_dir, tmp_path / "out")
    run_id = run_of(tiny_cfg, "lora", "lora")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(NeobenchError, match="exists and is not an empty directory"):
        export_run(run_id, tiny_cfg.runs_dir, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine", "nothing of the user's is touched"
    no_weights = run_of(tiny_cfg, "lora", "lora", save_weights=False)
    with pytest.raises(NeobenchError, match="stored no weights"):
        export_run(no_weights, tiny_cfg.runs_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-export-*"))


def test_log_to_tensorboard_writes_the_train_log_as_events(tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_id = run_of(tiny_cfg, "neo", "lora", log_to="tensorboard")
    run_dir = Path(tiny_cfg.runs_dir) / run_id
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    for key in ("loss", "ce", "kd", "lr", "grad_norm"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [row["step"] for row in log]
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in log], rel=1e-6)


def test_log_to_without_its_package_fails_before_training_in_one_line(tiny_cfg, monkeypatch):
    import importlib.util

    from neobench.runs.config import validate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(NeobenchError, match=r"^--log-to tensorboard needs the tensorboard package: pip install 'neobench\[tensorboard\]'"):
        validate(dataclasses.replace(tiny_cfg, log_to="tensorboard"))
    with pytest.raises(NeobenchError, match="unknown --log-to 'wandb'; valid: none, tensorboard"):
        validate(dataclasses.replace(tiny_cfg, log_to="wandb"))
