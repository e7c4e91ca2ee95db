"""Row formats, assistant-only labels, truncation and the drop report."""

import json

import pytest

from neobench.core.errors import NeobenchError
from neobench.data.examples import encode_chat, example_order, load_rows, to_messages, tokenize_rows
from neobench.data.examples import PACKAGED_DATA_DIR
from neobench.models.loading import load_tokenizer
from neobench.training.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(str(tiny["tokenizer"]))


def labelled_text(tok, labels):
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


def test_labels_keep_only_assistant_tokens(tok):
    messages = [
        {"role": "user", "content": "What is one plus two?"},
        {"role": "assistant", "content": "one plus two is three."},
        {"role": "user", "content": "And two plus two?"},
        {"role": "assistant", "content": "four."},
    ]
    ids, labels = encode_chat(tok, messages)
    assert len(ids) == len(labels)
    assert labelled_text(tok, labels) == "one plus two is three.<|im_end|>four.<|im_end|>"
    # Everything before the first reply (system, user turn, assistant header) is masked.
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
    {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
    {"instruction": "Q?", "input": "", "output": "A."},
    {"prompt": "Q?", "response": "A."},
])
def test_row_formats_give_the_same_messages(row):
    assert to_messages(row) == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_alpaca_input_is_appended():
    assert to_messages({"instruction": "Sum:", "input": "1 2", "output": "3"})[0]["content"] == "Sum:\n\n1 2"


def test_bad_rows_are_counted_by_reason(tok):
    long_prompt = "one two three " * 40
    rows = [
        {"prompt": "Q?", "response": "A."},
        {"prompt": "Q?", "response": "   "},                      # empty
        {"messages": [{"role": "user", "content": "only a question"}]},  # empty: no reply
        {"text": "no known format"},                             # malformed
        {"messages": [{"role": "robot", "content": "x"}]},       # malformed role
        None,                                                    # unparsable JSONL line
        {"prompt": long_prompt, "response": "A."},               # reply cut off entirely
        {"prompt": "Q?", "response": "four five six " * 40},     # truncated, kept
    ]
    data = tokenize_rows(tok, rows, seq_len=48, source="test")
    report = data.report
    assert (report.rows, report.used, report.truncated) == (8, 2, 1)
    assert report.dropped == {"empty": 2, "malformed": 3, "no_response_after_truncation": 1}
    assert all(len(ex.input_ids) <= 48 for ex in data.examples)
    assert "2/8 rows used" in report.summary()


def test_no_usable_rows_is_an_error(tok):
    with pytest.raises(NeobenchError, match="no usable rows"):
        tokenize_rows(tok, [{"foo": 1}], seq_len=32, source="bad.jsonl")


def test_local_formats_load(tmp_path):
    rows = [{"prompt": "Q?", "response": "A."}] * 3
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    assert load_rows(str(tmp_path / "d.jsonl")) == rows + [None]
    assert load_rows(str(tmp_path / "d.json")) == rows
    assert load_rows(str(tmp_path / "d.parquet"), limit=2) == rows[:2]


def test_missing_data_file_and_split(tmp_path):
    with pytest.raises(NeobenchError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(NeobenchError, match="no split 'dev'; valid: heldout, test, train, validation"):
        load_rows("magpie-smollm2", "dev")


def test_heldout_splits_into_a_fixed_test_half_and_a_validation_half():
    heldout = load_rows("magpie-smollm2", "heldout")
    test, validation = load_rows("magpie-smollm2", "test"), load_rows("magpie-smollm2", "validation")
    assert test == heldout[:100] and validation == heldout[100:]  # by position, as the data card says
    assert not {json.dumps(r) for r in test} & {json.dumps(r) for r in validation}
    card = (PACKAGED_DATA_DIR / "magpie-smollm2" / "DATACARD.md").read_text()
    assert "split `test` is rows 1-100" in card and "split `validation` is rows 101-200" in card


def test_offline_hub_dataset_names_the_fix():
    with pytest.raises(NeobenchError, match="could not load data set 'someone/no-such-data'.*local"):
        load_rows("someone/no-such-data", "train", 10)


def test_example_order_is_seeded_and_covers_epochs():
    a, b = example_order(5, 12, seed=3), example_order(5, 12, seed=3)
    assert a == b and len(a) == 12
    assert sorted(a[:5]) == list(range(5)) and sorted(a[5:10]) == list(range(5))
    assert example_order(5, 12, seed=4) != a
