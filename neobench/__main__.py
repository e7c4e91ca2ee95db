"""`python -m neobench` and `torchrun -m neobench run ...`: the command line."""

from neobench.cli import main

main()
