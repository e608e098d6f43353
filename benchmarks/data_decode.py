"""JPEG decode + resize throughput per core: the official path against ours (DCT-scaled decoding), side by side.

    flock /tmp/dvgt-heavy.lock .venv/bin/python benchmarks/data_decode.py [--root ROOT --dataset D --split S]
        [--widths 512] [--aspect 1.77] [--repeats 3] [--limit N] [--s3]

Without --root it writes a temporary official tree: the nuScenes rows of the official fixture
(tests/data/official/official_format) with their JPEGs upscaled to nuScenes' stored 1600x900 (BICUBIC)
and re-encoded at quality 95 (the official writer's), intrinsics scaled to match. With --root it reads
that tree as it is, through the project's reader (format.read_table, format.open_image via
SceneDataset.view_image), so any root the reader accepts can be measured.

For each image width (512: the DVGT-1/DVGT-2 stage configs), each view is prepared as an unaugmented
view of that width and --aspect (SceneDataset.view_image) once with exact decoding (the official
path: full decode, crop, LANCZOS resize) and once with data.train.fast_decode (libjpeg decodes at
1/2, 1/4 or 1/8 scale when the crop keeps 1.5 times the resized size, then the same crop and LANCZOS
resize), alternating which goes first, in one
process: images/s of one process is images/s per core (PIL decodes and resizes on one thread). A
first untimed pass warms the page cache and gives the outputs to compare: shapes must be identical
(and the intrinsics are by construction: both paths share one ViewPlan); pixel values are compared
as mean and max |difference| in uint8 and as PSNR of ours against the exact output, next to the PSNR
of a quality-95 JPEG round trip of the exact output (the official writer's quality): "within JPEG
tolerance" means ours is at least as close to the exact output as that round trip.

With --s3 the same tree is also read from a SeaweedFS server started on 127.0.0.1 (s3://bench/tree,
through dvgt/data/remote.py as `data.root=s3://...` does): each path reads through a node cache of
its own, interleaved as above; the first pass is the cold cache (every file downloaded), the
following passes the warm one.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import SeaweedS3

from dvgt.config import S3CacheConfig
from dvgt.data import format as fmt
from dvgt.data.remote import open_root
from dvgt.data.scene_dataset import DatasetSpec, SceneDataset, target_shape

FIXTURE = Path(__file__).resolve().parents[1] / "tests/data/official/official_format"
NUSCENES_STORED = (1600, 900)  # (width, height) of a stored nuScenes JPEG


def upscaled_tree(
    out: Path, dataset: str = "nuscene", split: str = "val", size: tuple[int, int] = NUSCENES_STORED
) -> Path:
    """An official tree at ``out`` holding the fixture's ``dataset``/``split`` rows with their JPEGs
    upscaled to ``size`` (width, height) and re-encoded at quality 95, intrinsics scaled to match."""
    source, target = fmt.Tree(FIXTURE, dataset), fmt.Tree(out, dataset)
    table = fmt.read_table(source.parquet(split))
    intrinsics = table.intrinsics.copy()
    for row, filename in enumerate(table.filename.to_pylist()):
        with Image.open(source.image(filename)) as image:
            sx, sy = size[0] / image.width, size[1] / image.height
            fmt.write_image(
                target.image(filename), np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC))
            )
        k = intrinsics[row]  # pixel centres at +0.5 while scaling
        k[0, 0], k[1, 1] = k[0, 0] * sx, k[1, 1] * sy
        k[0, 2], k[1, 2] = (k[0, 2] + 0.5) * sx - 0.5, (k[1, 2] + 0.5) * sy - 0.5
    parquet = pq.read_table(source.parquet(split))  # every column as written, the intrinsics replaced
    column = pa.array(list(intrinsics.reshape(-1, 9)), type=pa.list_(pa.float64()))
    parquet = parquet.set_column(parquet.column_names.index("intrinsics"), "intrinsics", column)
    target.parquet(split).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(parquet, target.parquet(split), compression="zstd")
    return out


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def reencoded(rgb: np.ndarray, quality: int = 95) -> np.ndarray:
    """``rgb`` after a JPEG round trip at ``quality``: the yardstick of "within JPEG tolerance"."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def compare(root: str | Path, dataset: str, split: str, width: int, aspect: float, repeats: int, limit: int) -> dict:
    exact = SceneDataset(DatasetSpec(root=root, parquet=fmt.Tree(Path(root), dataset).parquet(split)))
    fast = SceneDataset(dataclasses.replace(exact.spec, fast_decode=True))
    target = target_shape(width, aspect, exact.spec.patch_size)
    rows = range(min(limit, exact.table.num_rows))
    pairs = [(exact.view_image(row, target), fast.view_image(row, target)) for row in rows]  # warm-up + outputs
    stored = exact._load_image(0, target, None)
    passes = timed_passes({"exact": exact, "fast": fast}, rows, target, repeats)
    seconds = {name: sum(p[name] for p in passes) for name in ("exact", "fast")}
    differences = np.concatenate([np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel() for a, b in pairs])
    count = len(rows) * repeats
    return {
        "target": target,
        "stored": stored[2],
        "draft": stored[1].draft_scale(),
        "images": len(rows),
        "same_shapes": all(a.shape == b.shape == (*target, 3) for a, b in pairs),
        "exact_ips": count / seconds["exact"],
        "fast_ips": count / seconds["fast"],
        "mean_abs": float(differences.mean()),
        "max_abs": int(differences.max()),
        "psnr": psnr(np.concatenate([a.ravel() for a, _ in pairs]), np.concatenate([b.ravel() for _, b in pairs])),
        "psnr_q95": psnr(
            np.concatenate([a.ravel() for a, _ in pairs]), np.concatenate([reencoded(a).ravel() for a, _ in pairs])
        ),
    }


