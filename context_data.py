"""The built-in context dataset: generated panoramas whose scene decides what every thing is.

A generated dataset on which both claims of the paper's Table 1 can be seen (Sec. 1, 2.2, Fig. 1 and 4).
Every image is a wide panorama of one of four scenes, a field, a park, a beach or a cliff. Ground and
water look the same in all of them. At one end stands a tree whose colour tells the scene, and nothing
else does: scattered over the rest of the panorama lie white things that look alike in every scene, but
are sheep in a field, swans in a park, shells on a beach and gulls on a cliff. So labelling a thing takes
context from up to 300 pixels away: beyond what the dilated FCN's receptive field uses in practice, one
global statistic for the Encoding layer (the first claim). Sheep and swans are large (~14 % of their
panoramas), shells and gulls small (~4 %): the pixel loss asks for the scene mostly through the large
things, while the SE-loss asks "which things are here?" once per image, however small they are (Sec. 2.2,
the second claim). The same property in real scenes: which small objects can be present depends on the
scene, and few pixels say so.

    context_scene         one generated panorama → (H×W×3 uint8 image, H×W int64 label)
    context_split         a whole split, generated once and cached under ~/.cache/encnet
    ContextDataset        the Dataset (`--data context`, the default): images used whole, random flips
    save_context_samples  the README's picture of the data

Why this design, the designs tried before it and the linear probes that locate where the scene is lost:
docs/context_data.md.
"""
import hashlib
import inspect
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from errors import DataError

CONTEXT_HEIGHT, CONTEXT_WIDTH = 64, 320
CONTEXT_SIZES = {"train": 3000, "val": 500}
CONTEXT_SCENES = [  # name, the colour of its tree, its things' class, how many things, their radius (pixels)
    ("field", (40, 160, 60), "sheep", (3, 5), (12, 18)),
    ("park", (200, 60, 160), "swan", (3, 5), (12, 18)),
    ("beach", (230, 200, 40), "shell", (3, 6), (6, 9)),
    ("cliff", (40, 200, 220), "gull", (3, 6), (6, 9)),
]
CONTEXT_CLASSES = ["ground", "water", "tree"] + [scene[2] for scene in CONTEXT_SCENES]  # things: 3 + scene
CONTEXT_PALETTE = [[150, 120, 80], [60, 100, 170], [30, 110, 40],
                   [245, 245, 245], [255, 215, 0], [250, 128, 114], [148, 0, 211]]
GROUND_RGB, WATER_RGB = (150, 120, 80), (60, 100, 170)  # the same in every scene: appearance says nothing
THING_RGB = (235, 235, 235)  # the things: the same white in every scene
TREE_ZONE = 30  # the tree's centre lies within this many pixels of one end, the things beyond 10 more
TREE_HALF_WIDTH = (10, 14)  # pixels: the tree covers ~4 % of a panorama; a thing in front hides it


def context_scene(rng):
    """One generated panorama → (H×W×3 uint8 image, H×W int64 label)."""
    h, w = CONTEXT_HEIGHT, CONTEXT_WIDTH
    scene = int(rng.integers(len(CONTEXT_SCENES)))
    _, tree_rgb, _, (min_count, max_count), (min_radius, max_radius) = CONTEXT_SCENES[scene]
    # ground and water split by a gentle wave across the whole width, water on top or below
    x = np.arange(w)
    wave = rng.uniform(2, h / 8) * np.sin(2 * np.pi * x / w * rng.uniform(0.5, 2) + rng.uniform(0, 2 * np.pi))
    boundary = h / 2 + rng.uniform(-h / 6, h / 6) + wave
    water = np.arange(h)[:, None] < boundary
    if rng.random() < 0.5:
        water = ~water
    image = np.where(water[..., None], np.float32(WATER_RGB), np.float32(GROUND_RGB))
    image += 18 * rng.standard_normal((h, w, 3), dtype=np.float32)  # the texture
    label = np.where(water, 1, 0)
    # the tree: an upright ellipse at the left or right end
    left = rng.random() < 0.5
    half_width, half_height = rng.uniform(*TREE_HALF_WIDTH), rng.uniform(0.3 * h, 0.45 * h)
    cx = rng.uniform(half_width + 1, TREE_ZONE)
    cx, cy = cx if left else w - cx, rng.uniform(half_height, h - half_height)
    yy, xx = np.mgrid[0:h, 0:w]
    tree = ((yy - cy) / half_height) ** 2 + ((xx - cx) / half_width) ** 2 <= 1
    image[tree] = np.add(tree_rgb, rng.normal(0, 10, 3))
    label[tree] = 2
    # the scene's white things, not overlapping, anywhere beyond the tree's zone
    things, count = [], rng.integers(min_count, max_count + 1)
    while len(things) < count:
        r = rng.uniform(min_radius, max_radius)
        cy, cx = rng.uniform(r, h - r), rng.uniform(TREE_ZONE + 10 + r, w - r)
        cx = cx if left else w - cx
        if all((cy - y) ** 2 + (cx - x0) ** 2 > (r + r0 + 1) ** 2 for y, x0, r0 in things):
            things.append((cy, cx, r))
    for cy, cx, r in things:
        y0, x0 = int(cy - r), int(cx - r)  # draw inside the bounding box only
        yy, xx = np.mgrid[y0:int(cy + r) + 1, x0:int(cx + r) + 1]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[yy[disc], xx[disc]] = np.add(THING_RGB, rng.normal(0, 10, 3))
        label[yy[disc], xx[disc]] = 3 + scene
    image *= rng.uniform(0.85, 1.15)  # global brightness: no pixel-exact shortcut
    return np.clip(image, 0, 255).astype(np.uint8), label.astype(np.int64)


