"""Side-by-side checks against the official code: ``dvgt data dump`` and ``dvgt data metrics``.

``dump_samples`` reads a manifest in the form of the reference ``samples_manifest.txt`` (JSON):
``constructor_args`` (the official DVGTSceneDataset arguments of each named config, with optional
``len`` and ``sequence_list`` to check against) and ``samples`` (entries ``{file, config, index}``, an
optional ``keys`` listing what to write, and an optional ``note`` starting with "ComposedDataset" for a
sample passed through the evaluation-mode ComposedDataset, "only key(s) ... kept" naming what it kept).
Each sample is built by our dataset in evaluation mode and written under the official key names.

``score_metric_cases`` scores every ``case_*.npz`` (the official metric function's inputs) and writes
the ``case_*.json`` our metrics give, NaN as null, beside a copy of the case, so the output folder holds
the same pairs as the official one.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dvgt.data.augment import to_tensors
from dvgt.data.remote import open_root
from dvgt.data.scene_dataset import DatasetSpec, SceneDataset
from dvgt.train.eval_metrics import score_case

COMPOSED_NOTE = "ComposedDataset"


def _sample_arrays(sample: dict[str, Any]) -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in sample.items():
        if hasattr(value, "numpy"):
            value = value.numpy()
        arrays[key] = np.asarray(value) if not isinstance(value, str) else np.array(value)
    return arrays


def _kept_keys(entry: dict[str, Any]) -> list[str] | None:
    if "keys" in entry:
        return list(entry["keys"])
    match = re.search(r"only keys? (.+?) kept", entry.get("note", ""))
    return [k.strip() for k in match.group(1).replace(" and ", ",").split(",") if k.strip()] if match else None


def dump_samples(root: str | Path, manifest: str | Path, out: str | Path, s3_cache: Any = None) -> Iterator[str]:
    """Write every manifest sample under ``out`` (same relative file names); yields one line per file.
    ``root`` is a local folder or an s3:// URI, read through ``s3_cache`` (data.s3_cache; None: its defaults)."""
    manifest_data = json.loads(Path(manifest).read_text())
    folder, remote = open_root(root, s3_cache)
    datasets: dict[str, SceneDataset] = {}
    for entry in manifest_data["samples"]:
        name = entry["config"]
        if name not in datasets:
            args = manifest_data["constructor_args"][name]
            dataset = SceneDataset(
                DatasetSpec.from_official(args, folder, remote), config_key=f"manifest config '{name}'"
            )
            ours = [s.name for s in dataset.sequences]
            if "sequence_list" in args and ours != list(args["sequence_list"]):
                raise ValueError(
                    f"manifest config '{name}': our sequences {ours} differ from the manifest's {args['sequence_list']}"
                )
            datasets[name] = dataset
        if not isinstance(entry["index"], int):
            raise ValueError(
                f"{entry['file']}: index {entry['index']} is a training draw; only evaluation samples "
                f"(integer indices) can be rebuilt"
            )
        sample = datasets[name][entry["index"]]
        if entry.get("note", "").startswith(COMPOSED_NOTE):
            sample = to_tensors(sample)  # evaluation mode: no augmentation
        arrays = _sample_arrays(sample)
        keep = _kept_keys(entry)
        if keep is not None:
            missing = [k for k in keep if k not in arrays]
            if missing:
                raise ValueError(f"{entry['file']}: the sample has no key(s) {missing}")
            arrays = {k: arrays[k] for k in keep}
        path = Path(out) / entry["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub: a ** could fill allow_pickle
        yield f"{path}: {arrays.get('seq_name', '')} ({len(arrays)} keys)"


def score_metric_cases(cases_dir: str | Path, out: str | Path) -> Iterator[str]:
    """Score every case_*.npz of ``cases_dir`` into ``out``/case_*.json; yields one line per case."""
    cases = sorted(Path(cases_dir).glob("case_*.npz"))
    if not cases:
        raise FileNotFoundError(f"no case_*.npz under '{cases_dir}'")
    Path(out).mkdir(parents=True, exist_ok=True)
    for case in cases:
        with np.load(case, allow_pickle=False) as data:
            metrics = score_case({k: data[k] for k in data.files})
        clean = {
            k: [None if isinstance(v, float) and math.isnan(v) else v for v in values] for k, values in metrics.items()
        }
        path = Path(out) / f"{case.stem}.json"
        path.write_text(json.dumps(clean, indent=1, ensure_ascii=False))
        if case.resolve() != (Path(out) / case.name).resolve():
            shutil.copyfile(case, Path(out) / case.name)
        yield f"{path}: {', '.join(clean)}"
