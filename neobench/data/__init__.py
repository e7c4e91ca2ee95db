"""Stage 2, data. In: a data spec (a shipped set's name, a .jsonl file, a hub data set). Out: token
ids with assistant-only labels, and a report of every row left out and why.

    examples         row formats, chat template, assistant-only labels, the held-out halves, collation
    synth            Magpie synthesis: the teacher writes a data set (`neobench data synth`)
    magpie-smollm2/  the shipped set: train.jsonl, heldout.jsonl (test + validation), DATACARD.md
"""
