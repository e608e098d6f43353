"""torchrun with an exit code that a restart policy can read.

    python -m dvgt.train.launch --nproc_per_node=8 -m dvgt.train --config=... [overrides]

The arguments are torchrun's. On SIGTERM (a pod being preempted) torchrun forwards the signal to
the workers, which commit a final checkpoint and exit with 143, but torchrun itself then exits with
1, which the Training Operator's ExitCode restart policy treats as a permanent failure. This
launcher exits with 128 + the signal number instead (143 for SIGTERM: retryable). Give the workers
time: --shutdown-timeout (or TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default 30 s) at least
checkpoint.preemption_budget_s; docs/checkpoints.md has the whole recipe.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun


def main() -> None:
    try:
        torchrun()
    except SignalException as error:
        sys.exit(128 + int(error.sigval))


if __name__ == "__main__":
    main()
