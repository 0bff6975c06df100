"""Evaluate a segmentation checkpoint, or segment your own images with it.

    python eval.py --checkpoint runs/seg/checkpoint.pth                       # built-in data
    python eval.py --checkpoint CKPT --data ade20k --data-root DATA --multi-scale
    python eval.py --checkpoint CKPT --images photo.jpg folder/ --out predictions/

Metrics (Sec. 3.1): pixAcc = correct labelled pixels / labelled pixels and IoU_c = TP / (TP + FP + FN),
both accumulated over the whole split in one confusion matrix (not averaged per image).
mIoU averages IoU over the classes that occur in the ground truth or the predictions of the
split (mmsegmentation's convention; the released code counts a class absent from both as 0).
Each dataset's convention comes from its labels: ADE20K and PASCAL-Context map background to
ignore (150 and 59 classes), VOC counts background as class 0 (21 classes).

Multi-scale (--multi-scale): long side resized to {0.5, 0.75, 1, 1.25, 1.5, 1.75} × base size,
each scale with its horizontal flip; windows of crop size at stride 2/3 crop where the image is
larger than the crop, logits averaged where windows overlap. Fusion: the softmax probabilities
of the scales are *averaged* at the original resolution (as mmsegmentation; the released code
instead sums exp(logits), which lets the most confident view dominate).
"""
import argparse
import glob
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import data
import encnet

MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


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

    def pixacc_miou(self):
        total = self.confusion.sum().item()
        pix_acc = self.confusion.diag().sum().item() / max(total, 1)
        iou = self.iou()
        miou = iou.nanmean().item() if (~iou.isnan()).any() else 0.0
        return pix_acc, miou


