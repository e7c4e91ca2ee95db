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
    with pytest.raises(NeobenchError, match="must be off, dense or topk:K"):
        CacheMode.parse(spec)
