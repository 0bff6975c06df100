"""Datasets, train-time augmentation and distributed batch sampling for EncNet.

    get_dataset           ADE20K, PASCAL VOC (+SBD aug), PASCAL-Context, COCO→VOC, Cityscapes, CIFAR-10 from
                          their standard on-disk layouts; items: (3×H×W uint8 image, H×W int64 label, −1 = ignore)
    check_dataset         a fast parallel pass over a split (labels decoded, image headers read) before training
    augment_train         flip, scale, rotation and crop of the released code as ONE affine warp per sample;
                          mmsegmentation's cat_max_ratio crop rule and photometric distortion as options
    normalize             uint8 → normalised float32, on the device after the transfer (a quarter of the bytes)
    ShardedBatchSampler   one global permutation per epoch, cut into global batches, each rank takes its slice
    shard_indices         validation sharding without padding, so metrics summed over ranks are exact
    dataset_info          class names and palette, for colouring predictions
    train_ids_to_label_ids   Cityscapes classes → official label ids, for the benchmark server's PNGs

Randomness. Every random number of a training item comes from np.random.default_rng([seed, epoch, index]):
an item depends neither on the DataLoader's worker count nor on the number of processes, and a resumed
run sees exactly the batches it would have seen. Call set_epoch before iterating a DataLoader; workers
made with persistent_workers=True keep the epoch they were started with.

Bad data stops with a DataError naming the file (and the offending value): nothing is skipped or repaired.
"""
import hashlib
import inspect
import json
import math
import os
import pickle
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter  # ImageFile.LOAD_TRUNCATED_IMAGES stays False: a truncated file must fail

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as the pretrained backbones expect
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class UserError(Exception):
    """A problem the user can fix: bad data, flags, files or downloads, a diverged run. Reported as its message
    alone (exit status `exit_status`), without a traceback; every other exception is a bug and keeps its
    traceback. Defined here, in the lowest module that raises one, so that every module can share it.
    all_ranks: whether each process reports its own (a data error may be one rank's only)."""
    exit_status = 1
    all_ranks = True


class DataError(UserError):
    """Missing, misplaced or damaged data. The message names the path."""


@contextmanager
def reading(path):
    """Turn Pillow's and the OS's errors while reading `path` into a DataError naming it."""
    try:
        yield
    except (OSError, SyntaxError) as e:  # Pillow raises SyntaxError for some broken PNG chunks
        raise DataError(f"{path}: cannot read ({e})") from None


