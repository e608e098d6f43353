"""Typed training configuration: the one place where every key is declared and documented.

A stage config is YAML. It may start with ``defaults: [other.yaml, ...]`` (paths relative to the
file) which are merged first, in order. Everything is merged onto the dataclass schema below, so
an unknown key or a value of the wrong type is an error that names the key (and the closest valid
key). Dotted command-line overrides (``optim.lr=1e-5``) are applied last.

Key names follow the reference trainer (VGGT / DVGT): max_epochs, limit_train_batches,
accum_steps, max_img_per_gpu, checkpoint.*, optim.*, loss.*.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from dvgt.s3_options import S3CacheConfig, S3Config


class ConfigError(ValueError):
    """A configuration problem, with a message that says how to fix it."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


# One line per key: its trailing comment is its documentation (docs/configuration.md is generated from it).
# fmt: off
@dataclass
class ModelConfig:
    name: str = "dvgt1"  # the model family (dvgt/families/): dvgt1 | dvgt2 | dvgt2_pretrain | vggt
    size: str = "full"  # full (the published architecture) | small | tiny (same code, fewer/narrower layers)
    dino_v3_weight_path: str | None = None  # DINOv3 ViT-L/16 weights (.pth state_dict or .safetensors)
    max_frames: int = 48  # length of the learned temporal embedding (frames per clip at most)
    activation_checkpointing: str = "full"  # aggregator blocks in backward, train mode only: none (keep all activations) | full (recompute every block) | selective (keep matmul and attention outputs, recompute the rest) | every_other (recompute every other block); docs/distributed.md
    frames_chunk_size: int | None = None  # DPT head: frames per chunk (None = all at once)
    device_map: dict[str, int] | None = None  # part -> local GPU index within the process, e.g. {aggregator: 0, point_head: 1, ...} (docs/distributed.md)
    compile_blocks: bool = False  # regional torch.compile: every transformer block compiled on its own (training; docs/distributed.md)
    attention_backend: str = "auto"  # SDPA kernels: auto (the fastest that takes each call; GPU: cudnn, flash, efficient, math; CPU: flash, math) | flash | cudnn | efficient | math (that one, math where it cannot); the choice is logged at start
    anchor_dir: str | None = None  # DVGT-2: folder of the official anchor files future_anchors_20_rdf.npz and past_anchors_20_rdf.npz (`dvgt anchors`; None = zeros until a checkpoint loads them)
    enable_ego_status: bool = False  # DVGT-2: condition planning on ego status [B,T,8] (velocity 2, acceleration 2, command one-hot 4)


@dataclass
class DatasetEntry:
    dataset: str = MISSING  # official dataset name (the parquet prefix): nuscene | openscene | kitti | waymo | ddad | argoverse | navtrain | navtest | demo
    split: str = MISSING  # reads <dataset>_<split>.parquet, e.g. train, val, total_train, navtrain, test_sample_200
    root: str | None = None  # the tree's root (the folder holding data_annotation/): a local path or s3://bucket/prefix; None = data.root
    original_fps: int = 2  # stored frame rate: 2 for nuScenes and OpenScene, 10 for KITTI, Waymo, DDAD
    dataset_len: int = -1  # sampling weight in the mix, as the official dataset_len (-1 = its number of sequences)
    frame_num_max: int = 99999  # most frames per training clip, future frames included (official frame_num_max)
    fixed_aspect_ratio: float = 0.0  # this dataset's evaluation aspect ratio (0 = the split's fixed_aspect_ratio)
    filtered: bool = True  # read meta/.../moge_pred_filter_parquet/ (the filter's output, what training reads) or meta/ (unfiltered)
    synthetic: bool = False  # generate this tree with dvgt's synthetic generator if it is missing (demo stages; dataset demo)


