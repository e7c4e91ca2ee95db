"""A run's workspace: everything it needs besides its student, prepared before the first step.

prepare resolves the models (dequantizing or pruning where asked), tokenizes the data and checks
that teacher and student share a vocabulary; the Workspace holds the result, and loads the
teacher only when a method needs it (whole, or sharded like the student under FSDP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

from neobench.data.examples import TokenizedData, load_training_data, resolve_data_file
from neobench.models.loading import check_shared_vocabulary, load_causal_lm, load_tokenizer, output_rows, pick_device, resolve_model
from neobench.models.precision import autocast, pick_dtype
from neobench.training.distributed import World
from neobench.training.fused_loss import LogitHead, TeacherHidden, check_head, scored_hidden
from neobench.training.prune import parse_pruned_spec, pruned_student_dir

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
    _teacher: Optional[torch.nn.Module] = field(default=None, repr=False)
    _teacher_head: Optional[LogitHead] = field(default=None, repr=False)
    _teacher_sharded: Optional[torch.nn.Module] = field(default=None, repr=False)

    def teacher(self) -> torch.nn.Module:
        """The frozen teacher, whole, held in the run's compute dtype (it needs no fp32 master copy)."""
        if self._teacher is None:
            self._teacher = load_causal_lm(self.teacher_path, self.dtype, self.device).eval().requires_grad_(False)
            self._teacher_head = LogitHead.of(self._teacher, self.vocab_size)
            check_head(self._teacher, self._teacher_head, self.teacher_path)
        return self._teacher

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
            check_head(model, LogitHead.of(model, self.vocab_size), self.teacher_path)
            self._teacher_sharded = shard(model, self.world, self.dtype, reshard_after_forward=True)

    def teacher_hidden(self, batch: dict, mask: torch.Tensor) -> TeacherHidden:
        """The teacher's last hidden states at the scored positions, with its head; no logits, no autograd record."""
        self.load_teacher_for_training()
        if self._teacher_sharded is None:
            with torch.inference_mode(), autocast(self.device, self.dtype):
                hidden = scored_hidden(self._teacher, batch, mask)
            return TeacherHidden(hidden.clone(), self._teacher_head)  # clone: a normal tensor autograd may see
        # FSDP gathers parameters in place, which inference tensors forbid: no_grad instead.
        with torch.no_grad(), autocast(self.device, self.dtype):
            hidden = self._teacher_sharded(batch["input_ids"], batch["attention_mask"], mask)
        # The root stays gathered after its forward (FSDP's rule for roots): its head is whole now.
        return TeacherHidden(hidden, LogitHead.of(self._teacher_sharded.model, self.vocab_size))

    def release_teacher_shards(self) -> None:
        """Free the gathered root of a sharded teacher once its outputs are used (reshard_after_forward)."""
        if self._teacher_sharded is not None:
            self._teacher_sharded.reshard()


def prepare(cfg: RunConfig, need_teacher: bool = True) -> Workspace:
    """Resolve models, tokenize the data and check that teacher and student share a vocabulary.

    Cheap checks (device, data file, student path) come before anything slow (dequantizing
    or pruning), so a typo fails in a second, not after minutes.
    """
    from neobench.training.distributed import init, rank_device

    device = pick_device(cfg.device)
    world = init(device)
    device = rank_device(device, world)
    dtype = pick_dtype(cfg.dtype, device)
    resolve_data_file(cfg.train_data, cfg.train_split)
    keep = parse_pruned_spec(cfg.student)
    student_path = resolve_model(cfg.student) if keep is None else None
    teacher_path = resolve_model(cfg.teacher)
    if keep is not None:
        student_path = str(pruned_student_dir(teacher_path, keep, cfg.train_data, cfg.train_split))
    tokenizer = load_tokenizer(student_path)
    data = load_training_data(tokenizer, cfg.train_data, cfg.train_split, cfg.seq_len, cfg.max_examples)
    ws = Workspace(teacher_path, student_path, tokenizer, data, len(tokenizer), device, dtype, world, cfg.strategy)
    if need_teacher:
        # Checked on tokenizers and configs, before any weights are loaded or steps taken.
        ws.vocab_size = check_shared_vocabulary(
            load_tokenizer(teacher_path), tokenizer, output_rows(teacher_path), output_rows(student_path),
            cfg.teacher, cfg.student,
        )
    return ws
