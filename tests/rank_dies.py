"""`python tests/rank_dies.py ARGS...`: the resnext CLI, except that the torchrun process whose
RANK is $DIE_RANK kills itself (SIGKILL: no cleanup, like a crash or an OOM kill) right after it
has written $DIE_AFTER batches of batch-predict rows. For tests of what a dying process leaves."""

from __future__ import annotations

import os
import signal
import sys

from resnext_cli.cli import main
from resnext_cli.outputs import results

if os.environ.get("RANK") == os.environ.get("DIE_RANK"):
    add, written = results.Journal.add, [0]

    def add_then_die(journal: results.Journal, rows: list) -> None:
        add(journal, rows)
        written[0] += 1
        if written[0] == int(os.environ["DIE_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)

    results.Journal.add = add_then_die  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
