"""ArcFace head with ECLoss on an image folder (one sub-folder per identity), as Python.

    python -m train --config train/configs/arcface_folder.py data.path=/data/faces
"""
config = {
    "model": {"arch": "vgg16", "batch_norm": True, "input_size": 112, "dropout": 0.1},
    "head": {"kind": "arcface", "s": 64.0, "m": 0.5},
    "ecloss": {"templates": "full", "estimator": "marginal"},
    "beta": {"schedule": "auto", "grad_ratio": 0.25, "warmup_steps": 1000},
    "data": {"source": "folder", "path": "faces", "num_workers": 8, "on_bad_data": "skip"},
    "optim": {"name": "sgd", "lr": 0.1, "warmup_epochs": 1, "decay": "cosine"},
    "train": {"epochs": 20, "batch_size": 128, "amp": "bf16"},
}