def normalize(images, mean=MEAN, std=STD):
    """B×3×H×W uint8 → float32 (x/255 − mean)/std on images' device, keeping channels_last if it has it."""
    mean = torch.tensor(mean, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(std, device=images.device).view(3, 1, 1) * 255
    return images.float().sub_(mean).div_(std)  # .float() and in-place ops preserve the memory format


CLASS_TABLE = json.loads(Path(__file__).with_name("classes.json").read_text())  # names, palettes, Cityscapes ids


def dataset_info(name):
    """{'classes', 'palette', 'num_classes'} of a dataset, from classes.json next to this file."""
    if name == "context":
        return {"classes": CONTEXT_CLASSES, "palette": CONTEXT_PALETTE, "num_classes": len(CONTEXT_CLASSES)}
    if name == "cifar10":
        palette = dataset_info("pascal_voc")["palette"][1:11]  # any ten distinct colours
        return {"classes": CIFAR_CLASSES, "palette": palette, "num_classes": 10}
    key = {"pascal_aug": "pascal_voc", "coco": "pascal_voc"}.get(name, name)  # COCO is trained on VOC's classes
    if key not in CLASS_TABLE or key.startswith("_"):
        raise DataError(f"no class list for dataset {name!r}")
    entry = CLASS_TABLE[key]
    return {"classes": entry["classes"], "palette": entry["palette"], "num_classes": len(entry["classes"])}


# ----------------------------------------------------------------------------------------------
# Augmentation

def crop_shape(crop_size):
    """crop_size as (height, width): an int n means n×n."""
    if isinstance(crop_size, (int, np.integer)):
        return int(crop_size), int(crop_size)
    height, width = crop_size
    return int(height), int(width)


def augment_train(image, label, rng, crop_size, base_size, scale_range=(0.5, 2.0), max_rotation=10.0,
                  label_fill=255, cat_max_ratio=None, label_classes=None, photometric=False, scale_rule="long",
                  scale_box=None, blur=False, image_fill=0):
    """The released code's random flip → scale → rotate → pad → crop, as one affine warp into the crop.

    image: PIL RGB image W×H (if it is a JPEG opened but not yet loaded, it is decoded at 1/2, 1/4 or 1/8
    size when the sampled scale allows; the matrix accounts for it). label: PIL 'L' of raw dataset values, W×H.
    crop_size: n (n×n) or (height, width). Returns the crop image (padding and rotated-away corners 0) and
    label (those label_fill), both PIL of width×height crop_size. image_fill: the padding's grey level or RGB.
    Warping only the output pixels skips resizing and rotating the whole scaled image (up to 1040×780).
    Shrinking is plain bilinear sampling, without the anti-aliasing filter of PIL's resize (like torch's
    interpolate), apart from the block averaging a reduced JPEG decode does.

    scale_rule: how the random scale is drawn.
        'long'  the released code's final revision: the long side a random integer in scale_range × base_size
                (both ends included), the short side rounded, aspect kept;
        'short' its revision that trained the published models (v0.5.0): the short side drawn so, the long
                side truncated (int());
        'box'   mmsegmentation's RandomResize(scale_box, ratio_range, keep_ratio=True): r ~ U(scale_range), the
                image resized by the largest factor that fits it into int(long·r) × int(short·r) of
                scale_box = (long, short) (mmcv's rescale_size, sides rounded).
    blur: a Gaussian blur of radius U(0, 1) on the crop's image with probability ½ (released v0.5.0).

    Options of mmsegmentation's recipes (off by default):
    cat_max_ratio: redraw the crop's offset (only the offset) while one class covers cat_max_ratio or more of
        the crop's labelled pixels, or fewer than two classes are present: up to 10 checks, then the 11th
        offset is taken unchecked, as mmsegmentation's RandomCrop does. label_classes: 256-entry table raw
        value → class, −1 = ignored, for that count (default: every raw value but label_fill is a class).
    photometric: photometric_distortion of the warped image; padding and rotated-away corners stay 0
        (mmsegmentation pads after its distortion).
    """
    w, h = image.size
    crop_h, crop_w = crop_shape(crop_size)
    flip = rng.random() < 0.5
    # Long side U(0.5, 2)·base_size. For Cityscapes (2048×1024) with base_size 2048 this is mmsegmentation's
    # RandomResize(scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True): the factor it draws, r,
    # makes the image 2048r × 1024r, as here (which draws the long side in whole pixels).
    if scale_rule == "box":
        ratio = rng.uniform(*scale_range)
        box_long, box_short = int(max(scale_box) * ratio), int(min(scale_box) * ratio)
        factor = min(box_long / max(w, h), box_short / min(w, h))
        sw, sh = int(w * factor + 0.5), int(h * factor + 0.5)
    else:
        side = int(rng.integers(int(base_size * scale_range[0]), int(base_size * scale_range[1]), endpoint=True))
        if scale_rule == "long":  # long side = side, aspect kept, short side rounded
            sw, sh = (int(w * side / h + 0.5), side) if h > w else (side, int(h * side / w + 0.5))
        else:  # "short": short side = side, long side truncated
            sw, sh = (side, int(h * side / w)) if h > w else (int(w * side / h), side)
    angle = math.radians(rng.uniform(-max_rotation, max_rotation))

    # Inverse map, output → input, in continuous coordinates where pixel i spans [i, i+1): Pillow's affine
    # transform samples the input at M·(x+½, y+½), so an integer translation is an exact crop.
    cx, cy, c, s = sw / 2, sh / 2, math.cos(angle), math.sin(angle)
    # PIL's rotate(deg) turns the content counter-clockwise about the centre; its inverse is this rotation
    unrotate = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1]])
    unscale = np.diag([w / sw, h / sh, 1.0])
    unflip = np.array([[-1, 0, w], [0, 1, 0], [0, 0, 1]], float) if flip else np.eye(3)
    size = (crop_w, crop_h)  # Pillow's order

    def random_crop():
        """(matrix, warped label) of a random crop window in the scaled image padded right/bottom to the crop."""
        x1 = int(rng.integers(0, max(sw, crop_w) - crop_w, endpoint=True))
        y1 = int(rng.integers(0, max(sh, crop_h) - crop_h, endpoint=True))
        crop = np.array([[1, 0, x1], [0, 1, y1], [0, 0, 1]], float)
        matrix = unflip @ unscale @ unrotate @ crop
        return matrix, label.transform(size, Image.Transform.AFFINE, tuple(matrix[:2].ravel()),
                                       Image.Resampling.NEAREST, fillcolor=label_fill)

    matrix, out_label = random_crop()
    if cat_max_ratio is not None:
        if label_classes is None:
            label_classes = np.arange(256)
            label_classes[label_fill] = -1
        for _ in range(10):
            if crop_is_varied(label_classes[np.asarray(out_label)], cat_max_ratio):
                break
            matrix, out_label = random_crop()

    reduced = image.draft(None, (sw, sh))  # JPEG only, before decoding: (mode, box of the original in it)
    factor = w / reduced[1][2] if reduced else 1.0
    image_matrix = np.diag([1 / factor, 1 / factor, 1.0]) @ matrix
    out = image.convert("RGB").transform(size, Image.Transform.AFFINE, tuple(image_matrix[:2].ravel()),
                                         Image.Resampling.BILINEAR, fillcolor=image_fill)
    if photometric:
        # the output pixels whose source lies inside the image (the label's nearest-neighbour rule)
        inside = Image.new("L", (w, h), 1).transform(size, Image.Transform.AFFINE, tuple(matrix[:2].ravel()),
                                                     Image.Resampling.NEAREST, fillcolor=0)
        pixels = np.asarray(out)
        distorted = photometric_distortion(pixels, rng)
        out = Image.fromarray(np.where(np.asarray(inside, bool)[..., None], distorted, pixels))
    if blur and rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.random()))
    return out, out_label


# Padding colours of training crops: black (the released code pads the image with 0 before normalising) or the
# ImageNet mean in whole pixel levels, which normalises to 0 within half a level (mmsegmentation pads the
# normalised image with exactly 0, i.e. the mean colour).
PAD_COLOURS = {"black": (0, 0, 0), "mean": tuple(int(m * 255 + 0.5) for m in MEAN)}


def crop_is_varied(classes, cat_max_ratio):
    """mmsegmentation's RandomCrop test: ≥ 2 classes and none with cat_max_ratio of the labelled pixels.

    classes: int array of class indices, −1 = ignored (not counted).
    """
    counts = np.bincount(classes[classes >= 0].ravel())
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() < cat_max_ratio * counts.sum()


# ----------------------------------------------------------------------------------------------
# Photometric distortion (mmsegmentation's PhotoMetricDistortion)

