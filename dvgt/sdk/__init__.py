"""Python SDK: describe a training job (TrainingJob), submit and follow it (Client) on a cluster or on
this machine. docs/sdk.md is the guide.

    from dvgt.sdk import TrainingJob, Client
    job = TrainingJob(stage="finetune-nuscenes", nodes=2, gpus_per_node=8, profile="h100-80g",
                      image="registry.example/dvgt:1.0", checkpoint_uri="s3://bucket/runs/nusc-1",
                      s3_secret="dvgt-s3", overrides={"optim.lr": 5e-6})
    client = Client()
    client.submit(job)
    client.wait(job.name, until="Running")
"""

from dvgt.sdk.client import Client
from dvgt.sdk.errors import (
    ClusterUnreachableError,
    ForbiddenError,
    InvalidJobError,
    JobExistsError,
    JobFailedError,
    JobNotFoundError,
    NoClusterConfigError,
    OperatorMissingError,
    SdkError,
    UnauthorizedError,
)
from dvgt.sdk.job import TrainingJob
from dvgt.sdk.status import CheckpointInfo, Condition, JobStatus, PodStatus, ReplicaStatus

__all__ = [
    "TrainingJob",
    "Client",
    "JobStatus",
    "Condition",
    "ReplicaStatus",
    "PodStatus",
    "CheckpointInfo",
    "SdkError",
    "InvalidJobError",
    "NoClusterConfigError",
    "ClusterUnreachableError",
    "UnauthorizedError",
    "ForbiddenError",
    "JobExistsError",
    "JobNotFoundError",
    "OperatorMissingError",
    "JobFailedError",
]
