"""Where the world's attributes are readable: linear probes of a model's hidden states, block by block.

For each block, two features per clip (the video at `--video-sigma`, 0 = clean, the text stream all noise tokens,
no prompt):
  video  the mean over video tokens of the block's video output, layer-normalised (what uniform attention reads)
  text   the shared self-attention's output at the first text positions (what the text stream does read)
and, per world attribute, a ridge classifier (standardised features) fit on the dataset's training items and
scored on its held-out items. Chance: shape 0.33, color 0.17, size 0.5, motion 0.2, speed 0.5 (moving clips
only), start 0.25.

    python scripts/probe_readout.py --model vigu_cli/assets/world-wan2.1 --data runs/demo/data
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vigu_cli.core.convert import load_pipeline
from vigu_cli.core.flow import interpolate, sigma_to_timestep
from vigu_cli.data import world
from vigu_cli.data.cache import CachedVideoTextDataset, collate
from vigu_cli.data.manifest import MANIFEST, read_lines
from vigu_cli.recipe import load_recipe

ATTRIBUTES = ("shape", "color", "size", "motion", "speed", "start")
TEXT_POSITIONS = 6


@torch.no_grad()
def features(
    pipe, dataset: CachedVideoTextDataset, count: int, video_sigma: float = 0.0, batch: int = 32
) -> torch.Tensor:
    """`[N, 2, blocks, D]`: the video and text features of the first `count` items, per block."""
    model = pipe.transformer
    length, vocab = pipe.config.text_max_length, model.config.text_vocab_size
    out = []
    for start in range(0, min(count, len(dataset)), batch):
        items = collate([dataset[i] for i in range(start, min(start + batch, count, len(dataset)))])
        latents = items["latents"].float()
        size = latents.shape[0]
        sigma_v = torch.full((size,), video_sigma)
        noise_v = torch.randn(latents.shape, generator=torch.Generator().manual_seed(start))
        latents = interpolate(latents, noise_v, sigma_v)
        video_tokens = latents[0, 0].numel() // int(np.prod(model.config.patch_size))
        attn, blocks = [], []
        # the text positions are an output's last `length` rows (a video that does not attend to the text has
        # its own, video-only attention call first, which holds none)
        keep = lambda m, i, o: o.shape[1] != video_tokens and attn.append(o[:, -length:])  # noqa: E731
        hooks = [b.attn1.register_forward_hook(keep) for b in model.blocks]
        hooks += [b.register_forward_hook(lambda m, i, o: blocks.append(o[0])) for b in model.blocks]
        noise = torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(start))
        try:
            pipe.model_fn(latents, noise, sigma_to_timestep(sigma_v), sigma_to_timestep(torch.ones(size)),
                          pipe.encode_condition([""] * size, "cpu"))
        finally:
            for hook in hooks:
                hook.remove()
        video = [torch.nn.functional.layer_norm(h.float(), h.shape[-1:]).mean(1) for h in blocks]
        text = [a[:, :TEXT_POSITIONS].float().mean(1) for a in attn]
        out.append(torch.stack([torch.stack(video, 1), torch.stack(text, 1)], 1))
    return torch.cat(out)


def ridge_accuracy(train_x, train_y: list[str], test_x, test_y: list[str], penalty: float = 10.0) -> float:
    """Accuracy on the test items of a ridge classifier on standardised features (one-hot targets)."""
    classes = sorted(set(train_y))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6

    def design(x):
        return torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1)

    a, targets = design(train_x), torch.tensor([[float(y == c) for c in classes] for y in train_y])
    weights = torch.linalg.solve(a.T @ a + penalty * torch.eye(a.shape[1]), a.T @ targets)
    predicted = (design(test_x) @ weights).argmax(1).tolist()
    return float(np.mean([classes[p] == y for p, y in zip(predicted, test_y)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a vigu folder or a stock Wan folder (world-tiny)")
    parser.add_argument("--data", required=True, help="a world dataset built for this model (vigu build-dataset)")
    parser.add_argument("--train-items", type=int, default=640)
    parser.add_argument("--recipe", default="world-tiny")
    parser.add_argument("--video-sigma", type=float, default=0.0, help="noise level of the video (0: clean)")
    args = parser.parse_args()

    pipe = load_pipeline(args.model, load_recipe(args.recipe))
    captions = {line.id: line.caption for line in read_lines(f"{args.data}/{MANIFEST}") if line.status == "ok"}
    splits = {}
    for split, count in (("train", args.train_items), ("val", 10**9)):
        dataset = CachedVideoTextDataset(args.data, split)
        truth = [world.parse_caption(captions[item_id]) for item_id, _ in dataset.items[:count]]
        splits[split] = (features(pipe, dataset, count, args.video_sigma), truth)

    (train_x, train_truth), (val_x, val_truth) = splits["train"], splits["val"]
    blocks = train_x.shape[2]
    table = Table(title=f"linear probes of {args.model} at video sigma {args.video_sigma} "
                        f"({len(train_truth)} fit, {len(val_truth)} scored)")
    table.add_column("attribute")
    for kind in ("video", "text"):
        for b in range(blocks):
            table.add_column(f"{kind} {b}", justify="right")
    for attribute in ATTRIBUTES:
        keep_train = [i for i, t in enumerate(train_truth) if t[attribute]]
        keep_val = [i for i, t in enumerate(val_truth) if t[attribute]]
        train_y = [train_truth[i][attribute] for i in keep_train]
        val_y = [val_truth[i][attribute] for i in keep_val]
        cells = [
            f"{ridge_accuracy(train_x[keep_train, k, b], train_y, val_x[keep_val, k, b], val_y):.2f}"
            for k in range(2) for b in range(blocks)
        ]
        table.add_row(attribute, *cells)
    Console(width=110).print(table)


if __name__ == "__main__":
    main()