def photometric_distortion(pixels, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmsegmentation's PhotoMetricDistortion of an H×W×3 uint8 RGB array → a new H×W×3 uint8 array.

    Each step happens with probability ½ (a coin, then its value, both from rng), in mmsegmentation's order:
      1. brightness: add U(−brightness_delta, brightness_delta)
      2. a coin decides whether contrast comes here or last; contrast: multiply by U(contrast_range)
      3. saturation: multiply HSV's S by U(saturation_range), S clipped to 1
      4. hue: rotate H by 2k degrees, k an integer in −hue_delta..hue_delta−1 (mmsegmentation's H is OpenCV's
         8-bit hue in 2° units, and numpy's randint excludes its upper end)
      5. contrast, if the coin of step 2 put it here
    Every step maps uint8 → uint8 as there: brightness and contrast in float32, clipped to 0..255 and
    truncated; saturation and hue through HSV and back, rounded. The HSV here is float; OpenCV's 8-bit HSV,
    which mmsegmentation uses, also quantises H to 2° and S to 1/255 (a level or two of difference).
    """
    def affine(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)  # astype truncates

    def contrast(x):
        if rng.integers(2):
            return affine(x, alpha=rng.uniform(*contrast_range))
        return x

    if rng.integers(2):
        pixels = affine(pixels, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_last = rng.integers(2) == 0  # mmsegmentation's "mode 0"
    if not contrast_last:
        pixels = contrast(pixels)
    if rng.integers(2):
        hue, saturation, value = rgb_to_hsv(pixels)
        saturation = np.minimum(saturation * np.float32(rng.uniform(*saturation_range)), 1)
        pixels = hsv_to_rgb(hue, saturation, value)
    if rng.integers(2):
        hue, saturation, value = rgb_to_hsv(pixels)
        pixels = hsv_to_rgb((hue + 2 * int(rng.integers(-hue_delta, hue_delta))) % 360, saturation, value)
    if contrast_last:
        pixels = contrast(pixels)
    return pixels


def rgb_to_hsv(pixels):
    """H×W×3 uint8 RGB → float32 (hue in degrees [0, 360), saturation [0, 1], value [0, 255]), each H×W.

    The hexcone model: value = max channel, saturation = (max − min)/max, hue = the position of the colour
    on the six edges red → yellow → green → cyan → blue → magenta (grey: hue and saturation 0).
    """
    r, g, b = np.moveaxis(pixels, -1, 0).astype(np.float32)  # contiguous planes: 3× faster than strided
    value, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    chroma = value - low
    safe = np.where(chroma > 0, chroma, np.float32(1))  # grey: numerators are 0, so the hue comes out 0
    hue = (r - g) / safe + 4                            # blue is the largest: 180°..300°
    hue = np.where(value == g, (b - r) / safe + 2, hue)  # green: 60°..180°
    hue = np.where(value == r, (g - b) / safe, hue)      # red: −60°..60°
    hue *= 60
    hue[hue < 0] += 360
    saturation = chroma / np.where(value > 0, value, np.float32(1))
    return hue, saturation, value


def hsv_to_rgb(hue, saturation, value):
    """Inverse of rgb_to_hsv → H×W×3 uint8, rounded.

    Channel n (red 5, green 3, blue 1 on the hue wheel in 60° steps) is value·(1 − saturation·ramp), where
    ramp = clip(min(k, 4 − k), 0, 1) and k = (n + hue/60) mod 6: 0 where the channel is the largest, 1 where
    it is the smallest, linear between.
    """
    sixths = hue / 60
    out = np.empty(hue.shape + (3,), np.uint8)
    for channel, n in enumerate((5, 3, 1)):
        k = sixths + n
        k = np.where(k >= 6, k - 6, k)
        ramp = np.clip(np.minimum(k, 4 - k), 0, 1)
        out[..., channel] = np.clip(np.rint(value * (1 - saturation * ramp)), 0, 255)
    return out


def center_crop(image, label, size):
    """Resize so the image just covers the crop and cut the central crop (quick validation).

    size: n (n×n: the short side becomes n) or (height, width).
    """
    w, h = image.size
    crop_h, crop_w = crop_shape(size)
    if crop_w * h >= crop_h * w:  # the crop is relatively wider: the width decides the scale
        bw, bh = w, crop_h * w / crop_w
    else:
        bw, bh = crop_w * h / crop_h, h
    box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)  # in the original's coordinates
    return (image.resize((crop_w, crop_h), Image.Resampling.BILINEAR, box),
            label.resize((crop_w, crop_h), Image.Resampling.NEAREST, box))


def image_tensor(image):
    """PIL RGB W×H → 3×H×W uint8 contiguous tensor."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# Segmentation datasets

def label_tables(class_values, also_legal):
    """The raw label values a dataset may contain, and the 256-entry raw value → class table.

    Raw value class_values[i] is class i; every other value (including 255, the fill of augment_train,
    never a class here) maps to −1 = ignore. Legal raw values: class_values and also_legal.
    """
    class_values = list(class_values)
    legal = np.zeros(256, bool)
    legal[class_values] = True
    legal[list(also_legal)] = True
    lut = np.full(256, -1, np.int64)
    lut[class_values] = np.arange(len(class_values))
    return legal, lut


# Cityscapes' 19 training classes (road, sidewalk, ..., bicycle) as the label ids of the gtFine
# *_labelIds.png files (cityscapesscripts' labels.py), from classes.json: index = class.
CITYSCAPES_LABEL_IDS = CLASS_TABLE["cityscapes"]["label_ids"]

LABELS = {  # label format: (raw value of class 0, 1, ..., other legal raw values)
    "ade20k": (range(1, 151), [0]),        # 0 = "other", ignored
    "pascal_voc": (range(21), [255]),      # 0 = background is a class, 255 = void
    "pascal_aug": (range(21), [255]),
    "pcontext": (range(1, 60), [0]),       # 0 = background, ignored in the 59-class setting
    "coco": (range(21), []),               # generated from the annotations in VOC's classes
    "cityscapes": (CITYSCAPES_LABEL_IDS, range(34)),   # *_gtFine_labelIds.png: ids 0..33, 19 are classes
    "cityscapes_train_ids": (range(19), [255]),        # *_gtFine_labelTrainIds.png: classes, 255 = ignore
}


def train_ids_to_label_ids(classes):
    """Cityscapes class indices 0..18 (−1 = ignore → 0, 'unlabeled') → the official label ids, as uint8.

    What the benchmark server expects in the PNGs it scores. classes: int array or tensor, any shape;
    a tensor comes back as a tensor on its device.
    """
    table = np.array(CITYSCAPES_LABEL_IDS + [0], np.uint8)  # index −1 picks the last entry
    if torch.is_tensor(classes):
        return torch.from_numpy(table).to(classes.device)[classes.long()]
    return table[np.asarray(classes)]


def read_png_label(path):
    """H×W uint8 raw label: the values of an 'L' PNG, the palette indices of a 'P' PNG."""
    with reading(path):
        label = Image.open(path)
        if label.mode not in ("L", "P"):
            raise DataError(f"{path}: label PNG has mode {label.mode}, expected single-channel L or P")
        return np.array(label)


class SegmentationDataset(torch.utils.data.Dataset):
    """(3×H×W uint8 image, H×W int64 label) items of one split.

    samples: list of (image path, label source); read_label(label source) → H×W uint8 raw label, and
    str(label source) names it in error messages. labels: the key of LABELS for the raw values (default
    name). crop_size: n (n×n) or (height, width). mode: 'train' random augmentation to crop_size, 'val' the
    whole image, 'center' resized to just cover crop_size and centre-cropped. max_rotation, cat_max_ratio
    and photometric: augment_train's options, for 'train' (cat_max_ratio counts classes after the raw
    value → class table, so every value that is not a class is ignored).
    """

    def __init__(self, name, samples, read_label, crop_size, base_size, mode, seed, labels=None, *,
                 max_rotation=10.0, cat_max_ratio=None, photometric=False, scale_rule="long", scale_box=None,
                 blur=False, pad="black"):
        self.samples, self.read_label = samples, read_label
        self.crop_size, self.base_size, self.mode, self.seed, self.epoch = crop_size, base_size, mode, seed, 0
        self.augmentation = dict(max_rotation=max_rotation, cat_max_ratio=cat_max_ratio, photometric=photometric,
                                 scale_rule=scale_rule, scale_box=scale_box, blur=blur, image_fill=PAD_COLOURS[pad])
        self.legal, self.lut = label_tables(*LABELS[labels or name])
        info = dataset_info(name)
        self.classes, self.palette, self.num_classes = info["classes"], info["palette"], info["num_classes"]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def open_checked(self, index):
        """(PIL image of item `index`, header read only; its H×W uint8 raw label), checked against each other.

        DataError naming the file when either cannot be read, their sizes differ or the label has a value
        the dataset does not define. The image's body is decoded later, when its scale is known.
        """
        image_path, label_source = self.samples[index]
        with reading(image_path):
            image = Image.open(image_path)  # reads the header only: decoding waits for the crop's scale
        raw = self.read_label(label_source)
        if raw.shape != (image.height, image.width):
            raise DataError(f"{label_source}: label is {raw.shape[1]}×{raw.shape[0]} but image {image_path} "
                            f"is {image.width}×{image.height}")
        if not np.take(self.legal, raw).all():  # a table look-up: 3× faster than a histogram of the values
            illegal = np.flatnonzero(np.bincount(raw.ravel(), minlength=256) * ~self.legal)
            legal = np.flatnonzero(self.legal)
            runs = np.split(legal, np.flatnonzero(np.diff(legal) > 1) + 1)
            raise DataError(f"{label_source}: label value {illegal[0]}, legal values are "
                            + ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs))
        return image, raw

    def __getitem__(self, index):
        image_path = self.samples[index][0]
        image, raw = self.open_checked(index)
        label = Image.fromarray(raw)
        with reading(image_path):
            if self.mode == "train":
                rng = np.random.default_rng([self.seed, self.epoch, index])
                image, label = augment_train(image, label, rng, self.crop_size, self.base_size,
                                             label_classes=self.lut, **self.augmentation)
            elif self.mode == "center":
                image, label = center_crop(image.convert("RGB"), label, self.crop_size)
            else:
                image = image.convert("RGB")
        return image_tensor(image), torch.from_numpy(self.lut[np.asarray(label)])


def require_dir(path, name, layout):
    if not path.is_dir():
        raise DataError(f"{name}: {path} not found; expected {layout}")
    return path


def under(root, top):
    """ROOT/top, or ROOT itself when it already is the `top` folder."""
    root = Path(root)
    return root if root.name == top and not (root / top).is_dir() else root / top


def read_ids(list_file):
    with reading(list_file):
        return [line.strip() for line in list_file.read_text().splitlines() if line.strip()]


def file_pairs(name, ids, image_dir, label_dir):
    """[(image_dir/id.jpg, label_dir/id.png)]; a listed id without both files is a DataError."""
    images, labels = set(os.listdir(image_dir)), set(os.listdir(label_dir))  # one listing, not a stat per file
    for i in ids:
        if f"{i}.jpg" not in images:
            raise DataError(f"{name}: {image_dir / i}.jpg not found (listed in the split)")
        if f"{i}.png" not in labels:
            raise DataError(f"{name}: {label_dir / i}.png not found (listed in the split)")
    return [(image_dir / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]


def ade20k_samples(root, split):
    base = under(root, "ADEChallengeData2016")
    layout = "ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}"
    samples = []
    for part in split.split("+"):
        folder = {"train": "training", "val": "validation"}.get(part)
        if folder is None:
            raise DataError(f"ade20k has splits train, val (or train+val), not {split!r}")
        image_dir = require_dir(base / "images" / folder, "ade20k", layout)
        label_dir = require_dir(base / "annotations" / folder, "ade20k", layout)
        ids = sorted(f[:-4] for f in os.listdir(image_dir) if f.endswith(".jpg"))
        if not ids:
            raise DataError(f"ade20k: no images (*.jpg) in {image_dir}")
        # an image without its label, or a label without its image: either is a file missing from the download
        orphans = sorted({f[:-4] for f in os.listdir(label_dir) if f.endswith(".png")} - set(ids))
        if orphans:
            raise DataError(f"ade20k: {image_dir / orphans[0]}.jpg not found (its label {label_dir / orphans[0]}.png "
                            f"is there{f', and {len(orphans) - 1} more' if len(orphans) > 1 else ''})")
        samples += file_pairs("ade20k", ids, image_dir, label_dir)
    return samples


def voc_samples(name, root, split):
    """pascal_voc, pascal_aug (VOC2012) and pcontext (VOC2010): a list file per split under ImageSets."""
    year, labels, lists = {"pascal_voc": ("VOC2012", "SegmentationClass", "Segmentation"),
                           "pascal_aug": ("VOC2012", "SegmentationClassAug", "Segmentation"),
                           "pcontext": ("VOC2010", "SegmentationClassContext", "SegmentationContext")}[name]
    base = under(root, "VOCdevkit") / year
    layout = f"ROOT/VOCdevkit/{year}/{{JPEGImages,{labels},ImageSets/{lists}}}"
    image_dir = require_dir(base / "JPEGImages", name, layout)
    label_dir = require_dir(base / labels, name, layout)
    samples = []
    for part in split.split("+"):
        if name == "pascal_aug" and part in ("train", "train_aug"):  # SBD's 10,582 training images
            list_file = base / "ImageSets" / "SegmentationAug" / "train_aug.txt"
        else:
            list_file = base / "ImageSets" / lists / f"{part}.txt"
        if not list_file.is_file():
            raise DataError(f"{name}: split list {list_file} not found; expected {layout}")
        ids = read_ids(list_file)
        if not ids:
            raise DataError(f"{name}: split list {list_file} is empty")
        samples += file_pairs(name, ids, image_dir, label_dir)
    return samples


# COCO → VOC (paper Sec. 3.3). Index = VOC class, value = COCO category id, as in the released code.
CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
VOC_CLASS_OF_COCO = {cat: voc for voc, cat in enumerate(CAT_LIST) if voc > 0}


class CocoLabel(NamedTuple):
    """What a COCO label is rasterised from; str() names it for error messages."""
    annotation_file: Path
    image_id: int
    height: int
    width: int
    objects: list  # [(VOC class, COCO segmentation)] in the annotation file's order

    def __str__(self):
        return f"{self.annotation_file} (image id {self.image_id})"


def rle_string_counts(s):
    """Run lengths of COCO's compressed RLE string (pycocotools rleFrString).

    Each count is 5-bit groups, least significant first, in chars of 48 + 6 bits (bit 5 = more follow,
    bit 4 of the last = negative); from the fourth count on, each is stored minus the count two before.
    """
    counts, p = [], 0
    while p < len(s):
        x = k = 0
        while True:
            c = ord(s[p]) - 48
            x |= (c & 0x1f) << 5 * k
            p, k = p + 1, k + 1
            if not c & 0x20:
                if c & 0x10:
                    x -= 1 << 5 * k
                break
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    return counts


# COCO polygons are rasterised as pycocotools does (rleFrPoly in its maskApi.c), so that labels are pixel for
# pixel those of the released code and of every COCO tool: trace the outline on a 5× finer grid, keep the
# points where the traced outline crosses a pixel column's centre line, and fill each column between them.
# A pixel is in the mask when its centre is inside the polygon, up to the rounding of that fine grid; edge
# pixels whose centre lies outside are not (Pillow's ImageDraw.polygon also draws the outline: masks ~7% larger).
POLYGON_UPSAMPLE = 5
POLYGON_REACH = 16  # vertices further than this many image sizes away are damaged data, not a polygon


def polygon_walk(x, y):
    """Every point of the closed outline through integer vertices (x[i], y[i]), as pycocotools walks it.

    x, y: int64 arrays of the k vertices on the fine grid. Returns int64 arrays (u, v) of the walk: each edge
    contributes max(|dx|, |dy|) + 1 points, one per step of its longer axis, the other coordinate rounded
    half up; an edge starts where the previous one ended (the shared vertex appears twice).
    """
    xs, ys = x, y
    xe, ye = np.roll(x, -1), np.roll(y, -1)  # edge i runs from vertex i to vertex i+1, the last one back to 0
    dx, dy = np.abs(xe - xs), np.abs(ye - ys)
    along_x = dx >= dy  # step along x (one point per column) or along y
    # Each edge is computed from its end with the smaller stepping coordinate and then listed in walking
    # order: the points of an edge do not depend on the direction it is walked in.
    flip = np.where(along_x, xs > xe, ys > ye)
    x0, x1 = np.where(flip, xe, xs), np.where(flip, xs, xe)
    y0, y1 = np.where(flip, ye, ys), np.where(flip, ys, ye)
    steps = np.where(along_x, dx, dy)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(along_x, (y1 - y0) / dx, (x1 - x0) / dy)  # float64, as in the C code
    slope[steps == 0] = 0  # a zero-length edge: one point (C computes 0/0 there; its value is never used)

    edge = np.repeat(np.arange(len(x)), steps + 1)  # edge index of every walk point
    d = np.arange(len(edge)) - np.repeat(np.cumsum(steps + 1) - (steps + 1), steps + 1)  # step within its edge
    t = np.where(flip[edge], steps[edge] - d, d)
    # minor coordinate: C's (int)(a + s·t + .5) truncates towards zero, which is not rounding below 0
    minor = np.trunc(np.where(along_x[edge], y0[edge], x0[edge]) + slope[edge] * t + 0.5).astype(np.int64)
    u = np.where(along_x[edge], x0[edge] + t, minor)
    v = np.where(along_x[edge], minor, y0[edge] + t)
    return u, v


def polygon_boundaries(polygon, height, width):
    """Sorted positions x·height + y where one polygon's mask switches (pycocotools' polygon → RLE).

    polygon: [x1, y1, x2, y2, ...] in pixels (a trailing odd number is ignored, as pycocotools does).
    In column-major order (COCO's RLE order) the mask is on between the 1st and 2nd position, the 3rd and
    4th, ...; a position may repeat (an even number of repeats cancels). Positions lie in 0..height·width.
    """
    xy = np.asarray(polygon, np.float64).ravel()
    k = len(xy) // 2
    if k == 0:
        return np.zeros(0, np.int64)
    if not np.all(np.isfinite(xy)) or np.abs(xy).max() > POLYGON_REACH * max(height, width, 1):
        raise ValueError(f"polygon vertex outside ±{POLYGON_REACH}× the image size or not finite")
    scale = POLYGON_UPSAMPLE
    # vertices on the fine grid, rounded as C's (int)(v + .5)
    x = np.trunc(scale * xy[0:2 * k:2] + 0.5).astype(np.int64)
    y = np.trunc(scale * xy[1:2 * k:2] + 0.5).astype(np.int64)
    u, v = polygon_walk(x, y)

    # Where the walk moves to the next fine column it may cross the centre line of a pixel column: the fine
    # column boundary between c and c+1 is the centre of pixel column X when (c + .5)/scale − .5 = X.
    moved = np.flatnonzero(u[1:] != u[:-1]) + 1
    c = np.minimum(u[moved], u[moved - 1]).astype(np.float64)
    column = (c + 0.5) / scale - 0.5
    keep = (np.floor(column) == column) & (column >= 0) & (column <= width - 1)
    # the crossing's row: the first pixel row whose centre is at or below the walk there, clamped to the image
    row = (np.minimum(v[moved], v[moved - 1])[keep] + 0.5) / scale - 0.5
    row = np.ceil(np.clip(row, 0, height))
    return np.sort(column[keep].astype(np.int64) * height + row.astype(np.int64))


def fill_boundaries(flat, positions):
    """OR into flat (height·width bool, column-major) the runs between successive pairs of positions."""
    if positions.size == 0:
        return
    first, last = positions[0], positions[-1]
    # parity of the switches up to each pixel; only the span first..last can be on
    switches = np.bincount(positions - first, minlength=last - first + 1).astype(np.uint8)
    flat[first:last] |= (np.cumsum(switches[:-1], dtype=np.uint8) & 1).astype(bool)


def segmentation_mask(segmentation, height, width):
    """H×W bool mask of one COCO segmentation, pixel for pixel pycocotools' annToMask.

    segmentation: polygons [[x1, y1, x2, y2, ...], ...] (the union of the parts), or RLE {'counts': [run
    lengths] or compressed string, 'size': [h, w]}. A part of fewer than 3 points is rasterised as any other
    (pycocotools' polygon → RLE gives the same), where annToMask raises when the first part has ≤ 4 numbers.
    """
    if isinstance(segmentation, list):
        flat = np.zeros(height * width, bool)  # column-major, as RLE runs
        for polygon in segmentation:
            fill_boundaries(flat, polygon_boundaries(polygon, height, width))
        return flat.reshape(width, height).T
    counts = segmentation["counts"]
    counts = rle_string_counts(counts) if isinstance(counts, str) else counts
    runs = np.zeros(len(counts), bool)
    runs[1::2] = True  # runs alternate background, object, ... starting with background
    flat = np.repeat(runs, counts)
    if flat.size != height * width:
        raise ValueError(f"RLE covers {flat.size} pixels, the image has {height}×{width}")
    return flat.reshape(width, height).T  # RLE runs down the columns


def coco_label(source):
    """H×W uint8 VOC-class label of a CocoLabel; where objects overlap the first one wins (as released)."""
    label = np.zeros((source.height, source.width), np.uint8)
    try:
        for voc_class, segmentation in source.objects:
            label[segmentation_mask(segmentation, source.height, source.width) & (label == 0)] = voc_class
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise DataError(f"{source}: bad segmentation ({e})") from None
    return label


def coco_label_version():
    """Hash of the code that turns annotations into labels (a selection cached by other code is stale)."""
    code = "".join(inspect.getsource(f) for f in (rle_string_counts, polygon_walk, polygon_boundaries,
                                                  fill_boundaries, segmentation_mask, coco_label))
    return hashlib.sha1((code + repr((POLYGON_UPSAMPLE, CAT_LIST))).encode()).hexdigest()[:12]


def coco_samples(root, split):
    """COCO images with more than 1,000 pixels of the 20 VOC categories, with their label sources."""
    root, year = Path(root), {"train": "train2017", "val": "val2017"}.get(split)
    if year is None:
        raise DataError(f"coco has splits train, val, not {split!r}")
    layout = "ROOT/{train2017,val2017}/*.jpg and ROOT/annotations/instances_{train,val}2017.json"
    image_dir = require_dir(root / year, "coco", layout)
    annotation_file = root / "annotations" / f"instances_{year}.json"
    if not annotation_file.is_file():
        raise DataError(f"coco: {annotation_file} not found; expected {layout}")
    try:
        with reading(annotation_file):
            coco = json.loads(annotation_file.read_text())
        images = {image["id"]: image for image in coco["images"]}
        objects = {}
        for a in coco["annotations"]:
            if a["category_id"] in VOC_CLASS_OF_COCO:
                objects.setdefault(a["image_id"], []).append((VOC_CLASS_OF_COCO[a["category_id"]], a["segmentation"]))
        sources = {i: CocoLabel(annotation_file, i, images[i]["height"], images[i]["width"], objects[i])
                   for i in sorted(objects)}
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"coco: {annotation_file}: not a COCO instances file ({e!r})") from None

    # Rasterising every image takes minutes on train2017, so the selection is cached beside the annotations,
    # keyed by the annotation file's size and by the code that rasterises: either changed, it is recomputed.
    cache = annotation_file.with_name(f"encnet_voc_index_{year}.json")
    stamp = {"annotation_bytes": annotation_file.stat().st_size, "rasteriser": coco_label_version()}
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):  # absent or unreadable: recompute
        cached = {}
    if all(cached.get(key) == value for key, value in stamp.items()):
        ids = cached["ids"]
    else:
        ids = [i for i, source in sources.items() if np.count_nonzero(coco_label(source)) > 1000]
        try:
            cache.write_text(json.dumps({**stamp, "ids": ids}))
        except OSError as e:
            print(f"coco: cannot write the image selection cache {cache} ({e}); continuing without it",
                  file=sys.stderr)
    if not ids:
        raise DataError(f"coco: no image of {annotation_file} has more than 1,000 pixels of the VOC classes")
    present = set(os.listdir(image_dir))
    for i in ids:
        if images[i]["file_name"] not in present:
            raise DataError(f'coco: {image_dir / images[i]["file_name"]} not found (listed in {annotation_file})')
    return [(image_dir / images[i]["file_name"], sources[i]) for i in ids]


