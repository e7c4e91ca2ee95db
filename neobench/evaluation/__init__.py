"""Stage 4, evaluation. In: a model in memory (or on disk) and an EvalSpec. Out: score rows and
per-document scores, the same as lm-eval's own `hf` model gives.

    catalog   the offline suite's tasks, EvalSpec, tasks checked, loaded and hashed
    harness   lm-eval on in-memory models, score rows, cached reference rows, the terminal table
    fidelity  neo_fidelity (KL and top-1 agreement to the teacher) and held-out NLL, computed directly
    suite     data and scoring of the offline tasks
    tasks/    their lm-eval task YAML (neo_heldout_nll, ...)
"""
