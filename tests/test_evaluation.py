"""Evaluation: the offline suite through lm-eval, equality with lm-eval's own `hf` model, stored results."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from neobench.core.errors import NeobenchError
from neobench.evaluation.catalog import SUITE, TASKS, EvalSpec, load_tasks, parse_task_list
from neobench.evaluation.harness import evaluate, model_evaluation
from neobench.evaluation.suite import heldout_pairs, match_docs, pydoc_windows, response_opening


@pytest.fixture(scope="module")
def tiny_spec(tiny):
    return EvalSpec(tasks=SUITE, limit=6, batch_size=4, heldout_data=str(tiny["data"]), heldout_split="train")


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_task_lists_expand_the_suite_and_keep_order():
    assert parse_task_list("neo_suite") == SUITE
    assert parse_task_list("arc_easy, neo_suite,arc_easy") == ("arc_easy", *SUITE)
    assert parse_task_list("none") == ()


def test_bundled_tasks_run_through_lm_eval_and_produce_every_metric(tiny, tiny_spec):
    student, tokenizer = load(tiny["student"])
    teacher, _ = load(tiny["teacher"])
    every_task = dataclasses.replace(tiny_spec, tasks=tuple(TASKS))  # the suite and the tasks asked for by name
    taskset = load_tasks(every_task, str(tiny["student"]))
    result = evaluate(student, tokenizer, taskset, teacher=teacher, vocab_size=tiny["vocab"])
    got = {(r["task"], r["metric"]): r for r in result["rows"]}
    expected = {(name, metric) for name in TASKS for metric in TASKS.get(name).metrics}
    assert set(got) == expected
    for (task, metric), row in got.items():
        assert math.isfinite(row["value"]) and row["stderr"] is not None and row["stderr"] >= 0, (task, metric)
        assert row["n_docs"] == 6 and row["limit"] == 6 and len(row["task_hash"]) == 64
        hib = {"response_tokens": None, "at_cap": None}.get(metric, metric in ("acc", "acc_norm", "top1_agreement", "rougeL"))
        assert row["higher_is_better"] is hib, (task, metric)
        # Every score is also stored per document (what the report's paired tests resample): their mean is the score.
        docs = result["per_doc"][task]
        assert len(docs["docs"]) == len(set(docs["docs"])) == 6
        if metric != "perplexity":  # lm-eval aggregates perplexity as exp(-mean) of its per-document items
            assert sum(docs["metrics"][metric]) / 6 == pytest.approx(row["value"], rel=1e-9), (task, metric)
    assert len(result["per_doc"]["neo_heldout_rougeL"]["answers"]) == 6
    assert all(len(a) == 3 for a in result["per_doc"]["neo_heldout_rougeL_sampled"]["answers"])  # 3 samples per prompt
    nll, ppl = got[("neo_heldout_nll", "nll")]["value"], got[("neo_heldout_nll", "perplexity")]["value"]
    assert ppl == pytest.approx(math.exp(nll), rel=1e-9)  # perplexity is exp(mean per-token NLL)
    assert got[("neo_pydoc_bpb", "bits_per_byte")]["value"] > 0
    # Bits per byte of a held-out response is its NLL re-expressed: nll * tokens / (bytes * ln 2).
    from neobench.evaluation.suite import heldout_pairs

    pairs = heldout_pairs(str(tiny["data"]), "train")[:6]
    nll_docs = result["per_doc"]["neo_heldout_nll"]["metrics"]["nll"]
    bpb_docs = result["per_doc"]["neo_heldout_bpb"]["metrics"]["bits_per_byte"]
    for pair, nll_doc, bpb_doc in zip(pairs, nll_docs, bpb_docs):
        n_tokens = len(tokenizer(pair["response"], add_special_tokens=False)["input_ids"])
        assert bpb_doc == pytest.approx(nll_doc * n_tokens / (len(pair["response"].encode()) * math.log(2)), rel=1e-9)
    assert 0 <= got[("neo_fidelity", "top1_agreement")]["value"] <= 1 and got[("neo_fidelity", "kl")]["value"] > 0
    assert result["lm_eval_version"] and result["spec"]["limit"] == 6


def test_scores_equal_lm_eval_hf_model_loading_the_same_directory(tiny, tiny_spec):
    """neobench's in-memory HFLM and lm-eval's own `hf` loader must agree to 1e-4."""
    from lm_eval import simple_evaluate

    spec = dataclasses.replace(tiny_spec, tasks=tuple(t for t in SUITE if TASKS.get(t).via_lm_eval))
    taskset = load_tasks(spec, str(tiny["student"]))
    ours = model_evaluation("model", str(tiny["student"]), taskset, "cpu", torch.float32)["rows"]
    theirs = simple_evaluate(
        model="hf", model_args={"pretrained": str(tiny["student"]), "device": "cpu", "dtype": "float32"},
        tasks=spec.lm_eval_tasks, task_manager=taskset.manager, limit=spec.limit, batch_size=spec.batch_size,
        apply_chat_template=True, bootstrap_iters=spec.bootstrap_iters, log_samples=False,
    )["results"]
    assert len(ours) == 8  # nll, perplexity, acc, acc_norm, rougeL, response_tokens, at_cap, bits_per_byte
    for row in ours:
        reference = theirs[row["task"]]
        assert row["value"] == pytest.approx(reference[f"{row['metric']},none"], abs=1e-4), row
        assert row["stderr"] == pytest.approx(reference[f"{row['metric']}_stderr,none"], abs=1e-4), row


def test_match_distractors_never_include_the_true_response():
    pairs = heldout_pairs()
    assert len(pairs) == 100  # the test split: the first half of the 200 held-out rows
    docs = match_docs(pairs)
    assert docs == match_docs(pairs), "a fixed seed gives the same docs"
    for pair, doc in zip(pairs, docs):
        true = response_opening(pair["response"])
        assert doc["choices"][doc["gold"]] == true
        assert len(set(doc["choices"])) == 4 and doc["choices"].count(true) == 1
    assert len({d["gold"] for d in docs}) == 4, "the true answer moves between positions"


def test_duplicate_responses_are_never_distractors():
    pairs = [{"prompt": f"p{i}", "response": "same answer" if i < 3 else f"answer {i}"} for i in range(8)]
    for doc in match_docs(pairs):
        assert len(set(doc["choices"])) == 4
    for doc in match_docs(pairs)[:3]:
        assert doc["choices"].count("same answer") == 1


def test_pydoc_windows_are_fixed_in_length_and_number():
    windows = pydoc_windows()
    assert len(windows) == 32 and {len(w["text"]) for w in windows} == {1024}
    assert windows == pydoc_windows()


def test_standard_tasks_are_checked_in_one_line_missing_data_and_typos(tiny, tmp_path, monkeypatch):
    """One test for both, since each load of lm-eval's full task index costs ~13 s."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets-cache"))
    with pytest.raises(NeobenchError) as err:
        load_tasks(EvalSpec(tasks=("arc_easy",)), str(tiny["student"]))
    message = str(err.value)
    assert "'arc_easy'" in message and "allenai/ai2_arc" in message and "load_dataset" in message
    assert "\n" not in message
    with pytest.raises(NeobenchError, match=r"unknown task 'arc_esay'; did you mean arc_easy"):
        load_tasks(EvalSpec(tasks=("arc_esay",)), str(tiny["student"]))


