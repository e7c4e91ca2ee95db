"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class NeobenchError(Exception):
    """A problem with the user's input or environment.

    The message is one line: what is wrong and how to fix it. The CLI prints it
    without a traceback and exits with code 2.
    """


DIVERGED_EXIT = 4
"""Exit code of a run that diverged: `neobench run` passes it on; an ablation marks its trial FAIL, never retried."""