@dataclass
class ColorJitterConfig:
    enabled: bool = True  # the official colour augmentation (training only; docs/data.md)
    brightness: float = 0.5  # factor drawn in [1 - b, 1 + b]
    contrast: float = 0.5  # factor drawn in [1 - c, 1 + c]
    saturation: float = 0.5  # factor drawn in [1 - s, 1 + s]
    hue: float = 0.1  # shift drawn in [-h, h] turns
    p: float = 0.9  # probability that the jitter is applied
    gray_scale: bool = True  # then grey with probability 0.05
    cojitter: bool = True  # one draw for the whole clip ...
    cojitter_ratio: float = 0.3  # ... except with this probability (then one per image)


@dataclass
class DataSplitConfig:
    datasets: list[DatasetEntry] = field(default_factory=list)  # the mix (see DatasetEntry below)
    clip_split: str = "default_train"  # default_train | DVGT1 | DVGT2 | long | nuscenes_planning | navtrain | navtest (docs/data.md)
    views: list[int] = field(default_factory=lambda: [2, 8])  # [min, max] cameras per clip (official view_num_range)
    min_frames: int = 2  # fewest frames per training clip (official min_frame_num); the most: max_img_per_gpu // views
    aspect_ratio: list[float] = field(default_factory=lambda: [1.6, 3.3])  # [min, max] width / height, drawn per step
    fixed_num_views: int = 0  # > 0: every clip has all cameras, in the dataset's order
    fixed_num_frames: int = 0  # > 0: frames per clip (DVGT1 / DVGT2 evaluation clips: their length)
    fixed_aspect_ratio: float = 0.0  # > 0: this aspect ratio instead of drawing one
    future_frames: int = 0  # frames after each clip whose poses are targets (official future_frame_num)
    img_width: int = 512  # height = width / aspect rounded down to a multiple of the patch size
    target_fps: int = 2  # clips are built at this rate (every original_fps // target_fps-th stored frame)
    inside_random: bool = True  # training: a random sequence per sample (else the sampler's index)
    aug_pixel_aspect_range: list[float] | None = field(default_factory=lambda: [0.8, 1.0])  # per-axis crop scale in training (null = off)
    aug_safe_scales: list[float] | None = field(default_factory=lambda: [0.8, 1.2])  # keep fx/fy within this after that crop
    random_resize: bool = True  # training: a random extra resize margin (triangular(0, 0, 0.3) x image size)
    fast_decode: bool = True  # training: decode JPEGs at 1/2, 1/4 or 1/8 scale when the view is at most that size (pixels within JPEG tolerance; evaluation always decodes exactly; docs/data.md)
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)
    filter_lidar: bool = False  # rows the filter flagged (use_lidar_proj_depth) get no depth instead of projected LiDAR
    eval_lidar_proj_depth: bool = False  # read projected LiDAR depth for every row
    max_ray_depth: float = 100.0  # metres; farther points are not supervised or scored
    steps_per_epoch: int = 1000  # training: steps per epoch of the grouped sampler


@dataclass
class DataConfig:
    root: str = "data/dvgt"  # the official tree's root, the folder holding data_annotation/: a local path (a PVC in the chart) or s3://bucket/prefix (read through s3_cache; docs/data.md)
    train: DataSplitConfig = field(default_factory=DataSplitConfig)
    val: DataSplitConfig = field(default_factory=DataSplitConfig)
    pin_memory: bool = True  # page-locked host batches (GPU only)
    prefetch_factor: int = 2  # batches prepared ahead per worker
    persistent_workers: bool = True  # keep workers alive across epochs
    check: bool = True  # at start, refuse a tree that fails the quick `dvgt data check` (docs/data.md "Checking a tree")
    feature_cache: str | None = None  # cached outputs of the frozen backbone or aggregator (dvgt cache build; docs/feature-cache.md): folder or s3:// URI
    s3_cache: S3CacheConfig = field(default_factory=S3CacheConfig)
    s3: S3Config = field(default_factory=S3Config)  # S3 options of s3:// data roots (the keys of checkpoint.s3; endpoint and credentials: the same AWS variables)


@dataclass
class EvalConfig:
    points_and_poses: bool = True  # score point maps, ray depth and poses (official eval_point_and_pose)
    trajectory: bool = True  # score DVGT-2's planned trajectory (official eval_traj)
    umeyama_per_scene: bool = False  # VGGT: align predicted points and camera centres to the GT by a similarity per clip


