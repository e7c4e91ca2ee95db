"""neobench side by side with TRL's distillation trainers on the same workload (a figure, not a test).

    python benchmarks/peers.py [--preset smol-cpu] [--steps 6] [--dtypes float32,bfloat16]
                               [--sides neo,kd,minillm] [--no-cache]

Needs TRL: `pip install -e '.[peers]'` (pinned). Every row trains in its own process, so its peak
memory is its own.

The workload, identical on both sides: the preset's student and teacher, the first N = steps x
batch x accumulation examples of its training data through the student's chat template (the token
ids neobench trains on, handed to TRL pre-tokenized), in neobench's seeded order, so that every
optimizer step sees the same examples on both sides; batch 4 x 2 micro-batches, the preset's max
length, learning rate, cosine schedule with 10% warm-up, no weight decay, gradient clipping at 1,
no dropout, no gradient checkpointing, forward KL(teacher || student) at temperature 1. Two things
stay each tool's own: padding (neobench sorts a step's 8 examples by length before cutting them
into micro-batches; GKDTrainer pads each micro-batch of 4 in the data order to its longest;
DistillationTrainer pads all 8 to the longest prompt plus the longest completion), and the first
warm-up step's rate (transformers gives it 0, neobench half the peak: no effect on the timing or on
the step-1 loss).

Sides:
  neo   LoRA r=32 on all linear layers, alpha 64 (the preset's adapter):
          neobench `run --method neo` (teacher online; and, as a separate row, with a complete
          hidden-state teacher cache, which TRL has no counterpart for)
          TRL GKDTrainer, off-policy (lmbda=0, beta=0: forward KL, no generation)
          TRL DistillationTrainer, beta=0. TRL 1.13 gives it no off-policy switch (it samples a
          completion from the student every step); the subclass below hands it the data set's
          completions instead, so it trains on the same tokens as the others. (The issue asked for
          loss_top_k=0, lmbda=0: those fields are not in TRL 1.13's DistillationConfig.)
  kd    the same student trained fully: neobench `run --method kd` against GKDTrainer without peft.
  minillm  (not in the default --sides) on-policy: the fully trained student samples up to 64 tokens
        per prompt at temperature 1, and reverse KL(student || teacher) is taken on its samples.
        neobench `run --method minillm --minillm-gold-fraction 0` (every example sampled, as TRL
        does) against TRL's DistillationTrainer in its own on-policy mode (beta=1). Samples differ
        between tools, so tokens/s, FLOP/s and the loss are left out of this row: s/step and memory.
        neobench's step also runs a teacher-forced pass over the gold responses (its CE term, weight
        1), which TRL's does not: neobench does more work per step here.

Precision: neobench in each of --dtypes (bfloat16: the frozen teacher and adapter base held in
bf16, trained weights fp32 with bf16 autocast). TRL beside each: float32 (bf16=False), and for
bfloat16 its own default (bf16=True, which TRL sets by default: accelerate's bf16 autocast over
fp32 weights). DistillationTrainer's loss calls the models' bare forwards, which escape
accelerate's autocast wrapper, so with bf16=True it would still compute in fp32 (TRL 1.13); the
subclasses below run its loss under the accelerator's autocast, as bf16=True means. The
"compute" column is measured, not assumed: the dtype of the first q_proj output of each model
during training.

Objectives differ in two ways the loss column shows:
  * neo and kd optimise (1 - kd_ratio) CE + kd_ratio KL; TRL's trainers only the KL. The table gives
    neobench's KL term beside TRL's loss: at step 1 both models are the same, so they should agree
    to about 1% in fp32.
  * neobench averages over response tokens (the assistant's span, its end-of-turn token included);
    TRL over every token after the prompt, which adds the template's trailing newline (one token
    per example, predicted almost surely, so it pulls TRL's mean down by about 1 / response length).
  bf16 rows differ further by rounding.

--compile (default both): every neobench row also as `run --compile` (every side): the student's
decoder, and the online teacher's, through torch.compile. Its one-time compile lands in step 1,
which the timing leaves out and the "step 1" column shows: 1-2.5 minutes from cold on 2 CPU cores,
less when inductor's on-disk cache (/tmp/torchinductor_$USER) already holds the graphs from an
earlier run, so that column depends on what ran before. --compile off gives the eager rows only
(about 9 minutes instead of 37 on 2 cores).

Columns: the first step's seconds (one-off start-up work: compiling, first-touch allocation), seconds per optimizer step (median of steps 2..N; each step timed from the end of the
one before, so batching and logging count on both sides), response tokens per second over steps
2..N (the same response tokens on both sides), peak RSS during training (the same measure on both
sides: neobench.training.memory.PeakMemory, reset after the models are loaded), useful GFLOP/s over
steps 2..N (benchmarks/step_cost.py's count) and its share of the matmul limit of the compute
dtype, measured in this run (benchmarks/matmul_limit.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_PRECISION = {"float32": "float32", "bfloat16": "default"}
"""TRL's precision beside each neobench dtype: bf16=False, or its own default (bf16=True: autocast
over fp32 weights)."""
TRAINER_NAMES = {"gkd": "GKDTrainer", "distillation": "DistillationTrainer", "onpolicy": "DistillationTrainer, on-policy"}


# --- the workload, shared by both sides ---------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The examples both sides train on, in the order both consume them."""

    config: object  # neobench RunConfig
    student_path: str
    teacher_path: str
    tokenizer: object
    examples: list  # neobench Example (input_ids, labels), in training order

    @property
    def per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accum

    def response_tokens(self, step: int) -> int:
        """Response tokens of optimizer step ``step`` (1-based): what both sides' losses score."""
        from neobench.data.examples import IGNORE_INDEX

        chunk = self.examples[(step - 1) * self.per_step : step * self.per_step]
        return sum(sum(1 for label in ex.labels[1:] if label != IGNORE_INDEX) for ex in chunk)

    def trl_rows(self) -> list[dict]:
        """The examples as TRL takes them pre-tokenized: the ids split at the first response token."""
        from neobench.training.onpolicy import prompt_of

        rows = []
        for ex in self.examples:
            start = len(prompt_of(ex))  # the prompt neobench's own on-policy method samples after
            ids = list(ex.input_ids)
            rows.append({
                # on-policy, TRL tokenizes this prompt and samples after it; otherwise the ids below are all it reads
                "prompt": self.tokenizer.decode(ids[:start]),
                "input_ids": ids, "attention_mask": [1] * len(ids), "completion_mask": [0] * start + [1] * (len(ids) - start),
                "prompt_ids": ids[:start], "completion_ids": ids[start:],
            })
        return rows