def cityscapes_samples(root, split):
    """Cityscapes fine annotations, as downloaded: (samples, key of LABELS for their label files).

    ROOT/leftImg8bit/SPLIT/CITY/X_leftImg8bit.png pairs with ROOT/gtFine/SPLIT/CITY/X_gtFine_labelIds.png
    (label ids 0..33). When every image of the split also has X_gtFine_labelTrainIds.png (written by
    cityscapesscripts' createTrainIdLabelImgs: classes 0..18, 255 = ignore), those are read instead: they
    hold whatever class mapping the user chose there. ROOT may also be the parent of a 'cityscapes' folder.
    """
    root = Path(root)
    base = root if (root / "leftImg8bit").is_dir() else root / "cityscapes"
    layout = "ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and ROOT/gtFine/SPLIT/CITY/*_gtFine_labelIds.png"
    image_suffix, ids_suffix = "_leftImg8bit.png", "_gtFine_labelIds.png"
    train_ids_suffix = "_gtFine_labelTrainIds.png"
    found = []  # (image path, label dir, stem, label files of its city)
    for part in split.split("+"):
        if part not in ("train", "val", "test"):
            raise DataError(f"cityscapes has splits train, val, test (or train+val), not {split!r}")
        image_root = require_dir(base / "leftImg8bit" / part, "cityscapes", layout)
        label_root = require_dir(base / "gtFine" / part, "cityscapes", layout)
        cities = sorted(c for c in os.listdir(image_root) if (image_root / c).is_dir())
        for city in sorted(set(os.listdir(label_root)) - set(cities)):
            raise DataError(f"cityscapes: labels {label_root / city} have no images {image_root / city}")
        part_found = []
        for city in cities:
            image_dir, label_dir = image_root / city, require_dir(label_root / city, "cityscapes", layout)
            stems = sorted(f[:-len(image_suffix)] for f in os.listdir(image_dir) if f.endswith(image_suffix))
            labels = set(os.listdir(label_dir))  # one listing, not a stat per file
            for f in sorted(labels - {f"{stem}{ids_suffix}" for stem in stems}):
                if f.endswith(ids_suffix):
                    raise DataError(f"cityscapes: {label_dir / f} has no image {image_dir}/"
                                    f"{f[:-len(ids_suffix)]}{image_suffix}")
            part_found += [(image_dir / f"{stem}{image_suffix}", label_dir, stem, labels) for stem in stems]
        if not part_found:
            raise DataError(f"cityscapes: no images (CITY/*{image_suffix}) in {image_root}")
        found += part_found
    train_ids = all(f"{stem}{train_ids_suffix}" in labels for _, _, stem, labels in found)
    suffix = train_ids_suffix if train_ids else ids_suffix
    for image, label_dir, stem, labels in found:
        if f"{stem}{suffix}" not in labels:
            raise DataError(f"cityscapes: {label_dir / stem}{suffix} not found (the label of {image})")
    samples = [(image, label_dir / f"{stem}{suffix}") for image, label_dir, stem, _ in found]
    return samples, "cityscapes_train_ids" if train_ids else "cityscapes"


