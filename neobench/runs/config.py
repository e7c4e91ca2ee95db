"""Run configuration: a frozen dataclass, filled from a preset YAML, then CLI flags.

    preset YAML  ->  RunConfig  ->  dataclasses.replace(cfg, **cli_flags)  ->  validate()

Every field carries a docstring (shown by ``neobench list --fields``). Unknown keys, wrong types
and out-of-range values are errors that name the field.
"""

from __future__ import annotations

import dataclasses
import shutil
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from neobench.core.errors import NeobenchError
from neobench.core.registry import Registry
from neobench.models.loading import EMBEDDED_TEACHER

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class RunConfig:
    # --- what to train -------------------------------------------------------------------
    preset: str = "smol-cpu"
    """Name of the preset this config came from (recorded with the run)."""
    method: str = "neo"
    """Training method: sft, lora, kd, neo, minillm (see `neobench list`)."""
    variant: Optional[str] = None
    """Adapter variant for adapter methods (lora, dora, pissa, rslora, moslora); None means lora."""
    loss: str = "forward_kl"
    """Divergence D(teacher || student) used by KD methods."""

    # --- models ----------------------------------------------------------------------------
    teacher: str = EMBEDDED_TEACHER
    """Teacher: hub id, local directory, .gguf file, or the embedded smollm2-135m-instruct."""
    student: str = "pruned:15"
    """Student: hub id, local directory, .gguf file, or pruned:N (teacher depth-pruned to N layers)."""

    # --- data -----------------------------------------------------------------------------
    train_data: str = "magpie-smollm2"
    """Training data: a packaged data set name, a .jsonl/.json/.parquet file, or a hub id (id or id:config)."""
    train_split: str = "train"
    """Split of the training data (packaged sets: train or heldout; hub sets: any split)."""
    max_examples: Optional[int] = None
    """Use only the first N rows of the training data (None: all)."""
    seq_len: int = 256
    """Tokens per example; longer examples are truncated."""

    # --- budget (identical for every method in a comparison) -------------------------------
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 0
    """Optimizer steps; 0 means one epoch over the training data."""
    max_wall_seconds: float = 0.0
    """Stop training after this many seconds (0: no cap); the run records that it was capped."""

    # --- optimisation ---------------------------------------------------------------------
    lr: float = 2e-5
    """Learning rate of full fine-tuning methods (sft, kd)."""
    adapter_lr: Optional[float] = None
    """Learning rate of adapter methods (lora, neo); None means 10 x lr, the LLM-Neo guideline."""
    lr_scale: float = 1.0
    """Multiplies the method's learning rate (lr, or adapter_lr for adapters). 1 is the paper's protocol
    (one fixed rate per family); the tuned protocol takes each method's from ablations/tune-lr.yaml."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warm-up before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: no clipping)."""
    optimizer: str = "adamw"
    """Optimizer of the trained weights: adamw, or sgd (plain; what the multi-process equality tests use)."""

    # --- adapters -------------------------------------------------------------------------
    rank: int = 16
    """Adapter rank r."""
    alpha: Optional[float] = None
    """Adapter scaling alpha; None means 2 x rank."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: str = "all-linear"
    """Which linear layers get adapters: all-linear (every decoder linear layer) or a comma-separated list."""

    # --- distillation ---------------------------------------------------------------------
    kd_ratio: float = 0.5
    """lambda in (1 - lambda) * CE + lambda * KD."""
    temperature: float = 1.0
    """Softmax temperature of the KD term; the term is scaled by T^2 so its gradients keep their size."""
    jsd_beta: float = 0.5
    """beta of --loss jsd: beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s; 0 = forward KL, 1 = reverse KL."""
    skew_alpha: float = 0.1
    """alpha of --loss skew_forward_kl / skew_reverse_kl (DistiLLM's default 0.1); 0 = plain KL."""
    akl_mu: float = 0.5
    """mu of --loss akl: the teacher's head is its most likely tokens up to this cumulative probability (the authors' 0.5)."""
    teacher_cache: str = "off"
    """Teacher outputs cached across runs: off, dense (fp16 log-probs) or topk:K (K largest + remaining mass)."""
    minillm_max_new_tokens: int = 64
    """minillm: tokens the student samples per prompt (its responses are capped there)."""
    minillm_temperature: float = 1.0
    """minillm: sampling temperature of the student's responses."""
    minillm_gold_fraction: float = 0.25
    """minillm: share of each micro-batch whose reverse-KL term uses the gold response instead of a sample."""
    minillm_ce_weight: float = 1.0
    """minillm: weight of CE on the gold responses added to the reverse KL."""
    loss_chunk_tokens: int = 256
    """Tokens per chunk of the fused projection + loss: bounds its fp32 tokens-by-vocabulary tiles; 0 = one chunk."""

    # --- evaluation (lm-evaluation-harness) -----------------------------------------------
    eval_tasks: str = "neo_suite"
    """Comma-separated tasks scored after training: neo_suite (the offline suite), its tasks, any lm-eval task, or none."""
    eval_limit: Optional[int] = None
    """Documents per task (the first N); None: all."""
    eval_num_fewshot: Optional[int] = None
    """Few-shot examples per prompt; None: each task's default."""
    eval_batch_size: int = 8
    """Sequences per forward pass during evaluation."""
    eval_generation_batch_size: int = 32
    """Sequences generated at once by generation tasks (neo_heldout_rougeL): decoding a token costs much the
    same for 8 sequences as for 32 on a CPU, while the log-likelihood tasks are fastest at eval_batch_size."""
    eval_chat_template: bool = True
    """Wrap evaluation prompts in the model's chat template (as in training), when it has one."""
    eval_data: str = "magpie-smollm2"
    """Held-out prompts and responses of the neo_* tasks: a packaged data set or a file (any training row format)."""
    eval_split: str = "test"
    """Split of eval_data. A packaged set's held-out file is two fixed halves: test (the leaderboard) and
    validation (what ablations and learning-rate tuning select on); see neobench.data.examples.HELDOUT_PARTS."""

    # --- system ---------------------------------------------------------------------------
    seed: int = 0
    """Seed for weights init of adapters and the order of examples."""
    device: str = "auto"
    """auto, cpu or cuda[:N]."""
    dtype: str = "auto"
    """auto (bf16 where the device has native bf16: CUDA, CPUs with AVX-512 BF16 or AMX; else fp32), float32 or bfloat16 (mixed precision, see neobench.models.precision)."""
    strategy: str = "ddp"
    """With several processes (torchrun): ddp (whole student per rank) or fsdp (FSDP2, sharded); see neobench.training.distributed."""
    compile: bool = False
    """torch.compile the decoders the training steps run (student forward and backward, the online teacher's
    forward): fused kernels, faster steps after a one-time compile of about 1-2.5 minutes on 2 CPU cores (less
    once inductor's on-disk cache holds the graphs). Pays on long runs; single process only. Evaluation stays eager."""
    save_every: int = 0
    """Write a checkpoint every K optimizer steps, and on SIGTERM/SIGINT, inside the unfinished run (0: none); `neobench run --resume RUN_ID` continues it."""
    runs_dir: str = "runs"
    """Where run directories are written."""
    save_weights: bool = True
    """Store the weights a run changed (adapters; all weights for sft/kd) so `neobench eval --run` can reload it."""
    log_to: str = "none"
    """Also log training scalars elsewhere while a run trains: none, or tensorboard (event files in RUN_DIR/tensorboard/)."""
    study: Optional[str] = None
    """Set by `neobench ablate`: the Optuna study this run is a trial of (None: not an ablation trial)."""
    trial: Optional[int] = None
    """Set by `neobench ablate`: the trial number within ``study``."""

    def effective_variant(self) -> Optional[str]:
        from neobench.training.methods import METHODS

        trains = METHODS.get(self.method).trains
        if trains == "adapter":
            return self.variant or "lora"
        return self.variant if trains == "either" else None

    def effective_lr(self) -> float:
        if self.effective_variant() is not None:
            family = self.adapter_lr if self.adapter_lr is not None else 10 * self.lr
        else:
            family = self.lr
        return family * self.lr_scale

    def effective_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    def loss_param(self) -> float:
        """The parameter of the chosen divergence (jsd_beta or skew_alpha), 0 if it has none."""
        from neobench.training.losses import DIVERGENCES

        field_name = DIVERGENCES.get(self.loss).param
        return getattr(self, field_name) if field_name else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = [f.name for f in fields(RunConfig)]
_HINTS = typing.get_type_hints(RunConfig)


def field_docs() -> dict[str, str]:
    """Field name -> its docstring, read from this module's source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(RunConfig))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = nxt.value.value
    return docs


def _coerce(name: str, value: Any) -> Any:
    hint = _HINTS[name]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None:
        if optional:
            return None
        raise NeobenchError(f"config field {name!r} cannot be empty; give a {base.__name__}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML reads 2e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise NeobenchError(f"config field {name!r} must be a {base.__name__}, got {value!r}")
    return value


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], source: str) -> RunConfig:
    """Return ``cfg`` with ``overrides`` applied; unknown keys name the valid ones."""
    unknown = sorted(set(overrides) - set(FIELD_NAMES))
    if unknown:
        raise NeobenchError(f"unknown config key {unknown[0]!r} in {source}; valid keys: {', '.join(FIELD_NAMES)}")
    return dataclasses.replace(cfg, **{k: _coerce(k, v) for k, v in overrides.items()})


PRESETS: Registry[Path] = Registry("preset")
for _path in sorted(PRESET_DIR.glob("*.yaml")):
    PRESETS.add(_path.stem, _path)


def load_preset(name_or_path: str) -> RunConfig:
    """A packaged preset by name, or any YAML file with RunConfig keys."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESETS.get(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise NeobenchError(f"preset {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise NeobenchError(f"preset {str(path)!r} must be a mapping of config keys to values")
    values.setdefault("preset", path.stem)
    return apply_overrides(RunConfig(), values, f"preset {str(path)!r}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check names against their registries and numbers against their ranges."""
    from neobench.models.adapters import VARIANTS
    from neobench.training.losses import DIVERGENCES
    from neobench.training.methods import METHODS

    method = METHODS.get(cfg.method)
    DIVERGENCES.get(cfg.loss)
    from neobench.models.precision import pick_dtype

    pick_dtype(cfg.dtype, "cpu")  # a bad name fails here, before anything loads
    from neobench.training.teacher_cache import CacheMode

    if CacheMode.parse(cfg.teacher_cache).kind == "topk" and cfg.loss == "uld":
        raise NeobenchError("--loss uld sorts the student's whole distribution, which a top-k teacher cache cannot give it; "
                            "use --teacher-cache hidden, dense or off")
    from neobench.training.distributed import STRATEGIES
    from neobench.training.optimizers import OPTIMIZERS

    STRATEGIES.get(cfg.strategy)
    OPTIMIZERS.get(cfg.optimizer)
    if method.on_policy and cfg.strategy == "fsdp":
        raise NeobenchError("minillm samples with generate(), which neobench does not run under FSDP; use --strategy ddp")
    if cfg.variant is not None:
        VARIANTS.get(cfg.variant)
        if method.trains == "all":
            raise NeobenchError(
                f"--variant {cfg.variant} needs an adapter method, but {cfg.method!r} trains all weights; "
                f"use --method lora, neo or minillm"
            )
    checks = [
        ("seq_len", cfg.seq_len >= 8, "at least 8"),
        ("batch_size", cfg.batch_size >= 1, "at least 1"),
        ("grad_accum", cfg.grad_accum >= 1, "at least 1"),
        ("max_steps", cfg.max_steps >= 0, "0 (one epoch) or more"),
        ("max_examples", cfg.max_examples is None or cfg.max_examples >= 1, "at least 1"),
        ("max_wall_seconds", cfg.max_wall_seconds >= 0, "0 (no cap) or more"),
        ("lr", cfg.lr > 0, "positive"),
        ("adapter_lr", cfg.adapter_lr is None or cfg.adapter_lr > 0, "positive"),
        ("lr_scale", cfg.lr_scale > 0, "positive"),
        ("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "in [0, 1)"),
        ("weight_decay", cfg.weight_decay >= 0, "0 or more"),
        ("max_grad_norm", cfg.max_grad_norm >= 0, "0 (off) or more"),
        ("save_every", cfg.save_every >= 0, "0 (no checkpoints) or more"),
        ("rank", cfg.rank >= 1, "at least 1"),
        ("alpha", cfg.alpha is None or cfg.alpha > 0, "positive"),
        ("dropout", 0 <= cfg.dropout < 1, "in [0, 1)"),
        ("kd_ratio", 0 <= cfg.kd_ratio <= 1, "in [0, 1]"),
        ("temperature", cfg.temperature > 0, "positive"),
        ("jsd_beta", 0 <= cfg.jsd_beta <= 1, "in [0, 1]"),
        ("skew_alpha", 0 <= cfg.skew_alpha < 1, "in [0, 1)"),
        ("akl_mu", 0 < cfg.akl_mu < 1, "in (0, 1)"),
        ("loss_chunk_tokens", cfg.loss_chunk_tokens >= 0, "0 (one chunk) or more"),
        ("minillm_max_new_tokens", cfg.minillm_max_new_tokens >= 1, "at least 1"),
        ("minillm_temperature", cfg.minillm_temperature > 0, "positive"),
        ("minillm_gold_fraction", 0 <= cfg.minillm_gold_fraction <= 1, "in [0, 1]"),
        ("minillm_ce_weight", cfg.minillm_ce_weight >= 0, "0 or more"),
        ("eval_limit", cfg.eval_limit is None or cfg.eval_limit >= 1, "at least 1"),
        ("eval_generation_batch_size", cfg.eval_generation_batch_size >= 1, "at least 1"),
        ("eval_num_fewshot", cfg.eval_num_fewshot is None or cfg.eval_num_fewshot >= 0, "0 or more"),
        ("eval_batch_size", cfg.eval_batch_size >= 1, "at least 1"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise NeobenchError(f"config field {name!r} must be {expected}, got {getattr(cfg, name)!r}")
    check_log_to(cfg.log_to)
    if cfg.compile and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise NeobenchError("--compile needs a C++ compiler for inductor's kernels: `apt-get install g++`, or leave --compile out")
    return cfg


LOG_TARGETS = ("none", "tensorboard")


def check_log_to(target: str) -> None:
    """A known target whose package is installed (a missing one fails before training, not after)."""
    import importlib.util

    if target not in LOG_TARGETS:
        raise NeobenchError(f"unknown --log-to {target!r}; valid: {', '.join(LOG_TARGETS)}")
    if target == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise NeobenchError(
            "--log-to tensorboard needs the tensorboard package: pip install 'neobench[tensorboard]' (or pip install tensorboard)"
        )