def workload_config(preset: str, method: str, steps: int, dtype: str, **overrides):
    from neobench.runs.config import apply_overrides, load_preset

    cfg = load_preset(preset)
    n = steps * cfg.batch_size * cfg.grad_accum
    return apply_overrides(cfg, {"method": method, "max_steps": steps, "max_examples": n, "dtype": dtype,
                                 "eval_tasks": "none", **overrides}, "benchmarks/peers.py")


def build_workload(cfg) -> Workload:
    """neobench's own data path (tokenizer, chat template, labels) and its seeded example order."""
    from neobench.data.examples import example_order
    from neobench.training.workspace import prepare

    ws = prepare(cfg)
    order = example_order(len(ws.data.examples), cfg.max_steps * cfg.batch_size * cfg.grad_accum, cfg.seed)
    return Workload(cfg, ws.student_path, ws.teacher_path, ws.tokenizer, [ws.data.examples[i] for i in order])


# --- TRL, in a process of its own ---------------------------------------------------------------


def distillation_trainer_class(dataset_completions: bool):
    from trl import DistillationTrainer

    class AutocastDistillationTrainer(DistillationTrainer):
        """bf16=True as TRL means it: the loss path calls the models' bare forwards, which escape
        accelerate's autocast wrapper (TRL 1.13), so the loss runs under the accelerator's autocast
        (a no-op with bf16=False)."""

        def compute_loss(self, *args, **kwargs):
            with self.accelerator.autocast():
                return super().compute_loss(*args, **kwargs)

    if not dataset_completions:
        return AutocastDistillationTrainer

    class DatasetCompletionsDistillationTrainer(AutocastDistillationTrainer):
        """TRL's DistillationTrainer with the data set's completions in place of sampled ones.

        TRL 1.13 has no off-policy mode for this trainer; replacing its sampling step is the one
        change, and everything after it (padding, teacher and student forward, chunked loss) is TRL's.
        """

        def _generate_and_score_completions(self, inputs):
            self._rows = inputs
            return super()._generate_and_score_completions(inputs)

        def _generate(self, prompts):
            return [r["prompt_ids"] for r in self._rows], [r["completion_ids"] for r in self._rows], None, None, []

    return DatasetCompletionsDistillationTrainer


