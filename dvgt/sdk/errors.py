"""The SDK's errors. Each message is one line that says what went wrong and what to do; they are
RuntimeErrors (ValueErrors for bad input), so `dvgt` prints them as `error: ...` and exits 2."""

from __future__ import annotations


class SdkError(RuntimeError):
    """Base of every error the SDK raises on purpose."""


class InvalidJobError(SdkError, ValueError):
    """The job is refused before any request is sent (chart schema, name, admission rules)."""


class NoClusterConfigError(SdkError):
    """Neither a kubeconfig nor an in-cluster service account."""


class ClusterUnreachableError(SdkError):
    """The API server did not answer."""


class UnauthorizedError(SdkError):
    """401: the credentials of the kubeconfig were refused."""


class ForbiddenError(SdkError):
    """403: the user may not do this verb on this resource."""


class JobExistsError(SdkError):
    """409: a PyTorchJob of that name exists."""


class JobNotFoundError(SdkError):
    """404 for a job that does not exist."""


class OperatorMissingError(SdkError):
    """404 for the pytorchjobs resource itself: the Training Operator's CRD is not installed."""


class JobFailedError(SdkError):
    """wait() saw the job fail while waiting for another state."""
