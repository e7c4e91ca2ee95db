"""One run, several processes: torch.distributed under torchrun (gloo on CPU, NCCL on GPU).

    torchrun --nproc-per-node N -m neobench run --method neo ...      (or: neobench run --nproc N ...)

What a budget is. A step consumes the *global* batch, batch_size x grad_accum x world examples.
Step s takes ``order[s*G : (s+1)*G]`` of one seeded permutation of the data (the same for any
number of processes), sorts it by length and cuts it into micro-batches of batch_size
(:func:`neobench.training.loop.group_by_length`); micro-batch j goes to rank j % world. So 2 processes
with grad_accum 1 and 1 process with grad_accum 2 see the very same micro-batches, padded alike:
the same budget, and the report treats them as one.

What a gradient is. Every loss term is a sum over response tokens, divided by the number of
response tokens in the global batch (all-reduced before the first backward), so neither
accumulation nor world size changes the gradient (the bug of TRL #4719, transformers #37766).
DDP and FSDP average gradients over ranks; the loss is multiplied by the world size to undo it.
Gradients are synchronised on the last micro-step only (``no_sync`` /
``set_requires_gradient_sync(False)``).

Strategies (``--strategy``):
    ddp   every rank holds the whole student; gradients are all-reduced (DistributedDataParallel).
    fsdp  FSDP2 ``fully_shard``: each decoder layer, then the whole, sharded over the ranks; the
          teacher is sharded the same way with ``reshard_after_forward=True`` (its root, which
          FSDP keeps gathered after a forward, is resharded explicitly once the loss is computed).
The teacher is never wrapped in DDP: it runs without gradients.

DDP and FSDP hook into a module's ``forward``. The training loop never calls the causal LM's own
forward (that would project every position to the vocabulary, see neobench.training.fused_loss): it calls
:class:`ScoredHidden`, whose forward is "decoder, then keep the scored positions". That module is
what gets wrapped, in one process too, so checkpoints name parameters alike in every setting.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from neobench.core.errors import NeobenchError
from neobench.core.registry import Registry

STRATEGIES: Registry[str] = Registry("strategy")
STRATEGIES.add("ddp", "DistributedDataParallel: the whole student on every rank, gradients all-reduced")
STRATEGIES.add("fsdp", "FSDP2 fully_shard: parameters, gradients and optimizer state sharded over the ranks")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 without torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str) -> World:
    """Join the process group torchrun set up (once); a plain process is a world of one."""
    world = launched_world()
    if not world.distributed:
        return world
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend)
    return world


def rank_device(device: str, world: World) -> str:
    """cuda -> cuda:LOCAL_RANK under torchrun: one GPU per process."""
    if world.distributed and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def all_sum(values: list[float], world: World, device: str) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64, so token counts stay exact)."""
    if not world.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_int(value: int, world: World, device: str) -> list[int]:
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world.size)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64, device=device))
    return [int(t) for t in out]


def broadcast_object(obj, world: World):
    """Rank 0's ``obj`` on every rank (a run id, say: each rank would otherwise stamp its own)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


class ScoredHidden(torch.nn.Module):
    """forward(input_ids, attention_mask, mask) -> the last hidden states [N, H] at ``mask`` [B, T].

    The module DDP and FSDP wrap (their hooks need a forward); see the module docstring.
    """

    def __init__(self, model: torch.nn.Module, compiled: bool = False):
        super().__init__()
        self.model = model
        # A compiled view of the same decoder (it shares the parameters), kept in a tuple so that it is
        # not a submodule: state_dict keys, checkpoints and saved weights stay those of the eager model.
        self._compiled = (compile_decoder(model),) if compiled else ()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from neobench.training.fused_loss import scored_hidden

        return scored_hidden(self.model, {"input_ids": input_ids, "attention_mask": attention_mask}, mask, *self._compiled)


COMPILE_IN_ONE_PROCESS = "--compile runs in a single process; leave it out with --nproc > 1 or under torchrun"


def compile_decoder(model: torch.nn.Module):
    """torch.compile of ``model``'s decoder (no head), for every sequence length at once (dynamic shapes).

    Inductor fuses the element-wise work around the matmuls (norms, rotary, activations, LoRA's
    scaling and casts), which eager PyTorch runs op by op. The first call compiles (1-2.5 minutes on 2
    CPU cores; inductor caches the result on disk for later processes); the numbers agree with
    the eager model's to rounding (fp32: about 1e-6).
    """
    from neobench.training.fused_loss import decoder_of

    return torch.compile(decoder_of(model), dynamic=True)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    from neobench.training.fused_loss import decoder_of

    layers = getattr(decoder_of(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise NeobenchError(f"{type(model).__name__} has no decoder .layers list; --strategy fsdp needs one to shard")
    return layers


def shard(model: torch.nn.Module, world: World, dtype: torch.dtype, reshard_after_forward: bool = True) -> ScoredHidden:
    """FSDP2: every decoder layer (``reshard_after_forward``), then the whole; bf16 runs gather parameters in bf16, reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    root = ScoredHidden(model)
    # The root (embeddings, final norm, lm_head) stays gathered after its forward: the fused loss
    # projects through lm_head after the forward returns. The student's is resharded after its
    # backward, the teacher's by Workspace.release_teacher_shards once its outputs are used.
    fully_shard(root, mp_policy=policy, reshard_after_forward=False)
    return root


def wrap_student(
    model: torch.nn.Module, strategy: str, world: World, device: str, dtype: torch.dtype, compiled: bool = False,
) -> torch.nn.Module:
    """The student as the training loop calls it: ScoredHidden, wrapped for the strategy when world > 1.

    ``compiled``: its decoder through torch.compile (one process only: see compile_decoder)."""
    if not world.distributed:
        return ScoredHidden(model, compiled)
    if compiled:
        raise NeobenchError(COMPILE_IN_ONE_PROCESS)
    if strategy == "fsdp":
        return shard(model, world, dtype)
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    # broadcast_buffers off: the only buffers are rotary tables, equal on every rank by construction.
    return DistributedDataParallel(ScoredHidden(model), device_ids=ids, broadcast_buffers=False)


def inner(wrapped: torch.nn.Module) -> torch.nn.Module:
    """The ScoredHidden inside DDP (FSDP2 and a single process have no wrapper around it)."""
    from torch.nn.parallel import DistributedDataParallel

    return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped


def sync_gradients(wrapped: torch.nn.Module, last_micro_step: bool):
    """A context for one micro-step's forward and backward: gradients are reduced on the last only."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel) and not last_micro_step:
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # an FSDP2 module
        wrapped.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


def grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The global gradient norm (across shards under FSDP); clips to ``max_norm`` when it is > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):  # a DTensor: the norm of this rank's shards, made global
        total = total.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def full_state(wrapped: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The student's tensors named in ``names`` (its own parameter names), whole and on the CPU.

    A collective under FSDP: every rank must call it; rank 0 gets the tensors, the others ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not hasattr(wrapped, "set_requires_gradient_sync"):  # not FSDP: every tensor is whole here
        return {n: p.detach().cpu().contiguous() for n, p in inner(wrapped).model.named_parameters() if n in names}
    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v.contiguous() for k, v in state.items() if k.removeprefix("model.") in names}


def close(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