def build_trl_trainer(spec: dict, work: Workload):
    """TRL's trainer for `spec` (trainer: gkd | distillation, training: lora | full, precision) on `work`."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    cfg, steps = work.config, work.config.max_steps
    if spec["trainer"] not in TRAINER_NAMES:
        raise ValueError(f"unknown TRL trainer {spec['trainer']!r}; valid: {', '.join(TRAINER_NAMES)}")
    # What the TRL side below can mirror: GKDTrainer's loss has no temperature, and the adapter is plain LoRA
    if cfg.temperature != 1.0 or (spec["training"] == "lora" and cfg.effective_variant() != "lora"):
        raise SystemExit("benchmarks/peers.py mirrors temperature 1 and plain LoRA only; "
                         f"the preset has temperature {cfg.temperature}, variant {cfg.effective_variant()}")
    torch.manual_seed(cfg.seed)
    student = AutoModelForCausalLM.from_pretrained(work.student_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(work.teacher_path, dtype=torch.float32)
    tokenizer = work.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    targets = cfg.target_modules if cfg.target_modules == "all-linear" else [m.strip() for m in cfg.target_modules.split(",")]
    peft_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.effective_alpha(), lora_dropout=cfg.dropout,
                             target_modules=targets, task_type="CAUSAL_LM") if spec["training"] == "lora" else None
    common = dict(
        output_dir=spec["output_dir"], per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_steps=steps, learning_rate=cfg.effective_lr(),
        lr_scheduler_type="cosine", warmup_steps=math.ceil(cfg.warmup_ratio * steps), weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed,
        gradient_checkpointing=False, use_cpu=True, bf16=spec["precision"] == "default", dataloader_num_workers=0,
        disable_dropout=True, remove_unused_columns=False, temperature=cfg.temperature, beta=0.0,
    )
    dataset = datasets.Dataset.from_list(work.trl_rows())
    if spec["trainer"] == "onpolicy":  # TRL's own mode: sample, then reverse KL on the samples
        from trl import DistillationConfig

        common.update(beta=1.0, temperature=cfg.minillm_temperature)
        args = DistillationConfig(**common, shuffle_dataset=False, max_completion_length=cfg.minillm_max_new_tokens)
        return distillation_trainer_class(dataset_completions=False)(
            model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer,
            peft_config=peft_config)
    if spec["trainer"] == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, lmbda=0.0, seq_kd=False, max_length=cfg.seq_len, train_sampling_strategy="sequential")
        return GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    from trl import DistillationConfig

    args = DistillationConfig(**common, shuffle_dataset=False, max_completion_length=cfg.seq_len)
    return distillation_trainer_class(dataset_completions=True)(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                        processing_class=tokenizer, peft_config=peft_config)


def watch_compute_dtype(model) -> set:
    """The dtypes the model's first q_proj matmul (the base layer under an adapter) outputs from now on."""
    import torch

    seen: set = set()
    layer = next(m for name, m in model.named_modules()
                 if name.endswith(("q_proj", "q_proj.base_layer")) and type(m) is torch.nn.Linear)
    layer.register_forward_hook(lambda module, args, out: seen.add(str(out.dtype).removeprefix("torch.")))
    return seen


def trl_train(spec: dict) -> dict:
    """Train with TRL as `spec` says; seconds per step, the first logged loss, peak RSS during training."""
    from transformers import TrainerCallback

    from neobench.training.memory import PeakMemory

    class StepClock(TrainerCallback):
        """Each step from the end of the one before (the first from the start of training), so the
        batch fetching and logging between steps count, as in neobench's log."""

        def __init__(self):
            self.seconds, self.losses = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    work = build_workload(workload_config(spec["preset"], spec["method"], spec["steps"], "float32"))
    trainer = build_trl_trainer(spec, work)
    clock = StepClock()
    trainer.add_callback(clock)
    student_dtypes, teacher_dtypes = watch_compute_dtype(trainer.model), watch_compute_dtype(trainer.teacher_model)
    with PeakMemory("cpu") as memory:
        trainer.train()
    # TRL's loss is the KL alone: both columns carry it
    return {"step_seconds": clock.seconds, "loss": clock.losses[0], "kl": clock.losses[0],
            "peak_memory_bytes": memory.peak_bytes(),
            "compute": {"student": sorted(student_dtypes), "teacher": sorted(teacher_dtypes)}}


