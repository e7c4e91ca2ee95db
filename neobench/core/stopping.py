"""One stop path for `neobench run`: SIGINT or SIGTERM at any moment ends the run at a safe point.

The signal handler only records the request. The run acts on it at the next point where
stopping loses nothing but the work in flight, and says in one line what it kept:

    moment the signal lands        what happens                                    the line it prints
    setup, before step 1           nothing trained: the unfinished run is          stopped before step 1; the unfinished
                                   discarded (a resumed run keeps its checkpoint)  run was discarded (nothing trained yet)
    inside a step, between steps   the step in progress finishes, then the run     stopped after step N; checkpoint in ...;
                                   is checkpointed (--save-every) or discarded     continue with `neobench run --resume ...`
                                                                                   stopped after step N; the unfinished run
                                                                                   was discarded (no --save-every)
    the final write                the write finishes: the run is complete and     stopped after training; the finished run
                                   kept, not scored                                is in DIR, unscored: `neobench eval ...`
    evaluation                     scoring stops at once (its files are written    (the same line)
                                   atomically): the run is kept, not scored

A second signal more than 2 s after the one before stops at once (KeyboardInterrupt): whatever
is half-written is removed, a complete checkpoint stays, and later signals are ignored while that
clean-up runs. A signal within 2 s of the one before is the same request arriving twice (a
terminal's Ctrl-C reaches `neobench run` and its run process, and the first forwards it).

Tests inject a signal at a named point (``NEOBENCH_INJECT_FAULT=sigint-at:inside-step:2``, see
:func:`signal_point`); ``signal.raise_signal`` runs the real handler before it returns, so every
moment is tested without a sleep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOPPED_EXIT = 130
"""Exit code of a run stopped by a signal (the shell's 128 + SIGINT); `neobench run` passes it on."""

SAME_REQUEST_SECONDS = 2.0

# What a first SIGINT answers in each phase (None: say nothing; the process doing the work speaks).
NOTICES = {
    "setup": "stopping before the first step (Ctrl-C again to stop now)",
    "training": "stopping after this step (Ctrl-C again to stop now)",
    "writing": "stopping once the run is written (Ctrl-C again to stop now)",
    "runs": None,  # the parent of run processes: the run process says what it does
    "evaluation": None,  # stops at once
}
INTERRUPTIBLE = ("evaluation",)  # phases that a signal ends at once: nothing there is half-written by an exception


class Stopped(Exception):
    """The run stopped on a signal at a safe point; the message is the one line that says what was kept."""


class Interrupted(Exception):
    """Raised by the training loop at a step boundary when a stop was requested: ``step`` steps are
    done, ``checkpoint`` is the run's newest checkpoint (None without --save-every)."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """The process's record of a stop signal; :data:`STOP` is the one instance.

    ``watching(phase)`` installs the handler (main thread only; nested calls just change the
    phase; a signal the process was started with ignored, as a script's background job is
    with SIGINT, stays ignored). ``requested`` tells whether a signal came; ``forwarding_to(child)``
    sends any signal on to a run process this one waits for.
    """

    def __init__(self):
        self.received: Optional[int] = None
        self.phase = "setup"
        self._at = 0.0
        self._forced = False
        self._old: dict = {}
        self._pid = os.getpid()
        self._children: list = []
        # A forked child (lm-eval's bootstrap pool worker) must not keep the handler: its parent
        # ends it with SIGTERM (Pool.terminate), and a child stuck in a lock it inherited locked
        # can never run a Python handler, so only the default action ends it.
        os.register_at_fork(after_in_child=self._restore)

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def watched(self) -> bool:
        """Whether this process's handler is installed (else a signal raises KeyboardInterrupt as usual)."""
        return bool(self._old)

    @contextlib.contextmanager
    def watching(self, phase: str = "setup"):
        """Handle SIGTERM/SIGINT while the block runs (in phase ``phase``); the old handlers come back after."""
        if self.watched or threading.current_thread() is not threading.main_thread():
            with self.in_phase(phase):
                yield self
            return
        self._old = {sig: signal.getsignal(sig) for sig in SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
        for sig in self._old:
            signal.signal(sig, self._handle)
        self.received, self._forced, self.phase, self._pid = None, False, phase, os.getpid()
        try:
            yield self
        finally:
            self._restore()

    def _restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old, self.received, self._forced, self.phase, self._children = {}, None, False, "setup", []

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        """Mark a phase of the run; an interruptible one raises KeyboardInterrupt on entry if a stop is pending."""
        before, self.phase = self.phase, phase
        try:
            if self.requested and phase in INTERRUPTIBLE and self.watched:
                raise KeyboardInterrupt
            yield
        finally:
            self.phase = before

    @contextlib.contextmanager
    def forwarding_to(self, child):
        """Send the signals this process gets on to ``child`` (a Popen) while the block runs."""
        self._children.append(child)
        try:
            yield
        finally:
            self._children.remove(child)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child before its at-fork reset: die as the default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        now = time.monotonic()
        for child in self._children:
            if child.poll() is None:
                child.send_signal(signum)
        if self._forced:  # stopping at once already: let its clean-up run undisturbed
            return
        if self.received is not None:
            repeated, self._at = now - self._at <= SAME_REQUEST_SECONDS, now
            if repeated:
                return
            self._forced = True
            raise KeyboardInterrupt
        self.received, self._at = signum, now
        if self.phase in INTERRUPTIBLE:
            self._forced = True
            raise KeyboardInterrupt
        notice = NOTICES.get(self.phase)
        if signum == signal.SIGINT and notice and os.environ.get("RANK", "0") == "0":
            from neobench.core.progress import console

            console.print(notice, highlight=False)


STOP = StopRequest()


def stopped_in_training(step: int, checkpoint, resume_command: str) -> Stopped:
    """The stop of a run that had not finished training: after ``step`` steps, with or without a checkpoint."""
    if checkpoint is not None:
        return Stopped(f"stopped after step {step}; checkpoint in {checkpoint}; continue with `{resume_command}`")
    if step == 0:
        return Stopped("stopped before step 1; the unfinished run was discarded (nothing trained yet)")
    return Stopped(f"stopped after step {step}; the unfinished run was discarded (no --save-every)")


def stopped_after_training(run_dir, scored_later: bool) -> Stopped:
    """The stop of a run whose training finished: it is kept; scoring, if any was planned, did not happen."""
    if scored_later:
        return Stopped(f"stopped after training; the finished run is in {run_dir}, unscored: `neobench eval --run {run_dir}` scores it")
    return Stopped(f"stopped after training; the finished run is in {run_dir} (--tasks none: nothing to score)")


# Faults injected by tests, never set otherwise: NEOBENCH_INJECT_FAULT=KIND:WHERE.
FAULT_VARIABLE = "NEOBENCH_INJECT_FAULT"
SIGNAL_FAULTS = {"sigint-at": signal.SIGINT, "sigterm-at": signal.SIGTERM}


def injected_fault(kind: str, step: int, trial: Optional[int] = None) -> bool:
    """Faults for the resume, divergence and study tests, at the end of step N (after its checkpoint):

        kill-after-step:N          SIGKILL this process
        kill-worker-after-step:N   SIGKILL the study worker that started this trial process, then this
                                   process: a lost machine (add :trial:T to pick the study's trial T)
        nan-at-step:N              step N's loss is NaN (the caller checks the return value)
    """
    value = os.environ.get(FAULT_VARIABLE, "")
    wanted = f"{kind}:{step}"
    if value not in (wanted, f"{wanted}:trial:{trial}"):
        return False
    if kind == "kill-worker-after-step":
        os.kill(os.getppid(), signal.SIGKILL)
    if kind in ("kill-after-step", "kill-worker-after-step"):
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def signal_point(point: str, step: Optional[int] = None) -> None:
    """A named moment of a run where a test may have a signal arrive:

        NEOBENCH_INJECT_FAULT=sigint-at:POINT          this process raises SIGINT here (sigterm-at: SIGTERM)
        NEOBENCH_INJECT_FAULT=wait-for-signal-at:POINT  it says so on stderr and waits here until a signal
                                                       comes from outside (a test sends it to the parent)

    POINT is ``setup`` (models and data loaded, no run directory yet), ``before-step:N`` (step N
    about to start; N=1 is before the first step), ``inside-step:N`` (between the first
    micro-batch's forward and its backward), ``final-write`` (between the weights and
    metrics.json) or ``evaluation`` (the student scored, the reference models not yet).
    """
    value = os.environ.get(FAULT_VARIABLE, "")
    kind, _, where = value.partition(":")
    if where != (point if step is None else f"{point}:{step}"):
        return
    if kind in SIGNAL_FAULTS:
        signal.raise_signal(SIGNAL_FAULTS[kind])  # runs the Python handler before it returns
    elif kind == "wait-for-signal-at" and STOP.watched:
        # One write of a whole line: the ranks of a torchrun share stderr, and a line split in two
        # writes could interleave with another rank's.
        os.write(sys.stderr.fileno(), f"waiting for a signal at {where}\n".encode())
        while not STOP.requested:  # a flag this process sets itself: no race, however late the signal
            time.sleep(0.05)
