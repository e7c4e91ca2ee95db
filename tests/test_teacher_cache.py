"""The teacher-logit cache: reuse across runs, top-k = vocabulary equals dense, corrupt entries rebuilt."""

import dataclasses

import pytest

from neobench.core.errors import NeobenchError
from neobench.training.loop import train
from neobench.training.teacher_cache import CacheMode, TeacherCache
from neobench.training.workspace import prepare


@pytest.fixture
def kd_cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg, method="kd", max_steps=3, max_examples=8, loss_chunk_tokens=16)


def losses(log):
    return [row["loss"] for row in log]


def test_a_second_run_reuses_the_cache_without_loading_the_teacher(kd_cfg):
    plain = train(kd_cfg, prepare(kd_cfg)).log
    cached_cfg = dataclasses.replace(kd_cfg, teacher_cache="dense")
    run = train(cached_cfg, prepare(cached_cfg))
    first, record1 = run.log, run.record
    ws = prepare(cached_cfg)
    run = train(dataclasses.replace(cached_cfg, method="neo"), ws)
    second, record2 = run.log, run.record
    assert record1["cost"]["teacher_cache"]["misses"] > 0
    assert record2["cost"]["teacher_cache"]["misses"] == 0 and ws._teacher is None, "all cached: no teacher load"
    # fp16 log-probabilities change the KD term only in the 4th digit.
    assert losses(first) == pytest.approx(losses(plain), rel=2e-3)


def test_top_k_of_the_whole_vocabulary_equals_dense(kd_cfg, tiny):
    dense = train(dataclasses.replace(kd_cfg, teacher_cache="dense"), prepare(kd_cfg)).log
    topk = train(dataclasses.replace(kd_cfg, teacher_cache=f"topk:{tiny['vocab']}"), prepare(kd_cfg)).log
    assert losses(topk) == pytest.approx(losses(dense), rel=1e-6)
    top8 = train(dataclasses.replace(kd_cfg, teacher_cache="topk:8"), prepare(kd_cfg)).log
    assert losses(top8) != pytest.approx(losses(dense), rel=1e-6)  # a real approximation, still close
    assert losses(top8) == pytest.approx(losses(dense), rel=0.1)


