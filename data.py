"""The datasets in their standard on-disk layouts: items of (3×H×W uint8 image, H×W int64 label, −1 = ignore).

    get_dataset           ADE20K, PASCAL VOC (+SBD aug), PASCAL-Context, COCO→VOC, Cityscapes, the built-in
                          context data, CIFAR-10, your own data ('folder'), by name
    FolderDataset         your own data: ROOT/classes.json, ROOT/images/SPLIT/…, ROOT/labels/SPLIT/… (index or
                          colour PNGs); read_folder_classes checks classes.json
    check_dataset         a fast parallel pass over a split (labels decoded, images decoded) before training;
                          with class_frequencies, the share of each class in the training split
    ShardedBatchSampler   one global permutation per epoch, cut into global batches, each rank takes its slice
    shard_indices         validation sharding without padding, so metrics summed over ranks are exact
    dataset_info          class names and palette, for colouring predictions
    colorize, label_png   a class map as colours, or as a label PNG in the dataset's own encoding
    train_ids_to_label_ids   Cityscapes classes → official label ids, for the benchmark server's PNGs

Where each dataset's files lie is layouts.py's; the augmentation transforms.py's, COCO's rasteriser
coco_masks.py's, the built-in data context_data.py's.

Randomness. Every random number of a training item comes from np.random.default_rng([seed, epoch, index]):
an item depends neither on the DataLoader's worker count nor on the number of processes, and a resumed
run sees exactly the batches it would have seen. Call set_epoch before iterating a DataLoader; workers
made with persistent_workers=True keep the epoch they were started with.

Bad data stops with a DataError naming the file (and the offending value): nothing is skipped or repaired.
"""
import inspect
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image  # ImageFile.LOAD_TRUNCATED_IMAGES stays False: a truncated file must fail

from coco_masks import coco_label
from context_data import CONTEXT_CLASSES, CONTEXT_PALETTE, context_dataset
from errors import DataError, UserError, reading
from layouts import (FolderLabel, ade20k_samples, cityscapes_samples, coco_samples, folder_samples,
                     read_folder_classes, read_png_label, under, voc_samples)
from transforms import PAD_COLOURS, augment_train, center_crop, eight_bit, image_tensor

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


CLASS_TABLE = json.loads(Path(__file__).with_name("classes.json").read_text())  # names, palettes, Cityscapes ids


def dataset_info(name, root=None):
    """{'classes', 'palette', 'num_classes'} of a dataset, from classes.json next to this file; for 'folder'
    (your own data) from ROOT/classes.json, so `root` is needed."""
    if name == "folder":
        spec = read_folder_classes(root)
        return {"classes": spec["classes"], "palette": spec["palette"], "num_classes": spec["num_classes"]}
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


def colorize(label, palette):
    """H×W class indices (−1 = ignore → black) → 3×H×W uint8 colours; palette: K×3 uint8 tensor."""
    colours = torch.cat([palette, palette.new_zeros(1, 3)])  # index −1 picks the extra black row
    return colours[label.long()].permute(2, 0, 1).contiguous()


def label_png(pred, dataset):
    """Label-index PNG in the dataset's own encoding, as evaluation servers expect: ADE20K and
    PASCAL-Context store class+1 (0 = other/background), Cityscapes the official label ids of its 19
    training classes (classes.json 'label_ids'), VOC/COCO the class index as a palette PNG."""
    pred = pred.numpy().astype(np.uint8)
    if dataset in ("ade20k", "pcontext"):
        return Image.fromarray(pred + 1, mode="L")
    if dataset == "cityscapes":
        return Image.fromarray(train_ids_to_label_ids(pred), mode="L")
    image = Image.fromarray(pred, mode="P")
    image.putpalette([c for rgb in dataset_info("pascal_voc")["palette"] for c in rgb])
    return image


