"""Stage 8, commands. In: one `neobench` command's parsed options. Out: that command's work done
through the stages below, its lines on the console, and its exit code. neobench.cli only parses.

    run       `neobench run`: plan, protocol, skip-done, launch here / in processes / under torchrun, resume
    evaluate  `neobench eval`
    export    `neobench export`
    ablate    `neobench ablate`
    report    `neobench report`: runs collected into rows, every table rebuilt from them
    listing   `neobench list`
    prune     `neobench student prune`
    synth     `neobench data synth`
"""