def get_dataset(name, root, split, crop_size=480, base_size=520, mode=None, seed=0, *, max_rotation=10.0,
                cat_max_ratio=None, photometric=False, scale_rule="long", scale_box=None, blur=False, pad="black"):
    """The Dataset `name` ('context', 'ade20k', 'pascal_voc', 'pascal_aug', 'pcontext', 'coco', 'cityscapes',
    'cifar10').

    split: 'train', 'val', or lists joined by '+' ('train+val'); 'train_aug' for pascal_aug; 'test' for
    cityscapes (its gtFine/test labels carry no classes); 'test' = 'val' for cifar10. crop_size: n (n×n) or
    (height, width). mode: 'train' (random augmentation), 'val' (whole image) or 'center'; by default 'val'
    for the validation/test split, 'train' otherwise. max_rotation (degrees), cat_max_ratio, photometric,
    scale_rule, scale_box, blur: the training augmentation's options (see augment_train; train_seg.py's recipes
    set them); pad: the colour of the crop's padding (PAD_COLOURS); context
    and cifar10 have their own fixed augmentation and refuse them.
    """
    mode = mode or ("val" if split in ("val", "test") else "train")
    if mode not in ("train", "val", "center"):
        raise ValueError(f"mode must be 'train', 'val' or 'center', not {mode!r}")
    options = dict(max_rotation=max_rotation, cat_max_ratio=cat_max_ratio, photometric=photometric,
                   scale_rule=scale_rule, scale_box=scale_box, blur=blur, pad=pad)
    if name in ("context", "cifar10") and options != dict(max_rotation=10.0, cat_max_ratio=None, photometric=False,
                                                          scale_rule="long", scale_box=None, blur=False, pad="black"):
        raise UserError(f"{name} has its own fixed augmentation: the augmentation options apply to the other "
                        "datasets")
    if scale_rule == "box" and scale_box is None:
        raise UserError("scale rule 'box' (mmsegmentation's RandomResize) needs a scale box, e.g. 2048x512")
    if name == "context":
        return context_dataset(split, crop_size, base_size, mode, seed)
    if name == "cifar10":
        return CIFAR10(root, split, mode == "train", seed)
    labels = None  # the label format, when it is not the dataset's name
    if name == "ade20k":
        samples, read_label = ade20k_samples(root, split), read_png_label
    elif name in ("pascal_voc", "pascal_aug", "pcontext"):
        samples, read_label = voc_samples(name, root, split), read_png_label
    elif name == "coco":
        samples, read_label = coco_samples(root, split), coco_label
    elif name == "cityscapes":
        (samples, labels), read_label = cityscapes_samples(root, split), read_png_label
    else:
        raise DataError(f"unknown dataset {name!r}")
    return SegmentationDataset(name, samples, read_label, crop_size, base_size, mode, seed, labels, **options)


