"""Teacher cache: the teacher's outputs on training examples, computed once and reused.

    --teacher-cache off | hidden | dense | topk:K

Every KD-based run of a matrix, seed or ablation trial that trains on the same examples with the
same teacher reuses them: a run whose examples are all cached never loads the teacher. Entries
are per training example (its response positions only) under

    <neobench cache>/teacher-logits/<key>/ex-<index>.safetensors

where the key covers the teacher's fingerprint, the data hash, seq_len, the temperature and the
mode. hidden stores the teacher's last hidden state [n, H] in the run's compute dtype, and its
output head once (head.safetensors): the loss then projects them chunk by chunk exactly as it
does with the teacher running (the same values in fp32; in bf16, to the rounding of the batch the
teacher ran in; none of its decoder's compute; 0.4 GB in bf16
for the 2,000 embedded examples, against 43 GB for dense). dense stores fp16 log-probabilities
over the vocabulary [n, V]; topk:K stores the K most likely tokens' fp16 log-probabilities and
int32 ids [n, K] and the remaining probability mass [n] (fp32); both approximate the teacher.
Each file carries a sha256 of its tensors and of the example's tokens; a file that fails either
check is rebuilt, never used. fill() runs the teacher over every example not cached yet, once
for a whole study (`neobench run` does it before a matrix's first run). Every entry, filled or met
by a run, is made by run_teacher with the teacher on that example alone, so its bytes do not
depend on the cache's history.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from neobench.core.errors import NeobenchError
from neobench.training.losses import TeacherLogProbs, next_token_targets


@dataclass(frozen=True)
class CacheMode:
    kind: str
    """"off", "hidden", "dense" or "topk"."""
    k: int = 0

    @classmethod
    def parse(cls, spec: str) -> "CacheMode":
        if spec in ("off", "hidden", "dense"):
            return cls(spec)
        if spec.startswith("topk:") and spec[5:].isdigit() and int(spec[5:]) > 0:
            return cls("topk", int(spec[5:]))
        raise NeobenchError(f"teacher_cache must be off, hidden, dense or topk:K (K a positive integer), got {spec!r}")

    def __str__(self) -> str:
        return f"topk:{self.k}" if self.kind == "topk" else self.kind


def example_digest(input_ids: tuple[int, ...], labels: tuple[int, ...], *teacher_side: tuple[int, ...]) -> str:
    return hashlib.sha256(json.dumps([input_ids, labels, *teacher_side]).encode()).hexdigest()


def digest_of(example) -> str:
    """What a cache entry was made for: the example's tokens (and, across two vocabularies, the
    teacher's tokens and the alignment)."""
    if not example.teacher_input_ids:
        return example_digest(example.input_ids, example.labels)
    return example_digest(example.input_ids, example.labels, example.teacher_input_ids, example.aligned_positions,
                          example.teacher_positions)


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TeacherCache:
    """Read and fill one cache directory (one teacher, data set, seq_len, temperature and mode)."""

    def __init__(self, root: Path, mode: CacheMode, temperature: float, vocab_size: int):
        self.root, self.mode, self.temperature, self.vocab_size = Path(root), mode, temperature, vocab_size
        self.root.mkdir(parents=True, exist_ok=True)
        self.rebuilt = 0
        self._head = None  # the loaded head, read and verified once per run

    @classmethod
    def for_run(
        cls, mode: CacheMode, teacher_path: str, data_hash: str, seq_len: int, temperature: float, vocab_size: int,
        dtype: Optional[torch.dtype] = None, tokenizers: tuple[str, ...] = (),
    ) -> "TeacherCache":
        """The cache of one teacher and data set. Hidden states depend on the compute dtype (``dtype``),
        not on the temperature; log-probabilities the other way round. ``tokenizers``: the two
        tokenizers' fingerprints and the alignment's hash of a cross-vocabulary run."""
        from neobench.models.loading import cache_dir, model_fingerprint

        if mode.kind == "hidden":
            if dtype is None:
                raise ValueError("a hidden-state cache needs the run's compute dtype")
            parts = [model_fingerprint(teacher_path), data_hash, seq_len, str(mode), vocab_size, str(dtype)]
        else:
            parts = [model_fingerprint(teacher_path), data_hash, seq_len, temperature, str(mode), vocab_size]
        parts.append(f"examples per teacher forward: {FILL_BATCH}")  # entries made another way are other bytes
        if tokenizers:
            parts.append(list(tokenizers))
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
        return cls(cache_dir() / "teacher-logits" / key, mode, temperature, vocab_size)

    @property
    def holds_hidden(self) -> bool:
        return self.mode.kind == "hidden"

    def _path(self, index: int) -> Path:
        return self.root / f"ex-{index}.safetensors"

    def _read(self, path: Path, example=None) -> Optional[dict[str, torch.Tensor]]:
        """A cache file's tensors if it is whole (its sha256) and, given ``example``, made for its tokens;
        else None, and a bad file is deleted (rebuilt, never used)."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError):
            meta, tensors = {}, {}
        made_for = example is None or meta.get("example") == digest_of(example)
        if meta.get("sha256") != _tensor_digest(tensors) or not made_for:
            path.unlink(missing_ok=True)
            self.rebuilt += 1
            return None
        return {**tensors, "_meta": meta}

    def load(self, index: int, example) -> Optional[TeacherLogProbs | torch.Tensor]:
        """The cached entry of example ``index`` (hidden states [n, H] in hidden mode), or None if absent,
        corrupt or made for other tokens."""
        tensors = self._read(self._path(index), example)
        if tensors is None:
            return None
        if self.holds_hidden:
            return tensors["hidden"]
        return TeacherLogProbs(tensors["log_probs"], tensors.get("ids"), tensors.get("rest"))

    def _write(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        from safetensors.torch import save_file

        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp), metadata={**meta, "sha256": _tensor_digest(tensors)})
        os.replace(tmp, self.root / name)  # atomic: a reader sees the whole file or none

    def has(self, index: int) -> bool:
        return self._path(index).is_file()

    def store_hidden(self, index: int, example, hidden: torch.Tensor) -> torch.Tensor:
        """Cache the teacher's last hidden states [n, H] at one example's n scored positions (hidden mode)."""
        mask, _ = next_token_targets(torch.tensor([example.labels]))
        if hidden.shape[0] != int(mask.sum()):
            raise ValueError(f"example {index} has {int(mask.sum())} scored positions, got {hidden.shape[0]} rows")
        tensors = {"hidden": hidden.detach().cpu().contiguous()}
        self._write(self._path(index).name, tensors, {"example": digest_of(example)})
        return tensors["hidden"]

    HEAD_FILE = "head.safetensors"

    def store_head(self, head) -> None:
        """The teacher's output head (a neobench.training.fused_loss.LogitHead), once per cache (hidden mode)."""
        if (self.root / self.HEAD_FILE).is_file():
            return
        tensors = {"weight": head.weight.detach().cpu().contiguous()}
        if head.bias is not None:
            tensors["bias"] = head.bias.detach().cpu().contiguous()
        meta = {"vocab_size": str(head.vocab_size), "scale": repr(head.scale), "softcap": repr(head.softcap)}
        self._write(self.HEAD_FILE, tensors, meta)

    def load_head(self, device: str):
        """The teacher's head as stored, or None (absent or corrupt: the teacher is loaded and stores it again)."""
        from neobench.training.fused_loss import LogitHead

        if self._head is not None:
            return self._head
        tensors = self._read(self.root / self.HEAD_FILE)
        if tensors is None:
            return None
        meta = tensors["_meta"]
        softcap = None if meta["softcap"] == "None" else float(meta["softcap"])
        bias = tensors.get("bias")
        self._head = LogitHead(tensors["weight"].to(device), None if bias is None else bias.to(device), int(meta["vocab_size"]),
                               float(meta["scale"]), softcap)
        return self._head

    def store(self, index: int, example, response_logits: torch.Tensor) -> TeacherLogProbs:
        """Cache the teacher's distributions at the response positions of one example.

        response_logits: [n, V'] at the example's n scored positions (those whose next token is a
        response token), in order; V' may exceed V (padding rows, dropped here).
        """
        mask, _ = next_token_targets(torch.tensor([example.labels]))
        if response_logits.shape[0] != int(mask.sum()):
            raise ValueError(f"example {index} has {int(mask.sum())} scored positions, got {response_logits.shape[0]} rows")
        logits = response_logits[:, : self.vocab_size].float()
        log_probs = torch.log_softmax(logits / self.temperature, dim=-1)
        if self.mode.kind == "dense":
            tensors = {"log_probs": log_probs.half()}
        else:
            values, ids = log_probs.topk(min(self.mode.k, self.vocab_size), dim=-1)
            tensors = {"log_probs": values.half(), "ids": ids.int(), "rest": (1 - values.exp().sum(-1)).clamp_min(0)}
        self._write(self._path(index).name, tensors, {"example": digest_of(example)})
        return TeacherLogProbs(tensors["log_probs"], tensors.get("ids"), tensors.get("rest"))


