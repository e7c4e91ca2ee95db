"""Training data: rows -> chat messages -> token ids with assistant-only labels.

Accepted row formats (one data set may mix them):
  * ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``
  * ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`` (ShareGPT,
    as in BAAI/Infinity-Instruct)
  * ``{"instruction": ..., "input": ..., "output": ...}`` (Alpaca; ``input`` optional)
  * ``{"prompt": ..., "response": ...}``

Rows that are malformed, empty, or left without response tokens after truncation are counted in
a :class:`DataReport` by reason; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from neobench.core.errors import NeobenchError

PACKAGED_DATA_DIR = Path(__file__).parent
"""The shipped data sets, one folder each (magpie-smollm2/), beside this package's modules."""
IGNORE_INDEX = -100
"""Label of a token no loss scores (prompt, padding); the value PyTorch's cross_entropy skips by default."""

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_ROLES = {"system", "user", "assistant"}


@dataclass
class DataReport:
    """What happened to every row of the source."""

    source: str
    rows: int = 0
    used: int = 0
    truncated: int = 0
    """Used rows cut at seq_len that kept some response tokens."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> count: malformed, empty, no_response_after_truncation."""

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> str:
        drops = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(self.dropped.items())) or "none"
        return f"{self.used}/{self.rows} rows used from {self.source} ({self.truncated} truncated); dropped: {drops}"


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    # Cross-vocabulary runs only (a teacher with another tokenizer; see neobench.data.alignment):
    teacher_input_ids: tuple[int, ...] = ()
    """The same text in the teacher's tokens (cut after the last one an aligned position needs)."""
    aligned_positions: tuple[int, ...] = ()
    """Student positions (whose next token is a response token) the teacher is compared at."""
    teacher_positions: tuple[int, ...] = ()
    """For each aligned student position, the teacher position that predicts from the same text."""


@dataclass
class TokenizedData:
    examples: list[Example]
    report: DataReport
    data_hash: str
    """sha256 over the token ids and labels of the used examples, in order, and seq_len."""
    examples_hash: Optional[str] = None
    """sha256 over the used rows' chat-formatted texts, in order (and seq_len): the same for any
    tokenizer, so runs of students with different vocabularies can show they saw the same examples."""
    alignment_hash: Optional[str] = None
    """Cross-vocabulary runs: sha256 over data_hash, the teacher's ids and the alignment (part of the teacher cache's key)."""
    aligned_tokens: Optional[int] = None
    """Cross-vocabulary runs: response tokens the teacher is compared at (of ``scored_tokens``)."""
    scored_tokens: Optional[int] = None


# --- loading rows ------------------------------------------------------------------------


HELDOUT_PARTS = ("test", "validation")
"""A packaged data set's heldout.jsonl in two fixed halves, by position: ``test`` is the first half
(the leaderboard scores it), ``validation`` the second (ablation objectives, pruning, learning-rate
tuning). Nothing that selects a configuration reads ``test`` (neobench.ablation.spec enforces it)."""


def heldout_part(rows: list, part: str) -> list:
    """The ``part`` ("test" or "validation") of a held-out split's rows."""
    half = (len(rows) + 1) // 2
    return rows[:half] if part == "test" else rows[half:]


def resolve_data_file(spec: str, split: str) -> Optional[Path]:
    """The local file behind a packaged data set name or a path; None for a hub id.

    For a packaged set's ``test`` or ``validation`` split that has no file of its own, this is
    heldout.jsonl (``load_rows`` takes the part).
    """
    packaged = PACKAGED_DATA_DIR / spec
    if packaged.is_dir():
        path = packaged / f"{split}.jsonl"
        if not path.is_file() and split in HELDOUT_PARTS and (packaged / "heldout.jsonl").is_file():
            return packaged / "heldout.jsonl"
        if not path.is_file():
            splits = sorted(p.stem for p in packaged.glob("*.jsonl"))
            splits += [p for p in HELDOUT_PARTS if "heldout" in splits and p not in splits]
            raise NeobenchError(f"packaged data set {spec!r} has no split {split!r}; valid: {', '.join(sorted(splits))}")
        return path
    path = Path(spec).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise NeobenchError(f"data file {spec!r} does not exist; pass an existing .jsonl, .json or .parquet file")
        return path
    if path.exists() or spec.startswith((".", "/", "~")):
        raise NeobenchError(f"data {spec!r} is not a .jsonl, .json or .parquet file, a packaged data set or a hub id")
    return None


