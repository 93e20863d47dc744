"""Weights people can load elsewhere: the trainer's export and VAE training write diffusers-style
folders (config.json + diffusion_pytorch_model.safetensors) beside the .pt files.

- `training.model.from_pretrained` / `training.latent.vae.from_pretrained` rebuild the module
  from config.json alone, with a state dict equal to the original's, key for key and bit for
  bit, and the same forward;
- the folders load in a Python that cannot import this repo (``python -I`` in another working
  directory, with the repo's packages refused): plain ``safetensors.torch.load_file`` and ``json``;
- tensors sharing storage (tied weights, views) are written as copies, every key present;
- every ``torch.load`` in the code unpickles weights only.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data.tracking import MemoryTracker
from training import pretrained
from training.ema import EMA
from training.latent import vae as vae_mod
from training.latent.vae import VAEConfig
from training.model import ModelConfig, from_pretrained, save_pretrained
from training.pretrained import CONFIG_NAME, WEIGHTS_NAME
from training.trainer import EXPORTS, export

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REPO = Path(__file__).resolve().parent.parent


def tiny_model_cfg() -> ModelConfig:
    cfg = ModelConfig()
    cfg.dit.patch_size, cfg.dit.hidden_size, cfg.dit.depth, cfg.dit.num_heads = [1, 4, 4], 32, 2, 2
    cfg.dit.text_dim = cfg.text.dim = 32
    cfg.text.depth, cfg.text.num_heads, cfg.text.max_length = 1, 2, 16
    return ModelConfig(dit=cfg.dit, text=cfg.text)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight moved (adaLN-Zero would make an untrained DiT the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def velocity(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 2, 8, 8, generator=g)  # (B, C, T, H, W)
    t = torch.rand(2, generator=g)
    ids, mask = model.tokenize(["a red square", "two blue circles moving"])
    with torch.no_grad():
        return model(x, t, ids, mask)  # (B, C, T, H, W)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The trainer's own export of a tiny model (raw weights, and an EMA that differs from
    them), into a stage directory and a checkpoint mirror."""
    root = tmp_path_factory.mktemp("export")
    mcfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = perturbed(mcfg.build(), 1).eval()
    weights = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ema = EMA(trainable, decay=0.5)
    with torch.no_grad():
        ema.update({n: p + 1.0 for n, p in trainable.items()})  # the EMA moves off the raw weights
    out = root / "train"
    out.mkdir()
    config = {"model": asdict(mcfg), "train": {"steps": 1}, "latent": None, "stage": "train",
              "stage_hash": "0" * 64, "inputs": {},
              "stage_url": str(root / "bucket" / "train")}
    export(out, weights, ema, config, {"train/loss": 1.0}, MemoryTracker())
    return {"out": out, "mirror": root / "bucket" / "train", "model": model, "mcfg": mcfg,
            "weights": weights, "ema": {**weights, **ema.shadow}}


def test_export_writes_folders_that_rebuild_the_model_exactly(exported):
    out = exported["out"]
    for d in ("dit", "dit_ema"):
        assert {p.name for p in (out / d).iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
        assert (exported["mirror"] / d / WEIGHTS_NAME).read_bytes() == (out / d / WEIGHTS_NAME).read_bytes()
    assert all(f in EXPORTS for f in ("dit/config.json", "dit_ema/" + WEIGHTS_NAME))
    # the .pt files stay, read as weights only
    assert same_state(torch.load(out / "model.pt", weights_only=True), exported["weights"])

    raw = from_pretrained(out / "dit")
    assert not raw.training and raw.cfg == exported["mcfg"]
    assert same_state(raw.state_dict(), exported["weights"])
    assert torch.equal(velocity(raw), velocity(exported["model"]))

    ema = from_pretrained(out / "dit_ema")
    assert same_state(ema.state_dict(), exported["ema"])
    assert not same_state(exported["ema"], exported["weights"])  # it is the EMA, not a copy
    assert not torch.equal(velocity(ema), velocity(raw))

    config = json.loads((out / "dit" / CONFIG_NAME).read_text())
    assert config["_class_name"] == "TextToVideo" and config["dit"]["hidden_size"] == 32
    with pytest.raises(ValueError, match="is a 'TextToVideo', not a 'VAE'"):
        vae_mod.from_pretrained(out / "dit")


def test_vae_folder_rebuilds_the_vae_with_its_latent_normalisation(tmp_path):
    torch.manual_seed(0)
    vae = perturbed(VAEConfig().build(), 2).eval()
    vae.set_normalization([0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0])
    vae_mod.save_pretrained(tmp_path / "vae", vae)
    back = vae_mod.from_pretrained(tmp_path / "vae")
    assert back.cfg == vae.cfg and back.cfg.latent_std == [1.5, 0.5, 2.0, 1.0]
    assert same_state(back.state_dict(), vae.state_dict())
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)  # (1, 4, 2, 2, 2), normalised
        assert torch.equal(back.encode(x), z) and torch.equal(back.decode(z), vae.decode(z))


