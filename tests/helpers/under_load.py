"""Run a command while other processes keep the machine's cores busy, as on a loaded CI machine.

    python tests/helpers/under_load.py --cores 2 -- python -m pytest -q

Starts ``--cores`` busy-looping processes (plain Python arithmetic at normal priority: each
takes a whole core while it can), runs the command, stops the load however the command ends,
and exits with the command's exit code. It prints the command's wall time and the load's share of
CPU time, so a log shows how busy the machine really was.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time


def spin() -> None:
    x = 0
    while True:
        x = (x * 1_103_515_245 + 12_345) % 2_147_483_648


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (0 where it cannot be read)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="busy processes to run beside the command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    load = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.cores)]
    for p in load:
        p.start()
    print(f"under load: {args.cores} busy process(es) beside `{' '.join(command)}`", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        code = subprocess.call(command)
    finally:
        wall = time.perf_counter() - started
        busy = sum(cpu_seconds(p.pid) for p in load)
        for p in load:
            p.terminate()
        for p in load:
            p.join()
    print(f"under load: exit {code} after {wall:.0f} s; the load used {busy:.0f} CPU-seconds "
          f"({busy / max(wall, 1e-9):.2f} cores on average)", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