@dataclass
class PointLossConfig:
    weight: float = 1.0  # weight of the point loss in the objective
    gradient_loss_fn: str | None = "normal"  # normal | grad | None
    valid_range: float = 0.98  # quantile of per-pixel losses kept (outlier filter); <= 0 disables
    gamma: float = 1.0  # weight of the confidence-weighted term
    alpha: float = 0.2  # weight of the -log(conf) regulariser


@dataclass
class EgoPoseLossConfig:
    weight: float = 5.0  # weight of the ego-pose loss in the objective
    gamma: float = 0.6  # per-iteration decay: iteration i of n weighs gamma ** (n - i - 1)
    loss_type: str = "l1"  # l1 | l2
    weight_trans: float = 1.0  # translation term
    weight_rot: float = 1.0  # rotation (quaternion) term


@dataclass
class AnchorModeLossConfig:
    weight: float = 1.0  # weight of this term in the objective (DVGT-2 stage 2)
    cls_weight: float = 10.0  # focal classification of the anchor nearest to the ground truth
    reg_weight: float = 8.0  # L1 regression of that anchor's mode
    focal_alpha: float = 0.25  # focal loss: weight of the positive (nearest-anchor) class
    focal_gamma: float = 2.0  # focal loss: down-weighting of easy scores


@dataclass
class CameraLossConfig:
    weight: float = 5.0  # weight of the VGGT camera loss in the objective
    gamma: float = 0.6  # per-iteration decay: iteration i of n weighs gamma ** (n - i - 1)
    loss_type: str = "l1"  # l1 | l2
    weight_trans: float = 1.0  # translation term
    weight_rot: float = 1.0  # rotation (quaternion) term
    weight_focal: float = 0.5  # field-of-view term


@dataclass
class LossConfig:
    point: PointLossConfig = field(default_factory=PointLossConfig)
    ego_pose: EgoPoseLossConfig = field(default_factory=EgoPoseLossConfig)  # DVGT-1, DVGT-2 stage 1
    planning: AnchorModeLossConfig = field(default_factory=AnchorModeLossConfig)  # DVGT-2 trajectory decoder
    past_pose: AnchorModeLossConfig = field(default_factory=AnchorModeLossConfig)  # DVGT-2 relative-pose decoder
    camera: CameraLossConfig = field(default_factory=CameraLossConfig)  # VGGT only


@dataclass
class ClipGroupConfig:
    module_name: list[str] = field(default_factory=list)  # parameter-name substrings of this group
    max_norm: float = 1.0  # clip this group's gradient norm to this value
    norm_type: float = 2.0  # p of the p-norm


@dataclass
class AmpConfig:
    enabled: bool = True  # autocast on GPU; always off on CPU
    amp_dtype: str = "bfloat16"  # bfloat16 | float16


@dataclass
class OptimConfig:
    lr: float = 2e-4  # peak learning rate
    min_lr: float = 1e-8  # start of warm-up and end of the cosine
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms, biases, tokens)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    warmup_fraction: float = 0.05  # share of all optimizer steps spent warming up (linear)
    frozen_module_names: list[str] = field(default_factory=list)  # fnmatch globs on parameter names
    gradient_clip: list[ClipGroupConfig] = field(default_factory=list)  # clipping groups (see ClipGroupConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    max_consecutive_nonfinite: int = 10  # stop with an error after this many skipped steps in a row


