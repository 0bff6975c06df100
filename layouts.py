"""Where each dataset keeps its files: the standard on-disk layouts, as lists of (image path, label source).

    ade20k_samples      ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}
    voc_samples         ROOT/VOCdevkit/VOC2012 (pascal_voc, pascal_aug with SBD's list) and VOC2010 (pcontext)
    coco_samples        ROOT/{train2017,val2017} and ROOT/annotations/instances_*.json (the VOC categories)
    cityscapes_samples  ROOT/leftImg8bit/SPLIT/CITY and ROOT/gtFine/SPLIT/CITY (label ids or train ids)
    folder_samples      your own data: ROOT/classes.json, ROOT/images/SPLIT/…, ROOT/labels/SPLIT/… (FOLDER_LAYOUT)

Everything missing, misplaced or unpaired is a DataError naming the file and the layout expected, raised when
the dataset is made; the pixels themselves are checked by data.check_dataset.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from coco_masks import VOC_CLASS_OF_COCO, CocoLabel, coco_label, coco_label_version
from errors import DataError, reading


def distinct_palette(num_classes):
    """num_classes distinct colours (up to 256) for classes without a palette: [37i, 97i, 157i] mod 256, each
    an odd multiplier, so each channel alone already differs between any two classes."""
    return [[37 * i % 256, 97 * i % 256, 157 * i % 256] for i in range(num_classes)]


def read_png_label(path):
    """H×W uint8 raw label: the values of an 'L' PNG, the palette indices of a 'P' PNG."""
    with reading(path):
        label = Image.open(path)
        if label.mode not in ("L", "P"):
            raise DataError(f"{path}: label PNG has mode {label.mode}, expected single-channel L or P")
        return np.array(label)


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


FOLDER_LAYOUT = "ROOT/classes.json, ROOT/images/SPLIT/NAME.jpg (or .png, ...) and ROOT/labels/SPLIT/NAME.png"
FOLDER_EXAMPLE = '{"classes": ["road", "car"], "palette": [[128, 64, 128], [0, 0, 142]]} (palette optional)'
FOLDER_KEYS = ("classes", "palette", "ignore_index", "reduce_zero_label")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_folder_classes(root):
    """ROOT/classes.json of a folder dataset, checked → {'classes', 'palette', 'num_classes', 'ignore_index',
    'reduce_zero_label', 'has_palette', 'path'}; a DataError saying what is expected otherwise.

    'classes': the K names (index = class). 'palette' (optional): one [r, g, b] per class, distinct; without it
    distinct_palette(K), and RGB labels are refused. 'ignore_index' (default 255): the raw value of unlabelled
    pixels. 'reduce_zero_label' (default false): ADE20K's convention, raw 0 = "other" (ignored), raw v = class v−1.
    """
    if root is None:
        raise DataError(f"--data folder needs --data-root ROOT: {FOLDER_LAYOUT}")
    path = Path(root) / "classes.json"
    if not path.is_file():
        raise DataError(f"{path} not found: a folder dataset ({FOLDER_LAYOUT}) names its classes there, e.g. "
                        f"{FOLDER_EXAMPLE}")
    with reading(path):
        text = path.read_text(encoding="utf-8-sig")
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({getattr(e, 'msg', e)} at line {getattr(e, 'lineno', '?')} "
                        f"column {getattr(e, 'colno', '?')}); expected e.g. {FOLDER_EXAMPLE}") from None
    if not isinstance(spec, dict) or "classes" not in spec:
        raise DataError(f'{path}: expected an object with "classes", a list of class names, e.g. {FOLDER_EXAMPLE}')
    unknown = [k for k in spec if k not in FOLDER_KEYS]
    if unknown:
        raise DataError(f'{path}: unknown key "{unknown[0]}"; the keys are {", ".join(FOLDER_KEYS)}')
    classes = spec["classes"]
    if not isinstance(classes, list) or not classes:
        raise DataError(f'{path}: "classes" must be a non-empty list of class names, e.g. {FOLDER_EXAMPLE}')
    for i, name in enumerate(classes):
        if not isinstance(name, str) or not name.strip():
            raise DataError(f'{path}: class {i} ({json.dumps(name)}) is not a name: "classes" lists strings')
        if name in classes[:i]:
            raise DataError(f'{path}: class name "{name}" appears twice (classes {classes.index(name)} and {i})')
    k = len(classes)
    ignore_index, reduce_zero_label = spec.get("ignore_index", 255), spec.get("reduce_zero_label", False)
    if not isinstance(reduce_zero_label, bool):
        raise DataError(f'{path}: "reduce_zero_label" must be true or false, not {json.dumps(reduce_zero_label)}')
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not 0 <= ignore_index <= 255:
        raise DataError(f'{path}: "ignore_index" must be a label value 0..255, not {json.dumps(ignore_index)}')
    class_values = range(1, k + 1) if reduce_zero_label else range(k)
    if class_values[-1] > 255:
        raise DataError(f"{path}: {k} classes, but 8-bit labels hold at most {255 - reduce_zero_label} "
                        f"(raw values {class_values[0]}..255)")
    if ignore_index in class_values:
        raise DataError(f'{path}: "ignore_index" {ignore_index} is the label value of class '
                        f'{class_values.index(ignore_index)} ("{classes[class_values.index(ignore_index)]}"); '
                        f"with {k} classes it must lie outside {class_values[0]}..{class_values[-1]}")
    palette = spec.get("palette")
    if palette is not None:
        if not isinstance(palette, list) or len(palette) != k:
            count = f"{len(palette)} colours" if isinstance(palette, list) else json.dumps(palette)
            raise DataError(f'{path}: "palette" has {count} for {k} classes; expected one [r, g, b] per class')
        for i, colour in enumerate(palette):
            if (not isinstance(colour, list) or len(colour) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour)):
                raise DataError(f"{path}: palette entry {i} ({json.dumps(colour)}, class {classes[i]}) is not "
                                f"[r, g, b] with values 0..255")
            if colour in palette[:i]:
                raise DataError(f"{path}: classes {palette.index(colour)} and {i} ({classes[palette.index(colour)]}, "
                                f"{classes[i]}) have the same colour {colour}: each class needs its own")
    return {"classes": classes, "palette": palette or distinct_palette(k), "num_classes": k,
            "ignore_index": ignore_index, "reduce_zero_label": reduce_zero_label, "has_palette": palette is not None,
            "class_values": class_values, "path": path}


def files_under(folder):
    """Paths of the files under `folder` and its subfolders, relative to it, sorted; hidden ones left out."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(top).relative_to(folder)
        found += [rel / f for f in files if not f.startswith(".")]
    return sorted(found)


