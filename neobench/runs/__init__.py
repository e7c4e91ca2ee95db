"""Stage 5, runs. In: a preset and flags. Out: run directories (config.yaml, train_log.jsonl,
weights, evaluations/*.json), and tidy result rows read back from them.

    config      RunConfig (frozen), presets/ (YAML), overrides, validation against the registries
    store       atomic run directories, unfinished runs, a run or its finished twin (--skip-done)
    execute     planning runs; one run trained then scored; matrices in child processes
    rescore     a stored run's student, or any model, scored again (`neobench eval`)
    results     tidy result rows, curves and per-document scores from run directories
    export      a run's student as a peft adapter or a transformers model
"""