def context_split(split):
    """(N×3×H×W uint8 images, N×H×W int64 labels) of one split, generated or read from the cache.

    Generation takes a few seconds; the result is cached under ~/.cache/encnet, keyed by a hash of the
    generator's source and of the constants it reads, so an edited generator never meets a stale cache.
    """
    design = (inspect.getsource(context_scene), CONTEXT_SIZES, CONTEXT_HEIGHT, CONTEXT_WIDTH, CONTEXT_SCENES,
              GROUND_RGB, WATER_RGB, THING_RGB, TREE_ZONE, TREE_HALF_WIDTH)
    key = hashlib.sha1(repr(design).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "encnet" / f"context-{split}-{key}.npz"
    try:
        with np.load(cache) as stored:
            return torch.from_numpy(stored["images"]), torch.from_numpy(stored["labels"]).long()
    except (OSError, ValueError, KeyError):  # absent or damaged: generate
        pass
    scenes = [context_scene(np.random.default_rng([{"train": 1, "val": 2}[split], i]))
              for i in range(CONTEXT_SIZES[split])]
    images = np.stack([s[0] for s in scenes]).transpose(0, 3, 1, 2).copy()
    labels = np.stack([s[1] for s in scenes]).astype(np.uint8)
    try:  # write-then-rename: concurrent processes never read half a file
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache only costs the seconds of generation next time
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def save_context_samples(path):
    """The README's picture (context_samples.png): the first validation panorama of each scene (left)
    beside its labels in CONTEXT_PALETTE (right), one per row, 4-pixel white gaps."""
    images, labels = context_split("val")
    scenes = labels.flatten(1).max(1).values - 3  # a panorama's largest label is its things': 3 + scene
    picks = torch.cat([(scenes == scene).nonzero()[:1, 0] for scene in range(len(CONTEXT_SCENES))])
    palette, gap = np.array(CONTEXT_PALETTE, np.uint8), 4
    white = np.full((CONTEXT_HEIGHT, gap, 3), 255, np.uint8)
    rows = []
    for i in picks.tolist():
        if rows:
            rows.append(np.full((gap, 2 * CONTEXT_WIDTH + gap, 3), 255, np.uint8))
        rows.append(np.concatenate([images[i].permute(1, 2, 0).numpy(), white, palette[labels[i].numpy()]], 1))
    Image.fromarray(np.concatenate(rows)).save(path)


class ContextDataset(torch.utils.data.Dataset):
    """The built-in dataset, generated from the split alone (the same images for every seed).

    Images are used whole (CONTEXT_HEIGHT × CONTEXT_WIDTH): the only training augmentation is a random
    horizontal flip, since a crop could cut away the tree that defines the labels.
    """

    def __init__(self, split, mode, seed=0):
        parts = split.split("+")
        if any(p not in CONTEXT_SIZES for p in parts):
            raise DataError(f"context has splits train, val (or train+val), not {split!r}")
        images, labels = zip(*(context_split(p) for p in parts))
        self.images, self.labels = torch.cat(images), torch.cat(labels)
        self.mode, self.seed, self.epoch = mode, seed, 0
        self.classes, self.palette, self.num_classes = CONTEXT_CLASSES, CONTEXT_PALETTE, len(CONTEXT_CLASSES)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image, label = self.images[index], self.labels[index]
        if self.mode == "train" and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            image, label = image.flip(2), label.flip(1)
        return image.contiguous(), label.contiguous()


def context_dataset(split, crop_size, base_size, mode, seed):
    if crop_size != CONTEXT_WIDTH or base_size != CONTEXT_WIDTH:
        raise DataError(f"the context images ({CONTEXT_HEIGHT}×{CONTEXT_WIDTH}) are used whole: crop and base size "
                         f"must be {CONTEXT_WIDTH}, not {crop_size} and {base_size}")
    return ContextDataset(split, mode, seed)
