"""Checkpoint save and load through S3 against a tuned raw boto3 multipart transfer of the same
bytes, side by side on one SeaweedFS server (goals: save <= 1.02x raw, load <= 0.8x raw).

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/checkpoint_s3.py [--state-mb 528] [--repeats 5]

A training state (model weights plus AdamW moments) is
  saved (a) raw: boto3 upload_fileobj of its two big objects, already serialised in memory, multipart
        16 MB parts x 16 threads (the tuned baseline);
        (b) ours: CheckpointManager.save until the manifest is committed, serialisation (the copy
        into the staged file images) included, at the default checkpoint.s3 settings;
  loaded (a) raw: boto3 download_fileobj of the same objects into memory, 16 MB x 16 threads;
         (b) ours: Checkpoint.load_all as a resume does it: downloaded, size and xxh3_128 checked
         as the bytes arrive, parsed into tensors (views of the downloaded bytes).
Every round runs each contender once in turn, so a burst of load on a shared machine hits them
alike; the ratios are of the medians over --repeats rounds (ours / raw: below 1 is faster).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import SeaweedS3

from dvgt.checkpoint.manager import CheckpointManager
from dvgt.checkpoint.safetensors_stream import write_safetensors, write_state
from dvgt.config import S3Config

RAW_PART_MB, RAW_THREADS = 16, 16


def training_state(total_mb: int):
    """A model of 4 MB fp32 tensors and its AdamW state (two moments each): total_mb in all."""
    tensors = max(1, total_mb // 12)
    model = {f"layer{i}.weight": torch.randn(1024, 1024) for i in range(tensors)}
    optimizer = {
        "state": {
            i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(1024, 1024), "exp_avg_sq": torch.rand(1024, 1024)}
            for i in range(tensors)
        },
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": list(range(tensors))}],
    }
    return model, optimizer


def serialised(model, optimizer) -> dict:
    """The bytes of our two big objects, as CheckpointManager writes them."""
    out, opt = io.BytesIO(), io.BytesIO()
    write_safetensors(model, out)
    write_state(optimizer, opt)
    return {"model.safetensors": out.getvalue(), "optimizer.safetensors": opt.getvalue()}


def raw_client(server: SeaweedS3):
    """A plain boto3 client with a connection for each of the tuned transfer's threads."""
    import boto3
    from botocore.config import Config

    env = server.env()
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
        config=Config(
            s3={"addressing_style": "path"},
            max_pool_connections=RAW_THREADS,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def rounds(fns, repeats: int) -> list:
    """Median time of each function over `repeats` rounds, each round running them all in turn."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, own in zip(fns, times):
            started = time.perf_counter()
            fn()
            own.append(time.perf_counter() - started)
    return [statistics.median(own) for own in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=int, default=528)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from boto3.s3.transfer import TransferConfig

    options = S3Config()
    tuned = TransferConfig(
        multipart_threshold=RAW_PART_MB * 2**20, multipart_chunksize=RAW_PART_MB * 2**20, max_concurrency=RAW_THREADS
    )
    model, optimizer = training_state(args.state_mb)
    blobs = serialised(model, optimizer)
    total = sum(len(b) for b in blobs.values())
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedS3(Path(tmp) / "weed").start()
        try:
            os.environ.update(server.env())
            server.make_bucket("bench")
            client = raw_client(server)

            def raw_save() -> None:
                for name, blob in blobs.items():
                    client.upload_fileobj(io.BytesIO(blob), "bench", f"raw/{name}", Config=tuned)

            manager = CheckpointManager("s3://bench/ours", async_mode="off", keep_last=1, s3=options)
            events = []

            def our_save() -> None:
                step = len(events) + 1
                events.append(
                    manager.save(
                        step,
                        model_state=model,
                        optimizer_state=optimizer,
                        trainer_state={"step": step},
                        config_yaml="exp_name: bench\n",
                        epoch=0,
                    )
                )
                assert events[-1].outcome == "ok", events[-1].error

            raw_save_t, our_save_t = rounds([raw_save, our_save], args.repeats)

            def raw_load() -> None:
                for name in blobs:
                    client.download_fileobj("bench", f"raw/{name}", io.BytesIO(), Config=tuned)

            reader = CheckpointManager("s3://bench/ours", s3=options)  # a client, as the trainer has at start
            newest = reader.latest()

            def our_load() -> None:
                newest.load_all(0)

            raw_load_t, our_load_t = rounds([raw_load, our_load], args.repeats)
        finally:
            server.stop()

    mb = 2**20
    blocked = statistics.median(e.blocked_s for e in events[1:] or events)  # the host buffers exist after the first
    print(
        f"training state {total / mb:.0f} MB (model {len(blobs['model.safetensors']) / mb:.0f} MB + optimizer); "
        f"SeaweedFS on 127.0.0.1 (sharing this machine's {os.cpu_count()} cores); median of {args.repeats} rounds"
    )
    print(
        f"  save, raw boto3 upload_fileobj ({RAW_PART_MB} MB x {RAW_THREADS}):  {raw_save_t:6.2f} s "
        f"{total / mb / raw_save_t:7.1f} MB/s   1.00"
    )
    print(
        f"  save, ours ({options.part_size_mb} MB x {options.concurrency}, until committed): {our_save_t:6.2f} s "
        f"{total / mb / our_save_t:7.1f} MB/s   {our_save_t / raw_save_t:.2f}x raw   (goal <= 1.02)"
    )
    print(f"        of which the loop is blocked (copy into the staged images): {blocked:.3f} s")
    print(
        f"  load, raw boto3 download_fileobj ({RAW_PART_MB} MB x {RAW_THREADS}): {raw_load_t:6.2f} s "
        f"{total / mb / raw_load_t:7.1f} MB/s   1.00"
    )
    print(
        f"  load, ours (verified and parsed, as a resume): {our_load_t:6.2f} s {total / mb / our_load_t:7.1f} MB/s   "
        f"{our_load_t / raw_load_t:.2f}x raw   (goal <= 0.80)"
    )


if __name__ == "__main__":
    main()