# --- neobench, in a process of its own ----------------------------------------------------------


def neobench_train(preset: str, method: str, steps: int, dtype: str, runs_root: str, cache: str, compiled: bool = False) -> dict:
    cfg = workload_config(preset, method, steps, dtype)
    Path(runs_root).mkdir(parents=True, exist_ok=True)
    runs_dir = tempfile.mkdtemp(dir=runs_root)  # one run per folder: the run read back is this one
    cmd = [sys.executable, "-m", "neobench.cli", "run", "--preset", preset, "--method", method, "--dtype", dtype,
           "--max-steps", str(steps), "--max-examples", str(cfg.max_examples), "--tasks", "none",
           "--runs-dir", runs_dir, "--teacher-cache", cache]
    if method == "minillm":
        cmd += ["--minillm-gold-fraction", "0"]
    if compiled:
        cmd += ["--compile"]
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"neobench {method} ({dtype}) failed:\n{done.stderr[-2000:]}")
    (run,) = Path(runs_dir).iterdir()
    from benchmarks.step_cost import per_step, train_log

    log = train_log(run)
    metrics = json.loads((run / "metrics.json").read_text())
    # neobench's bf16: frozen weights held in bf16, the rest under bf16 autocast (README, precision)
    return {"step_seconds": per_step(log, "elapsed_s"), "loss": log[0]["loss"], "kl": log[0]["kd"],
            "peak_memory_bytes": metrics["cost"]["peak_memory_bytes"],
            "compute": {"student": [dtype], "teacher": [dtype]}}


