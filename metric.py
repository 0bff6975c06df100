"""The segmentation metric (Sec. 3.1): pixAcc and mIoU over a whole split, and the evaluation of a split.

Metrics (Sec. 3.1): pixAcc = correct labelled pixels / labelled pixels and IoU_c = TP / (TP + FP + FN),
both accumulated over the whole split in one confusion matrix (not averaged per image). ADE20K and
PASCAL-Context map background to ignore (150 and 59 classes), VOC counts it as class 0 (21 classes).

    SegMetric        the confusion matrix of a split (all-reduced over processes): pixAcc, per-class IoU, mIoU
    per_class_table  the per-class IoU table as text
    evaluate         dataset items through a protocol's predictor (protocols.make_predictor) into a SegMetric
"""
import time

import torch
import torch.distributed as dist

from protocols import class_map
from transforms import normalize


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


def evaluate(model, dataset, indices, device, predictor, log_every=0):
    """Whole-image evaluation of dataset[i] for i in indices → SegMetric (not yet all-reduced).
    predictor: from make_predictor. log_every > 0: a progress line every log_every seconds (images done,
    images/s, ETA)."""
    model.eval()
    metric = SegMetric(dataset.num_classes)
    start = last = time.time()
    for done, i in enumerate(indices, 1):
        image, label = dataset[i]
        views = predictor(model, normalize(image[None].to(device)))
        metric.update(class_map(views, label.shape).cpu(), label)
        now = time.time()
        if log_every > 0 and (now - last >= log_every or done == len(indices)):
            last, rate = now, done / max(now - start, 1e-9)
            print(f"eval {done}/{len(indices)} images | {rate:.2f} img/s | eta {(len(indices) - done) / rate / 60:.1f} "
                  f"min", flush=True)
    return metric
