"""Two tokenizations of one text: where a teacher and a student with different vocabularies can be compared.

Both tokenizers encode the same chat-formatted text (rendered by the student's chat template),
and each token's character span comes from the tokenizer's own offsets
(``return_offsets_mapping``), never from string heuristics.

A *boundary* of a tokenization is a character offset ``c`` where one token ends and the next
begins: ``end[j - 1] == start[j] == c``. A byte-level tokenizer that splits a multi-byte
character (an emoji, say) into two tokens gives them overlapping spans, so the split is no
boundary: neither model's context there is a whole prefix of the text.

A student position ``p`` predicts the student token starting at ``c``; it is *aligned* when
``c`` is a boundary of both tokenizations, and then the teacher position ``q`` that predicts the
teacher token starting at ``c`` has read exactly the same text, ``text[:c]``. Both next-token
distributions are over "what comes at ``c``", each in its own vocabulary, and a
cross-vocabulary loss compares them there.

Where the spans do not line up one to one, the tokens between two shared boundaries form one
group, and the group is compared at its start only (a *merge*: one comparison per group). The
student's later tokens inside a group get their cross-entropy but no distillation term. The
tokens the teacher splits differently are exactly those, so nothing is compared across
misaligned contexts. The share of response tokens that are aligned is recorded with the data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from neobench.core.errors import NeobenchError


def boundary_starts(offsets: Sequence[tuple[int, int]]) -> dict[int, int]:
    """{c: j} for every token j >= 1 that starts at a boundary c (the previous token ends exactly there)."""
    starts = {}
    for j in range(1, len(offsets)):
        start, previous_end = offsets[j][0], offsets[j - 1][1]
        if start == previous_end and offsets[j][1] > start:
            starts[start] = j
    return starts


def align_positions(
    student_offsets: Sequence[tuple[int, int]], teacher_offsets: Sequence[tuple[int, int]], scored: Sequence[int],
) -> tuple[list[int], list[int]]:
    """(student positions, teacher positions) that predict a token starting at the same boundary.

    ``scored``: the student positions p that are trained (their next token p + 1 is a response
    token), ascending. Returns the aligned subset of them and, for each, the teacher position q
    (the teacher token q + 1 starts where student token p + 1 does); both ascending.
    """
    student_starts = boundary_starts(student_offsets)
    teacher_starts = boundary_starts(teacher_offsets)
    by_token = {j: c for c, j in student_starts.items()}
    pairs = [(p, teacher_starts[by_token[p + 1]] - 1) for p in scored if by_token.get(p + 1) in teacher_starts]
    return [p for p, _ in pairs], [q for _, q in pairs]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary and special tokens (what the pairing depends on; the alignment,
    which merges and pre-tokenizer shape too, has its own hash, neobench.data.examples.TokenizedData.alignment_hash)."""
    payload = [sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens, type(tokenizer).__name__]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def same_vocabulary(teacher_tok, student_tok) -> bool:
    return teacher_tok.get_vocab() == student_tok.get_vocab()


@dataclass(frozen=True)
class VocabPairing:
    """The tokens two vocabularies spell alike: student id ``student_ids[i]`` is teacher id ``teacher_ids[i]``.

    Matched on the tokenizers' own token strings (``convert_ids_to_tokens``): byte-level BPE
    vocabularies (GPT-2, Llama 3, Qwen, SmolLM2 and a BPE trained with the same pre-tokenizer)
    spell a token the same way, so most of a smaller one is shared. A SentencePiece vocabulary
    ("▁word") and a byte-level one ("Ġword") share little: use ``uld`` there.
    """

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor

    @classmethod
    def of(cls, student_tok, teacher_tok) -> "VocabPairing":
        teacher_ids = {token: i for i, token in enumerate(teacher_tok.convert_ids_to_tokens(list(range(len(teacher_tok)))))}
        pairs = [
            (i, teacher_ids[token])
            for i, token in enumerate(student_tok.convert_ids_to_tokens(list(range(len(student_tok)))))
            if token in teacher_ids
        ]
        if not pairs:
            raise NeobenchError("the two tokenizers spell no token alike, so shared_vocab_kl has nothing to compare; use --loss uld")
        student, teacher = zip(*pairs)
        return cls(torch.tensor(student), torch.tensor(teacher))

    def __len__(self) -> int:
        return len(self.student_ids)


def restrict_to_shared(log_s: torch.Tensor, log_t: torch.Tensor, pairing: Optional[VocabPairing]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both log-distributions over the shared tokens only, each renormalised there: [N, S], [N, S].

    Without a pairing (one vocabulary) every token is shared and nothing changes.
    """
    if pairing is None:
        return log_s, log_t
    shared_s = log_s[:, pairing.student_ids.to(log_s.device)]
    shared_t = log_t[:, pairing.teacher_ids.to(log_t.device)]
    return shared_s - shared_s.logsumexp(-1, keepdim=True), shared_t - shared_t.logsumexp(-1, keepdim=True)