def concat(parts: list[TeacherLogProbs]) -> TeacherLogProbs:
    """Entries of a micro-batch's examples, in batch order (the order of the response mask)."""
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return TeacherLogProbs(cat([p.log_probs for p in parts]), cat([p.ids for p in parts]), cat([p.rest for p in parts]))


def store_from_hidden(cache: TeacherCache, index: int, example, hidden: torch.Tensor, head, compute_dtype: torch.dtype):
    """Cache one example from the teacher's hidden states [n, H] at its scored positions; returns the entry."""
    from neobench.training.fused_loss import project

    if cache.holds_hidden:
        cache.store_head(head)
        return cache.store_hidden(index, example, hidden)
    with torch.no_grad():
        logits = head.transform(project(hidden, head, compute_dtype))
    return cache.store(index, example, logits.cpu())


FILL_BATCH = 1
"""Examples per teacher forward while filling: one, so that an entry is the same bytes whatever was
filled with it. In bf16 a batch's padding and shape change the kernels' rounding: with batches of 8
sorted by length, the embedded teacher's KL term moved in the 4th digit between a cache filled for
96 examples and one filled for all 2,000, so a study's numbers depended on the cache's history.
One by one, filling takes longer than in batches of 8, once per machine."""


def run_teacher(cache: TeacherCache, ws, picks: list[int]) -> list:
    """Run the teacher on examples ``picks``, :data:`FILL_BATCH` at a time; store and return their entries.

    The one way entries are made (filling, and a run meeting an example the cache lacks), so that
    an entry's bytes never depend on the micro-batch it was first needed in.
    """
    from neobench.data.examples import collate

    examples, entries = ws.data.examples, []
    for start in range(0, len(picks), FILL_BATCH):
        group = picks[start : start + FILL_BATCH]
        batch = collate([examples[i] for i in group], ws.tokenizer.pad_token_id, ws.teacher_pad_id)
        batch = {k: v.to(ws.device) for k, v in batch.items()}
        mask, _ = next_token_targets(batch["labels"])
        teacher = ws.teacher_hidden(batch, mask)
        for i, rows in zip(group, torch.split(teacher.hidden, mask.sum(1).tolist())):
            entries.append(store_from_hidden(cache, i, examples[i], rows, teacher.head, ws.dtype))
    return entries


