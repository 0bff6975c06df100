"""Evaluate a segmentation model, or segment your own images with it.

    python eval.py --checkpoint runs/seg/checkpoint.pth                       # built-in data
    python eval.py --checkpoint CKPT --data ade20k --data-root DATA --multi-scale
    python eval.py --checkpoint encnet_resnet50s_ade --data-root DATA --protocol released
    python eval.py --checkpoint CKPT --images photo.jpg folder/ --out predictions/
    python eval.py --checkpoint CKPT --export encnet.onnx                     # or encnet.pt2 (torch.export)

--checkpoint: anything zoo.load_model reads (a train_seg.py checkpoint, a file of the authors' or of
mmsegmentation's EncNet zoo, or a zoo name); classes, palette, crop and base size come with it.

Metrics (Sec. 3.1): pixAcc = correct labelled pixels / labelled pixels and IoU_c = TP / (TP + FP + FN),
both accumulated over the whole split in one confusion matrix (not averaged per image). ADE20K and
PASCAL-Context map background to ignore (150 and 59 classes), VOC counts it as class 0 (21 classes).

Protocols (--protocol), each the test-time procedure behind a set of published numbers:
  repo      (default) this project's own. Long side resized to base size (bilinear, align_corners=False);
            where larger than the crop, crop-sized windows at stride 2/3 crop, shifted back to end at the
            border, logits averaged where they overlap; an image smaller than the crop is one unpadded
            forward. --multi-scale: scales 0.5–1.75 of the base size, each with its mirror image (logits
            of the pair averaged), softmax probabilities averaged over scales at the original resolution.
            mIoU over the classes present in the labels or predictions.
  released  the authors' code (PyTorch-Encoding: encoding/models/base.py MultiEvalModule, experiments/
            segmentation/test.py), always multi-scale with flips: long side ceil(base·s) for s in 0.5–1.75
            (Cityscapes 0.75–2.25), bilinear with align_corners=True; the image padded (bottom/right) with
            the colour that normalises to 0 − mean/std, i.e. black, up to the crop, also when it fits in one
            crop; windows from 0 at stride int(2/3 crop), the last ones padded; each window's score is
            exp(logits + logits of its mirror image), averaged where windows overlap; the scores of all
            scales are summed at the original resolution. mIoU counts a class absent from labels and
            predictions as 0. PASCAL-Context's 60-class figure: mIoU·59/60 (background counted as wrong).
  mmseg     mmsegmentation's single-scale test (mode='whole'): resized to fit a (2048, 512) box (Cityscapes
            (2048, 1024)) keeping the aspect ratio (bilinear, rounded to uint8 levels as mmcv's cv2 resize),
            one forward of the whole image, logits resized back (align_corners=False), softmax, argmax.
            mIoU as `repo`.
  mmseg-ms  the same with the box times img_ratios 0.5–1.75 (0.x MultiScaleFlipAug, which made the published
            numbers; 1.x's TestTimeAug scales the image itself) and flips, softmax probabilities averaged
            (--protocol mmseg --multi-scale is the same).

Every protocol's prediction is made at the model's scale (one score map per scale and mirror image: a `View`)
and brought to the image's full resolution in bands of rows (`class_map`), so a 12-megapixel photo never needs
a full-resolution score map of all classes.

Speed: on a GPU the windows of a scale go through the model 8 at a time, then their mirror images
(--window-batch); eval-mode BatchNorm and the Encoding layer treat samples independently, so this changes
probabilities by float rounding only. --amp (bf16 autocast, with channels_last on a CPU) where bf16 is native:
a GPU, or a CPU with AVX512-BF16/AMX; elsewhere it falls back to float32 and says so. bench.py --only eval
measures both, and what bf16 costs in accuracy.

--images: one colour PNG per image plus an overlay (or with --label-png, label-index PNGs in the dataset's
encoding: ADE20K/PASCAL-Context class+1, VOC class index, Cityscapes official label ids). Photos are
turned upright by their EXIF orientation first (dataset images are not: their labels follow the stored
pixels); 16-bit images are scaled to 8 bits. Outputs never replace an input or an existing file (--overwrite
allows the latter), and two inputs may not share an output name; unreadable files are named at the end,
after the others are written, and the exit status is 1.
"""
import argparse
import json
import math
import os
import time
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps

import data
import zoo
from run import HelpFormatter, cpu_has_fast_bf16, end_distributed, fail, run_or_exit, setup_distributed, warn

