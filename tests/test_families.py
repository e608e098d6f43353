"""The model-family registry: a family declared in a test trains through the normal trainer, and every
built-in family declares what the trainer, inference and the feature cache ask of it."""

from __future__ import annotations

from functools import partial
from typing import Any, TypedDict

import pytest
import torch
from conftest import tiny_overrides
from torch import Tensor, nn

from dvgt import families
from dvgt.config import ConfigError, ModelConfig, load_config
from dvgt.families.base import Batch, ModelFamily, Predictions
from dvgt.train.logger import read_log
from dvgt.train.loop import train
from dvgt.train.losses import point_losses


class ToyPredictions(TypedDict):
    points: Tensor  # [B, T, V, H, W, 3]
    points_conf: Tensor  # [B, T, V, H, W]


class ToyModel(nn.Module):
    """Points from each pixel's colour: a 1x1 convolution ("aggregator") and a scale ("point_head")."""

    patch_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.aggregator = nn.Conv2d(3, 4, 1)
        self.point_head = nn.Linear(4, 4)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        B, T, V, _, H, W = images.shape
        features = self.aggregator(images.flatten(0, 2)).permute(0, 2, 3, 1)  # [BTV, H, W, 4]
        out = self.point_head(features).reshape(B, T, V, H, W, 4)
        return {"points": out[..., :3], "points_conf": 1 + out[..., 3].exp()}


def toy_loss(predictions: Predictions, batch: Batch, loss_cfg: Any) -> dict[str, Tensor]:
    return point_losses(predictions, batch["points_in_ego_first"], batch, loss_cfg.point)


def toy_post_process(
    predictions: Predictions, batch: Batch, gt_scale_factor: float, eval_cfg: Any
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return (
        {"points_in_ego_first": predictions["points"].double() / gt_scale_factor},
        {"points_in_ego_first": batch["points_in_ego_first"].double() / gt_scale_factor},
    )


TOY = ModelFamily(
    name="toy",
    title="Toy",
    build=lambda model_cfg: ToyModel(),
    predictions=ToyPredictions,
    loss=lambda model, loss_cfg: partial(toy_loss, loss_cfg=loss_cfg),
    post_process=toy_post_process,
    training_targets=frozenset({"points_in_ego_first"}),
)


@pytest.fixture
def toy_family():
    families.register(TOY)
    try:
        yield TOY
    finally:
        families.unregister(TOY.name)


def test_a_family_declared_in_a_test_trains_through_the_normal_trainer(toy_family, tiny_data_root, tmp_path):
    """One registration (no other file touched): the config accepts model.name=toy, the trainer builds,
    trains two steps, evaluates with the family's post-processing and checkpoints it."""
    overrides = tiny_overrides(tiny_data_root, tmp_path, max_epochs=1, limit_train_batches=2)
    cfg = load_config("train/dvgt1/demo.yaml", [*overrides, "model.name=toy", "optim.frozen_module_names=[]"])
    result = train(cfg)
    assert result["step"] == 2
    records = read_log(tmp_path / "train_log.jsonl")
    steps = [r for r in records if r.get("kind") == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss/objective"])) for r in steps)
    evals = [r for r in records if r.get("kind") == "eval"]
    assert evals and all(r["val/demo/ego_first_chamfer"] > 0 for r in evals)  # scored from the toy's points
    assert (tmp_path / "ckpts" / "step_00000002" / "manifest.json").is_file()


def test_model_names_come_from_the_registry(toy_family, tiny_data_root, tmp_path):
    overrides = tiny_overrides(tiny_data_root, tmp_path)
    with pytest.raises(ConfigError, match="model.name 'toy2' is not one of dvgt1, dvgt2_pretrain, dvgt2, vggt, toy"):
        load_config("train/dvgt1/demo.yaml", [*overrides, "model.name=toy2"])
    families.unregister("toy")
    with pytest.raises(ConfigError, match="model.name 'toy' is not one of dvgt1, dvgt2_pretrain, dvgt2, vggt$"):
        load_config("train/dvgt1/demo.yaml", [*overrides, "model.name=toy"])


def test_a_name_is_registered_once(toy_family):
    with pytest.raises(ValueError, match="model family 'toy' is already registered"):
        families.register(ModelFamily(**{**TOY.__dict__, "title": "another toy"}))


@pytest.mark.parametrize("family", families.BUILT_IN, ids=lambda f: f.name)
def test_built_in_families_declare_what_their_models_return(family):
    """The TypedDict of a family names every key its tiny model returns (train mode, and eval mode with the
    input images), and its model-specific options are refused by the others."""
    model = family.build(ModelConfig(name=family.name, size="tiny")).train()
    p = model.patch_size
    images = torch.rand(1, 2, 1, 3, p, 2 * p)
    batch = {"ego_status": torch.zeros(1, 2, len(family.ego_status_fields))}
    with torch.no_grad():
        trained = model(images, **family.model_inputs(ModelConfig(name=family.name), batch))
        evaluated = model.eval()(images)
    declared = set(family.predictions.__annotations__)
    assert set(trained) <= declared and set(evaluated) <= declared and "images" in evaluated
    assert family.training_targets  # every family trains on some target
    if not family.planning_steps:
        with pytest.raises(ValueError, match="model.anchor_dir needs a planning model"):
            families.check_model_config(ModelConfig(name=family.name, anchor_dir="anchors"))
