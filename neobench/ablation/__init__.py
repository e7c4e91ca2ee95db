"""Stage 6, ablation. In: a study file (ablations/*.yaml). Out: an Optuna study whose every trial
is one run, scored on the validation split; the tuned protocol's learning rates.

    spec      the study file's schema: fields checked one by one into a StudySpec
    samplers  the samplers and pruners a study file may name
    storage   the study on its Optuna storage: create or continue it, count and re-queue its trials
    trial     one trial as runs: its direction, outcome and score, and the reporter inside its run
    worker    `neobench ablate`: the workers that run trials until N are finished
    tuned     the tuned protocol: its studies, the rule that picks a rate (also the reporting
              stage's), the rates the studies chose, and planned runs set to them
    export    a study's trials as JSON, what its report is made from
"""
