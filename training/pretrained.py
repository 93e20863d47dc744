"""Weights as diffusers-style folders: ``config.json`` + ``diffusion_pytorch_model.safetensors``.

    <folder>/config.json                           {"_class_name": ..., <the config dataclass>}
    <folder>/diffusion_pytorch_model.safetensors   the full state dict, float32, every key

What other tools load without this repo (``safetensors.torch.load_file`` + ``json``), and what
``training.model.from_pretrained`` / ``training.latent.vae.from_pretrained`` rebuild a module
from (no pickle anywhere). safetensors refuses tensors sharing storage (tied weights, or views
of one buffer): those are written as copies, so every key of the state dict is in the file
and a plain ``load_file`` gives the whole state dict back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FILES = (CONFIG_NAME, WEIGHTS_NAME)


def save_pretrained(folder: str | os.PathLike, class_name: str, config: dict[str, Any],
                    state_dict: dict[str, torch.Tensor]) -> Path:
    """Write `config` (a config dataclass as a dict) and `state_dict` as a folder; returns it.
    Each file appears whole or not at all (written aside, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        shared = v.numel() > 0 and key in seen
        seen.add(key)
        # a copy for the second of two tensors on one storage, and for views (non-contiguous
        # or a slice of a larger storage): safetensors writes only whole, unshared storages
        if shared or not v.is_contiguous() or v.untyped_storage().nbytes() != v.nbytes:
            v = v.contiguous().clone()
        tensors[k] = v
    tmp = folder / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_NAME)
    tmp = folder / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"_class_name": class_name, **config}, indent=2))
    os.replace(tmp, folder / CONFIG_NAME)
    return folder


def load_pretrained(folder: str | os.PathLike, class_name: str
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """-> (the config dict, without its ``_``-keys; the state dict) of a `save_pretrained`
    folder, checking that it holds a `class_name`."""
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} not found: a pretrained folder holds "
                                    f"{' and '.join(FILES)}")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("_class_name") != class_name:
        raise ValueError(f"{folder / CONFIG_NAME} is a {config.get('_class_name')!r}, "
                         f"not a {class_name!r}")
    return ({k: v for k, v in config.items() if not k.startswith("_")},
            load_file(str(folder / WEIGHTS_NAME)))
