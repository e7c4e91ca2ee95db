"""lm-eval hooks for neobench's offline tasks (the YAML files here name them with ``!function``).

The logic lives in :mod:`neobench.evaluation.suite`, where it is importable and tested; lm-eval loads this
file by path, so it only re-exports.
"""

from neobench.evaluation.suite import (  # noqa: F401
    load_heldout_bpb,
    load_heldout_match,
    load_heldout_nll,
    load_heldout_rouge,
    load_pydoc_windows,
    process_heldout_bpb,
    process_heldout_nll,
    process_heldout_rouge_greedy,
    process_heldout_rouge_sampled,
    process_pydoc_bpb,
)