class SplitChecker(torch.utils.data.Dataset):
    """dataset[indices] → the message of the first DataError among those items, or None (see check_dataset).

    The error travels back as a value: a DataError raised in a DataLoader worker comes back wrapped in
    torch's 'Caught DataError in DataLoader worker process N' and the worker's traceback.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, indices):
        for i in indices:
            try:
                image, _ = self.dataset.open_checked(i)
                with reading(self.dataset.samples[i][0]), image:
                    image.load()  # the whole body: a truncated JPEG fails here, not hours into training
            except DataError as e:
                return str(e)
        return None


def check_dataset(dataset, workers=None, indices=None, chunk=16):
    """Decode every label and every image of a split before training; raise its first DataError.

    Finds in minutes what would otherwise stop a run hours in: unreadable or truncated files, a label of
    another size than its image, label values the dataset does not define (pairing and missing files are
    checked when the dataset is made). The first bad item in index order is reported, whatever the number
    of workers (bench.py --only data measures the cost per item). workers: processes (default, and at
    most, os.cpu_count()), started as a DataLoader's, like training's. Generated and fully loaded datasets
    (context, cifar10) pass at once.
    indices: the items to check (default: all; a process of a distributed run checks its shard).
    Returns the number of items checked.
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not isinstance(dataset, SegmentationDataset):
        return len(indices)
    chunks = [indices[start:start + chunk] for start in range(0, len(indices), chunk)]
    workers = min(workers or os.cpu_count(), os.cpu_count(), len(chunks))
    loader = torch.utils.data.DataLoader(SplitChecker(dataset), batch_size=None, sampler=chunks,
                                         num_workers=workers if workers > 1 else 0)
    for problem in loader:  # in chunk order, so the first problem is the same for any worker count
        if problem is not None:
            raise DataError(problem)
    return len(indices)