@dataclass
class CheckpointConfig:
    uri: str = "runs/${exp_name}/ckpts"  # local folder, file:// or s3://bucket/prefix (credentials: AWS variables)
    save_freq: int = 1  # save every N epochs (and always at the end)
    save_every_steps: int = 0  # also save every N optimizer steps (0 = off)
    keep_last: int = 0  # keep the newest K checkpoints (0 = keep all)
    resume: str = "auto"  # auto: continue from the newest checkpoint under uri if any | never
    resume_checkpoint_path: str | None = None  # resume from this checkpoint folder (must exist)
    direct_load_pretrained_weights_path: str | None = None  # same-architecture weights (.pt or .safetensors)
    load_pretrained_weights_path: str | None = None  # converted init: VGGT-1B -> DVGT-1/2, DVGT-2 stage 1 -> 2
    strict: bool = False  # strict key matching for the pretrained weights above
    async_mode: str = "wait"  # a save requested while one uploads: wait | skip; off: every save blocks until committed
    preemption_budget_s: float = 120.0  # on SIGTERM: seconds to commit a final checkpoint (< terminationGracePeriodSeconds)
    retry_budget_s: float = 300.0  # a save retries a transient storage failure this long (the final one, then it spills)
    spill_dir: str | None = "${logging.log_dir}/spill"  # a final checkpoint the store cannot take goes here, uploaded at the next start (S3 only; null = none)
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class LoggingConfig:
    log_dir: str = "runs/${exp_name}"  # train_log.jsonl (and tensorboard/) go here
    log_freq: int = 10  # log every N optimizer steps (the host reads losses off the device then, not every step)
    tensorboard: bool = False  # also write TensorBoard event files
    progress: bool = True  # progress bar on rank 0
    peak_tflops: float | None = None  # dense bf16 peak of one GPU in TFLOP/s, for MFU (None: looked up from the GPU's name, dvgt/train/flops.py; a CPU has none, so no MFU)
    metrics: bool = True  # Prometheus metrics of every rank into $PROMETHEUS_MULTIPROC_DIR, else <log_dir>/metrics (docs/metrics.md)


@dataclass
class FSDPConfig:
    mode: str = "zero2"  # zero2: optimizer state and gradients sharded | zero3: parameters too (gathered per block in forward and backward)
    reshard_after_forward: bool | None = None  # free gathered block parameters after forward (None: True for zero3, False for zero2)
    cpu_offload: bool = False  # keep parameter shards, gradients and optimizer state in host memory; the optimizer step runs on the CPU
    mixed_precision: bool = True  # with AMP on a GPU: aggregator blocks gather parameters in optim.amp.amp_dtype; gradients reduce in float32


@dataclass
class PipelineConfig:
    stages: int = 1  # > 1: the model split into this many stages, one per rank of a pipeline (docs/distributed.md)
    schedule: str = "1f1b"  # gpipe | 1f1b (micro-batches = the accum_steps chunks)


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # ddp: full replica per rank | fsdp: FSDP2 sharding (see distributed.fsdp, docs/distributed.md)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise
    timeout_mins: int = 30  # collective timeout
    find_unused_parameters: bool = False  # DDP option (needed only if some outputs go unused)
    bucket_cap_mb: int = 25  # DDP gradient bucket size
    gradient_as_bucket_view: bool = True  # DDP: gradients alias the buckets (less memory)
    verify_replicas: bool = False  # after every step, check that all ranks hold identical parameters


@dataclass
class TrainConfig:
    exp_name: str = "dvgt"  # run name: default log and checkpoint folders are runs/<exp_name>
    seed_value: int = 42  # seeds weights init (same on all ranks) and per-rank RNGs
    device: str = "auto"  # auto | cpu | cuda
    max_epochs: int = 20  # epochs of data.train.steps_per_epoch (or limit_train_batches) steps
    limit_train_batches: int | None = None  # cap on steps per epoch (None = data.train.steps_per_epoch)
    limit_val_batches: int | None = 4  # evaluation clips per validation dataset, shared out between ranks (0 = no evaluation, null = all)
    val_epoch_freq: int = 1  # evaluate every N epochs (and before the first step)
    accum_steps: int = 1  # forward chunks per batch (one optimizer step per batch; gradients synchronised on the last)
    max_img_per_gpu: int = 48  # images per GPU per optimizer step (not per forward pass): batch = max(1, this // (views * frames)) clips, split into accum_steps forward chunks
    max_img_per_forward: int | None = None  # images per forward pass per GPU; set: accum_steps = ceil(max_img_per_gpu / it)
    gt_scale_factor: float = 0.1  # ground truth is multiplied by this in the data (DVGT: outputs in units of 10 m; VGGT: 1)
    num_workers: int = 8  # data-loading worker processes per rank (0 = in the training process)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# fmt: on

