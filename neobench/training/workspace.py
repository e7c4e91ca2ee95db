"""A run's workspace: everything it needs besides its student, prepared before the first step.

prepare resolves the models (dequantizing or pruning where asked), tokenizes the data and checks
that teacher and student share a vocabulary; the Workspace holds the result, and loads the
teacher only when a method needs it (whole, or sharded like the student under FSDP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from neobench.data.alignment import VocabPairing, same_vocabulary
from neobench.data.examples import TokenizedData, load_training_data, resolve_data_file
from neobench.core.errors import NeobenchError
from neobench.models.loading import check_output_rows, load_causal_lm, load_tokenizer, pick_device, resolve_model
from neobench.models.precision import autocast, pick_dtype
from neobench.training.distributed import World
from neobench.training.fused_loss import LogitHead, TeacherHidden, check_head, scored_hidden
from neobench.training.losses import DIVERGENCES
from neobench.training.prune import parse_pruned_spec, pruned_student_dir
from neobench.training.revocab import parse_student_spec, revocabulary_student_dir

if TYPE_CHECKING:  # a RunConfig's fields are read; the runs stage above defines and validates it
    from neobench.runs.config import RunConfig


@dataclass
class Workspace:
    """Everything a run needs besides its student: resolved model paths, tokenized data, the teacher (loaded lazily)."""

    teacher_path: str
    student_path: str
    tokenizer: object
    data: TokenizedData
    vocab_size: int
    device: str
    dtype: torch.dtype
    world: World = World()
    strategy: str = "ddp"
    teacher_tokenizer: Optional[object] = None
    """Set when the teacher has a vocabulary of its own (a cross-vocabulary run); None: it shares the student's."""
    teacher_vocab_size: Optional[int] = None
    """The teacher's vocabulary size (its head's real rows); the student's ``vocab_size`` when they share one."""
    pairing: Optional[VocabPairing] = None
    """Cross-vocabulary runs with a loss over the shared tokens: which student id is which teacher id."""
    _teacher: Optional[torch.nn.Module] = field(default=None, repr=False)
    _teacher_head: Optional[LogitHead] = field(default=None, repr=False)
    _teacher_sharded: Optional[torch.nn.Module] = field(default=None, repr=False)
    _teacher_compiled: Optional[object] = field(default=None, repr=False)

    def teacher(self) -> torch.nn.Module:
        """The frozen teacher, whole, held in the run's compute dtype (it needs no fp32 master copy)."""
        if self._teacher is None:
            self._teacher = load_causal_lm(self.teacher_path, self.dtype, self.device).eval().requires_grad_(False)
            self._teacher_head = LogitHead.of(self._teacher, self.teacher_vocab)
            check_head(self._teacher, self._teacher_head, self.teacher_path)
        return self._teacher

    @property
    def teacher_vocab(self) -> int:
        return self.teacher_vocab_size or self.vocab_size

    @property
    def cross_vocabulary(self) -> bool:
        return self.teacher_tokenizer is not None

    @property
    def tokenizer_fingerprints(self) -> tuple[str, ...]:
        """Both tokenizers' fingerprints and the alignment's hash on a cross-vocabulary run (part of its teacher
        cache's key); () otherwise."""
        from neobench.data.alignment import tokenizer_fingerprint

        if not self.cross_vocabulary:
            return ()
        return tokenizer_fingerprint(self.teacher_tokenizer), tokenizer_fingerprint(self.tokenizer), self.data.alignment_hash

    @property
    def teacher_pad_id(self) -> Optional[int]:
        return None if self.teacher_tokenizer is None else self.teacher_tokenizer.pad_token_id

    @property
    def teacher_loaded(self) -> bool:
        """Whether this process has loaded the teacher's weights (a complete teacher cache never does)."""
        return self._teacher is not None or self._teacher_sharded is not None

    @property
    def shards_teacher(self) -> bool:
        return self.world.distributed and self.strategy == "fsdp"

    def load_teacher_for_training(self) -> None:
        """The teacher as training runs it: whole, or under FSDP sharded like the student."""
        if not self.shards_teacher:
            self.teacher()
        elif self._teacher_sharded is None:
            from neobench.training.distributed import shard

            model = load_causal_lm(self.teacher_path, self.dtype, self.device).eval().requires_grad_(False)
            check_head(model, LogitHead.of(model, self.teacher_vocab), self.teacher_path)
            self._teacher_sharded = shard(model, self.world, self.dtype, reshard_after_forward=True)

    def teacher_hidden(self, batch: dict, mask: torch.Tensor, compiled: bool = False) -> TeacherHidden:
        """The teacher's last hidden states at the scored positions, with its head; no logits, no autograd record.

        Across two vocabularies the teacher reads the batch in its own tokens, at the positions
        aligned with the student's (neobench.data.alignment); see :meth:`at_student_rows`.
        ``compiled``: through a torch.compile'd decoder (a training run's --compile). The teacher
        cache's entries never are: what it stores must not depend on how a run was configured.
        """
        self.load_teacher_for_training()
        ids, attention, scored = batch["input_ids"], batch["attention_mask"], mask
        if self.cross_vocabulary:
            ids, attention, scored = batch["teacher_input_ids"], batch["teacher_attention_mask"], batch["teacher_scored"]
        if self._teacher_sharded is None:
            if compiled and self._teacher_compiled is None:
                from neobench.training.distributed import compile_decoder

                self._teacher_compiled = compile_decoder(self._teacher)
            with torch.inference_mode(), autocast(self.device, self.dtype):
                decoder = self._teacher_compiled if compiled else None
                hidden = scored_hidden(self._teacher, {"input_ids": ids, "attention_mask": attention}, scored, decoder)
            hidden, head = hidden.clone(), self._teacher_head  # clone: a normal tensor autograd may see
        else:
            # FSDP gathers parameters in place, which inference tensors forbid: no_grad instead.
            with torch.no_grad(), autocast(self.device, self.dtype):
                hidden = self._teacher_sharded(ids, attention, scored)
            # The root stays gathered after its forward (FSDP's rule for roots): its head is whole now.
            head = LogitHead.of(self._teacher_sharded.model, self.teacher_vocab)
        if self.cross_vocabulary:
            return self.at_student_rows(hidden, head, batch, mask)
        return TeacherHidden(hidden, head)

    def at_student_rows(self, aligned_rows: torch.Tensor, head: LogitHead, batch: dict, mask: torch.Tensor) -> TeacherHidden:
        """Teacher rows [N_aligned, H] of a cross-vocabulary batch placed at the student's N scored rows.

        Rows where the student is not aligned are zeros and marked so (``aligned`` [N]); the loss
        gives them no distillation term. Both sides list their positions in row-major order and
        alignment is monotone, so the i-th teacher row belongs to the i-th aligned student row.
        """
        aligned = batch["kd_aligned"][mask]
        if int(aligned.sum()) != aligned_rows.shape[0]:
            raise ValueError(f"{aligned_rows.shape[0]} teacher rows for {int(aligned.sum())} aligned student positions")
        hidden = aligned_rows.new_zeros((aligned.shape[0], aligned_rows.shape[1]))
        hidden[aligned] = aligned_rows
        return self.as_teacher(hidden, head, batch, mask)

    def as_teacher(self, hidden: torch.Tensor, head: LogitHead, batch: dict, mask: torch.Tensor) -> TeacherHidden:
        """Teacher rows at the student's N scored rows (computed now or read from the cache) as the loss takes
        them: across two vocabularies, with the alignment mask and the vocabulary pairing."""
        if not self.cross_vocabulary:
            return TeacherHidden(hidden, head)
        return TeacherHidden(hidden, head, batch["kd_aligned"][mask], self.pairing)

    def release_teacher_shards(self) -> None:
        """Free the gathered root of a sharded teacher once its outputs are used (reshard_after_forward)."""
        if self._teacher_sharded is not None:
            self._teacher_sharded.reshard()