PROTOCOLS = ("repo", "released", "mmseg", "mmseg-ms")
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# PyTorch-Encoding experiments/segmentation/test.py: `scales = [0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25] if
# args.dataset == 'citys' else [0.5, …, 1.75]`, MultiEvalModule's default, which the EncNet-era test.py used
# for every dataset (one revision of test.py has 0.5–2.0 for the others).
RELEASED_SCALES = {"cityscapes": (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25)}
# mmsegmentation configs/_base_/datasets/{ade20k,cityscapes,pascal_voc12,pascal_voc12_aug}.py: the test
# pipeline's Resize(keep_ratio=True) box (long, short); MultiScaleFlipAug multiplies it by each img_ratio.
MMSEG_TEST_BOX = {"ade20k": (2048, 512), "cityscapes": (2048, 1024), "pascal_voc": (2048, 512),
                  "pascal_aug": (2048, 512)}
# Windows per forward: batched on GPUs, one at a time on CPUs, which was faster there (bench.py --only eval).
WINDOW_BATCH = {"cuda": 8, "cpu": 1}


def predicted_classes(scores):
    """B×K×H×W scores → B×H×W class indices, the first maximum, as argmax gives. max(1).indices is argmax(1)
    without its slow strided CPU kernel (bench.py --only eval times both)."""
    return scores.max(1).indices


class SegMetric:
    """Confusion matrix over a whole split: pixAcc, per-class IoU and mIoU."""

    def __init__(self, num_classes, ignore_index=-1):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: truth, cols: prediction

    def update(self, pred, target):
        """pred, target: int tensors of equal shape (any leading dims); target may hold ignore_index."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        truth, pred = target[valid].long().cpu(), pred[valid].long().cpu()
        k = self.num_classes
        if truth.numel() and (truth.min() < 0 or truth.max() >= k or pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"labels must lie in [0, {k}) or be {self.ignore_index}")
        self.confusion += torch.bincount(truth * k + pred, minlength=k * k).view(k, k)

    def all_reduce(self):
        """Sum the confusion matrices of all processes (exact: integer counts)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion)

    def iou(self):
        """Per-class IoU (float64); NaN for a class absent from both truth and predictions."""
        tp = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.nan)

    def pixacc_miou(self, absent_as_zero=False):
        """→ (pixAcc, mIoU). mIoU averages over the classes present in truth or predictions (mmsegmentation's
        nanmean), or with absent_as_zero over all classes, an absent one counting 0 (the released code's
        encoding/utils/metrics.py: IoU = inter / (eps + union), mIoU = IoU.mean())."""
        total = self.confusion.sum().item()
        pix_acc = self.confusion.diag().sum().item() / max(total, 1)
        iou = self.iou()
        if absent_as_zero:
            return pix_acc, iou.nan_to_num(0.0).mean().item()
        return pix_acc, iou.nanmean().item() if (~iou.isnan()).any() else 0.0


