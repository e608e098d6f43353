"""The chart's stages and VRAM profiles, read from the one table the Helm templates read too
(charts/dvgt/files/catalog.yaml), and the accumulation table derived from them."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from dvgt.config import accum_steps_for

# The chart inside the installed package (a link to charts/dvgt in the source tree).
CHART_DIR = Path(str(resources.files("dvgt.k8s") / "chart"))
CATALOG_FILE = CHART_DIR / "files" / "catalog.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    config: str  # stage config path, as passed to --config
    model: str  # model.name of that config
    images_per_step: int  # images per GPU per optimizer step of the recipe (config max_img_per_gpu)
    nodes: int  # pods of the recipe


@dataclass(frozen=True)
class Profile:
    name: str
    max_images_per_forward: int  # images per GPU per forward pass (an estimate until measured)
    gpu: bool  # False: no GPU resources (local and CI runs)
    overrides: list[str]  # trainer config overrides the profile adds
    memory_gib: float | None = None  # memory of one GPU of this kind (None: no GPU)
    gpus_per_process: int = 1  # GPUs one process drives (a model.device_map override in `overrides`)
    model: str | None = None  # the only model.name the profile fits (its device map names that model's parts)
    note: str = ""  # what the numbers rest on (reference recipe, estimate, ...): the chart README's profile table


@dataclass(frozen=True)
class Catalog:
    stages: dict[str, Stage]
    profiles: dict[str, Profile]


def load_catalog(path: Path = CATALOG_FILE) -> Catalog:
    raw = yaml.safe_load(path.read_text())
    stages = {
        name: Stage(name, s["config"], s["model"], int(s["imagesPerStep"]), int(s["nodes"]))
        for name, s in raw["stages"].items()
    }
    profiles = {
        name: Profile(
            name,
            int(p["maxImagesPerForward"]),
            bool(p["gpu"]),
            list(p["overrides"]),
            p.get("memoryGiB"),
            int(p.get("gpusPerProcess", 1)),
            p.get("model"),
            p["note"],
        )
        for name, p in raw["profiles"].items()
    }
    return Catalog(stages, profiles)


def accumulation_table(catalog: Catalog) -> dict[str, dict[str, int]]:
    """accum_steps of every stage (its imagesPerStep) on every profile (its maxImagesPerForward): what the chart's
    templates look up (files/accumulation.yaml, written by `make manifests`) instead of computing it."""
    return {
        stage.name: {
            profile.name: accum_steps_for(stage.images_per_step, profile.max_images_per_forward)
            for profile in catalog.profiles.values()
        }
        for stage in catalog.stages.values()
    }