def load_rows(spec: str, split: str = "train", limit: Optional[int] = None) -> list[Any]:
    """Rows of a local file, a packaged data set or a hub data set (``id`` or ``id:config``)."""
    path = resolve_data_file(spec, split)
    if path is None:
        return _load_hub_rows(spec, split, limit)
    try:
        if path.suffix == ".jsonl":
            rows = []
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        rows.append(None)  # counted as malformed, not fatal
        elif path.suffix == ".json":
            rows = json.loads(path.read_text())
            if isinstance(rows, dict) and isinstance(rows.get(split), list):
                rows = rows[split]
            if not isinstance(rows, list):
                raise NeobenchError(f"data file {spec!r} must hold a JSON list of rows")
        else:
            import pandas as pd

            rows = pd.read_parquet(path).to_dict(orient="records")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as err:
        raise NeobenchError(f"could not read data file {spec!r}: {str(err).splitlines()[0]}") from None
    if split in HELDOUT_PARTS and path.name == "heldout.jsonl" and path.parent.parent == PACKAGED_DATA_DIR:
        rows = heldout_part(rows, split)
    return rows[:limit] if limit else rows


def _load_hub_rows(spec: str, split: str, limit: Optional[int]) -> list[Any]:
    import datasets

    name, _, config = spec.partition(":")
    try:
        # Streaming reads only the rows asked for: Infinity-Instruct has millions.
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        rows = list(stream.take(limit)) if limit else list(stream)
    except Exception as err:  # datasets raises many types for "no network" / "no such data set"
        raise NeobenchError(
            f"could not load data set {spec!r} (split {split!r}) from the Hugging Face hub "
            f"({type(err).__name__}); download it where there is access and pass a local .jsonl/.parquet file"
        ) from None
    return rows


# --- rows -> messages -------------------------------------------------------------------


class MalformedRow(Exception):
    """A row that cannot be read as a conversation (counted as "malformed", never fatal)."""


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise MalformedRow
    return value


def to_messages(row: Any) -> list[dict[str, str]]:
    """Normalise a row to chat messages; raises MalformedRow for rows of no known shape."""
    if not isinstance(row, dict):
        raise MalformedRow
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list):
            raise MalformedRow
        messages = []
        for t in turns:
            if not isinstance(t, dict) or t.get("role") not in CHAT_ROLES:
                raise MalformedRow
            messages.append({"role": t["role"], "content": _text(t.get("content"))})
        return messages
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, (list, np.ndarray)):
            raise MalformedRow
        messages = []
        for t in turns:
            if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES:
                raise MalformedRow
            messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": _text(t.get("value"))})
        return messages
    if "instruction" in row and "output" in row:
        user = _text(row["instruction"])
        extra = row.get("input") or ""
        if _text(extra).strip():
            user = f"{user}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row["output"])}]
    if "prompt" in row and "response" in row:
        return [{"role": "user", "content": _text(row["prompt"])}, {"role": "assistant", "content": _text(row["response"])}]
    raise MalformedRow


def is_empty(messages: list[dict[str, str]]) -> bool:
    has_reply = any(m["role"] == "assistant" and m["content"].strip() for m in messages)
    return not has_reply or any(not m["content"].strip() for m in messages)


# --- messages -> tokens -----------------------------------------------------------------


def encode_chat(tokenizer, messages: list[dict[str, str]], with_text: bool = False):
    """Token ids of the chat-templated conversation and labels that keep only assistant tokens.

    Each assistant turn spans from the end of the template rendered up to its generation prompt
    to the end of its own rendering (its end-of-turn token included, so the student learns to
    stop). Character spans are mapped to tokens through the tokenizer's offsets.
    ``with_text``: also the rendered text and each token's character span (for alignment).
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False).rstrip()
        if not (full.startswith(before) and full.startswith(through)):
            raise MalformedRow  # a template that rewrites earlier turns; the reply cannot be located
        spans.append((len(before), len(through)))
    # The template already holds any BOS token, so the tokenizer must not add another.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(start <= s < end for start, end in spans) else IGNORE_INDEX
        for tok, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    if with_text:
        return list(enc["input_ids"]), labels, full, [tuple(o) for o in enc["offset_mapping"]]
    return list(enc["input_ids"]), labels


def with_teacher_tokens(example: Example, text: str, offsets: list, teacher_tokenizer, seq_len: int) -> Example:
    """``example`` plus the same text in the teacher's tokens and the positions where both compare."""
    from neobench.data.alignment import align_positions

    enc = teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    teacher_ids, teacher_offsets = enc["input_ids"][:seq_len], [tuple(o) for o in enc["offset_mapping"][:seq_len]]
    scored = [p for p in range(len(example.labels) - 1) if example.labels[p + 1] != IGNORE_INDEX]
    student_positions, teacher_positions = align_positions(offsets[: len(example.input_ids)], teacher_offsets, scored)
    keep = teacher_positions[-1] + 1 if teacher_positions else 1  # the teacher reads no further than it is asked
    return Example(example.input_ids, example.labels, tuple(teacher_ids[:keep]), tuple(student_positions), tuple(teacher_positions))


