"""Run an exported EncNet without this repo's torch code: NumPy + onnxruntime, protocol 'repo' or 'mmseg' single-scale.

    python eval.py --checkpoint runs/seg/checkpoint.pth --export encnet.onnx   # once, with this repo
    python deploy.py encnet.onnx photo.jpg more.jpg --out predictions/         # anywhere: numpy, pillow, onnxruntime

    import deploy
    model = deploy.Model("encnet.onnx")                # the graph and the metadata of export.export_metadata
    classes = model.segment(np.asarray(photo))         # H×W uint8 RGB → H×W int64 class indices
    model.classes[classes[y, x]], model.palette[...]   # names and colours

The graph alone is not the prediction: run on the whole photo at full resolution, or on the photo resized to
base size, it sees the scene at another scale, or in other windows, than in training, and agrees with eval.py on a
fraction of the pixels only. The prediction is the test-time procedure of the file's metadata, protocols.py's
'repo' at one scale, step by step as here:
  1. normalise: (pixel − 255·mean) / (255·std) in float32, RGB, 3×H×W
  2. resize: long side to base_size, the other int(side·base_size/long + 0.5); bilinear, align_corners=False
  3. windows: a resized image within crop_size × crop_size is one forward, unpadded; otherwise it is zero-padded
     (bottom, right) up to crop_size where smaller, and crop-sized windows at stride int(2/3·crop_size), the last
     row and column shifted back to end at the border, go through the model; logits averaged where they overlap
  4. the logits resized to the photo's size (bilinear, align_corners=False); softmax; the class is the argmax
Protocol 'mmseg' (mmsegmentation's single-scale test, the default of its models and recipes) instead:
  1. the uint8 image resized into the metadata's mmseg_box (long, short) keeping its ratio, with OpenCV's
     bilinear, bit for bit (cv_resize.py); 2. normalised; 3. one forward of it whole; 4. as above.
Each model runs its own protocol (the metadata's 'model_protocol', eval.py's default) where it is one of these
two, else 'repo' (said). It equals `eval.py --images` (protocols.segment) with that protocol, up to float rounding:
onnxruntime's kernels are not PyTorch's, so a pixel whose two best classes are within ~1e-5 of each other may
differ.

Imports numpy, PIL, onnxruntime and cv_resize.py (NumPy) only, not torch: copy the two files beside the .onnx file.
"""
import argparse
import json
import os

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

import cv_resize

PROTOCOLS = ("repo", "mmseg")  # the test-time procedures run here