# Renamed keys of the reference trainer, so that their error can point at our name.
RENAMED_KEYS = {
    "checkpoint.save_dir": "checkpoint.uri",
    "loss.gt_scale_factor": "gt_scale_factor",
    "model.anchor_path": "model.anchor_dir",
    "eval_conf": "eval",
    "data.train.frames": "data.train.min_frames",
    "data.val.frames": "data.val.fixed_num_frames",
    "data.train.frame_stride": "data.train.target_fps",
    "train.strategy": "distributed.strategy",
    "optim.optimizer.lr": "optim.lr",
    "optim.optimizer.weight_decay": "optim.weight_decay",
    "model.gradient_checkpointing": "model.activation_checkpointing",  # true is full, false is none
}

# What --debug changes: few batches, log every step, save every epoch, no workers.
DEBUG_OVERRIDES = [
    "limit_train_batches=4",
    "limit_val_batches=1",
    "logging.log_freq=1",
    "checkpoint.save_freq=1",
    "num_workers=0",
]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

CONFIG_ROOT = resources.files("dvgt") / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A config path resolves against the packaged configs first, then the working directory."""
    candidates = [Path(str(CONFIG_ROOT / str(path))), Path(path)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    stages = ", ".join(
        sorted(
            str(p.relative_to(Path(str(CONFIG_ROOT))))
            for p in Path(str(CONFIG_ROOT)).rglob("*.yaml")
            if "base" not in p.parts
        )
    )
    raise ConfigError(
        f"config file '{path}' not found (looked in the packaged configs and the working "
        f"directory); packaged stage configs: {stages}"
    )


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The file's defaults (depth first, in order), then the file itself."""
    if path in seen:
        raise ConfigError(f"config '{path}' includes itself through its defaults")
    node = OmegaConf.load(path)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config '{path}' must be a mapping of keys to values")
    layers: list[DictConfig] = []
    defaults = node.pop("defaults", [])
    for item in defaults or []:
        layers += _read_yaml((path.parent / str(item)).resolve(), seen + (path,))
    layers.append(node)
    return layers


