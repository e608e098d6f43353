"""Data: the DVGT preprocessed layout, the synthetic generator, clip datasets and the grouped loader.

docs/data.md describes the layout and the conventions.
"""

from dvgt.data.dataset import ClipDataset, ClipRequest, MixedClipDataset, collate_clips, open_entry
from dvgt.data.layout import DataFileError, read_scene_table, read_split, write_scene_table
from dvgt.data.loader import build_dataloader, load_clip
from dvgt.data.sampler import GroupedBatchSampler
from dvgt.data.synthetic import demo_spec, ensure_synthetic_dataset, generate_synthetic_dataset

__all__ = [
    "ClipDataset", "ClipRequest", "DataFileError", "GroupedBatchSampler", "MixedClipDataset", "build_dataloader",
    "collate_clips", "demo_spec", "ensure_synthetic_dataset", "generate_synthetic_dataset", "load_clip",
    "open_entry", "read_scene_table", "read_split", "write_scene_table",
]