def timed_passes(readers: dict, rows: range, target: tuple[int, int], repeats: int) -> list[dict]:
    """Seconds per reader for each pass over ``rows``, the readers' order alternating per row."""
    passes = []
    for repeat in range(repeats):
        seconds = dict.fromkeys(readers, 0.0)
        for row in rows:
            names = list(readers) if (row + repeat) % 2 == 0 else list(readers)[::-1]
            for name in names:
                started = time.perf_counter()
                readers[name].view_image(row, target)
                seconds[name] += time.perf_counter() - started
        passes.append(seconds)
    return passes


def compare_s3(
    tree: Path, dataset: str, split: str, width: int, aspect: float, repeats: int, limit: int, tmp: Path
) -> dict:
    """Images/s per core of both paths reading ``tree`` from SeaweedFS: cold cache (the first pass),
    warm cache (the passes after it)."""
    import boto3

    server = SeaweedS3(tmp / "seaweedfs").start()
    try:
        os.environ.update(server.env())
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        for path in sorted(p for p in tree.rglob("*") if p.is_file()):
            client.upload_file(str(path), "bench", f"tree/{path.relative_to(tree).as_posix()}")
        readers = {}
        for name, fast in (("exact", False), ("fast", True)):
            cache = S3CacheConfig(dir=str(tmp / f"cache-{name}"), max_gib=4.0)
            root, remote = open_root("s3://bench/tree", cache)
            spec = DatasetSpec(
                root=root, parquet=fmt.Tree(root, dataset).parquet(split), remote=remote, fast_decode=fast
            )
            readers[name] = SceneDataset(spec)  # fetches the parquet: not timed
        target = target_shape(width, aspect, readers["exact"].spec.patch_size)
        rows = range(min(limit, readers["exact"].table.num_rows))
        cold, *warm = timed_passes(readers, rows, target, 1 + repeats)
        count = len(rows)
        return {
            name: {"cold_ips": count / cold[name], "warm_ips": count * len(warm) / sum(p[name] for p in warm)}
            for name in readers
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="an official tree to read (default: the fixture upscaled to 1600x900)")
    parser.add_argument("--dataset", default="nuscene")
    parser.add_argument("--split", default="val")
    parser.add_argument("--widths", type=int, nargs="+", default=[512], help="image widths (data.train.img_width)")
    parser.add_argument("--aspect", type=float, default=1.77, help="width / height of the view (nuScenes evaluation)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the images")
    parser.add_argument("--limit", type=int, default=sys.maxsize, help="at most this many images")
    parser.add_argument("--s3", action="store_true", help="also read the tree from a local SeaweedFS, cold and warm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or upscaled_tree(Path(tmp), args.dataset, args.split)
        print(
            f"{args.dataset}_{args.split} of {args.root or 'the fixture upscaled to 1600x900, quality 95'}; "
            f"one process, {args.repeats} interleaved passes"
        )
        for width in args.widths:
            r = compare(root, args.dataset, args.split, width, args.aspect, args.repeats, args.limit)
            print(
                f"  width {width}: {r['images']} images {r['stored'][1]}x{r['stored'][0]} -> "
                f"{r['target'][1]}x{r['target'][0]} (DCT scale 1/{r['draft']})"
            )
            print(f"    official (full decode + resize): {r['exact_ips']:7.1f} images/s per core")
            print(
                f"    ours (DCT-scaled decode + resize): {r['fast_ips']:7.1f} images/s per core   "
                f"ratio {r['fast_ips'] / r['exact_ips']:.2f}x"
            )
            print(
                f"    output shapes identical: {r['same_shapes']}; |ours - exact| uint8 mean {r['mean_abs']:.3f}, "
                f"max {r['max_abs']}; PSNR {r['psnr']:.1f} dB (a quality-95 JPEG round trip of the exact output: "
                f"{r['psnr_q95']:.1f} dB)"
            )
            if args.s3:
                r = compare_s3(
                    Path(root), args.dataset, args.split, width, args.aspect, args.repeats, args.limit, Path(tmp)
                )
                for cache in ("cold", "warm"):
                    exact, fast = r["exact"][f"{cache}_ips"], r["fast"][f"{cache}_ips"]
                    print(
                        f"    from SeaweedFS, {cache} cache: official {exact:7.1f}, ours {fast:7.1f} images/s per core   "
                        f"ratio {fast / exact:.2f}x"
                    )


if __name__ == "__main__":
    main()