def fill(cache: TeacherCache, ws, indices: Optional[list[int]] = None) -> int:
    """Run the teacher once over the examples (``indices``; None: all of ``ws``'s data) the cache lacks;
    returns how many it ran.

    ``ws`` is the run's neobench.training.workspace.Workspace (its teacher is loaded only if something
    is missing). A stop signal (Ctrl-C) ends it between examples: every entry written is whole, and kept.
    """
    from neobench.core.progress import CountProgress
    from neobench.core.stopping import STOP

    examples = ws.data.examples
    wanted = range(len(examples)) if indices is None else indices
    missing = [i for i in wanted if not cache.has(i)]
    if not missing and (not cache.holds_hidden or cache.load_head(ws.device) is not None):
        return 0
    if not missing:  # entries are there but the head is not: the teacher stores it
        ws.teacher()
        cache.store_head(ws._teacher_head)
        return 0
    total, ran = len(wanted), 0
    with CountProgress(f"teacher cache ({cache.mode})") as progress:
        progress.start(total, total - len(missing))
        for start in range(0, len(missing), FILL_BATCH):
            if STOP.requested:
                break
            picks = missing[start : start + FILL_BATCH]
            run_teacher(cache, ws, picks)
            ran += len(picks)
            progress.update(total - len(missing) + ran)
    return ran
