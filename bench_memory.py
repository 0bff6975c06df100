"""The memory of one training step, a section of bench.py: ours beside mmsegmentation's own EncNet.

Peak resident memory of one EncNet training step: ours (the default: cross-entropy upsampled in bands and
BatchNorm → ReLU recomputed), its variants (VARIANTS: the plain step of today, memory_saving(model, False); the
banded CE alone; + checkpointed backbone stages) vs mmsegmentation 1.2.2's own EncNet; and the time of our variants
side by side (alternating, one process).

Each measurement runs in a fresh Python process (so that peaks do not mix): it builds the model and the batch,
collects garbage, resets the kernel's high-water mark (echo 5 > /proc/self/clear_refs), reads VmRSS as the
baseline, runs one step (forward, loss, backward; no optimizer: the same on both sides) and reports
VmHWM − baseline. The step is the one outside checks run:
    ours:   out = model(images); loss, terms = encnet.seg_loss(out, labels, K, se_weight, aux_weight, divisors);
            loss.backward()
    mmseg:  loss, _ = MmsegEncNet.loss(images, samples) (EncoderDecoder.loss + parse_losses); loss.backward()
Settings (batch 2, 150 classes, fp32, seed 0):
    mmseg512  mmsegmentation's EncNet-R50-d8 (recipes.RECIPES 'mmseg_encnet_r50-d8_ade20k_80k': resnet50v1c, aux FCN
              head 0.4, SE 0.2, residual gate, no stage-3 encoding, Dropout2d, align_corners False, loss over all
              pixels), 512×512, our model loading mmsegmentation's weights (zoo.convert) where zoo imports
    paper480  the paper's ADE20K recipe (recipes.DATASET_RECIPES['ade20k']: resnet50, stage-3 encoding,
              no aux, loss over labelled pixels) at crop 480, against mmsegmentation's model at 480×480

Where the memory goes (breakdown_GiB): the tensors each step keeps for backward at the end of its forward pass, by
part (stem, stage 1–4, heads, logits and loss), beside the parameters, their gradients and SGD's momentum.

    python bench.py --only memory [--quick]
"""
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

import encnet
import train_seg
import zoo
from mmseg_peer import MmsegEncNet, load_mmseg, mmseg_files

REPO = os.path.dirname(os.path.abspath(__file__))

SETTINGS = {  # name: (size, our architecture, se_weight, aux_weight, loss_mean)
    "mmseg512": (512, dict(backbone="resnet50v1c", aux=True, residual_gate=True, stage3_encoding=False,
                           dropout2d=True, align_corners=False), 0.2, 0.4, "all"),
    "paper480": (480, dict(backbone="resnet50", aux=False, residual_gate=False, stage3_encoding=True,
                           dropout2d=False, align_corners=False), 0.2, 0.2, "labelled"),
}


def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])


def reset_peak():
    """Reset VmHWM to the current RSS; → True where the kernel allows it (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def batch(size, n=2, classes=150):
    torch.manual_seed(0)
    images = torch.randn(n, 3, size, size)
    labels = torch.randint(0, classes, (n, size, size))
    labels[:, : size // 8] = -1  # some ignored pixels, as crops padded beyond the image have
    return images, labels


VARIANTS = {  # our step's variants: what each switches on
    "ours": "the default: upsampled CE in bands + recomputed BN-ReLU",
    "ours_plain": "today's step: full-resolution logits, F.cross_entropy, plain BN-ReLU (memory_saving(model, False))",
    "ours_ce_only": "the banded CE alone (recompute_bn_relu off)",
    "ours_checkpoint": "the default + backbone.checkpoint_stages = (1, 2, 3, 4)",
}


def our_model(setting, width, head_width, variant, weights_file=None):
    torch.manual_seed(0)
    model = encnet.EncNet(150, num_codes=32, se_loss=True, lateral=False, dropout=0.1, head_width=head_width,
                          width=width, **SETTINGS[setting][1]).train()
    encnet.memory_saving(model, variant != "ours_plain")
    if variant == "ours_ce_only":
        encnet.memory_saving(model, False)
        model.upsample_in_loss = True
    if variant == "ours_checkpoint":
        model.backbone.checkpoint_stages = (1, 2, 3, 4)
    if weights_file and os.path.exists(weights_file):
        state = torch.load(weights_file, weights_only=True)
        zoo.load_strict(model, zoo.convert(state, zoo.MMSEG_KEYS), "mmsegmentation's EncNet")
    return model


def our_loss_fn(setting, model, images, labels):
    """→ fn() → the loss of one forward and seg_loss in `setting`, divided as train_seg.py divides it."""
    _, _, se_w, aux_w, loss_mean = SETTINGS[setting]
    divisors = train_seg.loss_divisors(labels, loss_mean, 0)
    return lambda: encnet.seg_loss(model(images), labels, 150, se_w, aux_w, divisors)[0]


def step_fn(loss_fn):
    """→ step(): loss_fn(), then its backward (no optimizer: the same on both sides) → the loss."""
    def step():
        loss = loss_fn()
        loss.backward()
        return loss.detach()
    return step


def mmseg_model(width, head_width, weights_out=None):
    folder, why = mmseg_files()
    if folder is None:
        raise SystemExit(why)
    mm = load_mmseg(folder)
    torch.manual_seed(0)
    model = MmsegEncNet(mm, 150, width, head_width).train()
    if weights_out:
        torch.save(model.state_dict(), weights_out)
    return model


def mmseg_samples(labels):
    """mmsegmentation's data samples: .gt_sem_seg.data 1×H×W, 255 = ignored."""
    return [SimpleNamespace(gt_sem_seg=SimpleNamespace(data=torch.where(label < 0, 255, label)[None]))
            for label in labels]


