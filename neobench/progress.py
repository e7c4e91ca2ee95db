"""Rich progress bars shared by the long-running commands."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class CountProgress:
    """A progress bar over a known count, with start(total, done) / update(done) calls."""

    def __init__(self, description: str):
        self.description = description
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console,
        )
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def start(self, total: int, done: int = 0):
        self.task = self.bar.add_task(self.description, total=total, completed=done, info="")

    def update(self, done: int, info: str = ""):
        self.bar.update(self.task, completed=done, info=info)

