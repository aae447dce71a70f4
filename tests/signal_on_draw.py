"""A signal at a known step: the real data iterator, sending this process SIGTERM while it draws
batch `at` (that step completes, then the loop stops at its next check).

Run as a program, `python tests/signal_on_draw.py -m MODULE ARGS...` runs `python -m MODULE
ARGS...` with the training's iterators so wrapped when SIGTERM_AT_BATCH=N is set: a subprocess
(a process of a multi-host job) interrupted at an exact step, not after a race with a timer.
"""

import os
import signal


class SignalOnDraw:
    """The real data iterator, sending this process SIGTERM while it draws batch `at`."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.draws = inner, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.draws += 1
        if self.draws == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _main(argv: list[str]) -> None:
    import pathlib
    import runpy
    import sys

    if argv[1:2] != ["-m"] or len(argv) < 3:
        raise SystemExit(f"usage: {argv[0]} -m MODULE [ARGS...]")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout first
    at = os.environ.get("SIGTERM_AT_BATCH")
    if at:
        from idfuse_jax import train_lib

        real = train_lib.index_iterator
        train_lib.index_iterator = lambda *a, **k: SignalOnDraw(real(*a, **k), int(at))
    sys.argv = [argv[2], *argv[3:]]
    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    import sys

    _main(sys.argv)
