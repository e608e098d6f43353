"""The trainer's exit codes (dvgt/train/exit_codes.py) and the restart policies tell one story: a code a restart
can help lies in 128-255, which the Training Operator's restartPolicy ExitCode and the chart's TrainJob
podFailurePolicy retry, and a permanent one in 1-127, on which both fail the job."""

import yaml

from dvgt.k8s.generate import render
from dvgt.train import exit_codes


def test_retryable_codes_are_the_ones_the_exit_code_policy_retries():
    assert [c.code for c in exit_codes.CODES] == [
        exit_codes.FINISHED,
        exit_codes.CRASHED,
        exit_codes.REFUSED,
        exit_codes.PREEMPTED,
        exit_codes.TEMPORARY,
    ]
    for code in exit_codes.CODES[1:]:
        assert code.retryable == (128 <= code.code <= 255), code
    runtime = yaml.safe_load(
        render(
            "dvgt",
            {"api": "trainjob", "restartPolicy": "ExitCode"},
            show_only="templates/trainingruntime.yaml",
        )
    )
    [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    [rule] = node["template"]["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    for code in exit_codes.CODES[1:]:
        assert (code.code in rule["onExitCodes"]["values"]) == (not code.retryable), code