def source_index(out_size, in_size):
    """Bilinear interpolation along one axis as PyTorch's F.interpolate(align_corners=False) computes it on a CPU
    (protocols.source_rows has the formula): for each output index → (lower source index, upper source index,
    float32 weight of the upper). PyTorch's arithmetic: the scale in/out divided in float32, the source position
    scale·(i + ½) − ½ rounded once to float32 (its x86 build fuses the multiply-add), clamped at 0."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32), np.float32(0))
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    return low, np.minimum(low + 1, in_size - 1), np.clip(src - low.astype(np.float32), 0, 1).astype(np.float32)


def resize(array, size, rows=None):
    """C×h×w float32 → C×H×W, bilinear, align_corners=False: along the width, then along the height, as
    F.interpolate adds its terms. rows: a range of output rows to make (default: all H)."""
    (h, w), (height, width) = array.shape[-2:], size
    rows = rows or range(height)
    low, high, upper = (a[rows.start:rows.stop] for a in source_index(height, h))
    left, right, right_weight = source_index(width, w)
    needed = np.unique(np.concatenate([low, high]))  # only the source rows these output rows read
    position = np.searchsorted(needed, [low, high])
    part = array[:, needed]
    across = part[:, :, left] * (1 - right_weight) + part[:, :, right] * right_weight
    return across[:, position[0]] * (1 - upper)[:, None] + across[:, position[1]] * upper[:, None]


def softmax(logits):
    """Over the classes (axis 0)."""
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


class Model:
    """An exported EncNet (eval.py --export FILE.onnx) in onnxruntime, with its test-time procedure.

    classes, palette, crop_size, base_size, window_stride, mean, std, mmseg_box (None where the dataset has no
    mmsegmentation setting): from the file's metadata; model_protocol: the protocol eval.py uses by default for this
    model; protocol: the one segment runs by default, model_protocol where it is one of PROTOCOLS, else 'repo'."""

    def __init__(self, path, providers=None):
        self.session = onnxruntime.InferenceSession(path, providers=providers or onnxruntime.get_available_providers())
        meta = self.session.get_modelmeta().custom_metadata_map
        if "crop_size" not in meta or "mean" not in meta:
            raise ValueError(f"{path}: no EncNet metadata (crop_size, mean, ...): export it with eval.py --export")
        self.crop_size, self.base_size = int(json.loads(meta["crop_size"])), int(json.loads(meta["base_size"]))
        self.window_stride = int(json.loads(meta.get("window_stride", "0"))) or max(1, int(self.crop_size * 2 / 3))
        self.mean = np.asarray(json.loads(meta["mean"]), np.float32) * np.float32(255)
        self.std = np.asarray(json.loads(meta["std"]), np.float32) * np.float32(255)
        self.classes, self.palette = json.loads(meta["classes"]), json.loads(meta["palette"])
        self.model_protocol = meta.get("model_protocol", "repo")
        self.mmseg_box = tuple(json.loads(meta["mmseg_box"])) if "mmseg_box" in meta else None
        self.protocol = self.model_protocol if self.model_protocol in PROTOCOLS else "repo"
        self.input = self.session.get_inputs()[0].name

    def forward(self, images):
        """B×3×h×w normalised float32 → B×K×h×w logits: the graph itself."""
        return self.session.run(None, {self.input: np.ascontiguousarray(images, np.float32)})[0]

    def normalise(self, image):
        """H×W×3 uint8 RGB → 3×H×W float32 (step 1)."""
        chw = np.asarray(image, np.float32).transpose(2, 0, 1)
        return (chw - self.mean[:, None, None]) / self.std[:, None, None]

    def resized(self, image):
        """3×H×W normalised → its long side at base size (step 2)."""
        _, h, w = image.shape
        long_side = self.base_size
        size = (long_side, int(w * long_side / h + 0.5)) if h >= w else (int(h * long_side / w + 0.5), long_side)
        return resize(image, size)

    def window_logits(self, image):
        """3×h×w normalised → K×h×w logits of the windows, averaged where they overlap (step 3)."""
        _, h, w = image.shape
        crop, stride = self.crop_size, self.window_stride
        if h <= crop and w <= crop:
            return self.forward(image[None])[0]
        ph, pw = max(h, crop), max(w, crop)
        padded = np.zeros((3, ph, pw), np.float32)
        padded[:, :h, :w] = image
        ys = sorted({min(y, ph - crop) for y in range(0, ph - crop + stride, stride)})
        xs = sorted({min(x, pw - crop) for x in range(0, pw - crop + stride, stride)})
        total, count = None, np.zeros((1, ph, pw), np.float32)
        for y in ys:
            for x in xs:
                logits = self.forward(padded[None, :, y:y + crop, x:x + crop])[0]
                if total is None:
                    total = np.zeros((logits.shape[0], ph, pw), np.float32)
                total[:, y:y + crop, x:x + crop] += logits
                count[:, y:y + crop, x:x + crop] += 1
        return (total / count)[:, :h, :w]

    def mmseg_logits(self, image):
        """H×W×3 uint8 → K×h×w logits of protocol 'mmseg' (its steps 1–3), h×w the size within the box."""
        if self.mmseg_box is None:
            raise ValueError("protocol 'mmseg': this file's metadata has no mmseg_box (mmsegmentation has no test "
                             "setting for its dataset)")
        size = cv_resize.rescale_size(*image.shape[:2], self.mmseg_box)
        resized = image if size == image.shape[:2] else cv_resize.resize_linear(image, size)
        return self.forward(self.normalise(resized)[None])[0]

    def segment(self, image, scores=False, band_bytes=64 << 20, protocol=None):
        """H×W×3 uint8 RGB (a PIL image too) → H×W int64 class indices (steps 1–4) by `protocol` ('repo' or 'mmseg';
        default self.protocol). The logits are brought to the photo's size a band of rows at a time (K × band × W
        floats: band_bytes), and the class is their argmax (softmax keeps the order). scores=True: (classes, K×H×W
        softmax probabilities), for small images."""
        protocol = protocol or self.protocol
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: deploy.py runs {' and '.join(PROTOCOLS)}")
        image = np.ascontiguousarray(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image))
        height, width = image.shape[:2]
        logits = (self.mmseg_logits(image) if protocol == "mmseg" else
                  self.window_logits(self.resized(self.normalise(image))))
        if scores:
            probabilities = softmax(resize(logits, (height, width)))
            return probabilities.argmax(0), probabilities
        band = max(1, band_bytes // (4 * logits.shape[0] * width))
        classes = np.empty((height, width), np.int64)
        for start in range(0, height, band):
            rows = range(start, min(start + band, height))
            classes[rows.start:rows.stop] = resize(logits, (height, width), rows).argmax(0)
        return classes


def read_photo(path):
    """An RGB photo turned upright by its EXIF orientation (16-bit images scaled to 8 bits), as eval.py reads it."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16"):
            image = Image.fromarray((np.asarray(image, np.uint16) >> 8).astype(np.uint8), mode="L")
        return image.convert("RGB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an ONNX file of eval.py --export")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="predictions", help="one colour PNG per image, NAME.png, goes here")
    p.add_argument("--protocol", choices=PROTOCOLS, help="the test-time procedure (default: the model's own, where "
                                                          "it is one of these, else repo)")
    args = p.parse_args(argv)
    model = Model(args.model)
    protocol = args.protocol or model.protocol
    if protocol == "mmseg" and model.mmseg_box is None:
        p.error(f"--protocol mmseg: {args.model} has no mmseg_box in its metadata (no mmsegmentation setting for "
                "its dataset)")
    if protocol != model.model_protocol:
        print(f"note: eval.py's default for this model is protocol {model.model_protocol!r}; this is {protocol!r} "
              f"(eval.py --protocol {protocol})")
    palette = np.asarray(model.palette, np.uint8)
    os.makedirs(args.out, exist_ok=True)
    for path in args.images:
        classes = model.segment(read_photo(path), protocol=protocol)
        out = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + ".png")
        Image.fromarray(palette[classes]).save(out)
        print(f"{path} → {out}")


if __name__ == "__main__":
    main()