def folder_samples(root, split):
    """[(ROOT/images/SPLIT/…/NAME.ext, ROOT/labels/SPLIT/…/NAME.png)]: images paired with labels by their path
    without the extension, subfolders mirrored. An image without its label, a label without its image, two
    images of one name (a.jpg, a.png) or a label that is no PNG is a DataError naming the file."""
    root, samples = Path(root), []
    for part in split.split("+"):
        image_dir = require_dir(root / "images" / part, "folder", FOLDER_LAYOUT)
        label_dir = require_dir(root / "labels" / part, "folder", FOLDER_LAYOUT)
        images, labels = {}, {}
        for rel in files_under(image_dir):
            if rel.suffix.lower() in IMAGE_SUFFIXES:
                stem = rel.with_suffix("")
                if stem in images:
                    raise DataError(f"{image_dir / images[stem]} and {image_dir / rel}: two images of one name, "
                                    f"for one label {label_dir / stem}.png; rename one")
                images[stem] = rel
        for rel in files_under(label_dir):
            if rel.suffix.lower() == ".png":
                labels[rel.with_suffix("")] = rel
            elif rel.suffix.lower() in IMAGE_SUFFIXES:
                raise DataError(f"{label_dir / rel}: labels must be PNG files (lossless: {rel.suffix} would change "
                                f"the class values), not {rel.suffix}")
        if not images:
            raise DataError(f"folder: no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
        for stem in images:
            if stem not in labels:
                raise DataError(f"{image_dir / images[stem]} has no label: expected {label_dir / stem}.png")
        for stem in labels:
            if stem not in images:
                raise DataError(f"{label_dir / labels[stem]} has no image: expected {image_dir / stem}.jpg "
                                f"(or {', '.join(IMAGE_SUFFIXES[1:])})")
        samples += [(image_dir / images[stem], label_dir / labels[stem]) for stem in sorted(images)]
    return samples


class FolderLabel:
    """read_label of a folder dataset: an L or P PNG's values as they are (class indices, ignore_index,
    ADE20K-style with reduce_zero_label); an RGB PNG's colours through the palette of classes.json, as the raw
    values an index PNG would hold (black, unless the palette names it, is unlabelled)."""

    def __init__(self, spec):
        self.classes_json, self.has_palette = spec["path"], spec["has_palette"]
        values = list(spec["class_values"])
        codes = [(r << 16) | (g << 8) | b for r, g, b in spec["palette"]]
        unlabelled = 0 if spec["reduce_zero_label"] else spec["ignore_index"]
        self.black_ignored = 0 not in codes
        if self.black_ignored:
            codes, values = codes + [0], values + [unlabelled]
        order = np.argsort(codes)
        self.codes, self.values = np.asarray(codes, np.int64)[order], np.asarray(values, np.uint8)[order]

    def __call__(self, path):
        with reading(path):
            label = Image.open(path)
            if label.mode in ("L", "P"):
                return np.array(label)
            if label.mode not in ("RGB", "RGBA"):
                raise DataError(f"{path}: label PNG has mode {label.mode}; expected class indices in one channel "
                                f"(mode L or P) or the palette's colours (RGB)")
            if not self.has_palette:
                raise DataError(f"{path}: an RGB label, but {self.classes_json} has no \"palette\" telling which "
                                f"colour is which class: add one [r, g, b] per class, or save the labels as class "
                                f"indices (mode L)")
            rgb = np.array(label)
        if rgb.shape[2] == 4:
            transparent = np.argwhere(rgb[..., 3] != 255)
            if len(transparent):
                y, x = transparent[0]
                raise DataError(f"{path}: transparent pixel at (x={x}, y={y}): save colour labels as RGB without "
                                f"transparency")
            rgb = rgb[..., :3]
        codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        at = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
        unknown = self.codes[at] != codes
        if unknown.any():
            y, x = np.argwhere(unknown)[0]
            black = " (black is unlabelled)" if self.black_ignored else ""
            raise DataError(f"{path}: colour {tuple(int(v) for v in rgb[y, x])} at pixel (x={x}, y={y}) is not in the "
                            f"palette of {self.classes_json}{black}")
        return self.values[at]