def test_a_run_stores_student_and_reference_scores(tiny_cfg):
    from neobench.runs.execute import execute
    from neobench.runs.rescore import evaluate_run

    cfg = dataclasses.replace(tiny_cfg, method="neo", variant="moslora", eval_tasks="neo_suite", eval_limit=4)
    metrics = execute(cfg)
    (stored,) = list((Path(metrics["run_dir"]) / "evaluations").glob("*.json"))
    payload = json.loads(stored.read_text())
    roles = {e["role"]: e for e in payload["evaluations"]}
    assert set(roles) == {"student", "teacher", "untrained_student"}
    assert not roles["teacher"]["cached"] and not roles["untrained_student"]["cached"]
    assert {r["task"] for r in roles["teacher"]["rows"]} == set(SUITE) - {"neo_fidelity"}
    assert {r["task"] for r in roles["student"]["rows"]} == set(SUITE)
    for row in roles["student"]["rows"]:
        assert {"value", "stderr", "higher_is_better", "task_hash", "num_fewshot", "limit", "evaluator"} <= set(row)
    assert payload["lm_eval_version"]

    # A second run pays nothing for the references; re-scoring from stored weights gives the same numbers.
    second = execute(dataclasses.replace(cfg, seed=1))
    (stored2,) = list((Path(second["run_dir"]) / "evaluations").glob("*.json"))
    again = {e["role"]: e for e in json.loads(stored2.read_text())["evaluations"]}
    assert again["teacher"]["cached"] and again["untrained_student"]["cached"]
    rescored = evaluate_run(metrics["run_id"], cfg.runs_dir, {})
    before = {(r["task"], r["metric"]): r["value"] for r in roles["student"]["rows"]}
    after = {(r["task"], r["metric"]): r["value"] for r in rescored["evaluations"][0]["rows"]}
    assert after == pytest.approx(before, abs=1e-5)