def test_corrupt_or_mismatched_entries_are_rebuilt_not_used(kd_cfg):
    cfg = dataclasses.replace(kd_cfg, teacher_cache="topk:8")
    ws = prepare(cfg)
    first = train(cfg, ws).log
    cache = TeacherCache.for_run(CacheMode.parse("topk:8"), ws.teacher_path, ws.data.data_hash, cfg.seq_len, cfg.temperature, ws.vocab_size)
    files = sorted(cache.root.glob("ex-*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:-7] + b"garbage")  # corrupt one entry
    index = int(files[1].stem.split("-")[1])
    other = ws.data.examples[(index + 1) % len(ws.data.examples)]
    assert cache.load(index, other) is None and not files[1].exists()  # made for other tokens
    run = train(cfg, prepare(cfg))
    again, record = run.log, run.record
    assert record["cost"]["teacher_cache"]["rebuilt"] == 1 and record["cost"]["teacher_cache"]["misses"] == 2
    assert losses(again) == pytest.approx(losses(first), rel=1e-6)


@pytest.mark.parametrize("spec", ["topk", "topk:0", "sparse", "topk:x"])
def test_bad_cache_modes_say_what_is_valid(spec):
    with pytest.raises(NeobenchError, match="must be off, hidden, dense or topk:K"):
        CacheMode.parse(spec)


def test_hidden_state_cache_gives_the_online_losses_and_a_full_cache_never_loads_the_teacher(kd_cfg):
    """hidden: the teacher's last hidden states + its head, projected by the loss as if it ran (exact)."""
    from neobench.training.teacher_cache import fill

    online = train(kd_cfg, prepare(kd_cfg)).log
    cfg = dataclasses.replace(kd_cfg, teacher_cache="hidden")
    ws = prepare(cfg)
    cache = TeacherCache.for_run(CacheMode.parse("hidden"), ws.teacher_path, ws.data.data_hash, cfg.seq_len,
                                 cfg.temperature, ws.vocab_size, ws.dtype)
    assert fill(cache, ws) == len(ws.data.examples) and ws._teacher is not None  # the whole data set, once
    assert fill(cache, prepare(cfg)) == 0  # nothing left to run
    for method in ("kd", "neo"):
        ws = prepare(cfg)
        run = train(dataclasses.replace(cfg, method=method), ws)
        assert run.record["cost"]["teacher_cache"]["misses"] == 0 and ws._teacher is None, "complete cache: no teacher"
        if method == "kd":
            assert losses(run.log) == pytest.approx(losses(online), rel=1e-6, abs=1e-7)
    # A corrupt head is not used: the next run loads the teacher, which stores it again.
    head = cache.root / TeacherCache.HEAD_FILE
    head.write_bytes(head.read_bytes()[:-5] + b"wrong")
    ws = prepare(cfg)
    again = train(cfg, ws).log
    assert ws._teacher is not None and losses(again) == pytest.approx(losses(online), rel=1e-6, abs=1e-7)
    assert TeacherCache(cache.root, cache.mode, 1.0, ws.vocab_size).load_head("cpu") is not None


def test_hidden_state_cache_is_per_compute_dtype(kd_cfg):
    ws = prepare(kd_cfg)
    key = lambda dtype: TeacherCache.for_run(CacheMode.parse("hidden"), ws.teacher_path, ws.data.data_hash,  # noqa: E731
                                             kd_cfg.seq_len, 1.0, ws.vocab_size, dtype).root
    import torch

    assert key(torch.float32) != key(torch.bfloat16)
    assert key(torch.float32) == TeacherCache.for_run(CacheMode.parse("hidden"), ws.teacher_path, ws.data.data_hash,
                                                      kd_cfg.seq_len, 2.0, ws.vocab_size, torch.float32).root


def test_hidden_state_cache_filled_while_training_gives_the_online_losses(kd_cfg):
    """An empty hidden cache: the run stores each example's hidden states as it meets them (misses), and a
    micro-batch mixing stored and new entries gives the online losses."""
    online = train(kd_cfg, prepare(kd_cfg)).log
    cfg = dataclasses.replace(kd_cfg, teacher_cache="hidden")
    other_order = dataclasses.replace(cfg, seed=1, max_steps=1)
    first = train(other_order, prepare(other_order))  # 4 of the 8 examples stored, in seed 1's order
    assert first.record["cost"]["teacher_cache"]["misses"] == 4 and first.record["cost"]["teacher_cache"]["teacher_loaded"]
    run = train(cfg, prepare(cfg))
    assert run.record["cost"]["teacher_cache"]["hits"] > 0 and run.record["cost"]["teacher_cache"]["misses"] == 4
    assert losses(run.log) == pytest.approx(losses(online), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_teacher_states_do_not_depend_on_which_examples_were_filled_together(kd_cfg, tmp_path, dtype):
    """Each example's entry is the same bytes whether the whole data set was filled at once or each
    example alone, in any order: a study's results cannot depend on the cache's history."""
    import torch

    from neobench.training.teacher_cache import fill

    cfg = dataclasses.replace(kd_cfg, teacher_cache="hidden", dtype=dtype)
    ws = prepare(cfg)
    batch_sizes = []
    teacher_hidden = ws.teacher_hidden
    ws.teacher_hidden = lambda batch, mask: batch_sizes.append(len(batch["input_ids"])) or teacher_hidden(batch, mask)
    caches = [TeacherCache(tmp_path / name, CacheMode.parse("hidden"), 1.0, ws.vocab_size) for name in ("all", "one")]
    n = len(ws.data.examples)
    fill(caches[0], ws)
    for i in reversed(range(n)):
        fill(caches[1], ws, [i])
    for i, example in enumerate(ws.data.examples):
        together, alone = (cache.load(i, example) for cache in caches)
        assert together.dtype == alone.dtype and torch.equal(together, alone), f"example {i}"
    # one example per teacher forward: with the real teacher in bf16, batches of 8 did change the bytes
    assert batch_sizes == [1] * (2 * n)


def test_a_run_meeting_uncached_examples_runs_the_teacher_on_each_alone(kd_cfg):
    """The entries a training run stores are made as fill makes them (one example per teacher forward),
    not from its micro-batches of 4."""
    cfg = dataclasses.replace(kd_cfg, teacher_cache="hidden")
    ws = prepare(cfg)
    batch_sizes = []
    teacher_hidden = ws.teacher_hidden
    ws.teacher_hidden = lambda batch, mask: batch_sizes.append(len(batch["input_ids"])) or teacher_hidden(batch, mask)
    run = train(cfg, ws)
    counts = run.record["cost"]["teacher_cache"]
    assert counts["misses"] == len(ws.data.examples) and counts["hits"] == cfg.max_steps * cfg.batch_size * cfg.grad_accum - counts["misses"]
    assert batch_sizes == [1] * counts["misses"]
