"""Data: the official DVGT preprocessed format (format.py), its scenes and sequences (scenes.py), the
dataset and its samples (scene_dataset.py), the samplers (sampler.py), the loaders (loader.py), s3://
roots (remote.py) and the synthetic generator (synthetic.py). docs/data.md describes the format and every
convention.

Nothing is imported here, so that reading a constant of format.py (as the config validator does) does
not load the loaders, torch and the S3 layer."""