def valid_keys(schema: Any = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (list items are described by their element type)."""
    keys = []
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += valid_keys(type(default), name + ".")
    return keys


def _closest_key(key: str) -> str:
    if key in RENAMED_KEYS:
        return f"; it is called '{RENAMED_KEYS[key]}' here"
    match = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if not match:
        leaf = key.rsplit(".", 1)[-1]
        match = [k for k in valid_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean '{match[0]}'?" if match else ""


def _schema_type(key: str) -> str:
    """The declared type of a dotted key, as a readable name ('int', 'Optional[str]', ...)."""
    schema: Any = TrainConfig
    annotation = "value"
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        if part not in fields:
            return annotation
        declared = fields[part]
        annotation = declared.type if isinstance(declared.type, str) else str(declared.type)
        default = (
            declared.default_factory() if declared.default_factory is not dataclasses.MISSING else declared.default
        )
        schema = type(default) if dataclasses.is_dataclass(default) else None
    return annotation.replace("typing.", "")


def _explain(error: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(error, "full_key", None) or ""
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(f"unknown config key '{key}' in {source}{_closest_key(key)}")
    if isinstance(error, ValidationError):
        detail = str(error).splitlines()[0]
        return ConfigError(f"config key '{key}' in {source} expects {_schema_type(key)}: {detail}")
    return ConfigError(f"invalid config in {source}: {str(error).splitlines()[0]} (key '{key}')")


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return cast(DictConfig, OmegaConf.merge(base, layer))  # (a merge onto a DictConfig is one)
    except OmegaConfBaseException as error:
        raise _explain(error, source) from None


def parse_overrides(overrides: Sequence[str]) -> list[tuple]:
    """`key.path=value` pairs; values are YAML (numbers, booleans, null, [lists], {maps})."""
    pairs = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' must look like key.path=value (for example optim.lr=1e-5)")
        key, value = item.lstrip("+").split("=", 1)
        pairs.append((key, OmegaConf.from_dotlist([f"value={value}"])["value"]))
    return pairs


def _apply_override(cfg: DictConfig, key: str, value: Any) -> None:
    """Set one dotted key (list items by index: data.train.datasets.0.root=...)."""
    parent_key, _, leaf = key.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
        if parent is None or not isinstance(parent, (DictConfig, ListConfig)):
            raise ConfigKeyError(f"Key '{key}' is not in the config")
        if isinstance(parent, ListConfig) and not (leaf.isdigit() and int(leaf) < len(parent)):
            raise ConfigError(
                f"override '{key}': '{parent_key}' has {len(parent)} item(s); index {leaf} does not exist"
            )
        if isinstance(parent, DictConfig) and leaf not in parent:
            raise ConfigKeyError(f"Key '{leaf}' is not in the config")
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as error:
        error.full_key = key
        raise _explain(error, "the command-line overrides") from None


def load_config(path: str | Path, overrides: Sequence[str] = (), debug: bool = False) -> DictConfig:
    """Load a stage config, apply overrides, validate, and return a read-only typed config."""
    config_file = resolve_config_path(path)
    cfg = OmegaConf.structured(TrainConfig)
    for layer in _read_yaml(config_file):
        cfg = _merge(cfg, layer, str(config_file))
    pairs = parse_overrides(list(DEBUG_OVERRIDES if debug else []) + list(overrides))
    for key, value in pairs:
        _apply_override(cfg, key, value)
    try:
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as error:
        raise _explain(error, str(config_file)) from None
    if missing:
        raise ConfigError(f"config {config_file} leaves required key(s) unset: {', '.join(missing)}")
    if cfg.max_img_per_forward is not None:
        _check(
            "accum_steps" not in dict(pairs),
            "give accum_steps or max_img_per_forward, not both: max_img_per_forward sets accum_steps "
            "(in the chart, set the value maxImagesPerForward instead of an override)",
        )
        _check(cfg.max_img_per_forward >= 1, f"max_img_per_forward must be >= 1, got {cfg.max_img_per_forward}")
        cfg.accum_steps = accum_steps_for(cfg.max_img_per_gpu, cfg.max_img_per_forward)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def accum_steps_for(images_per_step: int, max_images_per_forward: int) -> int:
    """The accumulation rule, in this one place: forward passes per optimizer step that keep `images_per_step`
    images per GPU per step while no pass holds more than `max_images_per_forward` (the trainer splits each
    batch into this many chunks, dvgt/train/loop.py split_batch). The trainer applies it to max_img_per_forward;
    `make manifests` writes it per stage and profile into the chart (files/accumulation.yaml)."""
    return math.ceil(images_per_step / max_images_per_forward)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """Checks across keys that types alone cannot express."""
    from dvgt.families import check_model_config  # the model's own rules; it imports torch, the rest of this does not

    try:
        check_model_config(cfg.model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    from dvgt.models.checkpointing import MODES
    from dvgt.train.speedups import ATTENTION_BACKENDS

    _check(
        cfg.model.activation_checkpointing in MODES,
        f"model.activation_checkpointing '{cfg.model.activation_checkpointing}' is not one of {', '.join(MODES)}",
    )
    _check(
        cfg.model.attention_backend in ("auto", *ATTENTION_BACKENDS),
        f"model.attention_backend '{cfg.model.attention_backend}' is not one of auto, {', '.join(ATTENTION_BACKENDS)}",
    )
    _check(
        cfg.logging.peak_tflops is None or cfg.logging.peak_tflops > 0,
        f"logging.peak_tflops must be > 0 TFLOP/s or null (looked up from the GPU), got {cfg.logging.peak_tflops}",
    )
    _check(cfg.accum_steps >= 1, f"accum_steps must be >= 1, got {cfg.accum_steps}")
    _check(cfg.max_img_per_gpu >= 1, f"max_img_per_gpu must be >= 1, got {cfg.max_img_per_gpu}")
    _check(cfg.max_epochs >= 1, f"max_epochs must be >= 1, got {cfg.max_epochs}")
    _check(
        cfg.checkpoint.resume in ("auto", "never"),
        f"checkpoint.resume must be 'auto' or 'never', got '{cfg.checkpoint.resume}'",
    )
    _check(cfg.gt_scale_factor > 0, f"gt_scale_factor must be > 0, got {cfg.gt_scale_factor}")
    for split in ("train", "val"):
        validate_data_split(cfg.data[split], f"data.{split}")
    if cfg.model.enable_ego_status:
        from dvgt.data.format import COMMAND_ORDER  # the data modules need pyarrow, which the exporter image lacks

        orders = {e.dataset: COMMAND_ORDER.get(e.dataset) for e in cfg.data.train.datasets}
        _check(
            len(set(orders.values())) <= 1,
            f"model.enable_ego_status feeds each dataset's driving_command one-hot in its own order, and the "
            f"training mix has several orders ({orders}); finetune with ego status on one command order at a time",
        )
    ck = cfg.checkpoint
    _check(
        ck.async_mode in ("wait", "skip", "off"),
        f"checkpoint.async_mode must be wait, skip or off, got '{ck.async_mode}'",
    )
    _check(
        ck.retry_budget_s >= 0 and ck.preemption_budget_s >= 0,
        "checkpoint.retry_budget_s and checkpoint.preemption_budget_s must be >= 0 seconds",
    )
    for key, s3 in (("checkpoint.s3", ck.s3), ("data.s3", cfg.data.s3)):
        _check(
            s3.addressing_style in ("auto", "path", "virtual"),
            f"{key}.addressing_style must be auto, path or virtual, got '{s3.addressing_style}'",
        )
        _check(
            s3.retry_mode in ("standard", "adaptive"),
            f"{key}.retry_mode must be standard or adaptive, got '{s3.retry_mode}'",
        )
        _check(
            s3.part_size_mb >= 5 and s3.concurrency >= 1 and s3.max_attempts >= 1,
            f"{key} needs part_size_mb >= 5 (the S3 minimum part), concurrency >= 1, max_attempts >= 1",
        )
    _check(cfg.data.s3_cache.max_gib > 0, f"data.s3_cache.max_gib must be > 0, got {cfg.data.s3_cache.max_gib}")
    _check(
        cfg.optim.amp.amp_dtype in ("bfloat16", "float16"),
        f"optim.amp.amp_dtype must be bfloat16 or float16, got '{cfg.optim.amp.amp_dtype}'",
    )
    d = cfg.distributed
    _check(d.strategy in ("ddp", "fsdp"), f"distributed.strategy must be ddp or fsdp, got '{d.strategy}'")
    _check(d.fsdp.mode in ("zero2", "zero3"), f"distributed.fsdp.mode must be zero2 or zero3, got '{d.fsdp.mode}'")
    _check(d.pipeline.stages >= 1, f"distributed.pipeline.stages must be >= 1, got {d.pipeline.stages}")
    _check(
        d.pipeline.schedule in ("gpipe", "1f1b"),
        f"distributed.pipeline.schedule must be gpipe or 1f1b, got '{d.pipeline.schedule}'",
    )
    if cfg.model.device_map is not None:
        _check(
            d.strategy == "ddp" and d.pipeline.stages == 1,
            "model.device_map places a whole model replica on several GPUs of one process and works with "
            "distributed.strategy=ddp only: drop distributed.pipeline.stages / strategy=fsdp, or model.device_map",
        )
    if d.pipeline.stages > 1:
        _check(
            d.strategy == "ddp" and not d.verify_replicas and not cfg.data.feature_cache,
            "distributed.pipeline.stages > 1 runs data parallelism as DDP between the pipelines, without "
            "verify_replicas or a feature cache: set distributed.strategy=ddp, distributed.verify_replicas=false, "
            "data.feature_cache=null",
        )
        _check(
            not (cfg.optim.amp.enabled and cfg.optim.amp.amp_dtype == "float16"),
            "distributed.pipeline.stages > 1 trains in bfloat16 or float32 (float16 would need its loss scaler in "
            "every stage): set optim.amp.amp_dtype=bfloat16",
        )
        _check(
            cfg.limit_val_batches == 0,
            "distributed.pipeline.stages > 1 does not evaluate during training yet: set limit_val_batches=0 "
            "(evaluate the checkpoints in one process with `dvgt infer` or a run without pipeline stages)",
        )
    if d.strategy == "fsdp":
        _check(
            not d.verify_replicas,
            "distributed.verify_replicas compares DDP replicas; under distributed.strategy=fsdp "
            "each rank holds a different shard: set distributed.verify_replicas=false",
        )
        _check(
            not (cfg.optim.amp.enabled and cfg.optim.amp.amp_dtype == "float16"),
            "distributed.strategy=fsdp trains in bfloat16 or float32 (float16 would need a sharded grad scaler): "
            "set optim.amp.amp_dtype=bfloat16",
        )


def validate_data_split(s: DictConfig, key: str) -> None:
    from dvgt.data.format import DATASETS
    from dvgt.data.scenes import SPLIT_TYPES

    for name in ("views", "aspect_ratio"):
        value = list(s[name])
        _check(
            len(value) == 2 and value[0] <= value[1] and value[0] > 0,
            f"{key}.{name} must be [min, max] with 0 < min <= max, got {value}",
        )
    _check(s.clip_split in SPLIT_TYPES, f"{key}.clip_split '{s.clip_split}' is not one of {', '.join(SPLIT_TYPES)}")
    _check(
        s.min_frames >= 1 and s.future_frames >= 0 and s.target_fps >= 1,
        f"{key} needs min_frames >= 1, future_frames >= 0 and target_fps >= 1",
    )
    for name in ("aug_pixel_aspect_range", "aug_safe_scales"):
        value = s[name]
        _check(
            value is None or (len(value) == 2 and 0 < value[0] <= value[1]),
            f"{key}.{name} must be null or [low, high] with 0 < low <= high, got {value}",
        )
    for i, entry in enumerate(s.datasets):
        _check(
            entry.dataset in DATASETS,
            f"{key}.datasets[{i}].dataset '{entry.dataset}' is not an official dataset "
            f"name ({', '.join(DATASETS)}); the name is the parquet's prefix (nuscene_train.parquet: nuscene)",
        )
        _check(entry.original_fps >= 1, f"{key}.datasets[{i}].original_fps must be >= 1, got {entry.original_fps}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def reference_markdown() -> str:
    """docs/configuration.md, generated from the schema above (its comments are the documentation)."""
    import inspect
    import re

    lines = [
        "# Configuration keys",
        "",
        "Generated from `dvgt/config.py` by `python -m dvgt.config > docs/configuration.md`; "
        "a test keeps the two in step.",
        "",
    ]

    def describe(schema: Any, prefix: str) -> None:
        source = inspect.getsource(schema)
        lines.extend(
            [
                f"## `{prefix.rstrip('.') or '(top level)'}`",
                "",
                "| key | type | default | meaning |",
                "| --- | --- | --- | --- |",
            ]
        )
        nested = []
        for f in dataclasses.fields(schema):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                nested.append((type(default), f"{prefix}{f.name}."))
                lines.append(f"| `{prefix}{f.name}` | section | | see below |")
                continue
            match = re.search(rf"^\s+{f.name}: [^=\n]+=[^#\n]*#\s*(.+)$", source, re.M)
            if not match:
                raise ValueError(f"{schema.__name__}.{f.name} has no documentation: end its line with a # comment")
            meaning = match.group(1).strip().replace("|", "\\|")
            type_name = (f.type if isinstance(f.type, str) else str(f.type)).replace("|", "\\|")
            shown = "required" if default is MISSING else repr(default)
            lines.append(f"| `{prefix}{f.name}` | {type_name} | `{shown}` | {meaning} |")
        lines.append("")
        for sub, sub_prefix in nested:
            describe(sub, sub_prefix)

    describe(TrainConfig, "")
    for item in (DatasetEntry, ClipGroupConfig):
        describe(item, f"{item.__name__} (list item).")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
