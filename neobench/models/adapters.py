"""Adapter variants for the adapter methods (lora, neo), all built on peft's LoRA.

| variant | what changes                                                                  |
|---------|-------------------------------------------------------------------------------|
| lora    | dW = (alpha / r) * B A, B = 0 at start (Hu et al., 2021)                      |
| dora    | weight = magnitude * direction(W + dW) (Liu et al., 2024)                     |
| pissa   | A, B from the top-r singular vectors of W; W keeps the residual (Meng et al.) |
| rslora  | scaling alpha / sqrt(r) instead of alpha / r (Kalajdzievski, 2023)            |
| moslora | dW = (alpha / r) * B M A with a trainable r x r mixer M (Wu et al., 2024)     |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neobench.core.registry import Registry

@dataclass(frozen=True)
class Variant:
    description: str
    peft_options: dict[str, Any]
    """Extra LoraConfig arguments."""
    rewrites_base: bool = False
    """Whether initialisation changes the frozen base weights (PiSSA keeps W - BA), so they must be saved too."""
    fp32_inputs: bool = False
    """Whether the adapter's numbers depend on peft casting its input to fp32 under bf16 autocast
    (DoRA's magnitude scaling runs outside autocast, in the input's dtype)."""


VARIANTS: Registry[Variant] = Registry("variant")
VARIANTS.add("lora", Variant("LoRA: dW = (alpha/r) B A", {}))
VARIANTS.add("dora", Variant("DoRA: weight-decomposed LoRA (magnitude x direction)", {"use_dora": True}, fp32_inputs=True))
# The randomized SVD (4 subspace iterations) is what the PiSSA authors recommend for speed.
VARIANTS.add("pissa", Variant("PiSSA: A, B from the top-r singular vectors of W", {"init_lora_weights": "pissa_niter_4"}, rewrites_base=True))
VARIANTS.add("rslora", Variant("rsLoRA: scaling alpha/sqrt(r)", {"use_rslora": True}))
# Plain LoRA, then a mixer is inserted between A and B: see add_moslora_mixers.
VARIANTS.add("moslora", Variant("MoSLoRA: dW = (alpha/r) B M A, trainable r x r mixer M", {}))


class MixedLoraB(nn.Module):
    """LoRA's up-projection with MoSLoRA's mixer in front: x -> B (M x).

    ``weight`` is B @ M, so peft's merge (which reads ``lora_B.weight``) folds the mixer in and
    ``merge_and_unload`` yields an ordinary model.
    """

    def __init__(self, lora_b: nn.Linear, generator: torch.Generator | None = None):
        super().__init__()
        rank = lora_b.in_features
        self.lora_b = lora_b
        # MoSLoRA initialises the mixer orthogonally; B is still 0, so the model starts unchanged.
        mixer = torch.empty(rank, rank, dtype=lora_b.weight.dtype, device=lora_b.weight.device)
        self.mixer = nn.Parameter(nn.init.orthogonal_(mixer, generator=generator))

    @property
    def weight(self) -> torch.Tensor:
        return self.lora_b.weight @ self.mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_b(x @ self.mixer.T)


def add_moslora_mixers(peft_model: nn.Module, adapter_name: str = "default", seed: int = 0) -> int:
    """Wrap every ``lora_B[adapter_name]`` of a peft LoRA model in :class:`MixedLoraB`; return the count."""
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(seed)
    count = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_B:
            mixed = MixedLoraB(module.lora_B[adapter_name], generator)
            mixed.mixer.requires_grad_(True)
            module.lora_B[adapter_name] = mixed
            count += 1
    return count


def apply_adapter(model: nn.Module, variant: str, rank: int, alpha: float, dropout: float, target_modules: str, seed: int):
    """Freeze ``model`` and attach a trainable adapter of ``variant``; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    targets: Any = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
        **VARIANTS.get(variant).peft_options,
    )
    torch.manual_seed(seed)  # peft draws A with the global generator
    peft_model = get_peft_model(model, config)
    if variant == "moslora":
        add_moslora_mixers(peft_model, seed=seed)
    return peft_model


def merged_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain transformers model with adapters folded in, in ``dtype`` if given (the input is left untouched)."""
    import copy

    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    elif dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        model = copy.deepcopy(model)
    return model if dtype is None else model.to(dtype)