def prepare(cfg: RunConfig, need_teacher: bool = True, fidelity: bool = False) -> Workspace:
    """Resolve models, tokenize the data, and check the vocabularies: one shared by teacher and student,
    or two that a cross-vocabulary loss compares (neobench.data.alignment).

    Cheap checks (device, data file, student path) come before anything slow (dequantizing
    or pruning), so a typo fails in a second, not after minutes. ``fidelity``: the run will score
    neo_fidelity (teacher and student token by token), which needs one vocabulary.
    """
    from neobench.training.distributed import init, rank_device

    device = pick_device(cfg.device)
    world = init(device)
    device = rank_device(device, world)
    dtype = pick_dtype(cfg.dtype, device)
    resolve_data_file(cfg.train_data, cfg.train_split)
    student_spec, own_vocabulary = parse_student_spec(cfg.student)
    keep = parse_pruned_spec(student_spec)
    student_path = resolve_model(student_spec) if keep is None else None
    teacher_path = resolve_model(cfg.teacher)
    if keep is not None:
        student_path = str(pruned_student_dir(teacher_path, keep, cfg.train_data, cfg.train_split))
    if own_vocabulary is not None:  # e.g. pruned:15+bpe:16384 (neobench.training.revocab)
        student_path = str(revocabulary_student_dir(Path(student_path), teacher_path, own_vocabulary, cfg.train_data, cfg.train_split))
    tokenizer = load_tokenizer(student_path)
    teacher_tok = load_tokenizer(teacher_path) if need_teacher else None
    cross = teacher_tok is not None and not same_vocabulary(teacher_tok, tokenizer)
    if cross:
        check_cross_vocabulary(cfg, teacher_tok, tokenizer, fidelity)
    data = load_training_data(tokenizer, cfg.train_data, cfg.train_split, cfg.seq_len, cfg.max_examples, teacher_tok if cross else None)
    ws = Workspace(teacher_path, student_path, tokenizer, data, len(tokenizer), device, dtype, world, cfg.strategy)
    if teacher_tok is not None:  # checked on configs, before any weights are loaded or steps taken
        check_output_rows([(cfg.teacher, teacher_path, len(teacher_tok)), (cfg.student, student_path, len(tokenizer))], not cross)
    if cross:
        ws.teacher_tokenizer, ws.teacher_vocab_size = teacher_tok, len(teacher_tok)
        if teacher_tok.pad_token_id is None:  # any id will do under the attention mask
            teacher_tok.pad_token_id = teacher_tok.eos_token_id or 0
        if DIVERGENCES.get(cfg.loss).outcomes == "shared":
            ws.pairing = VocabPairing.of(tokenizer, teacher_tok)
    return ws


