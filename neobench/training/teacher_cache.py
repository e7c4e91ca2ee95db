"""Teacher-logit cache: the teacher's distributions on training examples, computed once and reused.

    --teacher-cache off | dense | topk:K

Every KD-based run of a matrix, seed or ablation trial that trains on the same examples with the
same teacher reuses them: a run whose examples are all cached never loads the teacher. Entries
are per training example (its response positions only) under

    <neobench cache>/teacher-logits/<key>/ex-<index>.safetensors

where the key covers the teacher's fingerprint, the data hash, seq_len, the temperature and the
mode. dense stores fp16 log-probabilities over the vocabulary [n, V]; topk:K stores the K most
likely tokens' fp16 log-probabilities and int32 ids [n, K] and the remaining probability mass
[n] (fp32). Each file carries a sha256 of its tensors and of the example's tokens; a file that
fails either check is rebuilt, never used.
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
    """"off", "dense" or "topk"."""
    k: int = 0

    @classmethod
    def parse(cls, spec: str) -> "CacheMode":
        if spec in ("off", "dense"):
            return cls(spec)
        if spec.startswith("topk:") and spec[5:].isdigit() and int(spec[5:]) > 0:
            return cls("topk", int(spec[5:]))
        raise NeobenchError(f"teacher_cache must be off, dense or topk:K (K a positive integer), got {spec!r}")

    def __str__(self) -> str:
        return f"topk:{self.k}" if self.kind == "topk" else self.kind


def example_digest(input_ids: tuple[int, ...], labels: tuple[int, ...]) -> str:
    return hashlib.sha256(json.dumps([input_ids, labels]).encode()).hexdigest()


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

    @classmethod
    def for_run(cls, mode: CacheMode, teacher_path: str, data_hash: str, seq_len: int, temperature: float, vocab_size: int) -> "TeacherCache":
        from neobench.models.loading import cache_dir
        from neobench.models.loading import model_fingerprint

        key = hashlib.sha256(
            json.dumps([model_fingerprint(teacher_path), data_hash, seq_len, temperature, str(mode), vocab_size]).encode()
        ).hexdigest()[:20]
        return cls(cache_dir() / "teacher-logits" / key, mode, temperature, vocab_size)

    def _path(self, index: int) -> Path:
        return self.root / f"ex-{index}.safetensors"

    def load(self, index: int, example) -> Optional[TeacherLogProbs]:
        """The cached entry of example ``index``, or None if absent, corrupt or made for other tokens."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = self._path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError):
            meta, tensors = {}, {}
        if meta.get("sha256") != _tensor_digest(tensors) or meta.get("example") != example_digest(example.input_ids, example.labels):
            path.unlink(missing_ok=True)  # corrupt or mismatched: rebuild, never use
            self.rebuilt += 1
            return None
        return TeacherLogProbs(tensors["log_probs"], tensors.get("ids"), tensors.get("rest"))

    def store(self, index: int, example, response_logits: torch.Tensor) -> TeacherLogProbs:
        """Cache the teacher's distributions at the response positions of one example.

        response_logits: [n, V'] at the example's n scored positions (those whose next token is a
        response token), in order; V' may exceed V (padding rows, dropped here).
        """
        from safetensors.torch import save_file

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
        meta = {"sha256": _tensor_digest(tensors), "example": example_digest(example.input_ids, example.labels)}
        tmp = self.root / f".ex-{index}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self._path(index))
        return TeacherLogProbs(tensors["log_probs"], tensors.get("ids"), tensors.get("rest"))


def concat(parts: list[TeacherLogProbs]) -> TeacherLogProbs:
    """Entries of a micro-batch's examples, in batch order (the order of the response mask)."""
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
    return TeacherLogProbs(cat([p.log_probs for p in parts]), cat([p.ids for p in parts]), cat([p.rest for p in parts]))
