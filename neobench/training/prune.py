"""Depth pruning by block influence: the default student is the teacher with half its layers.

ShortGPT (Men et al., 2024) scores each decoder layer by its block influence,
BI = 1 - E[cos(h_in, h_out)] over calibration tokens: a layer whose output is nearly its input
does little and can go. Minitron (Muralidharan et al., 2024) prunes its students from their
teachers the same way before distilling into them. We keep the N layers with the highest BI,
in their original order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from neobench.core.errors import NeobenchError
from neobench.data.examples import collate, load_training_data
from neobench.models.loading import atomic_directory, cache_dir, load_causal_lm, load_tokenizer, model_fingerprint

CALIBRATION_EXAMPLES = 64
CALIBRATION_SEQ_LEN = 256


def parse_pruned_spec(spec: str) -> int | None:
    """``pruned:N`` -> N; any other spec -> None."""
    if not spec.startswith("pruned:"):
        return None
    try:
        keep = int(spec.split(":", 1)[1])
    except ValueError:
        raise NeobenchError(f"student {spec!r} should be pruned:N with N a number of layers, e.g. pruned:15") from None
    if keep < 1:
        raise NeobenchError(f"student {spec!r} must keep at least one layer")
    return keep


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise NeobenchError(f"cannot depth-prune {type(model).__name__}: it has no model.layers list of decoder blocks")
    return layers


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """1 - mean cosine similarity between each layer's input and output hidden states.

    Averaged over the non-padding tokens of ``batches``. Hooks see the raw residual stream:
    ``output_hidden_states`` would not do, as its last entry has the final norm applied.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask: torch.Tensor | None = None

    def hook(index):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            sums[index] += cos[mask].double().sum()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        for batch in batches:
            mask = batch["attention_mask"].bool()
            count += int(mask.sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return (1.0 - sums / count).tolist()


def prune_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the decoder layers at indices ``keep`` (in place), fixing config and layer indices."""
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def pruned_student_dir(teacher_path: str, keep: int, data_spec: str, data_split: str) -> Path:
    """Build (once) and return the cached directory of the teacher pruned to ``keep`` layers."""
    tokenizer = load_tokenizer(teacher_path)
    data = load_training_data(tokenizer, data_spec, data_split, CALIBRATION_SEQ_LEN, CALIBRATION_EXAMPLES)
    key = hashlib.sha256(f"{model_fingerprint(teacher_path)}|{data.data_hash}|{keep}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"pruned-{Path(teacher_path).name}-L{keep}-{key}"
    if (out / "config.json").is_file():
        return out
    from neobench.core.progress import console

    console.print(f"pruning the teacher to {keep} layers by block influence on {len(data.examples)} examples (once; cached in {out})", highlight=False, soft_wrap=True)
    teacher = load_causal_lm(teacher_path, torch.float32, "cpu")
    n_layers = len(decoder_layers(teacher))
    if keep >= n_layers:
        raise NeobenchError(f"cannot prune the teacher to {keep} layers: it has only {n_layers}; pick pruned:N with N < {n_layers}")
    batches = [collate(data.examples[i : i + 8], tokenizer.pad_token_id) for i in range(0, len(data.examples), 8)]
    scores = block_influence(teacher, batches)
    kept = sorted(sorted(range(n_layers), key=lambda i: (-scores[i], i))[:keep])
    student = prune_layers(teacher, kept)
    card = {
        "teacher": teacher_path,
        "kept_layers": kept,
        "block_influence": [round(s, 6) for s in scores],
        "calibration": {"data": data_spec, "split": data_split, "examples": len(data.examples),
                        "seq_len": CALIBRATION_SEQ_LEN, "data_hash": data.data_hash},
        "parameters": sum(p.numel() for p in student.parameters()),
    }
    with atomic_directory(out) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prune_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out