def per_class_table(metric, classes):
    """The per-class IoU table as text, for the console and OUT/per_class_iou.txt."""
    pix_acc, miou = metric.pixacc_miou()
    rows = [f"{'class':<24} {'IoU':>7}"]
    for name, iou in zip(classes, metric.iou().tolist()):
        # NaN: the class is in neither the labels nor the predictions
        rows.append(f"{name:<24} {'absent' if iou != iou else f'{100 * iou:6.2f}':>7}")
    rows.append(f"{'pixAcc / mIoU':<24} {100 * pix_acc:6.2f} / {100 * miou:.2f}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- inference

def sliding_window_logits(model, image, crop_size, flip=False):
    """Logits of an image of any size: one forward when it fits in a crop_size window, else windows of
    crop_size at stride 2/3·crop, averaged where they overlap (edges zero-padded, i.e. the normalised
    mean colour, up to the crop size). image: 1×3×H×W normalised → 1×K×H×W."""
    _, _, h, w = image.shape
    if h <= crop_size and w <= crop_size:
        # no padding: the Encoding layer's global statistics would count the padded pixels
        logits = model(image).float()
        return (logits + model(image.flip(-1)).float().flip(-1)) / 2 if flip else logits
    ph, pw = max(h, crop_size), max(w, crop_size)
    padded = F.pad(image, (0, pw - w, 0, ph - h))
    stride = max(1, int(crop_size * 2 / 3))
    ys = sorted({min(y, ph - crop_size) for y in range(0, ph - crop_size + stride, stride)})
    xs = sorted({min(x, pw - crop_size) for x in range(0, pw - crop_size + stride, stride)})
    total = count = None
    for y in ys:
        for x in xs:
            window = padded[:, :, y:y + crop_size, x:x + crop_size]
            logits = model(window).float()
            if flip:
                logits = (logits + model(window.flip(-1)).float().flip(-1)) / 2
            if total is None:
                total = logits.new_zeros(1, logits.shape[1], ph, pw)
                count = logits.new_zeros(1, 1, ph, pw)
            total[:, :, y:y + crop_size, x:x + crop_size] += logits
            count[:, :, y:y + crop_size, x:x + crop_size] += 1
    return (total / count)[:, :, :h, :w]


def predict(model, image, crop_size, base_size, scales=(1.0,), flip=False, amp=False):
    """Class probabilities of one image (1×3×H×W normalised) at its own resolution → 1×K×H×W.

    Each scale resizes the long side to scale·base_size; probabilities are averaged over scales."""
    _, _, h, w = image.shape
    probs = 0
    with torch.no_grad(), torch.autocast(image.device.type, torch.bfloat16, enabled=amp):
        for scale in scales:
            long_side = int(base_size * scale + 0.5)
            size = (long_side, int(w * long_side / h + 0.5)) if h >= w else (int(h * long_side / w + 0.5), long_side)
            resized = F.interpolate(image, size, mode="bilinear", align_corners=False)
            logits = sliding_window_logits(model, resized, crop_size, flip)
            logits = F.interpolate(logits, (h, w), mode="bilinear", align_corners=False)
            probs = probs + logits.softmax(1) / len(scales)
    return probs


def evaluate(model, dataset, indices, device, crop_size, base_size, scales=(1.0,), flip=False, amp=False):
    """Whole-image evaluation of dataset[i] for i in indices → SegMetric (not yet all-reduced)."""
    model.eval()
    metric = SegMetric(dataset.num_classes)
    for i in indices:
        image, label = dataset[i]
        probs = predict(model, data.normalize(image[None].to(device)), crop_size, base_size, scales, flip, amp)
        metric.update(probs.argmax(1)[0].cpu(), label)
    return metric


# ----------------------------------------------------------------------------- writing predictions

def colorize(label, palette):
    """H×W class indices (−1 = ignore → black) → 3×H×W uint8 colours; palette: K×3 uint8 tensor."""
    colours = torch.cat([palette, palette.new_zeros(1, 3)])  # index −1 picks the extra black row
    return colours[label.long()].permute(2, 0, 1).contiguous()


def label_png(pred, dataset):
    """Label-index PNG in the dataset's own encoding, as evaluation servers expect:
    ADE20K and PASCAL-Context store class+1 (0 = other/background), VOC/COCO store the class
    index as a palette PNG."""
    pred = pred.numpy().astype(np.uint8)
    if dataset in ("ade20k", "pcontext"):
        return Image.fromarray(pred + 1, mode="L")
    image = Image.fromarray(pred, mode="P")
    image.putpalette([c for rgb in data.dataset_info("pascal_voc")["palette"] for c in rgb])
    return image


def list_images(paths):
    """Files as given, folders expanded to the images they hold."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(f for f in glob.glob(os.path.join(path, "*"))
                            if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".webp")))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"--images {path}: no such file or folder")
    return files


def segment_images(model, files, out_dir, palette, crop_size, base_size, device, scales, flip, dataset_name,
                   label_pngs=False, amp=False):
    """One colour PNG per image (or a label-index PNG with label_pngs) at the input's size, plus an
    overlay on the photograph."""
    os.makedirs(out_dir, exist_ok=True)
    palette = torch.tensor(palette, dtype=torch.uint8)
    for path in files:
        try:
            photo = Image.open(path).convert("RGB")
        except OSError as e:
            raise data.DataError(f"{path}: cannot read the image ({e})") from None
        image = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)
        probs = predict(model, data.normalize(image[None].to(device)), crop_size, base_size, scales, flip, amp)
        pred = probs.argmax(1)[0].cpu()
        stem = os.path.splitext(os.path.basename(path))[0]
        if label_pngs:
            label_png(pred, dataset_name).save(os.path.join(out_dir, f"{stem}.png"))
            continue
        colour = colorize(pred, palette).permute(1, 2, 0).numpy()
        Image.fromarray(colour).save(os.path.join(out_dir, f"{stem}.png"))
        Image.blend(photo, Image.fromarray(colour), 0.5).save(os.path.join(out_dir, f"{stem}_overlay.jpg"))
        print(f"{path} → {os.path.join(out_dir, stem)}.png", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train_seg.py checkpoint (it names model, classes, palette)")
    p.add_argument("--data", help="dataset to evaluate on (default: the one trained on)")
    p.add_argument("--data-root", help="folder holding the dataset in its standard layout")
    p.add_argument("--split", default="val")
    p.add_argument("--multi-scale", action="store_true", help="scales 0.5–1.75 with flips, probabilities averaged")
    p.add_argument("--crop-size", type=int, help="window size (default: the training crop)")
    p.add_argument("--base-size", type=int, help="long side at scale 1 (default: the training base size)")
    p.add_argument("--images", nargs="+", help="segment these image files or folders instead")
    p.add_argument("--label-png", action="store_true",
                   help="with --images: write label-index PNGs in the dataset's encoding (for test servers)")
    p.add_argument("--out", default="predictions", help="folder for --images output and the IoU table")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = p.parse_args(argv)

    # imported here, not at the top: train_seg.py imports this file
    from train_seg import fail, load_checkpoint, setup_distributed
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        saved = checkpoint["args"]
        model = encnet.build_model(saved)
        encnet.load_strict(model, checkpoint["model"], args.checkpoint)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(f"{args.checkpoint}: not a train_seg.py checkpoint (missing {e})" if isinstance(e, KeyError) else str(e))
    rank, world, device = setup_distributed()
    model.to(device).eval()
    crop_size = args.crop_size or saved["crop_size"]
    base_size = args.base_size or saved["base_size"]
    scales, flip = (MULTI_SCALES, True) if args.multi_scale else ((1.0,), False)

    if args.images:
        if rank == 0:
            try:
                segment_images(model, list_images(args.images), args.out, checkpoint["palette"], crop_size,
                               base_size, device, scales, flip, saved["data"], args.label_png, args.amp)
            except (FileNotFoundError, data.DataError) as e:
                fail(str(e))
        return
    name = args.data or saved["data"]
    try:
        dataset = data.get_dataset(name, args.data_root or saved.get("data_root"), args.split, crop_size,
                                   base_size, mode="val")
    except (data.DataError, ValueError) as e:
        fail(str(e))
    if dataset.num_classes != saved["num_classes"]:
        fail(f"{args.checkpoint} predicts {saved['num_classes']} classes, {name} has {dataset.num_classes}")
    metric = evaluate(model, dataset, data.shard_indices(len(dataset), rank, world), device,
                      crop_size, base_size, scales, flip, args.amp)
    metric.all_reduce()
    if rank == 0:
        pix_acc, miou = metric.pixacc_miou()
        table = per_class_table(metric, dataset.classes)
        print(table)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"per_class_iou_{name}_{args.split}.txt"), "w") as f:
            f.write(table + "\n")
        if name == "pcontext":  # Table 2's 60-class figure, derived as the released code does
            print(f"mIoU with background as a 60th class (59/60 · mIoU): {100 * miou * 59 / 60:.2f}")
        print(f"{name} {args.split}{' multi-scale' if args.multi_scale else ''}: "
              f"pixAcc {pix_acc:.4f} mIoU {miou:.4f}")


if __name__ == "__main__":
    main()