# ----------------------------------------------------------------------------------------------
# CIFAR-10

class CIFAR10(torch.utils.data.Dataset):
    """CIFAR-10 from ROOT/cifar-10-batches-py: (3×32×32 uint8 image, int64 scalar label) items.

    Training items get a 4-pixel zero pad, a random 32×32 crop and a random horizontal flip.
    """

    def __init__(self, root, split, train, seed=0):
        base = under(root, "cifar-10-batches-py")
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"], "test": ["test_batch"]}
        if split not in names:
            raise DataError(f"cifar10 has splits train, val/test, not {split!r}")
        images, labels = [], []
        for path in (base / n for n in names[split]):
            if not path.is_file():
                raise DataError(f"cifar10: {path} not found; expected ROOT/cifar-10-batches-py/"
                                "{data_batch_1..5,test_batch}")
            try:  # the dataset's own format is a pickle of {b'data': N×3072 uint8, b'labels': [N ints]}
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[b"labels"], np.int64).reshape(-1))
                if len(images[-1]) != len(labels[-1]) or not np.all((labels[-1] >= 0) & (labels[-1] < 10)):
                    raise ValueError("labels do not match the images or lie outside 0..9")
            except Exception as e:  # a damaged pickle can raise almost anything
                raise DataError(f"cifar10: {path} is not a CIFAR-10 batch ({e!r})") from None
        self.images, self.labels = torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
        self.train, self.seed, self.epoch = train, seed, 0
        info = dataset_info("cifar10")
        self.classes, self.palette, self.num_classes = info["classes"], info["palette"], info["num_classes"]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            x, y = rng.integers(0, 9, size=2)  # offset of the 32×32 crop in the 40×40 padded image
            image = torch.nn.functional.pad(image, (4, 4, 4, 4))[:, y:y + 32, x:x + 32]
            if rng.random() < 0.5:
                image = image.flip(2)
        return image.contiguous(), self.labels[index]


