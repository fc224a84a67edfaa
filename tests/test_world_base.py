"""`make world-base` (scripts/world_base.sh), shrunk: the three phases run (two later passes in the third), a
second run reuses them, and the
result is exported as a stock diffusers folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import WanPipeline
from safetensors.torch import load_file

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
SHRUNK = [*TINY, "data.val_every=4", "data.shard_size=16", "train.base.batch_size=4", "train.base.checkpoint_every=1",
          "train.base.log_every=1", "train.base.warmup_steps=0", "train.base.validate_every=0", "train.base.val_items=2",
          "train.base.compile=false"]


def test_world_base_script_trains_three_phases_and_exports_a_stock_wan_folder(tmp_path):
    work, asset = tmp_path / "work", tmp_path / "asset"
    env = {**os.environ, "VIGU": f"{sys.executable} -m vigu_cli", "PYTHON": sys.executable, "WORK": str(work),
           "ASSET": str(asset), "ITEMS": "32", "STABLE_STEPS": "2", "TOTAL_STEPS": "4",
           "PASSES": "2", "PASS_STEPS": "2", "BASE_SET": " ".join(SHRUNK),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "scripts/world_base.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (asset / "metrics.jsonl").read_text().splitlines()]
    # phase 1 at the constant lr to STABLE_STEPS, phase 2 (resumed) on the cosine schedule to TOTAL_STEPS
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == rows[1]["lr"] and rows[3]["lr"] < rows[2]["lr"]
    assert (asset / "validation.jsonl").is_file()
    # phase 3, two more passes, each from the model before it on new clips, each with its own cosine schedule
    seeds = [json.loads((work / "data" / "dataset.json").read_text())["settings"]["data"]["seed"]]
    for number in (2, 3):
        later = [json.loads(line) for line in (asset / f"metrics-pass-{number}.jsonl").read_text().splitlines()]
        assert [row["step"] for row in later] == [1, 2] and later[1]["lr"] < later[0]["lr"]
        assert (asset / f"validation-pass-{number}.jsonl").is_file()
        data = json.loads((work / f"pass-{number}" / "data" / "dataset.json").read_text())
        seeds.append(data["settings"]["data"]["seed"])
        recipe = json.loads((work / f"pass-{number}" / "base" / "recipe.json").read_text())
        assert recipe["train"]["base"]["init"] == str(work / ("base" if number == 2 else "pass-2/base") / "model")
    assert len(set(seeds)) == 3
    exported = WanPipeline.from_pretrained(asset)  # a stock diffusers folder
    weights = work / "pass-3" / "base" / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    trained, saved = load_file(weights), weights.stat().st_mtime_ns
    for name, param in exported.transformer.state_dict().items():
        assert torch.equal(param, trained[name]), name
    # a second run reuses the finished phases: no training run saves the model again
    again = subprocess.run(["bash", "scripts/world_base.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert weights.stat().st_mtime_ns == saved and (asset / "metrics.jsonl").is_file()
