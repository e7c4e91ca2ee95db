"""Stage 0, core: plumbing every stage uses, and nothing of any stage (imports no other neobench stage).

    errors    NeobenchError, the one-line message a user sees, and the exit codes
    registry  name -> entry registries whose misses list the valid names
    progress  the console (messages never wrapped in a log) and progress bars
    stopping  the one stop path for SIGINT/SIGTERM, and the faults tests inject
"""
