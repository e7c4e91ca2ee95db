"""Presets, overrides, registries and model/tokenizer checks: each bad input gets its own error."""

import dataclasses

import pytest

from neobench.core.errors import NeobenchError
from neobench.models.loading import resolve_model
from neobench.runs.config import PRESETS, RunConfig, apply_overrides, load_preset, validate
from neobench.runs.execute import plan
from neobench.training.prune import block_influence, parse_pruned_spec, pruned_student_dir
from neobench.training.workspace import prepare


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_preset_loads_and_validates(name):
    cfg = validate(load_preset(name))
    assert cfg.preset == name


def test_paper_preset_is_the_released_setting():
    cfg = load_preset("paper-llama3.2")
    assert (cfg.teacher, cfg.student) == ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct")
    assert (cfg.rank, cfg.kd_ratio, cfg.adapter_lr, cfg.max_examples, cfg.max_steps) == (128, 0.9, 1e-4, 10000, 0)
    assert dataclasses.replace(cfg, method="neo").effective_lr() == 1e-4


def test_unknown_preset_key_lists_valid_keys(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("rank: 8\nrnak: 16\n")
    with pytest.raises(NeobenchError, match=r"unknown config key 'rnak'.*valid keys: preset, method"):
        load_preset(str(path))


def test_wrong_type_and_range_name_the_field():
    with pytest.raises(NeobenchError, match="'rank' must be a int"):
        apply_overrides(RunConfig(), {"rank": "big"}, "test")
    with pytest.raises(NeobenchError, match="'kd_ratio' must be in \\[0, 1\\]"):
        validate(RunConfig(kd_ratio=1.5))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(NeobenchError, match="unknown method 'distil'; valid: sft, lora, kd, neo"):
        validate(RunConfig(method="distil"))
    with pytest.raises(NeobenchError, match="unknown variant 'qlora'; valid: lora, dora, pissa, rslora, moslora"):
        validate(RunConfig(variant="qlora"))
    with pytest.raises(NeobenchError, match="unknown preset 'nope'; valid: "):
        load_preset("nope")


def test_uld_refuses_a_top_k_teacher_cache():
    with pytest.raises(NeobenchError, match="--loss uld sorts the student's whole distribution.*use --teacher-cache hidden"):
        validate(RunConfig(loss="uld", teacher_cache="topk:64"))
    validate(RunConfig(loss="uld", teacher_cache="hidden"))
    with pytest.raises(NeobenchError, match="'akl_mu' must be in \\(0, 1\\)"):
        validate(RunConfig(loss="akl", akl_mu=1.0))


def test_variant_needs_an_adapter_method():
    with pytest.raises(NeobenchError, match="--variant dora needs an adapter method"):
        validate(RunConfig(method="sft", variant="dora"))


def test_plan_variant_alone_means_neo_and_no_flags_means_the_matrix():
    base = RunConfig()
    assert [(c.method, c.effective_variant()) for c in plan(base, None, "dora")] == [("neo", "dora")]
    matrix = plan(base, None, None, seeds=2)
    assert [(c.method, c.seed) for c in matrix] == [(m, s) for s in (0, 1) for m in ("sft", "lora", "kd", "neo")]
    assert {c.effective_variant() for c in matrix if c.method in ("lora", "neo")} == {"lora"}


def test_adapter_lr_defaults_to_ten_times_full_lr():
    assert RunConfig(method="neo", lr=3e-5).effective_lr() == pytest.approx(3e-4)
    assert RunConfig(method="kd", lr=3e-5).effective_lr() == 3e-5
    assert RunConfig(method="lora", lr=3e-5, adapter_lr=1e-3).effective_lr() == 1e-3


def test_model_path_errors(tmp_path):
    with pytest.raises(NeobenchError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(NeobenchError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(NeobenchError, match="GGUF file .* does not exist"):
        resolve_model(str(tmp_path / "m.gguf"))


def test_offline_hub_model_names_the_fix(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, student="someone/no-such-model")
    with pytest.raises(NeobenchError, match="could not load 'someone/no-such-model'.*pass the directory"):
        prepare(cfg)


def test_different_tokenizers_are_refused_before_training(tiny, tiny_cfg, tmp_path):
    from conftest import make_llama, make_tokenizer

    other_tok = make_tokenizer(tmp_path / "tok", vocab_size=280, corpus_extra="entirely different words")
    other = make_llama(tmp_path / "other", tmp_path / "tok", layers=2, vocab_rows=len(other_tok))
    cfg = dataclasses.replace(tiny_cfg, student=str(other))
    with pytest.raises(NeobenchError, match=r"teacher '.*teacher'.*and student '.*other'.*different tokenizers"):
        prepare(cfg)


def test_vocabulary_rows_short_of_the_tokenizer_are_refused(tiny, tiny_cfg, tmp_path):
    from conftest import make_llama

    short = make_llama(tmp_path / "short", tiny["tokenizer"], layers=2, vocab_rows=tiny["vocab"] - 10)
    with pytest.raises(NeobenchError, match="output rows but the shared tokenizer has"):
        prepare(dataclasses.replace(tiny_cfg, student=str(short)))


def test_padding_rows_beyond_the_tokenizer_are_accepted(tiny, tiny_cfg):
    ws = prepare(tiny_cfg)  # teacher has 320 rows, student 300 = the tokenizer
    assert ws.vocab_size == tiny["vocab"]


def test_pruned_spec_parsing():
    assert parse_pruned_spec("pruned:15") == 15
    assert parse_pruned_spec("meta-llama/x") is None
    with pytest.raises(NeobenchError, match="pruned:N"):
        parse_pruned_spec("pruned:half")


def test_pruning_is_deterministic_and_keeps_the_most_influential_layers(tiny, tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    dirs = []
    for name in ("a", "b"):  # two empty caches: the student is built twice from scratch
        monkeypatch.setenv("NEOBENCH_CACHE", str(tmp_path / name))
        dirs.append(pruned_student_dir(str(tiny["teacher"]), 2, str(tiny["data"]), "train"))
    cards = [json.loads((d / "prune_card.json").read_text()) for d in dirs]
    assert cards[0] == {**cards[1], "teacher": cards[0]["teacher"]}
    scores = cards[0]["block_influence"]
    assert cards[0]["kept_layers"] == sorted(sorted(range(4), key=lambda i: -scores[i])[:2])
    w0, w1 = (load_file(d / "model.safetensors") for d in dirs)
    assert w0.keys() == w1.keys() and all((w0[k] == w1[k]).all() for k in w0)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(dirs[0]).num_hidden_layers == 2
    with pytest.raises(NeobenchError, match="has only 4"):
        pruned_student_dir(str(tiny["teacher"]), 4, str(tiny["data"]), "train")


def test_block_influence_of_an_identity_layer_is_zero(tiny):
    import torch

    from neobench.data.examples import collate, load_training_data
    from neobench.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(tiny["teacher"]), torch.float32, "cpu")
    layer = model.model.layers[1]
    for p in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
        torch.nn.init.zeros_(p)  # the residual branch adds nothing: output == input
    tok = load_tokenizer(str(tiny["tokenizer"]))
    data = load_training_data(tok, str(tiny["data"]), "train", 64, 8)
    scores = block_influence(model, [collate(data.examples, tok.pad_token_id)])
    assert scores[1] == pytest.approx(0.0, abs=1e-6)
    assert all(s > 1e-4 for i, s in enumerate(scores) if i != 1)


def test_registry_refuses_duplicates_and_lists_valid_names_on_a_miss():
    from neobench.core.registry import Registry

    colours = Registry[int]("colour")
    colours.add("red", 1)
    with pytest.raises(ValueError, match="already registered"):
        colours.add("red", 2)
    with pytest.raises(NeobenchError, match="unknown colour 'blue'; valid: red"):
        colours.get("blue")


def test_compile_without_a_cxx_compiler_is_refused_before_anything_loads(monkeypatch):
    import shutil

    from neobench.core.errors import NeobenchError
    from neobench.runs.config import RunConfig, validate

    monkeypatch.setattr(shutil, "which", lambda name: None)
    validate(RunConfig())  # not asked for: no compiler needed
    with pytest.raises(NeobenchError, match="needs a C\\+\\+ compiler"):
        validate(RunConfig(compile=True))
