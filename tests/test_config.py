"""Stage configs load, validate and report bad keys/values clearly."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dvgt.config import CONFIG_ROOT, ConfigError, load_config

STAGE_CONFIGS = {
    "dvgt1-default": "train/dvgt1/default.yaml",
    "dvgt1-demo": "train/dvgt1/demo.yaml",
    "dvgt1-finetune-demo": "train/dvgt1/finetune_demo.yaml",
    "dvgt1-finetune-heads-demo": "train/dvgt1/finetune_heads_demo.yaml",
    "dvgt2-pretrain": "train/dvgt2/pretrain.yaml",
    "dvgt2-default": "train/dvgt2/default.yaml",
    "dvgt2-demo": "train/dvgt2/demo.yaml",
    "dvgt2-finetune-demo": "train/dvgt2/finetune_demo.yaml",
    "finetune-navtrain": "train/dvgt2/default_finetune_navtrain.yaml",
    "finetune-nuscenes": "train/dvgt2/default_finetune_nuscenes.yaml",
    "vggt-default": "train/vggt/default.yaml",
}


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_every_stage_config_loads_with_the_recipe_values(stage):
    cfg = load_config(STAGE_CONFIGS[stage])
    assert cfg.exp_name == stage
    assert OmegaConf.is_readonly(cfg)
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_fraction == 0.05
    assert cfg.checkpoint.uri.endswith(f"{stage}/ckpts")
    if "demo" not in stage:
        assert cfg.max_img_per_gpu == 48 and cfg.accum_steps == 1
        assert cfg.model.size == "full"
    assert {g.module_name[0] for g in cfg.optim.gradient_clip} >= {"aggregator", "point_head"}


def test_stage_specific_values_follow_the_official_configs():
    nuscenes = load_config(STAGE_CONFIGS["finetune-nuscenes"])
    assert (nuscenes.data.train.fixed_num_views, nuscenes.data.train.fixed_num_frames) == (6, 4)
    assert nuscenes.data.val.clip_split == "nuscenes_planning" and nuscenes.data.val.future_frames == 6
    assert nuscenes.optim.lr == 1e-5 and nuscenes.model.enable_ego_status and not nuscenes.eval.points_and_poses
    navtrain = load_config(STAGE_CONFIGS["finetune-navtrain"]).data
    assert navtrain.train.clip_split == "navtrain" and navtrain.train.fixed_num_views == 8
    assert navtrain.train.aug_pixel_aspect_range is None and not navtrain.train.random_resize
    assert navtrain.val.clip_split == "navtest" and navtrain.train.datasets[0].split == "navtrain"
    vggt = load_config(STAGE_CONFIGS["vggt-default"])
    assert vggt.data.train.img_width == 518 and vggt.gt_scale_factor == 1.0
    assert load_config(STAGE_CONFIGS["dvgt2-pretrain"]).model.name == "dvgt2_pretrain"
    default = load_config(STAGE_CONFIGS["dvgt1-default"]).data
    assert [(e.dataset, e.split, e.dataset_len) for e in default.train.datasets][:2] == [
        ("openscene", "total_train", 1937600),
        ("nuscene", "train", 140000),
    ]  # the official mix and weights
    assert default.val.clip_split == "DVGT1" and default.val.fixed_num_frames == 16 and default.val.filter_lidar


def test_configs_ship_as_package_data():
    assert (Path(str(CONFIG_ROOT)) / "train/dvgt1/demo.yaml").is_file()


def test_overrides_apply_last_and_debug_sets_its_keys():
    cfg = load_config("train/dvgt1/demo.yaml", ["optim.lr=5e-6", "model.size=tiny", "num_workers=3"], debug=True)
    assert cfg.optim.lr == 5e-6 and cfg.model.size == "tiny"
    assert cfg.num_workers == 3  # user overrides win over --debug's
    assert cfg.limit_train_batches == 4 and cfg.logging.log_freq == 1 and cfg.checkpoint.save_freq == 1


def test_working_directory_config_with_defaults(tmp_path, monkeypatch):
    (tmp_path / "base.yaml").write_text("max_epochs: 7\nmodel: {size: tiny}\n")
    (tmp_path / "mine.yaml").write_text("defaults: [base.yaml]\nexp_name: mine\nmax_epochs: 9\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("mine.yaml")
    assert (cfg.exp_name, cfg.max_epochs, cfg.model.size) == ("mine", 9, "tiny")
    assert cfg.logging.log_dir == "runs/mine"  # interpolation resolved after the merge


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=1e-4", "unknown config key 'optim.lrr'.*did you mean 'optim.lr'"),
        ("model.sise=small", "did you mean 'model.size'"),
        ("checkpoint.save_dir=/ckpt", "it is called 'checkpoint.uri' here"),
        ("loss.gt_scale_factor=1.0", "it is called 'gt_scale_factor' here"),
        ("data.train.clip_split=DVGT3", "data.train.clip_split 'DVGT3' is not one of"),
        ("data.train.datasets.0.dataset=nuscenes", "'nuscenes' is not an official dataset name"),
        ("max_epochs=ten", "'max_epochs'.*expects int"),
        ("model.activation_checkpointing=maybe", "model.activation_checkpointing.*none, full, selective, every_other"),
        ("model.gradient_checkpointing=true", "it is called 'model.activation_checkpointing' here"),
        ("data.train.views=[4,2]", r"data.train.views must be \[min, max\]"),
        ("model.name=dvgt3", "model.name 'dvgt3' is not one of"),
        ("accum_steps=0", "accum_steps must be >= 1"),
        ("max_img_per_forward=0", "max_img_per_forward must be >= 1"),
        ("optim.lr", "must look like key.path=value"),
    ],
)
def test_bad_overrides_name_the_key_and_the_fix(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("train/dvgt1/demo.yaml", [override])


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(
        "defaults: [train/dvgt1/demo.yaml]\nmax_epoch: 3\n".replace(
            "train/dvgt1/demo.yaml", str(Path(str(CONFIG_ROOT)) / "train/dvgt1/demo.yaml")
        )
    )
    with pytest.raises(ConfigError, match=r"unknown config key 'max_epoch' in .*typo.yaml.*'max_epochs'"):
        load_config(str(path))


def test_missing_config_lists_the_packaged_stages():
    with pytest.raises(ConfigError, match="not found.*train/dvgt1/demo.yaml"):
        load_config("train/dvgt1/nope.yaml")


def test_configuration_reference_is_generated_from_the_schema():
    from dvgt.config import reference_markdown, valid_keys

    doc = (Path(__file__).parents[1] / "docs/configuration.md").read_text()
    assert doc.strip() == reference_markdown().strip(), "regenerate: python -m dvgt.config > docs/configuration.md"
    for key in valid_keys():
        assert f"`{key}`" in doc
    undocumented = [line.split("`")[1] for line in doc.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undocumented == [], f"keys without a comment in dvgt/config.py: {undocumented}"


def test_max_img_per_forward_derives_accum_steps_by_the_one_rule():
    """max_img_per_gpu stays the images per optimizer step; max_img_per_forward splits it into forward passes."""
    cfg = load_config("train/dvgt1/default.yaml", ["max_img_per_forward=20"])
    assert (cfg.max_img_per_gpu, cfg.accum_steps) == (48, 3)  # ceil(48 / 20)
    cfg = load_config("train/dvgt1/default.yaml", ["max_img_per_forward=20", "max_img_per_gpu=12"])
    assert cfg.accum_steps == 1  # the rule reads the final max_img_per_gpu, whatever the order
    with pytest.raises(ConfigError, match="give accum_steps or max_img_per_forward, not both"):
        load_config("train/dvgt1/default.yaml", ["accum_steps=2", "max_img_per_forward=20"])