class SegmentationDataset(torch.utils.data.Dataset):
    """(3×H×W uint8 image, H×W int64 label) items of one split.

    samples: list of (image path, label source); read_label(label source) → H×W uint8 raw label, and
    str(label source) names it in error messages. labels: the key of LABELS for the raw values (default
    name), or such a (class raw values, other legal raw values) pair itself. info: {'classes', 'palette',
    'num_classes'} (default: dataset_info(name)), for a dataset that carries its own. crop_size: n (n×n) or
    (height, width). mode: 'train' random augmentation to crop_size, 'val' the whole image, 'center' resized
    to just cover crop_size and centre-cropped. max_rotation, cat_max_ratio and photometric: augment_train's
    options, for 'train' (cat_max_ratio counts classes after the raw value → class table, so every value that
    is not a class is ignored).
    """

    def __init__(self, name, samples, read_label, crop_size, base_size, mode, seed, labels=None, *,
                 max_rotation=10.0, cat_max_ratio=None, photometric=False, scale_rule="long", scale_box=None,
                 blur=False, pad="black", info=None):
        self.samples, self.read_label = samples, read_label
        self.crop_size, self.base_size, self.mode, self.seed, self.epoch = crop_size, base_size, mode, seed, 0
        self.augmentation = dict(max_rotation=max_rotation, cat_max_ratio=cat_max_ratio, photometric=photometric,
                                 scale_rule=scale_rule, scale_box=scale_box, blur=blur, image_fill=PAD_COLOURS[pad])
        self.legal, self.lut = label_tables(*(labels if isinstance(labels, tuple) else LABELS[labels or name]))
        info = info or dataset_info(name)
        self.classes, self.palette, self.num_classes = info["classes"], info["palette"], info["num_classes"]

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def open_checked(self, index):
        """(PIL image of item `index`, header read only; its H×W uint8 raw label), checked against each other.

        DataError naming the file when either cannot be read, their sizes differ or the label has a value
        the dataset does not define. The image's body is decoded later, when its scale is known; a 16-bit image
        is decoded here and scaled to 8 bits, and a 32-bit one refused, as eval.py reads photos (transforms.eight_bit).
        """
        image_path, label_source = self.samples[index]
        with reading(image_path):
            image = Image.open(image_path)  # reads the header only: decoding waits for the crop's scale
            try:
                image = eight_bit(image)  # 16-bit scaled to 8 bits (decoded now; never a JPEG), 8-bit untouched
            except ValueError as e:
                image.close()
                raise DataError(f"{image_path}: {e}") from None
        raw = self.read_label(label_source)
        if raw.shape != (image.height, image.width):
            raise DataError(f"{label_source}: label is {raw.shape[1]}×{raw.shape[0]} but image {image_path} "
                            f"is {image.width}×{image.height}")
        if not np.take(self.legal, raw).all():  # a table look-up: 3× faster than a histogram of the values
            raise DataError(self.illegal_value_message(label_source, raw))
        return image, raw

    def illegal_value_message(self, label_source, raw):
        """The one-line error of a label holding a raw value the dataset does not define."""
        illegal = np.flatnonzero(np.bincount(raw.ravel(), minlength=256) * ~self.legal)
        legal = np.flatnonzero(self.legal)
        runs = np.split(legal, np.flatnonzero(np.diff(legal) > 1) + 1)
        return (f"{label_source}: label value {illegal[0]}, legal values are "
                + ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs))

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


# ----------------------------------------------------------------------------------------------
# Your own data: --data folder


class FolderDataset(SegmentationDataset):
    """Your own data (--data folder): ROOT/classes.json, ROOT/images/SPLIT/…, ROOT/labels/SPLIT/… (see
    read_folder_classes, folder_samples, FolderLabel). Pairing and classes.json are checked here; label sizes,
    values and colours when an item is read, so in check_dataset before training."""

    def __init__(self, root, split, crop_size, base_size, mode, seed, **options):
        spec = read_folder_classes(root)
        unlabelled = [0, spec["ignore_index"]] if spec["reduce_zero_label"] else [spec["ignore_index"]]
        super().__init__("folder", folder_samples(root, split), FolderLabel(spec), crop_size, base_size, mode, seed,
                         (spec["class_values"], unlabelled), info=spec, **options)
        self.root, self.spec = Path(root), spec

    def illegal_value_message(self, label_source, raw):
        spec = self.spec
        y, x = np.argwhere(~np.take(self.legal, raw))[0]
        value, values = raw[y, x], spec["class_values"]
        unlabelled = f"{spec['ignore_index']}" + (", 0" if spec["reduce_zero_label"] else "")
        shift = " (reduce_zero_label: raw v is class v−1)" if spec["reduce_zero_label"] else ""
        return (f"{label_source}: label value {value} at pixel (x={x}, y={y}), but {spec['path']} names "
                f"{spec['num_classes']} classes: values {values[0]}..{values[-1]}{shift}, {unlabelled} = unlabelled")


def class_pixel_counts(dataset, histogram):
    """Labelled pixels per class (K int64) from a histogram of a split's raw label values (check_dataset's)."""
    counts = np.zeros(dataset.num_classes, np.int64)
    labelled = dataset.lut >= 0
    np.add.at(counts, dataset.lut[labelled], np.asarray(histogram)[labelled])
    return counts