def check_cross_vocabulary(cfg: RunConfig, teacher_tok, student_tok, fidelity: bool = False) -> None:
    """A teacher and a student with two vocabularies: refuse, in one line, what cannot compare them."""
    from neobench.training.losses import CROSS_VOCABULARY
    from neobench.training.methods import METHODS

    pair = f"teacher {cfg.teacher!r} ({len(teacher_tok)} tokens) and student {cfg.student!r} ({len(student_tok)} tokens) use different tokenizers"
    method = METHODS.get(cfg.method)
    if method.on_policy:
        raise NeobenchError(f"{pair}; {cfg.method} scores the student's own samples with the teacher token by token, "
                            f"which needs one vocabulary; use --method kd or neo with --loss {' or '.join(CROSS_VOCABULARY)}")
    if method.uses_teacher and not DIVERGENCES.get(cfg.loss).cross_vocabulary:
        raise NeobenchError(f"{pair}; --loss {cfg.loss} compares distributions over one vocabulary; "
                            f"use a cross-vocabulary loss: {', '.join(CROSS_VOCABULARY)}")
    if method.uses_teacher and cfg.teacher_cache not in ("off", "hidden"):
        raise NeobenchError(f"{pair}; a cross-vocabulary run caches the teacher's hidden states only: use --teacher-cache hidden or off")
    if fidelity:
        raise NeobenchError(f"{pair}; neo_fidelity compares the two models token by token over one vocabulary; "
                            "leave it out of --tasks (the xvocab preset's tasks compare any vocabularies)")