def test_folders_load_with_plain_safetensors_and_json_without_this_repo(exported, tmp_path):
    vae = VAEConfig().build()
    vae_mod.save_pretrained(tmp_path / "vae", vae)
    script = r"""
import importlib.abc, json, sys
from pathlib import Path

class NoRepo(importlib.abc.MetaPathFinder):  # the venv has this repo installed: refuse it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("training", "pipeline", "data"):
            raise ModuleNotFoundError(f"no {name} here")

sys.meta_path.insert(0, NoRepo())
from safetensors.torch import load_file
out = {}
for d in sys.argv[1:]:
    cfg = json.loads((Path(d) / "config.json").read_text())
    sd = load_file(str(Path(d) / "diffusion_pytorch_model.safetensors"))
    out[d] = {"class": cfg["_class_name"], "sums": {k: v.double().sum().item() for k, v in sd.items()},
              "shapes": {k: list(v.shape) for k, v in sd.items()}}
print(json.dumps(out))
"""
    dirs = [str(exported["out"] / "dit"), str(exported["out"] / "dit_ema"), str(tmp_path / "vae")]
    r = subprocess.run([sys.executable, "-I", "-c", script, *dirs], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    wants = [("TextToVideo", exported["weights"]), ("TextToVideo", exported["ema"]),
             ("VAE", vae.state_dict())]
    for d, (cls, want) in zip(dirs, wants):
        assert got[d]["class"] == cls
        assert got[d]["shapes"] == {k: list(v.shape) for k, v in want.items()}
        assert got[d]["sums"] == {k: v.double().sum().item() for k, v in want.items()}


def test_tied_and_viewed_tensors_are_written_whole(tmp_path):
    mcfg = tiny_model_cfg()
    model = perturbed(mcfg.build(), 4)
    a, b = model.dit.blocks[0], model.dit.blocks[1]
    b.attn.qkv.weight = a.attn.qkv.weight  # tied: two keys, one storage
    sd = model.state_dict()
    assert sd["dit.blocks.1.attn.qkv.weight"].data_ptr() == sd["dit.blocks.0.attn.qkv.weight"].data_ptr()
    with pytest.raises(RuntimeError, match="share memory"):
        save_file(sd, str(tmp_path / "plain.safetensors"))  # what a plain save does with it
    save_pretrained(tmp_path / "tied", mcfg, sd)
    assert same_state(load_file(str(tmp_path / "tied" / WEIGHTS_NAME)), sd)  # every key
    assert same_state(from_pretrained(tmp_path / "tied").state_dict(), sd)

    base = torch.arange(24.0).view(4, 6)
    views = {"whole": base, "rows": base[1:3], "cols": base[:, 2], "t": base.t()}
    folder = pretrained.save_pretrained(tmp_path / "views", "Views", {}, views)
    assert same_state(load_file(str(folder / WEIGHTS_NAME)), views)


def test_every_torch_load_unpickles_weights_only():
    """Across the code (not tests): every torch.load passes weights_only=True."""
    bad = []
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("training/**/*.py"),
                 *REPO.glob("data/**/*.py"), *REPO.glob("benchmarks/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, bad
