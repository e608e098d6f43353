"""The S3 options of the config (`checkpoint.s3`, `data.s3`, `data.s3_cache`), apart from dvgt/config.py so that
the storage and data readers take their defaults without importing the whole configuration."""

from __future__ import annotations

from dataclasses import dataclass


# fmt: off
@dataclass
class S3Config:
    endpoint_url: str | None = None  # S3 endpoint; None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / the profile's region
    addressing_style: str = "auto"  # auto (path-style when an endpoint is set, else virtual) | path | virtual
    part_size_mb: int = 32  # multipart part size; upload memory is about part size x (concurrency + 2)
    concurrency: int = 8  # parts uploaded / byte ranges downloaded in parallel per object
    retry_mode: str = "adaptive"  # botocore retry mode on throttling, 5xx, timeouts: standard | adaptive
    max_attempts: int = 8  # attempts per request, the first included
    connect_timeout_s: float = 10.0  # TCP connect timeout per attempt
    read_timeout_s: float = 60.0  # socket read timeout per attempt


@dataclass
class S3CacheConfig:
    dir: str = "~/.cache/dvgt/data"  # node-local folder holding the files of s3:// data roots as they are read (the chart: an emptyDir); shared by every process of the node
    max_gib: float = 20.0  # bound on the folder's size: past it the least recently read files are evicted (the chart: 90% of data.s3CacheSize)
# fmt: on