def per_class_table(metric, classes, absent_as_zero=False, header=None):
    """The per-class IoU table as text (IoU, pixAcc and mIoU in %), for the console and the per_class_iou files.
    header: what was evaluated (checkpoint, data, split, protocol), the table's first line."""
    pix_acc, miou = metric.pixacc_miou(absent_as_zero)
    mean_over = "all classes, absent ones as 0" if absent_as_zero else "the classes in labels or predictions"
    rows = [f"# {header}" if header else "# per-class IoU", f"# in %, over the whole split; mIoU over {mean_over}",
            f"{'class':<24} {'IoU %':>7}"]
    for name, iou in zip(classes, metric.iou().tolist()):
        # NaN: the class is in neither the labels nor the predictions
        rows.append(f"{name:<24} {'absent' if iou != iou else f'{100 * iou:6.2f}':>7}")
    rows.append(f"{'pixAcc / mIoU %':<24} {100 * pix_acc:6.2f} / {100 * miou:.2f}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- from the model's scale to the image's

class View(NamedTuple):
    """One prediction of a protocol at the model's scale (one scale, or its mirror image): its contribution to
    the image's scores is weight · f(bilinear(scores → image size)), f = softmax over classes or identity."""
    scores: torch.Tensor  # 1×K×h×w, float32
    align_corners: bool
    softmax: bool
    weight: float = 1.0


def source_rows(out_rows, in_size, out_size, align_corners):
    """Bilinear interpolation along one axis as F.interpolate computes it: for output indices `out_rows` (a
    1-D tensor) → (lower source index, upper source index, weight of the upper one)."""
    y = out_rows.double()
    if align_corners:
        src = y * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:
        src = ((y + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    low = src.floor().long().clamp_max(in_size - 1)
    return low, (low + 1).clamp_max(in_size - 1), (src - low).float()


def view_rows(view, size, rows):
    """Rows `rows` (a range) of the view's contribution at the image size (H, W) → 1×K×len(rows)×W: bilinear
    along the height by hand for these rows only, then F.interpolate along the width."""
    scores = view.scores
    low, high, upper = source_rows(torch.arange(rows.start, rows.stop), scores.shape[2], size[0], view.align_corners)
    upper = upper.to(scores.device).view(1, 1, -1, 1)
    band = scores[:, :, low] * (1 - upper) + scores[:, :, high] * upper  # 1×K×rows×w
    band = F.interpolate(band, (len(rows), size[1]), mode="bilinear", align_corners=view.align_corners)
    return view.weight * (band.softmax(1) if view.softmax else band)


def full_scores(views, size):
    """The image's scores at full resolution, 1×K×H×W: Σ over views (for tests and small images)."""
    total = 0
    for view in views:
        up = F.interpolate(view.scores, size, mode="bilinear", align_corners=view.align_corners)
        total = total + view.weight * (up.softmax(1) if view.softmax else up)
    return total


def class_map(views, size, band_bytes=64 << 20):
    """The image's H×W class indices: argmax of full_scores(views, size), computed a band of rows at a time, so
    that memory stays at K × band × W floats (band_bytes) however large the image. The same classes as
    full_scores up to float rounding (the two interpolations round in another order): a pixel whose two best
    classes are within rounding of each other may differ."""
    height, width = size
    classes, device = views[0].scores.shape[1], views[0].scores.device
    band = max(1, band_bytes // (4 * classes * width))
    out = torch.empty(height, width, dtype=torch.int64, device=device)
    for start in range(0, height, band):
        rows = range(start, min(start + band, height))
        total = sum(view_rows(view, size, rows) for view in views)
        out[rows.start:rows.stop] = predicted_classes(total)[0]
    return out


# ----------------------------------------------------------------------------- protocol 'repo'

def stitch_windows(model, windows, boxes, height, width, flip, fuse, window_batch=None):
    """Scores of N same-sized windows averaged where they overlap on a height×width canvas → 1×K×height×width.

    boxes[i] = (y0, y1, x0, x1): where window i lies; its top-left (y1−y0)×(x1−x0) part is kept. fuse(logits,
    mirrored) → the window's scores, mirrored being the logits of its mirror image flipped back (None without
    flip). Windows, then their mirror images, go through the model window_batch at a time (default:
    WINDOW_BATCH of the device)."""
    batch = window_batch or WINDOW_BATCH.get(windows.device.type, 1)
    total = count = None
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        mirrored = model(chunk.flip(-1)).float().flip(-1) if flip else None
        scores = fuse(model(chunk).float(), mirrored)
        if total is None:
            total, count = scores.new_zeros(1, scores.shape[1], height, width), scores.new_zeros(1, 1, height, width)
        for (y0, y1, x0, x1), s in zip(boxes[start:], scores):
            total[0, :, y0:y1, x0:x1] += s[:, :y1 - y0, :x1 - x0]
            count[0, :, y0:y1, x0:x1] += 1
    return total / count


def repo_windows(height, width, crop_size):
    """Top-left corners of crop-sized windows at stride 2/3 crop covering height×width (both ≥ crop),
    the last row and column shifted back to end at the border."""
    stride = max(1, int(crop_size * 2 / 3))
    ys = sorted({min(y, height - crop_size) for y in range(0, height - crop_size + stride, stride)})
    xs = sorted({min(x, width - crop_size) for x in range(0, width - crop_size + stride, stride)})
    return [(y, x) for y in ys for x in xs]


def sliding_window_logits(model, image, crop_size, flip=False, window_batch=None):
    """Logits of an image of any size: one forward when it fits in a crop_size window, else windows of
    crop_size at stride 2/3·crop, averaged where they overlap (edges zero-padded, i.e. the normalised
    mean colour, up to the crop size). With flip, each window's logits are averaged with those of its
    mirror image. image: 1×3×H×W normalised → 1×K×H×W."""
    _, _, h, w = image.shape
    if h <= crop_size and w <= crop_size:
        # no padding: the Encoding layer's global statistics would count the padded pixels
        ph, pw, size, corners, windows = h, w, (h, w), [(0, 0)], image
    else:
        ph, pw, size = max(h, crop_size), max(w, crop_size), (crop_size, crop_size)
        padded = F.pad(image, (0, pw - w, 0, ph - h))
        corners = repo_windows(ph, pw, crop_size)
        windows = torch.cat([padded[:, :, y:y + crop_size, x:x + crop_size] for y, x in corners])
    boxes = [(y, y + size[0], x, x + size[1]) for y, x in corners]
    return stitch_windows(model, windows, boxes, ph, pw, flip, repo_fusion, window_batch)[:, :, :h, :w]


def repo_fusion(logits, mirrored):
    """A window's logits, averaged with those of its mirror image."""
    return logits if mirrored is None else (logits + mirrored) / 2


def repo_views(model, image, crop_size, base_size, scales=(1.0,), flip=False, amp=False, window_batch=None):
    """Protocol 'repo' for one image (1×3×H×W normalised): each scale resizes the long side to scale·base_size;
    the windows' logits there (with flip: averaged with their mirror images'), whose softmax at the image's
    size is averaged over the scales. → [View]"""
    _, _, h, w = image.shape
    views = []
    with torch.inference_mode(), torch.autocast(image.device.type, torch.bfloat16, enabled=amp):
        for scale in scales:
            long_side = int(base_size * scale + 0.5)
            size = (long_side, int(w * long_side / h + 0.5)) if h >= w else (int(h * long_side / w + 0.5), long_side)
            resized = F.interpolate(image, size, mode="bilinear", align_corners=False)
            logits = sliding_window_logits(model, resized, crop_size, flip, window_batch)
            views.append(View(logits, False, True, 1 / len(scales)))
    return views


def predict(model, image, crop_size, base_size, scales=(1.0,), flip=False, amp=False, window_batch=None):
    """Protocol 'repo': class probabilities of one image (1×3×H×W normalised) at its resolution → 1×K×H×W."""
    views = repo_views(model, image, crop_size, base_size, scales, flip, amp, window_batch)
    return full_scores(views, image.shape[-2:])


# ----------------------------------------------------------------------------- protocol 'released'

def released_size(h, w, base_size, scale):
    """(height, width) of an h×w image at one scale, as MultiEvalModule.forward: long side
    ceil(base·scale), short side int(short·long/long_old + 0.5); a square counts as wide."""
    long_side = int(math.ceil(base_size * scale))
    if h > w:
        return long_side, int(1.0 * w * long_side / h + 0.5)
    return int(1.0 * h * long_side / w + 0.5), long_side


def released_pad(image, crop_size):
    """base.py pad_image: pad bottom and right up to crop_size where smaller, with −mean/std, the value a
    black pixel normalises to."""
    _, _, h, w = image.shape
    value = -torch.tensor(data.MEAN) / torch.tensor(data.STD)
    padded = value.to(image).view(1, 3, 1, 1).repeat(image.shape[0], 1, max(h, crop_size), max(w, crop_size))
    padded[:, :, :h, :w] = image
    return padded


def released_windows(height, width, crop_size):
    """MultiEvalModule.forward's grid: (y0, y1, x0, x1) from 0 at stride int(crop·2/3), ceil((size−crop)/
    stride) + 1 per axis, each window clipped at the border (and later padded back to the crop)."""
    stride = int(crop_size * (2.0 / 3.0))
    rows = int(math.ceil(1.0 * (height - crop_size) / stride)) + 1
    cols = int(math.ceil(1.0 * (width - crop_size) / stride)) + 1
    return [(i * stride, min(i * stride + crop_size, height), j * stride, min(j * stride + crop_size, width))
            for i in range(rows) for j in range(cols)]


def released_fusion(logits, mirrored):
    """base.py module_inference: a window's score is exp(logits(x) + flip(logits(flip(x))))."""
    return (logits if mirrored is None else logits + mirrored).exp()


def released_views(model, image, crop_size, base_size, scales=MULTI_SCALES, flip=True, amp=False,
                   window_batch=None):
    """Protocol 'released', base.py MultiEvalModule.forward for one normalised image 1×3×H×W: per scale the
    windows' scores exp(logits + mirrored logits), summed at the original resolution (their argmax is the
    prediction; they are sums of exp(logits), not probabilities). → [View]"""
    _, _, h, w = image.shape
    views = []
    with torch.inference_mode(), torch.autocast(image.device.type, torch.bfloat16, enabled=amp):
        for scale in scales:
            height, width = released_size(h, w, base_size, scale)
            resized = F.interpolate(image, (height, width), mode="bilinear", align_corners=True)
            # one branch for both cases of the source: an image within the crop is padded to one window
            padded = released_pad(resized, crop_size)
            _, _, ph, pw = padded.shape
            boxes = released_windows(ph, pw, crop_size)
            windows = torch.cat([released_pad(padded[:, :, y0:y1, x0:x1], crop_size) for y0, y1, x0, x1 in boxes])
            outputs = stitch_windows(model, windows, boxes, ph, pw, flip, released_fusion, window_batch)
            views.append(View(outputs[:, :, :height, :width], True, False))
    return views


def predict_released(model, image, crop_size, base_size, scales=MULTI_SCALES, flip=True, amp=False,
                     window_batch=None):
    """Protocol 'released': the scores of one normalised image, 1×3×H×W → 1×K×H×W."""
    views = released_views(model, image, crop_size, base_size, scales, flip, amp, window_batch)
    return full_scores(views, image.shape[-2:])


# ----------------------------------------------------------------------------- protocols 'mmseg', 'mmseg-ms'

def mmseg_size(h, w, box):
    """mmcv rescale_size for Resize(keep_ratio=True): the largest size within box (long, short) →
    (height, width), each side int(side·factor + 0.5)."""
    factor = min(max(box) / max(h, w), min(box) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def to_pixel_levels(image):
    """Round a normalised image to the 256 levels of uint8 pixels: mmcv resizes the uint8 image (cv2
    INTER_LINEAR, rounded to uint8) before normalising. (cv2's fixed-point weights can differ by one level.)"""
    mean = torch.tensor(data.MEAN).to(image).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.STD).to(image).view(1, 3, 1, 1) * 255
    return ((image * std + mean).round().clamp(0, 255) - mean) / std


def mmseg_views(model, image, box, ratios=(1.0,), flip=False, amp=False):
    """Protocols 'mmseg' / 'mmseg-ms' (mmseg/models/segmentors/encoder_decoder.py whole_inference, inference,
    aug_test; 0.x MultiScaleFlipAug: box·ratio): softmax probabilities averaged over the ratios and flips
    (a mirrored view's logits are flipped back first: bilinear resizing commutes with the flip). → [View]"""
    _, _, h, w = image.shape
    views = []
    with torch.inference_mode(), torch.autocast(image.device.type, torch.bfloat16, enabled=amp):
        for ratio in ratios:
            size = mmseg_size(h, w, (int(box[0] * ratio), int(box[1] * ratio)))
            resized = image if size == (h, w) else \
                to_pixel_levels(F.interpolate(image, size, mode="bilinear", align_corners=False))
            for mirror in (False, True) if flip else (False,):
                logits = model(resized.flip(-1) if mirror else resized).float()
                views.append(View(logits.flip(-1) if mirror else logits, False, True))
    return [view._replace(weight=1 / len(views)) for view in views]


def predict_mmseg(model, image, box, ratios=(1.0,), flip=False, amp=False):
    """Protocols 'mmseg' / 'mmseg-ms': class probabilities of one normalised image, 1×3×H×W → 1×K×H×W."""
    return full_scores(mmseg_views(model, image, box, ratios, flip, amp), image.shape[-2:])


def make_predictor(protocol, crop_size, base_size, dataset, amp=False, window_batch=None):
    """→ fn(model, image 1×3×H×W normalised) → [View] whose class_map is the protocol's prediction.
    protocol: 'repo', 'repo-ms', 'released', 'mmseg', 'mmseg-ms'; dataset: the name the scales depend on."""
    if protocol in ("repo", "repo-ms"):
        scales, flip = (MULTI_SCALES, True) if protocol == "repo-ms" else ((1.0,), False)
        return partial(repo_views, crop_size=crop_size, base_size=base_size, scales=scales, flip=flip, amp=amp,
                       window_batch=window_batch)
    if protocol == "released":
        return partial(released_views, crop_size=crop_size, base_size=base_size, amp=amp,
                       scales=RELEASED_SCALES.get(dataset, MULTI_SCALES), window_batch=window_batch)
    if dataset not in MMSEG_TEST_BOX:
        raise data.UserError(f"--protocol {protocol}: mmsegmentation has no EncNet test setting for {dataset!r} "
                             f"(known: {', '.join(MMSEG_TEST_BOX)})")
    multi = protocol == "mmseg-ms"
    return partial(mmseg_views, box=MMSEG_TEST_BOX[dataset], ratios=MULTI_SCALES if multi else (1.0,),
                   flip=multi, amp=amp)


def evaluate(model, dataset, indices, device, predictor, log_every=0):
    """Whole-image evaluation of dataset[i] for i in indices → SegMetric (not yet all-reduced).
    predictor: from make_predictor. log_every > 0: a progress line every log_every seconds (images done,
    images/s, ETA)."""
    model.eval()
    metric = SegMetric(dataset.num_classes)
    start = last = time.time()
    for done, i in enumerate(indices, 1):
        image, label = dataset[i]
        views = predictor(model, data.normalize(image[None].to(device)))
        metric.update(class_map(views, label.shape).cpu(), label)
        now = time.time()
        if log_every > 0 and (now - last >= log_every or done == len(indices)):
            last, rate = now, done / max(now - start, 1e-9)
            print(f"eval {done}/{len(indices)} images | {rate:.2f} img/s | eta {(len(indices) - done) / rate / 60:.1f} "
                  f"min", flush=True)
    return metric


# ----------------------------------------------------------------------------- writing predictions

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
        return Image.fromarray(data.train_ids_to_label_ids(pred), mode="L")
    image = Image.fromarray(pred, mode="P")
    image.putpalette([c for rgb in data.dataset_info("pascal_voc")["palette"] for c in rgb])
    return image


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(paths):
    """Files as given, folders expanded to the images directly in them (not their subfolders).
    → (files, what was skipped in the folders, in words: '' when nothing)."""
    files, other_files, subfolders = [], [], []
    for path in paths:
        if os.path.isdir(path):
            entries = sorted(os.scandir(path), key=lambda e: e.name)
            found = [e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
            other_files += [e.name for e in entries if e.is_file() and not e.name.lower().endswith(IMAGE_SUFFIXES)]
            subfolders += [e.name for e in entries if e.is_dir()]
            if not found:
                raise data.DataError(f"--images {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise data.DataError(f"--images {path}: no such file or folder")
    skipped = []
    if other_files:
        skipped.append(f"{len(other_files)} files of other types ({', '.join(other_files[:3])}"
                       f"{', …' if len(other_files) > 3 else ''})")
    if subfolders:
        skipped.append(f"{len(subfolders)} subfolders ({', '.join(subfolders[:3])}{', …' if len(subfolders) > 3 else ''})")
    return files, " and ".join(skipped)


def image_outputs(files, out_dir, label_pngs, overwrite=False):
    """The files --images writes for each input, checked before any work → [(input, colour or label PNG,
    overlay or None)]. Refused, naming the files: an output that is an input (or --out an input folder), two
    inputs with one output name (x.jpg and x.png, a/x.jpg and b/x.jpg), an existing file without --overwrite."""
    inputs = {os.path.realpath(f) for f in files}
    folders = {os.path.dirname(f) for f in inputs}
    if os.path.realpath(out_dir) in folders:
        raise data.UserError(f"--out {out_dir} is a folder of the input images: the predictions would mix with "
                             f"(and could replace) them; choose another --out")
    plan, owner = [], {}
    for path in files:
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        outputs = (f"{stem}.png", None if label_pngs else f"{stem}_overlay.jpg")
        for out in filter(None, outputs):
            if out in owner:
                raise data.UserError(f"{owner[out]} and {path} would both be written to {out}: rename one, or "
                                     f"segment them into different --out folders")
            owner[out] = path
            if os.path.realpath(out) in inputs:
                raise data.UserError(f"{out} would replace the input image {out}; choose another --out")
        plan.append((path, *outputs))
    existing = [out for out in owner if os.path.exists(out)]
    if existing and not overwrite:
        raise data.UserError(f"{len(existing)} output files exist already ({', '.join(existing[:3])}"
                             f"{', …' if len(existing) > 3 else ''}); nothing was written. Choose another --out, or "
                             f"--overwrite to replace them")
    return plan


def read_photo(path):
    """An RGB photo (PIL), turned upright by its EXIF orientation (cameras store the sensor's pixels and a
    tag). 16-bit images are scaled to 8 bits (Pillow's own conversion would clip them to white); images of
    32-bit integers or floats have no photo's range and are refused."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I;16"):
                image = Image.fromarray((np.asarray(image, np.uint16) >> 8).astype(np.uint8), mode="L")
            elif image.mode in ("I", "F"):
                raise data.DataError(f"{path}: a {'32-bit integer' if image.mode == 'I' else 'floating-point'} "
                                     f"image, not a photo of 8 or 16 bits per channel: convert it first")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise data.DataError(f"{path} ({e})") from None


def segment_images(model, plan, palette, device, predictor, dataset_name, log_every=10.0):
    """One colour PNG per image (or a label-index PNG) at the input's size, plus an overlay on the photograph,
    as image_outputs planned them; a progress line per image. → the files that could not be read, each with
    its reason (the others are written)."""
    palette = torch.tensor(palette, dtype=torch.uint8)
    unreadable, start = [], time.time()
    for done, (path, out, overlay) in enumerate(plan, 1):
        try:
            photo = read_photo(path)
        except data.DataError as e:
            unreadable.append(str(e))
            continue
        if time.time() - start > log_every:
            print(f"[{done}/{len(plan)}] {path} ({photo.width}×{photo.height}) ...", flush=True)
        image = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)
        pred = class_map(predictor(model, data.normalize(image[None].to(device))), image.shape[-2:]).cpu()
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        if overlay is None:
            label_png(pred, dataset_name).save(out)
        else:
            colour = Image.fromarray(colorize(pred, palette).permute(1, 2, 0).numpy())
            colour.save(out)
            Image.blend(photo, colour, 0.5).save(overlay)
        rate = done / (time.time() - start)
        print(f"[{done}/{len(plan)}] {path} → {out} | eta {(len(plan) - done) / rate:.0f} s", flush=True)
    return unreadable


# ----------------------------------------------------------------------------- command line

def positive(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be positive")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--checkpoint", required=True,
                   help="a train_seg.py checkpoint, a zoo file (authors' or mmsegmentation's) or a zoo name")
    p.add_argument("--data", help="dataset to evaluate on (default: the model's)")
    p.add_argument("--data-root", help="folder holding the dataset in its standard layout")
    p.add_argument("--split", default="val", help="the split to evaluate")
    p.add_argument("--protocol", choices=PROTOCOLS, default="repo",
                   help="test-time procedure and mIoU convention: repo (this project's), released (the authors' "
                        "multi-scale code), mmseg / mmseg-ms (mmsegmentation's); see above")
    p.add_argument("--multi-scale", action="store_true",
                   help="repo: scales 0.5–1.75 with flips, probabilities averaged; mmseg: = mmseg-ms")
    p.add_argument("--crop-size", type=positive, help="window size (default: the model's)")
    p.add_argument("--base-size", type=positive, help="long side at scale 1 (default: the model's)")
    p.add_argument("--images", nargs="+", help="segment these image files or folders instead")
    p.add_argument("--label-png", action="store_true",
                   help="with --images: write label-index PNGs in the dataset's encoding (for test servers)")
    p.add_argument("--out", default="predictions", help="folder for --images output, the IoU table and results")
    p.add_argument("--overwrite", action="store_true", help="with --images or --export: replace existing output files")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast for speed where bf16 is native (GPUs; CPUs with AVX512-BF16 or AMX, there "
                        "with channels_last); elsewhere float32, with a warning")
    p.add_argument("--window-batch", type=positive, help="windows per forward (default: 8 on a GPU, 1 on a CPU)")
    p.add_argument("--export", metavar="FILE",
                   help="write the model for deployment instead of evaluating: FILE.onnx (ONNX, needs onnx and "
                        "onnxscript) or FILE.pt2 (torch.export); dynamic batch, height and width; classes, palette "
                        "and the input's normalisation in its metadata")
    p.add_argument("--log-every", type=float, default=10.0,
                   help="seconds between progress lines (of rank 0's share of the images)")
    args = p.parse_args(argv)
    args.protocol = {"repo": "repo-ms", "mmseg": "mmseg-ms"}.get(args.protocol, args.protocol) \
        if args.multi_scale else args.protocol
    if args.label_png and not args.images:
        fail("--label-png applies to --images (it writes their predictions as label-index PNGs)")
    if args.overwrite and not (args.images or args.export):
        fail("--overwrite applies to --images and --export (evaluation only replaces its own per_class_iou and "
             "results files)")
    if args.images and (args.data_root or args.split != "val"):
        fail("--data-root and --split choose a dataset split to evaluate; --images segments the files given instead")
    if args.export:
        if not args.export.endswith((".onnx", ".pt2")):
            fail(f"--export {args.export}: name it *.onnx (ONNX) or *.pt2 (torch.export)")
        if os.path.exists(args.export) and not args.overwrite:
            fail(f"--export {args.export} exists already; nothing was changed (--overwrite replaces it)")
        if args.images or args.data or args.data_root or args.multi_scale:
            fail("--export writes the model only; --images, --data, --data-root and --multi-scale evaluate it")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file; it must be a folder (made if missing)")
    return args


def use_amp(amp, device):
    """--amp where bf16 is native; a CPU without AVX512-BF16/AMX would emulate it, many times slower: float32."""
    if amp and device.type == "cpu" and not cpu_has_fast_bf16():
        warn("--amp: this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 is emulated and many times slower; "
             "evaluating in float32")
        return False
    return amp


def run_eval(args):
    model, info = zoo.load_model(args.checkpoint)
    if args.export:
        zoo.export(model, info, args.export)
        print(f"{args.checkpoint} → {args.export} ({len(info['classes'])} classes; the input's normalisation, "
              "classes and palette in its metadata)")
        return
    name = args.data or info["dataset"]
    if name is None:
        fail(f"{args.checkpoint}: no known dataset has its {len(info['classes'])} classes; name one with --data")
    if name == "context" and args.protocol not in ("repo", "mmseg"):
        what = "--multi-scale" if args.multi_scale else f"--protocol {args.protocol}"
        fail(f"{what} does not apply to the built-in context data: its models see its images at one scale only "
             f"(no scale augmentation), so other scales are inputs they never learnt")
    crop_size, base_size = args.crop_size or info["crop_size"], args.base_size or info["base_size"]
    rank, world, device = setup_distributed()
    amp = use_amp(args.amp, device)
    predictor = make_predictor(args.protocol, crop_size, base_size, name, amp, args.window_batch)
    model.to(device).eval()
    if amp and device.type == "cpu":  # oneDNN's bf16 convolutions want NHWC
        model.to(memory_format=torch.channels_last)

    if args.images:
        if rank == 0:
            files, skipped = list_images(args.images)
            plan = image_outputs(files, args.out, args.label_png, args.overwrite)
            print(f"{len(files)} images → {args.out}" + (f" (skipped {skipped})" if skipped else ""), flush=True)
            unreadable = segment_images(model, plan, info["palette"], device, predictor, name, args.log_every)
            if unreadable:
                raise data.DataError(f"{len(unreadable)} of {len(files)} images could not be read: "
                                     f"{'; '.join(unreadable)}")
        end_distributed(world)
        return
    dataset = data.get_dataset(name, args.data_root or info.get("data_root"), args.split, crop_size, base_size,
                               mode="val")
    if dataset.num_classes != len(info["classes"]):
        fail(f"{args.checkpoint} predicts {len(info['classes'])} classes, {name} has {dataset.num_classes}")
    metric = evaluate(model, dataset, data.shard_indices(len(dataset), rank, world), device, predictor,
                      log_every=args.log_every if rank == 0 else 0)
    metric.all_reduce()
    if rank == 0:
        report(metric, dataset.classes, name, args.split, args.protocol, args.out, args.checkpoint,
               "bf16" if amp else "float32")
    end_distributed(world)


def report(metric, classes, name, split, protocol, out, checkpoint="", dtype="float32"):
    """Print the table and the scores; write the table to OUT/per_class_iou_{data}_{split}_{protocol}.txt and
    the scores to OUT/results_{data}_{split}_{protocol}.json (fractions, as train_seg.py's results.json)."""
    released = protocol == "released"
    pix_acc, miou = metric.pixacc_miou(absent_as_zero=released)
    table = per_class_table(metric, classes, released, f"{checkpoint} on {name} {split}, protocol {protocol}, {dtype}")
    print(table)
    os.makedirs(out, exist_ok=True)
    stem = f"{name}_{split}_{protocol}"
    with open(os.path.join(out, f"per_class_iou_{stem}.txt"), "w") as f:
        f.write(table + "\n")
    results = {"pixAcc": pix_acc, "mIoU": miou, "data": name, "split": split, "protocol": protocol,
               "checkpoint": str(checkpoint), "dtype": dtype}
    if name == "pcontext" and not protocol.startswith("mmseg"):  # Table 2's figure, derived as the authors do
        results["mIoU60"] = miou * 59 / 60
        print(f"mIoU with background as a 60th class (59/60 · mIoU): {100 * miou * 59 / 60:.2f} %")
    with open(os.path.join(out, f"results_{stem}.json"), "w") as f:
        json.dump(results, f)
    multi = " multi-scale" if protocol in ("repo-ms", "released", "mmseg-ms") else ""
    print(f"{name} {split}{multi}{'' if protocol.startswith('repo') else f' ({protocol} protocol)'}: "
          f"pixAcc {100 * pix_acc:.2f} % mIoU {100 * miou:.2f} % → {out}/results_{stem}.json")


def main(argv=None):
    run_or_exit(lambda: run_eval(parse_args(argv)))


if __name__ == "__main__":
    main()