# --- neo_heldout_rougeL ------------------------------------------------------------------------


def rouge_spec(tiny, tasks=("neo_heldout_rougeL",)):
    return EvalSpec(tasks=tasks, limit=4, batch_size=4, heldout_data=str(tiny["data"]), heldout_split="train")


def scripted_generation(model, continuation: list[int]) -> None:
    """Make ``model`` generate ``continuation`` (then its last token forever) through transformers'
    own generate, so lm-eval's stop sequences and max_gen_toks act exactly as in a real evaluation."""
    from transformers import LogitsProcessor, LogitsProcessorList

    original = model.generate

    def generate(*args, **kwargs):
        start = kwargs["input_ids"].shape[1]

        class Force(LogitsProcessor):
            def __call__(self, input_ids, scores):
                token = continuation[min(input_ids.shape[1] - start, len(continuation) - 1)]
                forced = torch.full_like(scores, -float("inf"))
                forced[:, token] = 0.0
                return forced

        return original(*args, logits_processor=LogitsProcessorList([Force()]), **kwargs)

    model.generate = generate


def test_rouge_answer_is_cut_at_the_end_of_turn_and_scored_like_rouge_score(tiny):
    from rouge_score import rouge_scorer

    student, tokenizer = load(tiny["student"])
    said = tokenizer(" the model said this", add_special_tokens=False)["input_ids"]
    after = tokenizer(" and never this", add_special_tokens=False)["input_ids"]
    scripted_generation(student, said + [tokenizer.convert_tokens_to_ids("<|im_end|>")] + after)
    spec = rouge_spec(tiny)
    result = evaluate(student, tokenizer, load_tasks(spec, str(tiny["student"])))
    answers = [a[0] for a in result["per_doc"]["neo_heldout_rougeL"]["answers"]]
    assert answers == [tokenizer.decode(said)] * 4  # cut at <|im_end|>: nothing after the end of the turn
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    by_hand = [100 * scorer.score(p["response"], answers[0])["rougeL"].fmeasure for p in heldout_pairs(spec.heldout_data, "train")[:4]]
    got = {r["metric"]: r["value"] for r in result["rows"]}
    assert result["per_doc"]["neo_heldout_rougeL"]["metrics"]["rougeL"] == pytest.approx(by_hand, rel=1e-12)
    assert got["rougeL"] == pytest.approx(sum(by_hand) / 4, rel=1e-12)
    assert got["response_tokens"] == len(said) and got["at_cap"] == 0


def test_rouge_answer_that_never_stops_hits_the_cap(tiny):
    from neobench.evaluation.suite import ROUGE_MAX_NEW_TOKENS

    student, tokenizer = load(tiny["student"])
    word = tokenizer(" word", add_special_tokens=False)["input_ids"]
    scripted_generation(student, word)  # never ends its turn: generation stops at max_gen_toks
    result = evaluate(student, tokenizer, load_tasks(rouge_spec(tiny), str(tiny["student"])))
    got = {r["metric"]: r["value"] for r in result["rows"]}
    assert got["at_cap"] == 1 and got["response_tokens"] == ROUGE_MAX_NEW_TOKENS["neo_heldout_rougeL"] == 128


def test_greedy_rouge_is_deterministic_and_the_task_files_agree_with_the_caps(tiny):
    import yaml

    from neobench.evaluation.catalog import TASK_DIR
    from neobench.evaluation.suite import ROUGE_MAX_NEW_TOKENS

    student, tokenizer = load(tiny["student"])
    taskset = load_tasks(dataclasses.replace(rouge_spec(tiny), limit=2), str(tiny["student"]))
    first, second = (evaluate(student, tokenizer, taskset)["per_doc"]["neo_heldout_rougeL"] for _ in range(2))
    assert first == second and any(a[0] for a in first["answers"])
    for task, cap in ROUGE_MAX_NEW_TOKENS.items():
        text = (TASK_DIR / f"{task}.yaml").read_text().replace("!function ", "")
        config = yaml.safe_load(text)
        assert config["generation_kwargs"]["max_gen_toks"] == cap
        assert "<|im_end|>" in config["generation_kwargs"]["until"] and "\n\n" not in config["generation_kwargs"]["until"]
