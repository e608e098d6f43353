"""dvgt: DVGT-1 / DVGT-2 / VGGT training, Kubernetes-native.

model = dvgt.build_model("train/dvgt1/default.yaml", overrides=["model.size=small"], weights=None)
outputs = model(images)  # images [B, T, V, 3, H, W] in [0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dvgt")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+source"


def build_model(
    config: str, overrides: Sequence[str] = (), weights: str | None = None, device: str = "cpu", strict: bool = True
):
    """Build the model of a stage config, optionally load weights, and return it in eval mode.

    `weights` is a .pt/.pth (a bare state_dict or a dict with key "model", read with
    weights_only=True) or a .safetensors file.
    """
    from dvgt.config import load_config
    from dvgt.families import build_model as build_from_config
    from dvgt.models.weights import load_weights

    cfg = load_config(config, overrides)
    model = build_from_config(cfg.model)
    if weights is not None:
        load_weights(model, weights, strict=strict)
    return model.to(device).eval()
