"""Signals in a command: Ctrl-C, SIGTERM and SIGHUP raised where cleanups run (``Signals``),
never where the exception would be lost (an import, a finalizer), and a second Ctrl-C
that does not cut the first one's cleanup short."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from moespeq_cli.errors import Terminated


def importing(frame) -> bool:
    """Whether the main thread stands inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def deferred(frame) -> bool:
    """Whether an exception raised at ``frame`` would be lost: inside an import (below),
    or inside a finalizer (a ``__del__``, which the garbage collector may run anywhere:
    Python prints "Exception ignored" and goes on, so a Ctrl-C that landed in the disk
    tier's ``PageMapping.__del__`` let `bench` run to its end)."""
    f = frame
    while f is not None:
        if f.f_code.co_name == "__del__":
            return True
        f = f.f_back
    return importing(frame)


SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s))
FIRST = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, s))  # where several came


class Signals:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM and SIGHUP ``Terminated`` in the main
    thread, so that cleanups run (exit 130, 143, 129) rather than the process ending where
    it stands (a calibration's 256 MiB scratch file, a quantize's temporary draft were
    left behind) -- except where the exception would be lost (``deferred``): torch's C++
    import code swallows a Python exception raised there (a `quantize` cancelled in its
    first half second went on to replace the draft; `serve` kept serving) or aborts on it,
    and a finalizer's is printed and dropped; such a signal is raised once the main
    thread is out: a watcher thread looks at its stack every 20 ms and sends the signal
    again then (SIGTERM first where several came). A second Ctrl-C while one waits ends
    the process at once (a hung import). A second Ctrl-C while the first one's cleanup runs
    (reads in flight landing, the partial result written) does not cut it short: it is
    said, and a third ends the process at once; a command that goes on after a Ctrl-C
    (chat's answer stopped) calls ``interrupt_handled``. ``restore`` puts the previous
    handlers back and returns a signal that came and was not raised yet. Off the main
    thread (where handlers cannot be set) it does nothing."""

    CHECK_S = 0.02
    current: Signals | None = None  # the command's, for ``interrupt_handled``

    def __init__(self):
        self.previous: dict = {}
        self.pending: set[int] = set()
        self.watcher: threading.Thread | None = None
        self.closed = False
        self.stopping = False  # a Ctrl-C was raised and its cleanup runs
        self.holding: bytes | None = None  # ``uninterrupted``'s message: signals wait for its block
        self.held: set[int] = set()  # the signals that came during it
        self.pressed_again = False
        if threading.current_thread() is threading.main_thread():
            Signals.current = self
            self.main = threading.main_thread().ident
            # a signal the process was started ignoring stays ignored: `nohup moespeq serve &`
            # survives the terminal closing (SIGHUP), a background job of a non-interactive
            # shell Ctrl-C (SIGINT), as Python itself leaves them
            self.previous = {
                s: signal.signal(s, self.on_signal) for s in SIGNALS if signal.getsignal(s) != signal.SIG_IGN
            }

    @staticmethod
    def raise_for(signum: int):
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

    def on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.stopping:  # the first one's cleanup runs: not cut short
            if self.pressed_again:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.raise_signal(signal.SIGINT)
            self.pressed_again = True
            with contextlib.suppress(OSError):  # (straight to the descriptor: no stream's lock in a handler)
                os.write(2, b"\n(stopping; Ctrl-C again to quit at once)\n")
            return
        if self.holding is not None:  # ``uninterrupted``: its block's end raises what came
            if signum == signal.SIGINT and self.held:  # pressed again (after any signal in it): leave now
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.raise_signal(signal.SIGINT)
            if not self.held:
                with contextlib.suppress(OSError):
                    os.write(2, self.holding)
            self.held.add(signum)  # (one held back before the block, and sent again now, counts once)
            return
        if not deferred(frame):
            waiting, self.pending = self.pending, set()
            chosen = next(s for s in FIRST if s in waiting | {signum})
            self.stopping = chosen == signal.SIGINT
            self.raise_for(chosen)
        if signum == signal.SIGINT and signum in self.pending:  # pressed again: leave now
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)
        self.pending.add(signum)
        if self.watcher is None or not self.watcher.is_alive():
            self.watcher = threading.Thread(target=self.watch, name="moespeq-signals", daemon=True)
            self.watcher.start()

    def watch(self) -> None:
        """Until the main thread has left the import: then the signal again, to it."""
        import sys
        import time

        while self.pending and not self.closed:
            time.sleep(self.CHECK_S)
            frame = sys._current_frames().get(self.main)
            if frame is not None and not deferred(frame) and self.holding is None and self.pending and not self.closed:
                signum = next(s for s in FIRST if s in self.pending)
                signal.pthread_kill(self.main, signum)  # its handler raises it there (or queues it again)
                return

    def handled(self) -> None:
        self.stopping = self.pressed_again = False

    def restore(self) -> int | None:
        if Signals.current is self:
            Signals.current = None
        self.closed = True
        waiting, self.pending = self.pending, set()
        for s, h in self.previous.items():
            if h is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, h)
        self.previous = {}
        return next((s for s in FIRST if s in waiting), None)


@contextlib.contextmanager
def uninterrupted(message: str):
    """A block a signal must not cut in two (``rm`` deleting a model: half a model left
    is worse than the whole): a signal that comes meanwhile is raised when the block ends
    (in the main thread; a block that fails raises its own error instead: the command
    stops all the same), ``message`` said on stderr at the first; a Ctrl-C after it ends
    the process at once."""
    signals = Signals.current
    if signals is None or signals.holding is not None or threading.current_thread() is not threading.main_thread():
        yield  # (no handlers here, or inside an outer block: the outer one's end raises)
        return
    signals.holding = f"\n({message}; Ctrl-C again to stop at once)\n".encode()
    failed = True
    try:
        yield
        failed = False
    finally:
        # what came (and one held back by an import before the block), taken before the
        # watcher may send a held-back one again, and once more after: one that lands
        # between is not lost (from here on a signal is raised where it lands)
        waiting = signals.held | signals.pending
        signals.held, signals.pending = set(), set()
        signals.holding = None
        waiting |= signals.held | signals.pending
        signals.held, signals.pending = set(), set()
        if waiting and not failed:
            chosen = next(s for s in FIRST if s in waiting)
            signals.stopping = chosen == signal.SIGINT
            Signals.raise_for(chosen)


def interrupt_handled() -> None:
    """A Ctrl-C was handled and the command goes on (chat's answer stopped): the next
    Ctrl-C interrupts again."""
    if Signals.current is not None:
        Signals.current.handled()
