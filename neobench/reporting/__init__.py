"""Stage 7, reporting. In: result rows, per-document scores, curves, study exports. Out: the
leaderboard's tables (md, csv, html, tex), plots and README, and each study's report.

    selection     which runs may be compared fairly, and their scores as cells (mean ± CI over seeds)
    protocols     paper vs tuned learning-rate protocols, the tuning table, each protocol's text
    paired        paired bootstrap, exact McNemar, Holm's correction (pure functions on arrays)
    comparisons   each student vs LoRA, KD and SFT on the same documents (Holm-corrected)
    tables        the score, paired, efficiency and generation tables
    formats       a table as md, csv, html and tex files
    plots         scores, gap closed vs cost, training curves (with collision-free labels)
    leaderboard   the whole leaderboard of a preset: every table, plot and its README
    ablations     a study's report (<study>.md and plots) from its export (neobench.ablation.export)
"""