def class_frequencies(classes, counts, split="training", width=100):
    """The lines that tell the share of the labelled pixels each class has in a split, classes without pixels
    named (they cannot be learnt from it). A split without any labelled pixel is a DataError."""
    total = int(np.sum(counts))
    if total == 0:
        raise DataError(f"the {split} split has no labelled pixel: every label value is an ignored one")
    entries = [f"{name} {100 * c / total:.2f} %" for name, c in zip(classes, counts)]
    lines, line = [f"class frequencies of the {split} split (share of its {total:,} labelled pixels):"], ""
    for entry in entries:
        if line and len(line) + len(entry) + 2 > width:
            lines.append(f"  {line},")
            line = ""
        line = f"{line}, {entry}" if line else entry
    lines.append(f"  {line}")
    empty = [name for name, c in zip(classes, counts) if c == 0]
    if empty:
        many = "classes have" if len(empty) > 1 else "class has"
        lines.append(f"  {len(empty)} {many} no pixel in the {split} split (cannot be learnt from it): "
                     + ", ".join(empty))
    return lines


def get_dataset(name, root, split, crop_size=480, base_size=520, mode=None, seed=0, *, max_rotation=10.0,
                cat_max_ratio=None, photometric=False, scale_rule="long", scale_box=None, blur=False, pad="black"):
    """The Dataset `name` ('context', 'ade20k', 'pascal_voc', 'pascal_aug', 'pcontext', 'coco', 'cityscapes',
    'folder' (your own data, FolderDataset), 'cifar10').

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
    defaults = {k: p.default for k, p in inspect.signature(get_dataset).parameters.items() if p.kind == p.KEYWORD_ONLY}
    if name in ("context", "cifar10") and options != defaults:
        raise UserError(f"{name} has its own fixed augmentation: the augmentation options apply to the other "
                        "datasets")
    if scale_rule == "box" and scale_box is None:
        raise UserError("scale rule 'box' (mmsegmentation's RandomResize) needs a scale box, e.g. 2048x512")
    if name == "context":
        return context_dataset(split, crop_size, base_size, mode, seed)
    if name == "cifar10":
        return CIFAR10(root, split, mode == "train", seed)
    if name == "folder":
        return FolderDataset(root, split, crop_size, base_size, mode, seed, **options)
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

    def __init__(self, dataset, count=False):
        self.dataset, self.count = dataset, count

    def __getitem__(self, indices):
        histogram = np.zeros(256, np.int64) if self.count else None
        for i in indices:
            try:
                image, raw = self.dataset.open_checked(i)
                with reading(self.dataset.samples[i][0]), image:
                    image.load()  # the whole body: a truncated JPEG fails here, not hours into training
            except DataError as e:
                return (str(e), histogram) if self.count else str(e)
            if self.count:
                histogram += np.bincount(raw.ravel(), minlength=256)
        return (None, histogram) if self.count else None


def check_dataset(dataset, workers=None, indices=None, chunk=16, histogram=None):
    """Decode every label and every image of a split before training; raise its first DataError.

    Finds in minutes what would otherwise stop a run hours in: unreadable or truncated files, a label of
    another size than its image, label values the dataset does not define (pairing and missing files are
    checked when the dataset is made). The first bad item in index order is reported, whatever the number
    of workers (bench.py --only data measures the cost per item). workers: processes (default, and at
    most, os.cpu_count()), started as a DataLoader's, like training's. Generated and fully loaded datasets
    (context, cifar10) pass at once.
    indices: the items to check (default: all; a process of a distributed run checks its shard).
    histogram: None, or a 256-entry int64 NumPy array to which the raw label values of the checked items are
    added (class_pixel_counts turns it into pixels per class; a generated dataset adds nothing).
    Returns the number of items checked.
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not isinstance(dataset, SegmentationDataset):
        return len(indices)
    chunks = [indices[start:start + chunk] for start in range(0, len(indices), chunk)]
    workers = min(workers or os.cpu_count(), os.cpu_count(), len(chunks))
    count = histogram is not None
    loader = torch.utils.data.DataLoader(SplitChecker(dataset, count), batch_size=None, sampler=chunks,
                                         num_workers=workers if workers > 1 else 0)
    for problem in loader:  # in chunk order, so the first problem is the same for any worker count
        if count:
            problem, counted = problem
            histogram += np.asarray(counted, np.int64)
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
