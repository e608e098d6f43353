"""The trainer's exit codes: what each tells the operator, and whether a restart can help.

CODES is the one table of them: docs/kubernetes.md's table is generated from it (`make manifests`).
The Training Operator's restartPolicy ExitCode (and the chart's podFailurePolicy for a TrainJob) retries
exit codes 128-255 and fails the job on 1-127, so every retryable code lies in 128-255 (203 is sysexits'
EX_TEMPFAIL, 75, plus 128) and every permanent one in 1-127; tests/test_exit_codes.py checks it.
`python -m dvgt.train.launch` passes a worker's code on as the pod's (torchrun itself would exit 1).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

FINISHED = 0
CRASHED = 1
REFUSED = 2
PREEMPTED = 143  # 128 + SIGTERM
TEMPORARY = 203  # 128 + EX_TEMPFAIL


@dataclass(frozen=True)
class ExitCode:
    code: int
    meaning: str
    retryable: bool  # a restart can help (the run resumes from its newest committed checkpoint)


CODES = (
    ExitCode(FINISHED, "finished: the last step is committed", False),
    ExitCode(CRASHED, "crashed: an unexpected error (a bug; the traceback is in the log)", False),
    ExitCode(
        REFUSED,
        "refused: a bad config or input, a checkpoint of another model, a run that diverged (non-finite steps): "
        "fix it and resubmit",
        False,
    ),
    ExitCode(PREEMPTED, "preempted (SIGTERM): the final checkpoint is committed (or spilled)", True),
    ExitCode(
        TEMPORARY,
        "temporary: the checkpoint store is unreachable (at start, or the final checkpoint reached only the "
        "local spill folder and is uploaded at the next start), or a peer rank was lost",
        True,
    ),
)


def peer_lost(error: BaseException) -> bool:
    """A collective failed because another rank went away (its pod was killed or restarted)."""
    torch = sys.modules.get("torch")  # no torch import here: the exporter and the SDK use this module too
    if torch is not None and isinstance(error, torch.distributed.DistError):  # NCCL, the store, the network
        return True
    # gloo reports a vanished peer as a plain RuntimeError from its TCP transport
    return isinstance(error, RuntimeError) and "gloo/transport" in str(error)


def for_error(error: BaseException) -> int:
    """The exit code of a run stopped by `error` (one the command line reports as a one-line error)."""
    from dvgt.checkpoint.storage import StorageError

    if isinstance(error, StorageError) and error.retryable or peer_lost(error):
        return TEMPORARY
    return REFUSED