def mmseg_loss_fn(model, images, labels):
    """→ fn() → mmsegmentation's loss: EncoderDecoder.loss + parse_losses."""
    samples = mmseg_samples(labels)
    return lambda: model.loss(images, samples)[0]


def child(kind, setting, size, width, head_width, weights_file):
    """One measurement in this (fresh) process → prints a JSON line."""
    images, labels = batch(size)
    if kind == "mmseg":
        model = mmseg_model(width, head_width, weights_out=weights_file)
        step = step_fn(mmseg_loss_fn(model, images, labels))
    else:
        model = our_model(setting, width, head_width, kind, weights_file=weights_file)
        step = step_fn(our_loss_fn(setting, model, images, labels))
    gc.collect()
    ok = reset_peak()
    base = status_kib("VmRSS")
    hwm_before = status_kib("VmHWM")
    t = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t
    peak = status_kib("VmHWM")
    print(json.dumps(dict(kind=kind, setting=setting, size=size, baseline_GiB=base / 2**20,
                          peak_above_baseline_GiB=(peak - base) / 2**20, hwm_reset=ok,
                          hwm_before_step_GiB=hwm_before / 2**20, loss=loss.item(), seconds=seconds,
                          threads=torch.get_num_threads())), flush=True)


def part_of(name):
    """A module's qualified name → the part of the step its saved tensors count to (ours and mmsegmentation's
    names: backbone.conv1/bn1/maxpool or backbone.stem, backbone.layerN, heads; the model's own forward (which
    upsamples the logits in the plain step) and code outside every module (the loss) → 'logits and loss')."""
    if name == "" or "loss" in name:
        return "logits and loss"
    if name.startswith("backbone.layer"):
        return f"stage {name[len('backbone.layer')]}"
    return "stem" if name.startswith("backbone") else "heads"


