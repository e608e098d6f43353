"""DCT-scaled JPEG decoding (data.train.fast_decode): the same views as the official decode, geometry
exact and pixels within JPEG tolerance, on the official fixture tree; used for training only."""

import dataclasses
import io
import math
import shutil

import numpy as np
import pytest
from conftest import OFFICIAL_TREE
from PIL import Image

from dvgt.config import load_config
from dvgt.data import format as fmt
from dvgt.data.loader import dataset_spec
from dvgt.data.scene_dataset import ALL_TARGETS, DatasetSpec, SampleRequest, SceneDataset, target_shape


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    mse = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def jpeg_round_trip(rgb: np.ndarray) -> np.ndarray:
    """The exact view saved and read back at the official writer's quality (95): the tolerance's yardstick."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return np.asarray(Image.open(buffer).convert("RGB"))


def training_pair(width: int, root=OFFICIAL_TREE) -> tuple[SceneDataset, SceneDataset]:
    """The fixture's nuScenes split in training mode with the official augmentation, exact and fast."""
    spec = DatasetSpec(
        root=root,
        parquet=fmt.Tree(root, "nuscene").parquet("val"),
        mode="train",
        image_width=width,
        aug_pixel_aspect_range=(0.8, 1.0),
        aug_safe_scales=(0.8, 1.2),
        random_resize=True,
        targets=ALL_TARGETS,
    )
    return SceneDataset(spec), SceneDataset(dataclasses.replace(spec, fast_decode=True))


# The fixture's JPEGs are 249x140: a 64-pixel-wide view decodes at 1/2, a 32-pixel-wide one at 1/4.
@pytest.mark.parametrize("width, scale", [(64, 2), (32, 4)])
def test_fast_decoding_keeps_the_geometry_and_stays_within_jpeg_tolerance(width, scale):
    exact, fast = training_pair(width)
    assert fast._load_image(0, target_shape(width, 1.77, 16), None)[1].draft_scale() == scale
    for seed in range(5):
        request = SampleRequest(index=0, views=3, frames=2, aspect_ratio=1.77, seed=seed)
        want, got = exact[request], fast[request]
        assert sorted(got) == sorted(want)
        for key in set(want) - {"images"}:  # intrinsics, depths, points, poses: identical
            assert np.array_equal(np.asarray(want[key]), np.asarray(got[key])), key
        assert got["images"].shape == want["images"].shape and got["images"].dtype == np.uint8
        for a, b in zip(
            want["images"].reshape(-1, *want["images"].shape[-3:]), got["images"].reshape(-1, *got["images"].shape[-3:])
        ):
            assert psnr(a, b) >= psnr(a, jpeg_round_trip(a)), "farther from the exact view than a q95 round trip"
        assert not np.array_equal(want["images"], got["images"])  # the DCT-scaled decoder did run


def test_a_view_too_small_to_shrink_is_decoded_exactly():
    """Where no DCT scale leaves the crop at least the resized size, fast decoding is the official path."""
    exact, fast = training_pair(96)
    target = target_shape(96, 1.77, 16)
    assert fast._load_image(0, target, None)[1].draft_scale() == 1
    assert np.array_equal(exact.view_image(0, target), fast.view_image(0, target))


def test_a_truncated_jpeg_names_the_file_on_the_fast_path(tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(OFFICIAL_TREE, root)
    _, fast = training_pair(64, root)
    path = fast.tree.image(fast.table.filename[0].as_py())
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(fmt.DataFileError, match=f"cannot decode image file '{path}'.*re-copy it"):
        fast.view_image(0, target_shape(64, 1.77, 16))


def test_only_training_decodes_fast():
    cfg = load_config("train/dvgt1/default.yaml")
    assert cfg.data.train.fast_decode and cfg.data.val.fast_decode  # the key is on in both splits ...
    specs = {
        split: dataset_spec(
            cfg.data, split, cfg.data[split].datasets[0], patch_size=16, gt_scale_factor=0.1, targets=ALL_TARGETS
        )
        for split in ("train", "val")
    }
    assert specs["train"].fast_decode and not specs["val"].fast_decode  # ... but evaluation decodes exactly
