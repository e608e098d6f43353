"""Data: the official DVGT preprocessed format, its datasets and samples, the sampler and the loaders,
and the synthetic generator. docs/data.md describes the format and every convention."""

from dvgt.data.format import DataFileError
from dvgt.data.loader import build_eval_loader, build_train_loader, load_clip, open_datasets
from dvgt.data.scene_dataset import DatasetSpec, SampleRequest, SceneDataset
from dvgt.data.synthetic import ensure_synthetic_dataset, generate_synthetic_dataset

__all__ = [
    "DataFileError",
    "DatasetSpec",
    "SampleRequest",
    "SceneDataset",
    "build_eval_loader",
    "build_train_loader",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
    "load_clip",
    "open_datasets",
]