def tokenize_rows(tokenizer, rows: list[Any], seq_len: int, source: str, teacher_tokenizer=None) -> TokenizedData:
    """Examples of the usable rows; with ``teacher_tokenizer`` (another vocabulary than ``tokenizer``'s),
    each also carries the teacher's tokens of the same text and the aligned positions."""
    report = DataReport(source=source, rows=len(rows))
    examples = []
    texts = hashlib.sha256(f"seq_len={seq_len}".encode())
    for row in rows:
        try:
            messages = to_messages(row)
            if is_empty(messages):
                report.drop("empty")
                continue
            input_ids, labels, text, offsets = encode_chat(tokenizer, messages, with_text=True)
        except MalformedRow:
            report.drop("malformed")
            continue
        if len(input_ids) > seq_len:
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
            # Position 0 is never a target (nothing predicts it), so look from position 1.
            if all(label == IGNORE_INDEX for label in labels[1:]):
                report.drop("no_response_after_truncation")
                continue
            report.truncated += 1
        example = Example(tuple(input_ids), tuple(labels))
        texts.update(hashlib.sha256(text.encode()).digest())
        if teacher_tokenizer is not None:
            example = with_teacher_tokens(example, text, offsets, teacher_tokenizer, seq_len)
        examples.append(example)
    report.used = len(examples)
    if not examples:
        raise NeobenchError(f"no usable rows in {source}: {report.summary()}; check the row format (see `neobench run --help`)")
    digest = hashlib.sha256(f"seq_len={seq_len}".encode())
    for ex in examples:
        digest.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(ex.labels, dtype=np.int64).tobytes())
    data = TokenizedData(examples, report, digest.hexdigest(), texts.hexdigest())
    if teacher_tokenizer is not None:
        # Apart from data_hash, which is the student's alone: sft and lora runs (no teacher) and kd
        # and neo runs of one student train on the same data and share a table.
        alignment = hashlib.sha256(data.data_hash.encode())
        for ex in examples:
            for part in (ex.teacher_input_ids, ex.aligned_positions, ex.teacher_positions):
                alignment.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
        data.alignment_hash = alignment.hexdigest()
        data.aligned_tokens = sum(len(ex.aligned_positions) for ex in examples)
        data.scored_tokens = sum(sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in examples)
    return data


def load_training_data(
    tokenizer, spec: str, split: str, seq_len: int, max_examples: Optional[int], teacher_tokenizer=None,
) -> TokenizedData:
    rows = load_rows(spec, split, max_examples)
    return tokenize_rows(tokenizer, rows, seq_len, f"{spec}[{split}]", teacher_tokenizer)


# --- batches ------------------------------------------------------------------------------


def example_order(n_examples: int, n_needed: int, seed: int) -> list[int]:
    """Indices for ``n_needed`` draws: a fresh seeded permutation per epoch.

    Every method with the same seed sees the same examples in the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_needed:
        order += torch.randperm(n_examples, generator=generator).tolist()
    return order[:n_needed]


def collate(examples: list[Example], pad_id: int, teacher_pad_id: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, all [B, T].

    Examples with teacher tokens (cross-vocabulary) add teacher_input_ids, teacher_attention_mask
    and teacher_scored [B, T_t] (the teacher positions compared, padded with ``teacher_pad_id``)
    and kd_aligned [B, T] (the student positions they are compared with)."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if examples[0].teacher_input_ids:
        t_width = max(len(ex.teacher_input_ids) for ex in examples)
        batch["teacher_input_ids"] = torch.full((len(examples), t_width), teacher_pad_id, dtype=torch.long)
        batch["teacher_attention_mask"] = torch.zeros((len(examples), t_width), dtype=torch.long)
        batch["teacher_scored"] = torch.zeros((len(examples), t_width), dtype=torch.bool)
        batch["kd_aligned"] = torch.zeros((len(examples), width), dtype=torch.bool)
        for i, ex in enumerate(examples):
            batch["teacher_input_ids"][i, : len(ex.teacher_input_ids)] = torch.tensor(ex.teacher_input_ids)
            batch["teacher_attention_mask"][i, : len(ex.teacher_input_ids)] = 1
            batch["teacher_scored"][i, list(ex.teacher_positions)] = True
            batch["kd_aligned"][i, list(ex.aligned_positions)] = True
    return batch