def saved_for_backward(model, loss_fn):
    """Where the memory goes: {part: GiB} of the tensors autograd keeps for backward when loss_fn() has
    run (what lives at the end of the forward pass), each storage counted once, to the innermost module that
    saved it first (part_of); parameters are not activations and are left out. Then the loss's backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack, seen = [], {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (part_of(stack[-1] if stack else ""), storage.nbytes())
        return t

    def enter(name):
        return lambda module, args: stack.append(name)  # (a hook returning None changes nothing)

    def leave(module, args, out):
        stack.pop()

    hooks = []
    for name, module in model.named_modules():
        hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
    finally:
        for hook in hooks:
            hook.remove()
    parts = {}
    for part, nbytes in seen.values():
        parts[part] = parts.get(part, 0) + nbytes / 2**30
    loss.backward()
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    return dict(sorted(parts.items()), saved_total=sum(parts.values()), parameters=size,
                parameter_gradients=size, sgd_momentum=size)


def breakdown_child(kind, setting, size, width, head_width):
    """The breakdown of one step of `kind` in this (fresh) process → prints a JSON line."""
    images, labels = batch(size)
    if kind == "mmseg":
        model = mmseg_model(width, head_width)
        loss_fn = mmseg_loss_fn(model, images, labels)
    else:
        model = our_model(setting, width, head_width, kind)
        loss_fn = our_loss_fn(setting, model, images, labels)
    print(json.dumps(dict(kind=kind, setting=setting, size=size, **saved_for_backward(model, loss_fn))), flush=True)


def run_child(*args, mode="--child"):
    command = [sys.executable, os.path.abspath(__file__), mode, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def time_child(setting, size, width, head_width, repeat, variants):
    """Our step's variants side by side in one process, alternating (the order rotates each round), same weights
    and dropout masks. The step: zero_grad, forward, seg_loss, backward (no optimizer)."""
    images, labels = batch(size)
    models = {v: our_model(setting, width, head_width, v) for v in variants}
    first = models[variants[0]]
    for m in models.values():
        m.load_state_dict(first.state_dict())
    steps = {v: step_fn(our_loss_fn(setting, m, images, labels)) for v, m in models.items()}
    times = {k: [] for k in steps}
    losses = {}
    for i in range(repeat + 1):  # the first round is a warm-up
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        for k in order:
            models[k].zero_grad(set_to_none=True)
            torch.manual_seed(i)  # the same dropout masks for all
            t = time.perf_counter()
            losses[k] = steps[k]().item()
            if i:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps(dict(setting=setting, size=size, median_s=med, all_s=times, last_losses=losses,
                          **{f"time_{k}_vs_{variants[1]}": med[k] / med[variants[1]] for k in variants},
                          threads=torch.get_num_threads())), flush=True)


def bench_memory(quick=False, timing=True, repeat=None, variants=("ours", "ours_plain", "ours_ce_only"),
                 time_variants=("ours", "ours_plain"), runs=1, breakdown=True):
    """→ {setting: {ours, ours_plain, mmseg: {peak_GiB, ...}, ratios, breakdown}, 'time': {...}}.

    breakdown: where the memory goes, {part: GiB saved for backward} per step (saved_for_backward, a fresh
    process each), mmsegmentation's and ours (ours_plain: what the savings act on).

    quick: the same code paths on a small model (width 16, 128×128) for a test; else ResNet-50 at 512² and 480².
    runs: fresh processes per measurement (its median is reported; the allocator's state varies by ±3 %)."""
    width, head_width = (16, 64) if quick else (64, 512)
    folder, why = mmseg_files()
    if folder is None:
        return {"status": why}
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting, (size, *_rest) in SETTINGS.items():
            size = 128 if quick else size
            weights = os.path.join(tmp, f"mmseg_{setting}.pth")
            entry = result[setting] = {"size": size, "batch": 2, "width": width}
            ours_weights = weights if setting == "mmseg512" else ""
            for kind in ("mmseg", *variants):  # mmseg first: it writes the weights ours loads
                found = [run_child(kind, setting, size, width, head_width, weights if kind == "mmseg" else ours_weights)
                         for _ in range(runs)]
                peaks = [f["peak_above_baseline_GiB"] for f in found]
                entry[kind] = dict(found[0], peak_above_baseline_GiB=statistics.median(peaks), runs_GiB=peaks)
            theirs = entry["mmseg"]["peak_above_baseline_GiB"]
            for variant in variants:
                entry[f"ratio_{variant}_vs_mmseg"] = entry[variant]["peak_above_baseline_GiB"] / theirs
            if "ours" in entry and "ours_plain" in entry:
                entry["ratio_ours_vs_plain"] = (entry["ours"]["peak_above_baseline_GiB"]
                                                / entry["ours_plain"]["peak_above_baseline_GiB"])
            if breakdown:
                entry["breakdown_GiB"] = {}
                for kind in ("mmseg", "ours_plain", "ours"):
                    found = run_child(kind, setting, size, width, head_width, mode="--breakdown-child")
                    entry["breakdown_GiB"][kind] = {k: v for k, v in found.items() if isinstance(v, float)}
    if timing:
        result["time"] = {}
        for setting, (size, *_rest) in SETTINGS.items():
            size = 128 if quick else size
            command = [sys.executable, os.path.abspath(__file__), "--time-child", setting, str(size), str(width),
                       str(head_width), str(repeat or (1 if quick else 3)), ",".join(time_variants)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                raise RuntimeError(f"timing failed:\n{done.stderr[-4000:]}")
            result["time"][setting] = json.loads(lines[-1])
    return result


if __name__ == "__main__":  # the fresh processes of one measurement (bench.py runs the section)
    if sys.argv[1] == "--child":
        kind, setting, size, width, head_width = sys.argv[2:7]
        child(kind, setting, int(size), int(width), int(head_width), sys.argv[7] if len(sys.argv) > 7 else "")
    elif sys.argv[1] == "--breakdown-child":
        kind, setting, size, width, head_width = sys.argv[2:7]
        breakdown_child(kind, setting, int(size), int(width), int(head_width))
    elif sys.argv[1] == "--time-child":
        setting, size, width, head_width, repeat, variants = sys.argv[2:8]
        time_child(setting, int(size), int(width), int(head_width), int(repeat), variants.split(","))
