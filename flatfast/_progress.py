"""Progress bars for long work: a tqdm bar on stderr when asked for, or by default when stderr is a terminal.
Every part that runs for long (curvature passes, EP sweeps, kernel draws, SMC stages) reports through here."""
from __future__ import annotations

import sys


def progress_counter(total, desc, enabled):
    """``(update, bar)``: ``update(n)`` moves the bar to n done of ``total`` (None: a counter without a total);
    both None when no bar is wanted (``enabled`` True, False, or None for "when stderr is a terminal")."""
    if not (enabled if enabled is not None else sys.stderr.isatty()):
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
    state = {"n": 0}

    def update(n):
        bar.update(n - state["n"])
        state["n"] = n

    return update, bar


def with_progress(total, desc, enabled, run):
    """``run(update)`` with a progress bar of ``total`` steps (``enabled``: True, False, or None for "when stderr is
    a terminal"); ``update`` is None without a bar."""
    update, bar = progress_counter(total, desc, enabled)
    try:
        return run(update)
    finally:
        if bar is not None:
            bar.close()
