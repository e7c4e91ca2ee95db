"""Rich progress bars shared by the long-running commands."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class MessageConsole(Console):
    """A rich console whose messages stay one line outside a terminal.

    In a log (CI, nohup, `2> file`) rich would hard-wrap a message at 80 columns, and a one-line
    message (an error, a path) could no longer be grepped whole. Messages (strings, Text) are
    soft-wrapped there: written as they are. Tables and other renderables keep their layout.
    """

    def print(self, *objects, soft_wrap=None, **kwargs):
        if soft_wrap is None and not self.is_terminal and all(isinstance(o, (str, Text)) for o in objects):
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


console = MessageConsole(stderr=True)


class CountProgress:
    """A progress bar over a known count, with start(total, done) / update(done) calls.

    In a terminal, a live bar. In a log (CI, nohup, `> file`), plain lines instead: one per
    ``log_fraction`` of the count (None: none) and one at the end (rich would print only the bar's
    last state, squeezed to 80 columns).
    """

    def __init__(self, description: str, log_fraction: Optional[float] = 0.1):
        import time

        self.description = description
        self.log_fraction = log_fraction
        self.interactive = console.is_terminal
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, disable=not self.interactive,
        )
        self.task = None
        self.total = self.done = self.printed = 0
        self.started = time.perf_counter()

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()
        if not self.interactive and self.task is not None and self.done != self.printed:
            self._line()

    def start(self, total: int, done: int = 0):
        self.task = self.bar.add_task(self.description, total=total, completed=done, info="")
        self.total, self.done, self.printed = total, done, done

    def update(self, done: int, info: str = ""):
        self.bar.update(self.task, completed=done, info=info)
        self.done, self.info = done, info
        if not self.interactive and self.log_fraction and done - self.printed >= self.log_fraction * self.total:
            self._line()

    def _line(self):
        import time

        info = f" {self.info}" if getattr(self, "info", "") else ""
        console.print(f"{self.description}: {self.done}/{self.total} in {time.perf_counter() - self.started:.1f} s{info}", highlight=False)
        self.printed = self.done
