"""Tiny models and data written to a temp dir: no network, seconds per test.

The tokenizer is a 300-token byte-level BPE trained here with a ChatML template (the one
SmolLM2 uses); teacher (4 layers) and student (2 layers) are random Llama models sharing it.
The teacher's embedding is padded past the tokenizer (320 rows), as real checkpoints often are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# One intra-op thread in the test process and every process it starts (set before torch loads).
# The tiny models gain nothing from a second thread, and on a loaded machine, as CI's is, a
# second thread waits for a busy core at every parallel region. Measured on 2 AMX-BF16 cores with
# one busy: the embedded tests took 212 s with 2 threads and 58 s with 1 (41 s idle with 2).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails fast
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a tiny model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def tiny_rows(n: int = 24) -> list[dict]:
    """Simple, learnable conversations: adding small numbers."""
    rows = []
    for i in range(n):
        a, b = i % 5, (i * 3) % 7
        rows.append({"messages": [
            {"role": "user", "content": f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?"},
            {"role": "assistant", "content": f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."},
        ]})
    return rows


def make_tokenizer(out: Path, vocab_size: int = 300, corpus_extra: str = ""):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [json.dumps(r) for r in tiny_rows(64)] + [CHATML, "You are a tiny model.", corpus_extra] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def make_llama(out: Path, tokenizer_dir: Path, layers: int, vocab_rows: int, seed: int = 0) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Paths of a tiny teacher, student, tokenizer and data sets."""
    root = tmp_path_factory.mktemp("tiny")
    tok_dir = root / "tokenizer"
    tokenizer = make_tokenizer(tok_dir)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows(24)))
    return {
        "tokenizer": tok_dir,
        "vocab": len(tokenizer),
        "teacher": make_llama(root / "teacher", tok_dir, layers=4, vocab_rows=320, seed=1),
        "student": make_llama(root / "student", tok_dir, layers=2, vocab_rows=len(tokenizer), seed=2),
        "data": data,
    }


@pytest.fixture
def tiny_cfg(tiny, tmp_path):
    """A RunConfig on the tiny models, with a budget of a few seconds.

    fp32 on every CPU: `auto` would pick bf16 where it is native (AVX-512 BF16, AMX), and the tests
    built on this config state fp32 exactness (accumulation, processes, exports); bf16 has tests of
    its own that ask for it."""
    from neobench.runs.config import RunConfig

    return RunConfig(
        preset="tiny", teacher=str(tiny["teacher"]), student=str(tiny["student"]), train_data=str(tiny["data"]),
        seq_len=64, batch_size=4, grad_accum=1, max_steps=3, lr=1e-3, rank=4, runs_dir=str(tmp_path / "runs"),
        eval_tasks="none", eval_data=str(tiny["data"]), eval_split="train", eval_limit=6, eval_batch_size=4,
        dtype="float32",
    )


@pytest.fixture(autouse=True, scope="session")
def signals_arrive():
    """SIGINT handled as Python does by default, however pytest was started: a script's background
    job (`make test &`, nohup) starts with SIGINT ignored, and neobench leaves an ignored signal
    ignored; the stop tests deliver SIGINT as a user's Ctrl-C would."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch, request):
    """Every test but the embedded-default ones gets its own empty neobench cache."""
    if "embedded" not in request.keywords:
        monkeypatch.setenv("NEOBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def cli(capfd):
    """`neobench ARGS` in this process, through the same main(): returns (exit code, stderr).

    A fresh interpreter costs seconds of imports per call. The output is captured at the file
    descriptor, so it includes what child processes (the runs of a matrix) print, and stderr is
    not a terminal, as in CI.
    """
    import sys

    from neobench.cli import main

    def run(*args: str) -> tuple[int, str]:
        capfd.readouterr()  # drop what came before
        saved = sys.argv
        sys.argv = ["neobench", *args]
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        finally:
            sys.argv = saved
        return code, capfd.readouterr().err

    return run


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process it started (found in /proc before any is killed; a
    torchrun in its own session included)."""
    import signal

    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        found.append(parent)
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                frontier += [int(k) for k in task.read_text().split()]
            except OSError:
                pass
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def watchdog():
    """watch(proc): if the test still waits on ``proc`` after 10 minutes, kill it and all it started,
    so a hang fails the test instead of the whole run. A cap only: no test waits for it to pass."""
    import threading

    timers = []

    def watch(proc, seconds: float = 600):
        timer = threading.Timer(seconds, kill_tree, (proc.pid,))
        timer.daemon = True
        timer.start()
        timers.append(timer)

    yield watch
    for timer in timers:
        timer.cancel()