# ----------------------------------------------------------------------------------------------
# Sampling

class ShardedBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for one rank, such that the ranks' batches concatenated are the global batch.

    Each epoch draws one permutation of range(num_items) from torch.Generator seeded with
    seed·100003 + epoch, cuts it into batches of global_batch and gives rank r the slice
    [r·L, (r+1)·L), L = global_batch / world_size: 2 processes × 2 images compute the step of 1 × 4.
    With drop_last=False the short last batch is split as evenly as possible (a rank may get none).
    start_batch skips the first batches of the epoch, to resume mid-epoch; set_epoch resets it.
    """

    def __init__(self, num_items, global_batch, rank=0, world_size=1, seed=0, shuffle=True, drop_last=True):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.num_items, self.global_batch, self.rank, self.world_size = num_items, global_batch, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self):
        full, rest = divmod(self.num_items, self.global_batch)
        return full + (rest > 0 and not self.drop_last)

    def __len__(self):
        return max(0, self.batches_per_epoch() - self.start_batch)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        for b in range(self.start_batch, self.batches_per_epoch()):
            batch = order[b * self.global_batch:(b + 1) * self.global_batch]
            # tensor_split cuts a full batch into equal slices of L, in order
            yield batch.tensor_split(self.world_size)[self.rank].tolist()


def shard_indices(num_items, rank, world_size):
    """Indices rank, rank+world_size, ...: every item exactly once over all ranks (no padding)."""
    return list(range(rank, num_items, world_size))


# ----------------------------------------------------------------------------------------------
# The built-in context dataset
#
# A generated dataset on which both claims of the paper's Table 1 can be seen (Sec. 1, 2.2, Fig. 1 and 4).
# Every image is a wide panorama of one of four scenes, a field, a park, a beach or a cliff. Ground and
# water look the same in all of them. At one end stands a tree whose colour tells the scene, and nothing
# else does: scattered over the rest of the panorama lie white things that look alike in every scene, but
# are sheep in a field, swans in a park, shells on a beach and gulls on a cliff. So labelling a thing takes
# context from up to 300 pixels away: beyond what the dilated FCN's receptive field uses in practice, one
# global statistic for the Encoding layer (the first claim). Sheep and swans are large (~14 % of their
# panoramas), shells and gulls small (~4 %): the pixel loss asks for the scene mostly through the large
# things, while the SE-loss asks "which things are here?" once per image, however small they are (Sec. 2.2,
# the second claim). The same property in real scenes: which small objects can be present depends on the
# scene, and few pixels say so.
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
