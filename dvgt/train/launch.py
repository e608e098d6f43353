"""torchrun with an exit code that a restart policy can read: the pod's command in the chart.

    python -m dvgt.train.launch --nproc_per_node=8 -m dvgt.train --config=... [overrides]

The arguments are torchrun's. torchrun itself exits with 1 whenever it stops early: after SIGTERM
(a preempted pod; it forwards the signal to the workers, which commit a final checkpoint and exit
143) and when a worker fails, whatever the worker's exit code said. The Training Operator's
ExitCode restart policy reads 1 as a permanent failure. This launcher exits with what happened
instead (dvgt/train/exit_codes.py): 128 + the signal after a signal (143 for SIGTERM), else the exit
code of the first worker that failed (128 + its signal if one killed it), so a retryable worker
exit (143, 203) stays retryable and a refused run (2) stays permanent. Give the workers time after
SIGTERM: --shutdown-timeout at least checkpoint.preemption_budget_s (the chart sets both).
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def worker_exit_code(error: ChildFailedError) -> int:
    """The first failed worker's exit code, as a shell reports it (128 + N when signal N killed it)."""
    _, failure = error.get_first_failure()
    code = failure.exitcode
    return 128 - code if code < 0 else code or 1


def main() -> None:
    try:
        torchrun()
    except SignalException as error:
        sys.exit(128 + int(error.sigval))
    except ChildFailedError as error:
        sys.exit(worker_exit_code(error))


if __name__ == "__main__":
    main()
