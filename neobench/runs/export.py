"""`neobench export`: a run's student as files that peft, transformers and lm-eval load without neobench.

    adapter run           OUT/adapter_config.json, OUT/adapter_model.safetensors
                          -> PeftModel.from_pretrained(base, OUT)
                          OUT/base_model/  the base student, unless it is a hub id (pruned:N, a local
                          directory, a .gguf file): the export is complete on its own
    --merged, full-weight OUT/ is a save_pretrained model with tokenizer, chat template and generation
                          config -> AutoModelForCausalLM.from_pretrained(OUT), lm_eval --model hf
    always                OUT/README.md (model card with the Hub's YAML front matter and the run's
                          scores), OUT/neobench_config.yaml (the run's resolved config)

Every adapter is exported as plain LoRA, loadable by any peft: PiSSA through peft's own
conversion (the trained adapter minus its initial one, rank 2r, on the original base weights),
MoSLoRA with its mixer folded in (B' = B M, exact). DoRA keeps its magnitude vectors (peft's
`use_dora`). The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from neobench.core.errors import NeobenchError
from neobench.runs.config import RunConfig, load_preset, validate

BASE_DIR = "base_model"
CONFIG_FILE = "neobench_config.yaml"


def export_run(run: str, runs_dir: str, out: Path, merged: bool = False) -> dict[str, Any]:
    """Write ``run``'s student to ``out``; returns {"kind", "files", "bytes", "seconds"}."""
    from neobench.runs.store import find_run
    from neobench.training.loop import WEIGHTS_FILE, load_trained_student
    from neobench.training.workspace import prepare

    started = time.perf_counter()
    run_dir = find_run(run, runs_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NeobenchError(f"--out {out} exists and is not an empty directory; choose another path or remove it")
    cfg = validate(load_preset(str(run_dir / "config.yaml")))
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise NeobenchError(f"run {run_dir.name} stored no weights (it ran with --no-save-weights); train it again to export it")
    ws = prepare(cfg, need_teacher=False)
    student = load_trained_student(cfg, ws, weights)
    variant = cfg.effective_variant()
    kind = "adapter" if variant is not None and not merged else "merged" if variant is not None else "full"

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-export-{out.name}-", dir=out.parent))
    try:
        if kind == "adapter":
            base = save_adapter(student, cfg, ws, staging)
        else:
            save_merged(student, ws.tokenizer, staging)
            base = base_reference(cfg, ws)
            base = None if base == BASE_DIR else base  # a merged model ships no base: it is complete
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (staging / "README.md").write_text(model_card(run_dir, cfg, kind, base))
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {"kind": kind, "files": files, "bytes": sum(p.stat().st_size for p in files), "seconds": time.perf_counter() - started}


def base_reference(cfg: RunConfig, ws) -> str:
    """How the export names its base student: the hub id, or the base_model/ directory it ships."""
    from neobench.training.prune import parse_pruned_spec
    from neobench.training.revocab import parse_student_spec

    local = Path(cfg.student).expanduser()
    base, own_vocabulary = parse_student_spec(cfg.student)
    if own_vocabulary is None and parse_pruned_spec(base) is None and not local.exists() and Path(ws.student_path) == Path(cfg.student):
        return cfg.student  # a hub id: anyone can fetch it
    return BASE_DIR


def save_adapter(student, cfg: RunConfig, ws, out: Path) -> str:
    """A plain peft LoRA adapter for the original base student; returns the base reference."""
    from neobench.training.loop import build_student

    base = base_reference(cfg, ws)
    if base == BASE_DIR:
        shutil.copytree(ws.student_path, out / BASE_DIR)
    adapter = student  # loaded for this export alone: folding the mixers in place costs no copy
    variant = cfg.effective_variant()
    if variant == "moslora":
        fold_mixers(adapter)
    if variant == "pissa":
        # peft's documented conversion: the initial PiSSA adapter (rebuilt from the run's seed, so
        # identical to the one training started from) is subtracted, leaving a LoRA of rank 2r
        # that applies to the original weights W instead of PiSSA's residual.
        with tempfile.TemporaryDirectory() as initial:
            start = build_student(cfg, ws)
            start.peft_config["default"].init_lora_weights = True
            start.save_pretrained(initial)
            adapter.save_pretrained(str(out), path_initial_model_for_weight_conversion=initial)
    else:
        adapter.save_pretrained(str(out))
    # Saved against the base's real path (peft reads its config there); the export names its own copy.
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    _drop_peft_card(out)
    return base


def fold_mixers(peft_model) -> None:
    """Replace every MoSLoRA up-projection B (with mixer M) by a plain Linear holding B M (exact)."""
    from torch import nn

    from neobench.models.adapters import MixedLoraB

    for module in peft_model.modules():
        for name, child in list(getattr(module, "lora_B", {}).items()):
            if isinstance(child, MixedLoraB):
                plain = nn.Linear(child.lora_b.in_features, child.lora_b.out_features, bias=False)
                plain.weight = nn.Parameter(child.weight.detach().clone())
                module.lora_B[name] = plain


def save_merged(student, tokenizer, out: Path) -> None:
    """A save_pretrained model: adapters merged, fp32, with tokenizer, chat template and generation config."""
    from neobench.models.adapters import merged_copy

    model = merged_copy(student, torch.float32)
    model.config.use_cache = True  # training switched the KV cache off; generation wants it
    if model.generation_config is not None:
        model.generation_config.use_cache = True
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _drop_peft_card(out: Path) -> None:
    """peft writes a template README.md with empty fields; neobench writes its own card."""
    card = out / "README.md"
    if card.is_file():
        card.unlink()


# --- the model card ---------------------------------------------------------------------------


def student_scores(run_dir: Path) -> list[dict]:
    """The student's rows of the run's evaluations (every stored evaluation, newest task result wins)."""
    rows: dict[tuple[str, str], dict] = {}
    for path in sorted((run_dir / "evaluations").glob("*.json"), key=lambda p: p.stat().st_mtime):
        for evaluation in json.loads(path.read_text())["evaluations"]:
            if evaluation["role"] == "student":
                for row in evaluation["rows"]:
                    rows[(row["task"], row["metric"])] = row
    return list(rows.values())


def model_card(run_dir: Path, cfg: RunConfig, kind: str, base: str | None) -> str:
    """README.md with the Hub's YAML front matter (base_model, tags, datasets, model-index) and the run's story."""
    from huggingface_hub import EvalResult, ModelCardData

    metrics = json.loads((run_dir / "metrics.json").read_text())
    scores = student_scores(run_dir)
    variant = cfg.effective_variant()
    label = f"{cfg.method}+{variant}" if variant else cfg.method
    results = [
        EvalResult(
            task_type="text-generation", dataset_type=row["task"], dataset_name=row["task"], metric_type=row["metric"],
            metric_value=row["value"], metric_name=row["metric"], verified=False,
            metric_args={"stderr": row["stderr"]} if row.get("stderr") is not None else None,
        )
        for row in scores
    ]
    data = ModelCardData(
        base_model=base, library_name="peft" if kind == "adapter" else "transformers",
        tags=["neobench", "knowledge-distillation", cfg.method, *([variant] if variant else []), "text-generation"],
        datasets=[cfg.train_data], model_name=metrics["run_id"], eval_results=results or None,
        pipeline_tag="text-generation",
    )
    budget, cost = metrics["budget"], metrics["cost"]
    if kind == "adapter":
        how_to_load = (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({_base_expr(base)})\n"
            "model = PeftModel.from_pretrained(base, \"THIS_DIR\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained({_base_expr(base)})\n```\n"
        )
    else:
        how_to_load = (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"THIS_DIR\")\ntokenizer = AutoTokenizer.from_pretrained(\"THIS_DIR\")\n```\n\n"
            "or score it with lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=THIS_DIR --tasks ...`\n"
        )
    table = "\n".join(
        f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {_stderr_text(r.get('stderr'))} |" for r in scores
    )
    body = f"""
# {metrics['run_id']}

A student trained by neobench, the benchmark suite for LLM-Neo ([arXiv 2411.06839](https://arxiv.org/abs/2411.06839))
and its distillation baselines: {_method_words(cfg.method)}. Exported by `neobench export` as
{'a LoRA adapter' if kind == 'adapter' else 'a full model'}.

| | |
|---|---|
| teacher | `{cfg.teacher}` |
| student (base) | `{cfg.student}`{' (shipped in `base_model/`)' if base == BASE_DIR else ''} |
| method | {label}{f", loss {cfg.loss}, kd_ratio {cfg.kd_ratio}, temperature {cfg.temperature}" if metrics.get('loss') else ''} |
| adapter | {f"{variant}, rank {cfg.rank}, alpha {cfg.effective_alpha()}, targets {cfg.target_modules}" if variant else 'none (all weights trained)'} |
| budget | {budget['steps']} optimizer steps x {budget['batch_size']} examples x {budget['grad_accum']} micro-batches, seq_len {budget['seq_len']}, {budget['tokens']:,} tokens |
| data | `{cfg.train_data}` (split {cfg.train_split}), data hash `{budget['data_hash'][:12]}`{_data_card(cfg.train_data)} |
| cost | {cost['train_seconds']:.0f} s of training, peak memory {cost['peak_memory_bytes'] / 2**30:.2f} GiB, {cost['device']}, {cost['dtype']} |

## Load it

{how_to_load}
## Scores

Scored by lm-evaluation-harness through neobench (± is the standard error lm-eval reports).

| task | metric | value | stderr |
|---|---|---:|---:|
{table}

## Reproduce it

`neobench_config.yaml` here is the run's resolved configuration:

```bash
neobench run --preset neobench_config.yaml
```
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _data_card(train_data: str) -> str:
    from neobench.data.examples import PACKAGED_DATA_DIR

    card = PACKAGED_DATA_DIR / train_data / "DATACARD.md"
    return f"; its card: `neobench/data/{train_data}/DATACARD.md` in neobench" if card.is_file() else ""


def _stderr_text(stderr) -> str:
    return "" if stderr is None else f"{stderr:.4f}"


def _base_expr(base: str) -> str:
    return '"THIS_DIR/base_model"' if base == BASE_DIR else json.dumps(base)


def _method_words(method: str) -> str:
    from neobench.training.methods import METHODS

    return METHODS.get(method).description