def profile_row(spec: dict) -> str:
    """Where a row's time goes: torch.profiler's top operators by self CPU time over steps 2 and 3."""
    from torch.profiler import ProfilerActivity, profile, schedule

    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=0, active=2, repeat=1))
    if spec["tool"] == "neobench":
        from neobench.runs.execute import execute

        cfg = workload_config(spec["preset"], spec["method"], 3, spec["precision"], runs_dir=spec["output_dir"],
                              teacher_cache="off")
        with prof:
            execute(cfg, after_step=lambda *_: prof.step())
    else:
        from transformers import TrainerCallback

        class Step(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                prof.step()

        trainer = build_trl_trainer(spec, build_workload(workload_config(spec["preset"], spec["method"], 3, "float32")))
        trainer.add_callback(Step())
        with prof:
            trainer.train()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def trl_process(spec: dict, tmp: str) -> dict:
    """`trl_train` in a fresh Python process, so its peak memory is its own."""
    spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
    spec_file.write_text(json.dumps({**spec, "output_dir": str(Path(tmp) / "trl-out")}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    mode = "--profile-worker" if spec.get("profile") else "--worker"
    done = subprocess.run([sys.executable, __file__, mode, str(spec_file), str(out_file)], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{spec.get('tool', 'TRL')} {spec['trainer']} ({spec['training']}, {spec['precision']}) "
                         f"failed:\n{done.stderr[-3000:]}")
    return json.loads(out_file.read_text())


# --- the table ----------------------------------------------------------------------------------


@dataclass
class Row:
    tool: str
    trainer: str
    side: str
    precision: str
    result: dict

    @property
    def timed_steps(self) -> range:
        """Steps 2..N (1-based): the first carries one-off start-up work on both sides."""
        return range(2, len(self.result["step_seconds"]) + 1)

    def seconds(self) -> float:
        return statistics.median(self.result["step_seconds"][1:])

    def tokens_per_second(self, work: Workload) -> float:
        times = self.result["step_seconds"]
        return sum(work.response_tokens(s) for s in self.timed_steps) / sum(times[s - 1] for s in self.timed_steps)

    def compute(self) -> str:
        """What the matmuls ran in, e.g. "bfloat16" or "student float32, teacher bfloat16"."""
        student, teacher = ("/".join(self.result["compute"][k]) for k in ("student", "teacher"))
        return student if student == teacher else f"student {student}, teacher {teacher}"


def step_flops(work: Workload, steps: range, full: bool, teacher_runs: bool) -> float:
    """Useful FLOPs per step over `steps`, counted as benchmarks/step_cost.py counts them."""
    from transformers import AutoConfig

    from benchmarks.step_cost import forward_flops

    examples = [ex for s in steps for ex in work.examples[(s - 1) * work.per_step : s * work.per_step]]
    tokens = sum(len(ex.input_ids) for ex in examples) / len(steps)
    scored = sum(work.response_tokens(s) for s in steps) / len(steps)
    mean_length = tokens * len(steps) / len(examples)
    student, teacher = AutoConfig.from_pretrained(work.student_path), AutoConfig.from_pretrained(work.teacher_path)
    vocab = student.vocab_size
    total = forward_flops(student, tokens, scored, mean_length, vocab) * (3 if full else 2)
    if teacher_runs:
        total += forward_flops(teacher, tokens, scored, mean_length, vocab)
    return total


def parse_list(value: str, valid, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    wrong = [v for v in items if v not in valid]
    if not items or wrong:
        raise SystemExit(f"{what} takes a comma-separated list of {', '.join(valid)}; got {value!r}")
    return items


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] in ("--worker", "--profile-worker"):
        spec = json.loads(Path(sys.argv[2]).read_text())
        result = trl_train(spec) if sys.argv[1] == "--worker" else {"table": profile_row(spec)}
        Path(sys.argv[3]).write_text(json.dumps(result))
        return
    sys.path.insert(0, str(REPO))
    from neobench.models.precision import cpu_has_native_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smol-cpu")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per row (timing: median of steps 2..N)")
    parser.add_argument("--dtypes", default=None, help="neobench's dtypes (TRL runs beside each: float32, or its "
                        "bf16 default beside bfloat16); default float32 (+ bfloat16 where native)")
    parser.add_argument("--sides", default="neo,kd", help="comma-separated: neo (LoRA + KD), kd (full-weight KD), "
                        "minillm (on-policy, full weights)")
    parser.add_argument("--trainers", default="gkd,distillation", help="TRL trainers for the neo side (kd: gkd)")
    parser.add_argument("--no-cache", action="store_true", help="leave out neobench's teacher-cache row")
    parser.add_argument("--compile", default="both", choices=("off", "on", "both"),
                        help="neobench's rows eager (off), with `run --compile` (on), or each way (both)")
    parser.add_argument("--save", type=Path, help="also write the measured rows to this JSON file")
    parser.add_argument("--load", type=Path, help="print the table of rows saved by --save, without training")
    parser.add_argument("--profile", action="store_true", help="instead of the table: top operators of neobench's "
                        "neo and TRL's GKDTrainer (LoRA) in each of --dtypes, steps 2-3 under torch.profiler")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is left out of the timing)")
    dtypes = (parse_list(args.dtypes, TRL_PRECISION, "--dtypes") if args.dtypes
              else ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else []))
    sides = parse_list(args.sides, ("neo", "kd", "minillm"), "--sides")
    neo_trainers = parse_list(args.trainers, ("gkd", "distillation"), "--trainers")
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed; install the pinned peer with: pip install -e '.[peers]'") from None
    from benchmarks.matmul_limit import limits

    if args.load:
        saved = json.loads(args.load.read_text())
        print_table(saved["preset"], saved["steps"], saved["limit"], [Row(**row) for row in saved["rows"]])
        return
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            for dtype in dtypes:
                for tool, precision in (("neobench", dtype), ("TRL", TRL_PRECISION[dtype])):
                    print(f"... profiling {tool} neo {precision}", file=sys.stderr, flush=True)
                    spec = {"preset": args.preset, "method": "neo", "trainer": "gkd" if tool == "TRL" else "run",
                            "training": "lora", "precision": precision, "tool": tool, "profile": True}
                    table = trl_process(spec, tmp)["table"]
                    print(f"\n{tool} neo ({'GKDTrainer, ' if tool == 'TRL' else ''}{precision}), steps 2-3:\n{table}")
        return
    limit, _ = limits(args.preset)
    rows: list[Row] = []
    compiled_ways = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            for compiled in compiled_ways:
                flag = " --compile" if compiled else ""
                for dtype in dtypes:
                    print(f"... neobench {side} {dtype}{flag}", file=sys.stderr, flush=True)
                    rows.append(Row("neobench", f"run{flag}", side, dtype,
                                    neobench_train(args.preset, side, args.steps, dtype, f"{tmp}/runs", "off", compiled)))
                if side == "neo" and not args.no_cache:
                    for dtype in dtypes:
                        if compiled == compiled_ways[0]:  # entries do not depend on --compile: one fill serves both
                            print(f"... neobench {side} {dtype}, filling the teacher cache (untimed)", file=sys.stderr, flush=True)
                            neobench_train(args.preset, side, args.steps, dtype, f"{tmp}/runs", "hidden")
                        print(f"... neobench {side} {dtype}{flag}, teacher cache", file=sys.stderr, flush=True)
                        rows.append(Row("neobench", f"run{flag}, teacher cache", side, dtype,
                                        neobench_train(args.preset, side, args.steps, dtype, f"{tmp}/runs", "hidden", compiled)))
            trainers = {"neo": neo_trainers, "kd": ["gkd"], "minillm": ["onpolicy"]}[side]
            for trainer in trainers:
                for precision in (TRL_PRECISION[d] for d in dtypes):
                    print(f"... TRL {trainer} {side} {precision}", file=sys.stderr, flush=True)
                    spec = {"preset": args.preset, "method": side, "steps": args.steps, "trainer": trainer,
                            "training": "lora" if side == "neo" else "full", "precision": precision}
                    rows.append(Row(f"TRL {trl.__version__}", TRAINER_NAMES[trainer], side, precision,
                                    trl_process(spec, tmp)))
    if args.save:
        args.save.write_text(json.dumps({"preset": args.preset, "steps": args.steps, "limit": limit,
                                         "rows": [row.__dict__ for row in rows]}, indent=1))
    print_table(args.preset, args.steps, limit, rows)


