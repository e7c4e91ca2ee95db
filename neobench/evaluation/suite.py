"""The offline evaluation suite: the data and scoring behind the lm-eval tasks in ``neobench/evaluation/tasks/``.

| task              | what it measures                                                       | metrics            |
|-------------------|------------------------------------------------------------------------|--------------------|
| neo_heldout_nll   | log-likelihood of each held-out teacher response given its prompt      | nll, perplexity    |
| neo_heldout_match | the true response to a held-out prompt among four; the three          | acc, acc_norm      |
|                   | distractors are responses to other held-out prompts (fixed seed)       |                    |
| neo_heldout_bpb   | the same log-likelihood as bits per UTF-8 byte of the response: the    | bits_per_byte      |
|                   | unit that compares students with different tokenizers (not in the     |                    |
|                   | suite; the smol-cpu-xvocab preset scores it)                           |                    |
| neo_pydoc_bpb     | bits per byte on fixed windows of the standard library's              | bits_per_byte      |
|                   | ``pydoc_data.topics`` (human-written Python documentation)              |                    |
| neo_heldout_rougeL| the student's own answer to each held-out prompt (greedy, <= 128 new   | rougeL,            |
|                   | tokens, stopped at the end of its turn) against the teacher's response:| response_tokens,   |
|                   | ROUGE-L F-measure x 100 with stemming; also the answer's length in     | at_cap             |
|                   | tokens and whether it hit the 128-token cap                            |                    |
| neo_fidelity      | KL(p_teacher || p_student) per response token and top-1 agreement,     | kl, top1_agreement |
|                   | computed by :mod:`neobench.evaluation.fidelity` (it needs both models) |                    |

``neo_heldout_rougeL_sampled`` (not in the suite) scores the same answers under the MiniLLM /
DistiLLM protocol: sampled at temperature 1, top-p 1, no repeated 6-gram, <= 256 new tokens,
3 samples per prompt averaged.

lm-eval runs the first three like any task of its own: the YAML files name the functions below
through ``!function``, and everything is built from local data, so nothing is downloaded.
Task options come from lm-eval's task metadata (``TaskManager(metadata=...)``): ``tokenizer``
(or lm-eval's own ``pretrained`` model argument) to count response tokens, and
``heldout_data`` / ``heldout_split`` for the prompts and responses (default: the packaged
magpie-smollm2 held-out split).

Every metric is a per-document value averaged over documents, so lm-eval reports a standard
error for each: nll is each response's mean token NLL, perplexity is exp(mean nll).
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any, Optional

DEFAULT_HELDOUT = ("magpie-smollm2", "test")
MATCH_CHOICES = 4
MATCH_SEED = 1234
MATCH_WORDS = 32
"""Choices are the first words of each response: the opening reveals the topic, and scoring
4 x 128 tokens per prompt would make this the slowest task by far on a CPU."""
ROUGE_MAX_NEW_TOKENS = {"neo_heldout_rougeL": 128, "neo_heldout_rougeL_sampled": 256}
"""max_gen_toks of each generation task's YAML (a test keeps them equal): an answer this long hit the cap."""
PYDOC_WINDOWS = 32
PYDOC_WINDOW_CHARS = 1024
"""32 windows of 1,024 characters: about 8k tokens, well under a minute on 2 CPU cores."""


def heldout_pairs(data: str = DEFAULT_HELDOUT[0], split: str = DEFAULT_HELDOUT[1]) -> list[dict[str, str]]:
    """(prompt, response) of the first user and assistant turn of each usable held-out row, in file order."""
    from neobench.data.examples import MalformedRow, load_rows, to_messages

    pairs = []
    for row in load_rows(data, split):
        try:
            messages = to_messages(row)
        except MalformedRow:
            continue
        user = next((m["content"] for m in messages if m["role"] == "user"), "")
        reply = next((m["content"] for m in messages if m["role"] == "assistant"), "")
        if user.strip() and reply.strip():
            pairs.append({"prompt": user, "response": reply})
    return pairs


def response_opening(text: str, words: int = MATCH_WORDS) -> str:
    return " ".join(text.split()[:words])


def match_docs(pairs: list[dict[str, str]], seed: int = MATCH_SEED, n_choices: int = MATCH_CHOICES) -> list[dict[str, Any]]:
    """One multiple-choice doc per pair: its own response opening among ``n_choices``.

    Distractors are openings of other pairs' responses, drawn with ``seed``; an opening equal to
    the true one (a duplicate response) is never a distractor, and no opening appears twice.
    """
    openings = [response_opening(p["response"]) for p in pairs]
    if len(set(openings)) < n_choices:
        raise ValueError(f"held-out data needs at least {n_choices} distinct responses for the match task")
    rng = random.Random(seed)
    docs = []
    for i, pair in enumerate(pairs):
        chosen = [openings[i]]
        while len(chosen) < n_choices:
            j = rng.randrange(len(pairs))
            if openings[j] not in chosen:
                chosen.append(openings[j])
        order = list(range(n_choices))
        rng.shuffle(order)
        choices = [chosen[k] for k in order]
        docs.append({"prompt": pair["prompt"], "choices": choices, "gold": order.index(0)})
    return docs


