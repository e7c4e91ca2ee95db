"""Stage 3, training. In: a run's config, its models and data. Out: the trained student, its
per-step log, and a record of what the run consumed.

    losses         CE and the divergence family as pure fp32 functions (the reference definitions)
    fused_loss     the step's loss from hidden states: chunked projection, no [tokens x vocab] tensor
    methods        sft, lora, kd, neo, minillm: which weights train, and the objective
    labels         how a run is named: neo+lora in the terminal, neo on the leaderboard
    optimizers     the optimizer registry (adamw, sgd)
    onpolicy       minillm: student-sampled responses, reverse KL
    teacher_cache  teacher outputs reused across runs (hidden states, dense or top-k), verified by hash
    prune          the student cut from the teacher by block influence
    distributed    torchrun worlds, DDP / FSDP2, gradient sync
    checkpoint     checkpoints inside an unfinished run, exact resume
    memory         peak memory of a block of work
    workspace      a run's models and tokenized data, prepared before its first step
    loop           the one training loop, its budget and cost record, the divergence guard
"""