def print_table(preset: str, steps: int, limit: dict, rows: list[Row]) -> None:
    from neobench.models.precision import cpu_bf16_kernel

    work = build_workload(workload_config(preset, "neo", steps, "float32"))
    print(f"\npreset {preset}: first {len(work.examples)} training examples, {steps} steps of batch "
          f"{work.config.batch_size} x {work.config.grad_accum} micro-batches, max length {work.config.seq_len}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, bf16 matmuls on {cpu_bf16_kernel()}; "
          f"matmul limit fp32 {limit['float32']:.0f}, bf16 {limit['bfloat16']:.0f} GFLOP/s\n")
    print("| side | tool | trainer | precision | compute | step 1 (s) | s/step | response tok/s | peak RSS (GiB) | GFLOP/s "
          "| share of limit | step-1 KL | step-1 loss |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        seconds, r = row.seconds(), row.result
        label = {"default": "default (bf16=True)"}.get(row.precision, row.precision)
        cells = [row.side, row.tool, row.trainer, label, row.compute(), f"{r['step_seconds'][0]:.1f}", f"{seconds:.2f}"]
        if row.side == "minillm":  # sampled sequences differ between tools: time and memory only
            cells += ["n/a", f"{r['peak_memory_bytes'] / 2**30:.2f}", "n/a", "n/a", "n/a", "n/a"]
        else:
            flops = step_flops(work, row.timed_steps, full=row.side == "kd", teacher_runs="teacher cache" not in row.trainer)
            achieved = flops / seconds / 1e9
            # held to the limit of the dtype its student's matmuls ran in
            ran = "bfloat16" if "bfloat16" in r["compute"]["student"] else "float32"
            cells += [f"{row.tokens_per_second(work):.0f}", f"{r['peak_memory_bytes'] / 2**30:.2f}", f"{achieved:.0f}",
                      f"{achieved / limit[ran]:.0%}", f"{r['kl']:.4f}", f"{r['loss']:.4f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nneobench / TRL, like with like (neobench float32 beside TRL float32, neobench bfloat16 beside TRL's "
          "default); speed = TRL's s/step over neobench's, memory = neobench's peak over TRL's:")
    for row in rows:
        for peer in rows:
            if row.tool == "neobench" and peer.tool != "neobench" and peer.side == row.side \
                    and peer.precision == TRL_PRECISION[row.precision]:
                print(f"  {row.side} {row.precision}: neobench {row.trainer} vs {peer.trainer}: "
                      f"speed {peer.seconds() / row.seconds():.2f}x, "
                      f"peak memory {row.result['peak_memory_bytes'] / peer.result['peak_memory_bytes']:.2f}x")

if __name__ == "__main__":
    main()