def pydoc_windows(n_windows: int = PYDOC_WINDOWS, chars: int = PYDOC_WINDOW_CHARS) -> list[dict[str, str]]:
    """``n_windows`` windows of ``chars`` characters, evenly spaced through the topics in name order.

    The text ships with every Python, but it changes between Python versions; the task hash
    that neobench stores with each score covers the windows, so such scores are never mixed.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    stride = (len(text) - chars) // max(1, n_windows - 1)
    return [{"text": text[k * stride : k * stride + chars]} for k in range(n_windows)]


# --- lm-eval hooks (named by the YAML files through tasks/neo_tasks.py) -----------------------


def _dataset(docs: list[dict]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def _heldout(options: dict) -> list[dict[str, str]]:
    return heldout_pairs(options.get("heldout_data") or DEFAULT_HELDOUT[0], options.get("heldout_split") or DEFAULT_HELDOUT[1])


def load_heldout_nll(**options: Any):
    """Dataset of {prompt, response, response_tokens}; tokens counted by the evaluated model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer_path: Optional[str] = options.get("tokenizer") or options.get("pretrained")
    if not tokenizer_path:
        raise ValueError("neo_heldout_nll needs the tokenizer in the task metadata (tokenizer=PATH or pretrained=PATH)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    docs = []
    for pair in _heldout(options):
        n = len(tokenizer(pair["response"], add_special_tokens=False)["input_ids"])
        docs.append({**pair, "response_tokens": n})
    return _dataset(docs)


def load_heldout_match(**options: Any):
    return _dataset(match_docs(_heldout(options)))


_counting_tokenizer: dict[str, Any] = {}
"""The evaluated model's tokenizer, set when a ROUGE task loads (process_results sees only doc and answer)."""


def load_heldout_rouge(**options: Any):
    """Dataset of {prompt, response}; the tokenizer that counts answer tokens is kept for process_results."""
    from transformers import AutoTokenizer

    tokenizer_path: Optional[str] = options.get("tokenizer") or options.get("pretrained")
    if not tokenizer_path:
        raise ValueError("neo_heldout_rougeL needs the tokenizer in the task metadata (tokenizer=PATH or pretrained=PATH)")
    _counting_tokenizer["tokenizer"] = AutoTokenizer.from_pretrained(tokenizer_path)
    return _dataset(_heldout(options))


def rouge_l(reference: str, answer: str) -> float:
    """ROUGE-L F-measure x 100 with Porter stemming (Google's rouge_score, as lm-eval uses it)."""
    return 100.0 * _rouge_scorer().score(reference, answer)["rougeL"].fmeasure


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_scores(doc: dict, answers: list[str], max_new_tokens: int) -> dict[str, float]:
    """Mean over ``answers`` (one, or one per sample) of ROUGE-L, length in tokens and cap hit (0/1)."""
    tokenizer = _counting_tokenizer["tokenizer"]
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    n = len(answers)
    return {
        "rougeL": sum(rouge_l(doc["response"], a) for a in answers) / n,
        "response_tokens": sum(lengths) / n,
        "at_cap": sum(length >= max_new_tokens for length in lengths) / n,
    }


def process_heldout_rouge_greedy(doc: dict, results: list) -> dict[str, float]:
    """results: [the generated answer], already cut at the first stop sequence."""
    return rouge_scores(doc, list(results), ROUGE_MAX_NEW_TOKENS["neo_heldout_rougeL"])


def process_heldout_rouge_sampled(doc: dict, results: list) -> dict[str, float]:
    """results: [the answers of the task's ``repeats`` samples] (its filter keeps them all)."""
    answers = [a for r in results for a in (r if isinstance(r, (list, tuple)) else [r])]
    return rouge_scores(doc, answers, ROUGE_MAX_NEW_TOKENS["neo_heldout_rougeL_sampled"])


def load_pydoc_windows(**options: Any):
    return _dataset(pydoc_windows())


def process_heldout_nll(doc: dict, results: list) -> dict[str, float]:
    """results: [(log-likelihood of the response, is_greedy)] -> per-token NLL of this response."""
    loglikelihood, _ = results[0]
    per_token = loglikelihood / max(1, doc["response_tokens"])
    # lm-eval's `perplexity` aggregation is exp(-mean(items)): exp of the mean NLL.
    return {"nll": -per_token, "perplexity": per_token}


def process_heldout_bpb(doc: dict, results: list) -> dict[str, float]:
    """results: [(log-likelihood of the response, is_greedy)] -> bits per UTF-8 byte of this response."""
    loglikelihood, _ = results[0]
    return {"bits_per_byte": -loglikelihood / (max(1, len(doc["response"].encode("utf-8"))) * math.log(2))}


def load_heldout_bpb(**options: Any):
    """Dataset of {prompt, response}: the held-out pairs, nothing counted by a tokenizer."""
    return _dataset(list(_heldout(options)))


def process_pydoc_bpb(doc: dict, results: list) -> dict[str, float]:
    """results: [log-likelihood of the window] -> bits per UTF-8 byte of this window."""
    (loglikelihood,) = results
    return {"bits_per_byte": -loglikelihood / (len(doc["text"].encode("utf-8")) * math.log(2))}
