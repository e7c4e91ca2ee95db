"""`neobench.results.load_results("runs")`, as the README shows it: the rows live in
:mod:`neobench.runs.results`; this name stays for code written against it."""

from neobench.runs.results import load_curves, load_per_doc, load_results  # noqa: F401
