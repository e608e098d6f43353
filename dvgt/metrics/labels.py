"""The labels that identify one training process in every series it writes.

Label names avoid the target labels Prometheus attaches at scrape time (`job`, `instance`, and the
`namespace`/`pod`/`container` a PodMonitor adds): a clashing name would be renamed to `exported_job`
or, with honor_labels, would overwrite the scrape target's own label. Hence `dvgt_job`, not `job`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

LABEL_NAMES = ("dvgt_job", "stage", "node_rank", "local_rank")


def job_name(default: str = "", env: Mapping[str, str] | None = None) -> str:
    """DVGT_JOB_NAME (the chart sets it to the PyTorchJob's name), else `default`."""
    env = os.environ if env is None else env
    return env.get("DVGT_JOB_NAME") or default


def node_rank(env: Mapping[str, str] | None = None) -> str:
    """The node's index in the job: torchrun's GROUP_RANK, else the Training Operator's
    PET_NODE_RANK, else RANK // LOCAL_WORLD_SIZE (a process started without torchrun, where the
    operator's RANK is the node rank), else 0."""
    env = os.environ if env is None else env
    for key in ("GROUP_RANK", "PET_NODE_RANK"):
        if env.get(key, "").isdigit():
            return env[key]
    return str(int(env.get("RANK", "0")) // max(1, int(env.get("LOCAL_WORLD_SIZE", "1"))))


def rank_labels(exp_name: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The label values of this training process: job (DVGT_JOB_NAME, else exp_name), stage
    (exp_name), node rank and local rank (LOCAL_RANK, else 0)."""
    env = os.environ if env is None else env
    return {
        "dvgt_job": job_name(exp_name, env),
        "stage": exp_name,
        "node_rank": node_rank(env),
        "local_rank": env.get("LOCAL_RANK", "0"),
    }
