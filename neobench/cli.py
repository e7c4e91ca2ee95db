"""The `neobench` command line: each command parses its options and calls one function of
neobench.commands, which does the work through the stages below it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from neobench.core.errors import NeobenchError
from neobench.core.progress import console

app = typer.Typer(
    help="neobench: train and compare LLM-Neo (LoRA + KD) and its distillation baselines under one budget.",
    no_args_is_help=True, pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make training data.", no_args_is_help=True)
student_app = typer.Typer(help="Make students from teachers.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(student_app, name="student")

WHAT, MODELS, DATA, BUDGET, OPTIM, ADAPTER, KD, MINILLM, EVAL, SYSTEM = (
    "What to train", "Models", "Data", "Budget (shared by every method)", "Optimisation", "Adapter",
    "Distillation", "MiniLLM (on-policy)", "Evaluation (lm-evaluation-harness)", "System",
)
SCALE = "Processes and checkpoints"
TASKS_HELP = "Comma-separated: neo_suite (the offline suite), its tasks, any lm-eval task (arc_easy, mmlu, ...), or none."


@app.command()
def run(
    preset: str = typer.Option("smol-cpu", help="Preset name (see `neobench list`) or path to a preset YAML.", rich_help_panel=WHAT),
    method: Optional[str] = typer.Option(None, help="sft, lora, kd, neo or minillm. Omit (with --variant) for the whole matrix.", rich_help_panel=WHAT),
    variant: Optional[str] = typer.Option(None, help="Adapter variant: lora, dora, pissa, rslora, moslora. Alone it means --method neo.", rich_help_panel=WHAT),
    seeds: int = typer.Option(1, min=1, help="Repeat every run with seeds seed, seed+1, ...", rich_help_panel=WHAT),
    loss: Optional[str] = typer.Option(None, help="Divergence of the KD term: forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd, akl; across two tokenizers: uld, shared_vocab_kl.", rich_help_panel=WHAT),
    teacher: Optional[str] = typer.Option(None, help="Hub id, directory, .gguf file or smollm2-135m-instruct.", rich_help_panel=MODELS),
    student: Optional[str] = typer.Option(None, help="Hub id, directory, .gguf file or pruned:N.", rich_help_panel=MODELS),
    train_data: Optional[str] = typer.Option(None, help="Packaged data set, .jsonl/.json/.parquet file, or hub id[:config].", rich_help_panel=DATA),
    train_split: Optional[str] = typer.Option(None, help="Split of the training data.", rich_help_panel=DATA),
    max_examples: Optional[int] = typer.Option(None, help="Use the first N rows only.", rich_help_panel=DATA),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per example (longer ones are truncated).", rich_help_panel=DATA),
    batch_size: Optional[int] = typer.Option(None, help="Examples per micro-batch.", rich_help_panel=BUDGET),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step.", rich_help_panel=BUDGET),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (0: one epoch).", rich_help_panel=BUDGET),
    budgets: Optional[str] = typer.Option(None, help="Train the plan at several budgets, e.g. 12,48,192,E (optimizer steps; E: one epoch of the training data). Each run gets its own schedule (10 percent warm-up, cosine to the end of its budget), never a prefix of a longer run.", rich_help_panel=BUDGET),
    max_wall_seconds: Optional[float] = typer.Option(None, help="Stop training after this many seconds (0: no cap).", rich_help_panel=BUDGET),
    lr: Optional[float] = typer.Option(None, help="Learning rate of full fine-tuning (sft, kd).", rich_help_panel=OPTIM),
    adapter_lr: Optional[float] = typer.Option(None, help="Learning rate of adapter methods (default 10 x --lr).", rich_help_panel=OPTIM),
    lr_scale: Optional[float] = typer.Option(None, help="Multiply the method's learning rate by this.", rich_help_panel=OPTIM),
    skip_done: bool = typer.Option(False, "--skip-done", help="Leave out runs whose exact configuration (seed included) already finished under --runs-dir: a long matrix stopped half-way continues where it was.", rich_help_panel=WHAT),
    protocol: str = typer.Option("paper", help="paper: each family's fixed rate (the preset's); tuned: each method at the lr_scale the tune-lr study (tune-lr-variants for LLM-Neo's adapter variants; tune-lr-epoch at one epoch: each run takes the tuning nearest its budget) chose on the validation split (run `neobench ablate tune-lr --runs-dir RUNS_DIR` first; without any tuning study there, the choices of the tuning trials in the committed leaderboards/<preset>/results.jsonl).", rich_help_panel=OPTIM),
    warmup_ratio: Optional[float] = typer.Option(None, help="Fraction of steps of linear warm-up before cosine decay.", rich_help_panel=OPTIM),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay.", rich_help_panel=OPTIM),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient clipping norm (0: off).", rich_help_panel=OPTIM),
    optimizer: Optional[str] = typer.Option(None, help="adamw (default) or sgd.", rich_help_panel=OPTIM),
    rank: Optional[int] = typer.Option(None, help="Adapter rank.", rich_help_panel=ADAPTER),
    alpha: Optional[float] = typer.Option(None, help="Adapter alpha (default 2 x rank).", rich_help_panel=ADAPTER),
    dropout: Optional[float] = typer.Option(None, help="Adapter dropout.", rich_help_panel=ADAPTER),
    target_modules: Optional[str] = typer.Option(None, help="all-linear or comma-separated module names.", rich_help_panel=ADAPTER),
    kd_ratio: Optional[float] = typer.Option(None, help="lambda in (1-lambda)*CE + lambda*KD.", rich_help_panel=KD),
    temperature: Optional[float] = typer.Option(None, help="KD softmax temperature (term scaled by T^2).", rich_help_panel=KD),
    jsd_beta: Optional[float] = typer.Option(None, help="beta of --loss jsd (0: forward KL, 1: reverse KL).", rich_help_panel=KD),
    skew_alpha: Optional[float] = typer.Option(None, help="alpha of the skew KLs (DistiLLM; default 0.1).", rich_help_panel=KD),
    akl_mu: Optional[float] = typer.Option(None, help="mu of --loss akl: the teacher's head holds its top tokens up to this cumulative probability (default 0.5).", rich_help_panel=KD),
    loss_chunk_tokens: Optional[int] = typer.Option(None, help="Tokens per chunk of the fused projection + loss (bounds its fp32 tokens-by-vocabulary tiles; 0: one chunk).", rich_help_panel=KD),
    teacher_cache: Optional[str] = typer.Option(None, help="Reuse teacher outputs across runs: off, hidden (its last hidden states: the online losses; smol-cpu's), dense or topk:K (log-probabilities: approximate).", rich_help_panel=KD),
    minillm_max_new_tokens: Optional[int] = typer.Option(None, help="Tokens the student samples per prompt.", rich_help_panel=MINILLM),
    minillm_temperature: Optional[float] = typer.Option(None, help="Sampling temperature of the student.", rich_help_panel=MINILLM),
    minillm_gold_fraction: Optional[float] = typer.Option(None, help="Share of each micro-batch that keeps its gold response.", rich_help_panel=MINILLM),
    minillm_ce_weight: Optional[float] = typer.Option(None, help="Weight of CE on the gold responses.", rich_help_panel=MINILLM),
    tasks: Optional[str] = typer.Option(None, help=TASKS_HELP, rich_help_panel=EVAL),
    limit: Optional[int] = typer.Option(None, help="Documents per task (the first N).", rich_help_panel=EVAL),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples per prompt (default: each task's own).", rich_help_panel=EVAL),
    eval_batch_size: Optional[int] = typer.Option(None, help="Sequences per forward pass when evaluating.", rich_help_panel=EVAL),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Wrap evaluation prompts in the chat template (default: on).", show_default=False, rich_help_panel=EVAL),
    eval_data: Optional[str] = typer.Option(None, help="Held-out prompts/responses of the neo_* tasks (packaged set or file).", rich_help_panel=EVAL),
    eval_split: Optional[str] = typer.Option(None, help="Split of --eval-data.", rich_help_panel=EVAL),
    seed: Optional[int] = typer.Option(None, help="Seed of adapter init and example order.", rich_help_panel=SYSTEM),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda[:N].", rich_help_panel=SYSTEM),
    dtype: Optional[str] = typer.Option(None, help="auto (bf16 where the device computes it natively: CUDA, CPUs with AVX-512 BF16/AMX; else fp32), float32 or bfloat16 (mixed precision: fp32 master weights and losses).", rich_help_panel=SYSTEM),
    runs_dir: Optional[str] = typer.Option(None, help="Where run directories are written (default: runs).", rich_help_panel=SYSTEM),
    nproc: int = typer.Option(1, min=1, help="Processes per run, launched with torchrun on this machine (one per GPU; gloo on CPU). Under torchrun, leave it out.", rich_help_panel=SCALE),
    strategy: Optional[str] = typer.Option(None, help="With several processes: ddp (whole student per rank) or fsdp (FSDP2, sharded).", rich_help_panel=SCALE),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every K steps and on SIGTERM/SIGINT (0: never); --resume continues.", rich_help_panel=SCALE),
    resume: Optional[str] = typer.Option(None, help="Continue the unfinished run RUN_ID (under --runs-dir) from its last checkpoint, as it was configured.", rich_help_panel=SCALE),
    compile_decoders: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the decoders training runs (a one-time compile of 1-2.5 minutes on 2 CPU cores, then faster steps; single process). Default: off.", show_default=False, rich_help_panel=SYSTEM),
    save_weights: Optional[bool] = typer.Option(None, "--save-weights/--no-save-weights", help="Store the trained weights for `neobench eval --run` and `neobench export` (default: on).", show_default=False, rich_help_panel=SYSTEM),
    log_to: Optional[str] = typer.Option(None, help="Also log training scalars while training: none or tensorboard (RUN_DIR/tensorboard/; needs `pip install tensorboard`).", rich_help_panel=SYSTEM),
    run_id: Optional[str] = typer.Option(None, hidden=True),
    optuna_trial: Optional[str] = typer.Option(None, hidden=True, help="Set by neobench ablate: the trial this run reports to (JSON)."),
):
    """Train students, record what each run consumed, and score them with lm-evaluation-harness.

    \b
    neobench run --variant dora          LLM-Neo with DoRA adapters on the default preset
    neobench run --method kd             one baseline
    neobench run                         the matrix: sft, lora, kd, neo under one budget
    neobench run --seeds 3               the matrix for seeds 0, 1, 2
    neobench run --budgets 12,48,192,E   the matrix at 4 budgets (E: one epoch)
    neobench run --method kd --nproc 2   one run on 2 processes (torchrun; same budget as 1 process)
    neobench run --save-every 50         checkpoints; after a kill: neobench run --resume RUN_ID

    Flags left out take the preset's values (`neobench list --fields` shows
    every field). Runs are written to RUNS_DIR/<run_id>/ (config.yaml,
    train_log.jsonl, metrics.json, trained_weights.safetensors, evaluations/).
    After training, the student, the teacher and the untrained student are
    scored on --tasks (reference scores are cached).

    Ctrl-C or SIGTERM stops a run at its next safe point and says in one
    line what was kept: after the step in progress a checkpoint
    (--save-every) or nothing; a finished run, unscored, when it lands
    after training. Exit code 130; a second Ctrl-C stops at once.
    """
    from neobench.commands.run import run_command

    flags = {
        "loss": loss, "teacher": teacher, "student": student, "train_data": train_data, "train_split": train_split,
        "max_examples": max_examples, "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum,
        "max_steps": max_steps, "max_wall_seconds": max_wall_seconds, "lr": lr, "adapter_lr": adapter_lr, "lr_scale": lr_scale,
        "warmup_ratio": warmup_ratio, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "rank": rank,
        "alpha": alpha, "dropout": dropout, "target_modules": target_modules, "kd_ratio": kd_ratio,
        "temperature": temperature, "jsd_beta": jsd_beta, "skew_alpha": skew_alpha, "akl_mu": akl_mu,
        "loss_chunk_tokens": loss_chunk_tokens, "teacher_cache": teacher_cache,
        "minillm_max_new_tokens": minillm_max_new_tokens, "minillm_temperature": minillm_temperature,
        "minillm_gold_fraction": minillm_gold_fraction, "minillm_ce_weight": minillm_ce_weight, "seed": seed, "device": device, "dtype": dtype, "runs_dir": runs_dir,
        "optimizer": optimizer, "strategy": strategy, "save_every": save_every, "compile": compile_decoders,
        "save_weights": save_weights, "log_to": log_to, "eval_data": eval_data, "eval_split": eval_split,
        **eval_flags(tasks, limit, num_fewshot, eval_batch_size, chat_template),
    }
    given = {k: v for k, v in flags.items() if v is not None}
    run_command(given, (method, variant, seeds, preset), protocol, skip_done, nproc, resume, runs_dir, run_id, optuna_trial, budgets)


def eval_flags(tasks, limit, num_fewshot, batch_size, chat_template) -> dict:
    return {
        "eval_tasks": tasks, "eval_limit": limit, "eval_num_fewshot": num_fewshot,
        "eval_batch_size": batch_size, "eval_chat_template": chat_template,
    }


@app.command("eval")
def eval_command(
    run: Optional[str] = typer.Option(None, "--run", help="A run id under --runs-dir, or a run directory."),
    model: Optional[str] = typer.Option(None, "--model", help="Any model: hub id, directory, .gguf file, smollm2-135m-instruct or pruned:N."),
    preset: str = typer.Option("smol-cpu", help="For --model: preset giving the teacher (for neo_fidelity), dtype and evaluation defaults."),
    tasks: Optional[str] = typer.Option(None, help=TASKS_HELP),
    limit: Optional[int] = typer.Option(None, help="Documents per task (the first N)."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples per prompt (default: each task's own)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per forward pass."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Wrap prompts in the chat template (default: on).", show_default=False),
    runs_dir: str = typer.Option("runs", help="Where --run looks for run ids."),
    out: Optional[Path] = typer.Option(None, help="Also write the results (JSON) to this file."),
):
    """Score a stored run's student, or any model, with lm-evaluation-harness.

    \b
    neobench eval --run RUN_ID                   re-score a run (its tasks; its preset's if it ran with --tasks none)
    neobench eval --run RUN_ID --tasks arc_easy  another task; stored beside the first
    neobench eval --model pruned:15 --limit 20   any model; results cached by content

    A run's scores go to RUN_DIR/evaluations/; --model results to the neobench
    cache (and --out).
    """
    from neobench.commands.evaluate import evaluate_command

    evaluate_command(run, model, preset, eval_flags(tasks, limit, num_fewshot, batch_size, chat_template), runs_dir, out)


@app.command()
def export(
    run: str = typer.Argument(..., help="A run id under --runs-dir, or a run directory."),
    out: Path = typer.Option(..., "--out", help="Directory to write (must not exist, or be empty)."),
    merged: bool = typer.Option(False, "--merged", help="Adapter runs: write a full model with the adapter merged in, not a peft adapter."),
    runs_dir: str = typer.Option("runs", help="Where RUN looks for run ids."),
):
    """Write a run's student where other tools load it: a peft adapter, or a transformers model.

    \b
    neobench export RUN_ID --out students/neo-dora            peft adapter (+ base_model/ if not on the Hub)
    neobench export RUN_ID --out students/neo-dora-merged --merged   one model: transformers, lm_eval --model hf

    Adapter runs give a plain LoRA adapter (PiSSA converted, MoSLoRA's mixer
    folded in); full-weight runs, and --merged, a save_pretrained directory with
    tokenizer and chat template. Both carry a model card (README.md) with the
    run's scores, and the run's config.
    """
    from neobench.commands.export import export_command

    export_command(run, runs_dir, out, merged)


@app.command()
def ablate(
    study: str = typer.Argument(..., help="A study in ablations/ (rank, kd_ratio, lr, variant, temperature, neo-hparams, tune-lr, tune-lr-variants, tune-lr-epoch) or a study YAML file."),
    trials: Optional[int] = typer.Option(None, min=1, help="Trials the study should hold when done (default: the study file's). Finished ones count."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: sqlite:///RUNS_DIR/ablations.db). A PostgreSQL/MySQL URL lets workers on many machines share one study."),
    workers: int = typer.Option(1, min=1, help="Local worker processes on the same storage; each trains one trial at a time."),
    study_name: Optional[str] = typer.Option(None, help="Name of the study in the storage (default: the study file's name)."),
    runs_dir: Optional[str] = typer.Option(None, help="Where trial runs are written (default: the preset's, runs)."),
    report_: bool = typer.Option(True, "--report/--no-report", help="Write leaderboards/<preset>/ablations/<study>.md and plots when done."),
    out: Path = typer.Option(Path("leaderboards"), help="Leaderboards directory for --report."),
    dtype: Optional[str] = typer.Option(None, help="Hold every trial at this dtype (auto, float32, bfloat16), as if the study file fixed it; part of the study's identity. Default: the study file's, else the preset's (auto)."),
    worker: int = typer.Option(0, "--worker", hidden=True, help="Set by --workers: this worker's number (1, 2, ...)."),
):
    """Run an Optuna study: every trial is a `neobench run` with the study's parameters.

    \b
    neobench ablate rank                     the rank sweep of ablations/rank.yaml
    neobench ablate kd_ratio --trials 8      8 trials (finished ones count: re-running continues)
    neobench ablate lr --workers 2           two local workers on one SQLite study
    neobench ablate neo-hparams --storage postgresql://host/db   workers on many machines
    neobench ablate rank --dtype float32     every trial in fp32, whatever the CPU

    Trials are ordinary run directories (tagged with study and trial) in
    RUNS_DIR. The study lives in --storage; running the command again continues
    it, and a trial whose process died is run again with the same parameters.
    Held-out NLL is reported every few steps, so a study with a median pruner
    stops poor trials early.
    """
    from neobench.commands.ablate import ablate_command

    ablate_command(study, trials, storage, workers, study_name, runs_dir, report_, out, dtype, worker)


@app.command()
def report(
    runs: Path = typer.Option(Path("runs"), help="Runs directory to collect (skipped when it holds no runs)."),
    out: Path = typer.Option(Path("leaderboards"), help="Leaderboards directory: one folder per preset."),
    format: str = typer.Option("md,csv,html,tex", "--format", help="Comma-separated table formats: md, csv, html, tex."),
    preset: Optional[str] = typer.Option(None, help="Only this preset (default: every preset found)."),
    replace: bool = typer.Option(False, "--replace", help="Rebuild each collected preset's rows from the runs under --runs alone (rows of runs that are not there are dropped)."),
):
    """Regenerate leaderboard tables and plots from stored runs.

    \b
    neobench report                        runs/ -> leaderboards/<preset>/
    neobench report --runs runs/matrix     another runs directory
    neobench report --format md,csv        fewer formats

    Runs under --runs are added to OUT/<preset>/results.jsonl (the tidy rows; a
    run already there is replaced; with --replace the runs under --runs become
    all of it), with their per-document scores in per_doc.csv, then every
    preset's tables and plots are rebuilt from these rows alone. Each student is
    compared with LoRA, KD and SFT on the same documents (paired bootstrap,
    Holm-corrected); the paper and tuned protocols get separate tables. Without
    runs (a fresh clone), the committed rows regenerate the committed files
    exactly. Only runs with one budget, one data hash and one config per method
    are compared; the others are listed as left out, with the reason.
    """
    from neobench.commands.report import report_command

    report_command(runs, out, format, preset, replace)


@app.command("list")
def list_entries(fields: bool = typer.Option(False, "--fields", help="Also list every config field with its meaning.")):
    """List methods, adapter variants, losses, evaluation tasks, presets and ablation studies."""
    from neobench.commands.listing import list_command

    list_command(fields)


@student_app.command("prune")
def student_prune(
    keep: int = typer.Option(..., help="Decoder layers to keep."),
    teacher: str = typer.Option("smollm2-135m-instruct", help="Model to prune."),
    data: str = typer.Option("magpie-smollm2", help="Calibration data (its first 64 training rows)."),
    split: str = typer.Option("train", help="Split of the calibration data."),
):
    """Depth-prune the teacher to KEEP layers by block influence (cached; `--student pruned:KEEP` uses it)."""
    from neobench.commands.prune import prune_command

    prune_command(keep, teacher, data, split)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(None, help="Output directory (default: the packaged magpie-smollm2 data set)."),
    teacher: str = typer.Option("smollm2-135m-instruct", help="Model that writes the data."),
    n_train: int = typer.Option(2000, help="Training examples to keep."),
    n_heldout: int = typer.Option(200, help="Held-out examples to keep."),
    seed: int = typer.Option(0, help="Generation seed; the same seed gives the same rows."),
    batch_size: int = typer.Option(48, help="Sequences generated at once."),
):
    """Synthesize instruction/response pairs from the teacher with Magpie (resumable)."""
    from neobench.commands.synth import synth_command

    synth_command(out, teacher, n_train, n_heldout, seed, batch_size)


def quiet_libraries() -> None:
    """Keep the terminal for neobench's own progress: no per-shard bars or deprecation chatter."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Bare tqdm bars (GGUF conversion, lm-eval's context building) add noise, not information.
    # tqdm reads this when first imported, which is after this point; bars that pass disable=
    # explicitly (lm-eval's request loop, with its ETA) still show.
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*tensor.detach.*")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def main():
    quiet_libraries()
    try:
        app()
    except NeobenchError as err:
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
