"""Benchmarks behind the README's performance table: `python bench.py` (the README gives its duration).

Every claim is a ratio against its alternative measured in the same run, so it holds on a noisy
machine. Sections (--only NAME runs one):

    encoding      Encoding layer fwd+bwd vs the materialised formula (time, peak memory) and vs the six
                  matrix products it cannot avoid; plain autograd and torch.compile of the same algebra
    models        EncNet vs FCN, ResNet-50 at 480×480: FLOPs, parameters, fwd+bwd time
    data          training augmentation items/s per core: one affine warp vs the sequential Pillow pipeline;
                  the pre-training check (check_dataset) per item against loading the item for training
    syncbn        SyncBatchNorm in 2 gloo processes vs local BatchNorm; collectives per step
    train         training images/s of EncNet and FCN on the built-in data (train_seg.py defaults); the loop's
                  host syncs: numbers read every step vs kept on the device and read every 10 steps
    cifar         training images/s of the four Table-6 networks, i.e. the CPU time of one epoch
    coco          COCO polygon → mask, masks/s of data.py's NumPy rasteriser vs pycocotools' C (same masks)
    eval          eval.py's evaluation images/s, single- and multi-scale: windows batched (on a GPU) vs the
                  former one-window-at-a-time path (same probabilities up to rounding), bf16 on a GPU
    photo         eval.py --images on a 4000×3000 photo: peak memory and time against a photo at model scale
    cpu_bf16      evaluation of the built-in data in float32 vs bf16 autocast + channels_last: time, mIoU
    export        the exported ONNX file in onnxruntime vs eager PyTorch on the CPU
    gpu           on a GPU, when one is present: EncNet-ResNet50 training step in fp32 / bf16 / +channels_last /
                  +compile (images/s, memory, MFU), Encoding layer eager vs compiled
    gpu_vs_mmseg  on a GPU: training side by side with mmsegmentation 1.2.2's own EncNet (from its wheel)

Writes the table to stdout and to --json (default bench_results.json). --quick shrinks every
section to seconds (used by the tests to keep this file working; its numbers are not written unless --json
names a file).
"""
import argparse
import importlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
import warnings
import weakref
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import data
import encnet
import eval as seg_eval
import layers
import run
import syncbn
import train_seg
import zoo

# optional (test requirements): the sections that compare against them say "not measured" without them
try:
    import onnxruntime
except ImportError:
    onnxruntime = None
try:
    import pycocotools.mask as coco_mask
except ImportError:
    coco_mask = None


def timeit(fn, repeat, warmup=2):
    """Median seconds of fn() over `repeat` runs."""
    return timeit_alternating({"fn": fn}, repeat, warmup)["fn"]


def timeit_alternating(fns, repeat, warmup=2):
    """Median seconds of each of {name: fn}, run in turns (a, b, a, b, …): an alternative compared in a
    ratio sees the same machine state, whatever the CPU's clock and caches do over the minutes."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensors alive at once, counted op by op (CPU has no allocator statistics)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                self.seen.add(key)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key, size):
        self.seen.discard(key)
        self.live -= size


def peak_bytes(fn):
    with PeakMemory() as mode:
        fn()
    return mode.peak


# ----------------------------------------------------------------------------- 1. Encoding layer

def encoding_plain_autograd(x, codewords, scale):
    """The same expanded algebra as layers.py, differentiated by autograd instead of by hand."""
    x = x.flatten(2)
    dist_sq = (x.square().sum(1, keepdim=True) - 2 * torch.matmul(codewords, x)
               + codewords.square().sum(1)[:, None])
    assign = torch.softmax(-scale[:, None] * dist_sq, dim=1)
    return torch.matmul(assign, x.transpose(1, 2)) - assign.sum(2, keepdim=True) * codewords


def bench_encoding(quick):
    B, C, H, W, K = (2, 64, 16, 16, 8) if quick else (4, 512, 60, 60, 32)
    repeat = 3 if quick else 10
    torch.manual_seed(0)
    x = torch.randn(B, C, H, W, requires_grad=True)
    codewords = (torch.randn(K, C) * 0.1).requires_grad_()
    scale = torch.rand(K).requires_grad_()

    def fwd_bwd(fn):
        def step():
            out = fn(x, codewords, scale)
            out.backward(torch.ones_like(out))
        return step

    # the six products forward and backward cannot avoid (each B·N·K·C multiply-adds)
    X, D = x.detach().flatten(2), codewords.detach()
    A, G, E = torch.rand(B, K, H * W), torch.rand(B, K, H * W), torch.rand(B, K, C)

    def six_matmuls():
        torch.matmul(D, X), torch.matmul(A, X.transpose(1, 2))  # X·Dᵀ, Aᵀ·X
        torch.matmul(E, X), torch.matmul(E.transpose(1, 2), A)  # their gradient products
        torch.matmul(D.t(), G), torch.matmul(G, X.transpose(1, 2))

    seconds = timeit_alternating({"ours": fwd_bwd(layers.encode), "six_matmuls": six_matmuls,
                                  "plain_autograd": fwd_bwd(encoding_plain_autograd)}, repeat)
    result = {
        "shape": f"B={B} C={C} {H}x{W} K={K} fp32",
        **{f"{name}_ms": 1e3 * t for name, t in seconds.items()},
        "materialised_ms": 1e3 * timeit(fwd_bwd(layers.encode_materialised), max(2, repeat // 3), warmup=1),
        "ours_peak_MB": peak_bytes(fwd_bwd(layers.encode)) / 2**20,
        "materialised_peak_MB": peak_bytes(fwd_bwd(layers.encode_materialised)) / 2**20,
    }
    if quick:  # inductor compiles C++ for minutes on a CPU: only in the full run
        result["compiled_plain_ms"] = "skipped in --quick"
    else:  # torch.compile of the plain algebra: how close a compiler gets without a hand-written backward
        try:
            compiled = torch.compile(encoding_plain_autograd)
            result["compiled_plain_ms"] = 1e3 * timeit(fwd_bwd(compiled), repeat, warmup=3)
        except Exception as e:  # e.g. a machine without a C++ compiler cannot run inductor
            result["compiled_plain_ms"] = f"unavailable: {type(e).__name__}"
    result["x_vs_six_matmuls"] = result["ours_ms"] / result["six_matmuls_ms"]
    result["speedup_vs_materialised"] = result["materialised_ms"] / result["ours_ms"]
    result["memory_saving_vs_materialised"] = result["materialised_peak_MB"] / result["ours_peak_MB"]

    # the ADE20K training setting: batch 16 (per step, one process); the materialised version would
    # hold 16×3600×32×512 fp32 = 3.8 GB per residual-sized tensor, so it is not run here
    if not quick:
        x16 = torch.randn(16, C, H, W, requires_grad=True)
        X16 = x16.detach().flatten(2)
        A16, G16, E16 = torch.rand(16, K, H * W), torch.rand(16, K, H * W), torch.rand(16, K, C)

        def ours16():
            out = layers.encode(x16, codewords, scale)
            out.backward(torch.ones_like(out))

        def six16():
            torch.matmul(D, X16), torch.matmul(A16, X16.transpose(1, 2))
            torch.matmul(E16, X16), torch.matmul(E16.transpose(1, 2), A16)
            torch.matmul(D.t(), G16), torch.matmul(G16, X16.transpose(1, 2))
        seconds = timeit_alternating({"ours": ours16, "six_matmuls": six16}, 5)
        result["ade20k_b16_ours_ms"] = 1e3 * seconds["ours"]
        result["ade20k_b16_x_vs_six_matmuls"] = seconds["ours"] / seconds["six_matmuls"]
        result["ade20k_b16_residual_tensor_GB"] = 16 * H * W * K * C * 4 / 1e9
    return result


# ----------------------------------------------------------------------------- 2. EncNet vs FCN

def bench_models(quick):
    """FLOPs and parameters of FCN and EncNet, and their forward+backward time, measured alternately
    (FCN, EncNet, FCN, …) so that the CPU's drift over minutes falls on both alike."""
    backbone, size = ("resnet18", 96) if quick else ("resnet50", 480)
    result = {"setting": f"{backbone}, {size}x{size}, 150 classes; FLOPs at batch 1, time at batch 2"}
    steps = {}
    for cls in (encnet.FCN, encnet.EncNet):
        name = cls.__name__
        with torch.device("meta"):
            model = cls(150, backbone).eval()
            images = torch.empty(1, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            model(images)
        result[f"{name}_GFLOPs_eval"] = counter.get_total_flops() / 1e9
        result[f"{name}_params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        torch.manual_seed(0)
        model = cls(150, backbone).train()
        images, labels = torch.randn(2, 3, size, size), torch.randint(0, 150, (2, size, size))

        def step(model=model, images=images, labels=labels):
            loss, _ = encnet.seg_loss(model(images), labels, 150)
            loss.backward()
        steps[name] = step
    for name, seconds in timeit_alternating(steps, 1 if quick else 5, warmup=1).items():
        result[f"{name}_fwd_bwd_s"] = seconds
    result["flops_overhead_pct"] = 100 * (result["EncNet_GFLOPs_eval"] / result["FCN_GFLOPs_eval"] - 1)
    result["time_overhead_pct"] = 100 * (result["EncNet_fwd_bwd_s"] / result["FCN_fwd_bwd_s"] - 1)
    return result


# ----------------------------------------------------------------------------- 3. data pipeline

def sequential_item(dataset, index, crop_size, base_size):
    """The released code's pipeline: flip → resize → rotate → pad → crop, whole images, Pillow."""
    image_path, label_path = dataset.samples[index]
    image = Image.open(image_path).convert("RGB")
    raw = data.read_png_label(label_path)
    np.bincount(raw.ravel(), minlength=256)  # the same label check as the dataset's
    label = Image.fromarray(raw)
    rng = np.random.default_rng([dataset.seed, dataset.epoch, index])  # draws in augment_train's order
    if rng.random() < 0.5:
        image, label = ImageOps.mirror(image), ImageOps.mirror(label)
    w, h = image.size
    long_side = int(rng.integers(int(base_size * 0.5), int(base_size * 2.0), endpoint=True))
    sw, sh = (int(w * long_side / h + 0.5), long_side) if h > w else (long_side, int(h * long_side / w + 0.5))
    image, label = image.resize((sw, sh), Image.BILINEAR), label.resize((sw, sh), Image.NEAREST)
    angle = rng.uniform(-10, 10)
    image, label = image.rotate(angle, Image.BILINEAR), label.rotate(angle, Image.NEAREST, fillcolor=255)
    pad_w, pad_h = max(crop_size - sw, 0), max(crop_size - sh, 0)
    if pad_w or pad_h:
        image = ImageOps.expand(image, (0, 0, pad_w, pad_h), fill=0)
        label = ImageOps.expand(label, (0, 0, pad_w, pad_h), fill=255)
    x1 = int(rng.integers(0, sw + pad_w - crop_size, endpoint=True))
    y1 = int(rng.integers(0, sh + pad_h - crop_size, endpoint=True))
    box = (x1, y1, x1 + crop_size, y1 + crop_size)
    return data.image_tensor(image.crop(box)), torch.from_numpy(dataset.lut[np.asarray(label.crop(box))])


def bench_data(quick):
    """Whole training items (JPEG + PNG decode, label check, augmentation) from synthetic ADE20K-sized
    files (683×512, JPEG quality 90), one core, crop 480 / base 520, the same random draws for both; and
    data.check_dataset's cost per item (the pre-training check of a split) against loading it for training."""
    crop_size, base_size = 480, 520
    num_images, epochs = (4, 1) if quick else (8, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    seconds = {"warp": 0.0, "sequential": 0.0, "check": 0.0}
    with tempfile.TemporaryDirectory() as root:
        image_dir = Path(root, "ADEChallengeData2016", "images", "training")
        label_dir = Path(root, "ADEChallengeData2016", "annotations", "training")
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for i in range(num_images):  # smooth colour fields with some grain, blocky label regions
            smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize((683, 512), Image.BICUBIC)
            image = np.clip(np.asarray(smooth) + rng.normal(0, 6, (512, 683, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(image_dir / f"{i:04d}.jpg", quality=90)
            label = Image.fromarray(rng.integers(0, 151, (8, 11), np.uint8)).resize((683, 512), Image.NEAREST)
            label.save(label_dir / f"{i:04d}.png")
        dataset = data.get_dataset("ade20k", root, "train", crop_size, base_size)
        for epoch in range(epochs):
            dataset.set_epoch(epoch)
            for index in range(num_images):  # alternate, so background load hits both alike
                # "check": what check_dataset does per item before training (full decode, label values)
                for name, item in (("warp", lambda i: dataset[i]),
                                   ("sequential", lambda i: sequential_item(dataset, i, crop_size, base_size)),
                                   ("check", lambda i: data.check_dataset(dataset, workers=0, indices=[i]))):
                    start = time.perf_counter()
                    item(index)
                    seconds[name] += time.perf_counter() - start
    torch.set_num_threads(threads)
    items = epochs * num_images
    warp = items / seconds["warp"]
    return {"warp_items_per_s_per_core": warp, "sequential_items_per_s_per_core": items / seconds["sequential"],
            "speedup": seconds["sequential"] / seconds["warp"],
            # the pre-training check of a split costs this share of one epoch's loading of it
            "check_items_per_s_per_core": items / seconds["check"],
            "check_vs_epoch_loading": seconds["check"] / seconds["warp"],
            # a GPU step consuming R images/s needs R / warp loader cores
            "loader_cores_per_100_images_per_s": 100 / warp}


# ----------------------------------------------------------------------------- 4. SyncBatchNorm

def _syncbn_worker(rank, world, port, quick, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    shape = (2, 64, 16, 16) if quick else (4, 256, 60, 60)
    x = torch.randn(shape, requires_grad=True)
    results = {}
    for name, bn in (("local", nn.BatchNorm2d(shape[1])), ("sync", syncbn.SyncBatchNorm(shape[1]))):
        calls = [0]
        original = dist.all_reduce

        def counting(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)
        dist.all_reduce = counting

        def step():
            bn(x).sum().backward()
        seconds = timeit(step, 3 if quick else 20)
        dist.all_reduce = original
        results[f"{name}_ms"] = 1e3 * seconds
        results[f"{name}_collectives_per_step"] = calls[0] / ((3 if quick else 20) + 2)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def bench_syncbn(quick):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=_syncbn_worker, args=(r, 2, port, quick, queue)) for r in range(2)]
    for p in processes:
        p.start()
    result = queue.get(timeout=600)
    for p in processes:
        p.join()
    result["shape_per_process"] = "2x64x16x16" if quick else "4x256x60x60"
    result["sync_vs_local"] = result["sync_ms"] / result["local_ms"]
    return result


# ----------------------------------------------------------------------------- 5./6. training step

def bench_train(quick, device="cpu"):
    """Training step of `python train_seg.py [--model fcn]` (its defaults) on random data."""
    result = {}
    for name in ("fcn", "encnet"):
        # the defaults of `python train_seg.py`; --out only to a folder that cannot hold a run (the real
        # runs/seg may: get_args refuses a folder with a run in it)
        with tempfile.TemporaryDirectory() as tmp:
            args = train_seg.get_args(["--model", name, "--out", os.path.join(tmp, "run")])
        args.num_classes = len(data.CONTEXT_CLASSES)
        batch = 4 if quick else args.batch_size
        torch.manual_seed(0)
        model = encnet.model_from_args(vars(args)).to(device).train()
        optimizer = train_seg.build_optimizer(model, args)
        images = torch.randn(batch, 3, data.CONTEXT_HEIGHT, data.CONTEXT_WIDTH, device=device)
        labels = torch.randint(0, args.num_classes, (batch, data.CONTEXT_HEIGHT, data.CONTEXT_WIDTH), device=device)

        def step():
            loss, terms = encnet.seg_loss(model(images), labels, args.num_classes)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            optimizer.step()
            return loss, terms, grad_norm
        result[f"{name}_images_per_s"] = batch / timeit(step, *((1, 0) if quick else (20, 2)))
        result["setting"] = (f"{args.backbone} width {args.width}, {data.CONTEXT_HEIGHT}x{data.CONTEXT_WIDTH}, "
                             f"batch {batch}, {device}")
    result["encnet_vs_fcn_time"] = result["fcn_images_per_s"] / result["encnet_images_per_s"]

    # The loop's host syncs: numbers read every step (.tolist()/.item(), the loop before run.StepStats)
    # against kept on the device and read once per run.SYNC_EVERY steps, over SYNC_EVERY EncNet steps.
    def read_every_step():
        for _ in range(run.SYNC_EVERY):
            loss, terms, grad_norm = step()
            torch.stack([loss.detach(), *terms.values()]).tolist(), grad_norm.item()

    def read_every_ten():
        stats = run.StepStats(world=1)
        for it in range(run.SYNC_EVERY):
            loss, terms, grad_norm = step()
            stats.add(it, loss=loss, **terms, grad_norm=grad_norm)
        stats.sync()
    times = timeit_alternating({"every_step": read_every_step, "every_10": read_every_ten}, *((1, 0) if quick else (5, 1)))
    result["host_sync_every_step_s"], result["host_sync_every_10_s"] = times["every_step"], times["every_10"]
    result["host_sync_every_10_vs_every_step_time"] = times["every_10"] / times["every_step"]
    return result


def bench_cifar(quick):
    """Training images/s of the four Table-6 networks on this machine → the wall-clock of one epoch
    (50,000 images), extrapolated from a few steps at batch 128."""
    batch = 8 if quick else 128
    result = {}
    for name in encnet.CIFAR_MODELS:
        torch.manual_seed(0)
        model = encnet.build_cifar(name).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

        def step():
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rate = batch / timeit(step, *((1, 0) if quick else (5, 1)))
        result[f"{name}_params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        result[f"{name}_images_per_s"] = rate
        result[f"{name}_epoch_min"] = 50000 / rate / 60
    return result


# Dense bf16 tensor-core peak of the data sheets, TFLOP/s, for the model FLOPs utilisation (MFU) column.
# Matched against torch.cuda.get_device_name(), first match wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("A10G", 70))


def device_peak(device):
    """→ (is it a GPU, its name, its bf16 peak TFLOP/s from PEAK_BF16_TFLOPS or None)."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else str(device)
    return cuda, name, next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def bench_gpu(quick, device=None):
    """On one GPU: an EncNet-ResNet50 training step (crop 480, batch 16) in fp32 / bf16 autocast /
    + channels_last / + torch.compile: images/s, peak memory, TFLOP/s and MFU; and the Encoding layer
    eager vs compiled. `device` lets the tests run the same code on a CPU at --quick sizes."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else None)
    if device is None:
        return {"status": "not measured: no GPU on this machine"}
    cuda, name, peak = device_peak(device)
    size, batch, backbone = (32, 2, "resnet18") if quick else (480, 16, "resnet50")
    result = {"device": name, "setting": f"EncNet {backbone}, {size}x{size}, batch {batch}, 150 classes"}

    def synchronised(fn):
        def run():
            fn()
            if cuda:
                torch.cuda.synchronize()
        return run

    variants = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16+channels_last", True, True, False),
                ("bf16+channels_last+compile", True, True, True)]
    for label, amp, channels_last, compiled in variants:
        if compiled and not cuda:
            continue  # inductor builds C++ for minutes on a CPU
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = encnet.EncNet(150, backbone).to(device, memory_format=fmt).train()
        net = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        labels = torch.randint(0, 150, (batch, size, size), device=device)

        @synchronised
        def step():
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                out = net(images)
            loss, _ = encnet.seg_loss(out, labels, 150)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = timeit(step, 2 if quick else 20, warmup=1 if quick else 3)
        if label == "fp32":  # the same arithmetic in every variant; counted eagerly, outside the compiler
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
            result["GFLOP_per_step"] = flops / 1e9
        tflops = flops / seconds / 1e12
        result[f"{label}_images_per_s"] = batch / seconds
        result[f"{label}_TFLOP_per_s"] = tflops
        if cuda:
            result[f"{label}_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        if amp:
            result[f"{label}_MFU_pct"] = 100 * tflops / peak if peak else f"no peak on record for {name}"

    # the Encoding layer at the head's shape: eager (hand-written backward) vs compiled, and the
    # plain autograd algebra compiled, which is what a compiler makes of it without the manual backward
    B, C, H, W, K = (2, 64, 16, 16, 8) if quick else (4, 512, 60, 60, 32)
    x = torch.randn(B, C, H, W, device=device, requires_grad=True)
    codewords = (0.1 * torch.randn(K, C, device=device)).requires_grad_()
    scale = torch.rand(K, device=device).requires_grad_()
    functions = {"eager": layers.encode, "plain_autograd": encoding_plain_autograd}
    if cuda:
        functions.update(compiled=torch.compile(layers.encode),
                         plain_autograd_compiled=torch.compile(encoding_plain_autograd))

    def fwd_bwd(fn):
        @synchronised
        def step():
            out = fn(x, codewords, scale)
            out.backward(torch.ones_like(out))
        return step
    seconds = timeit_alternating({k: fwd_bwd(fn) for k, fn in functions.items()}, 3 if quick else 50,
                                 warmup=1 if quick else 5)
    for key, t in seconds.items():
        result[f"encoding_{key}_ms"] = 1e3 * t
    return result


# ----------------------------------------------------------------------------- GPU: side by side with mmsegmentation

# mmsegmentation's own EncNet, from its wheel: the files that build and train it, no install and no mmcv build.
MMSEG_VERSION = "1.2.2"
MMSEG_WHEEL = f"mmsegmentation-{MMSEG_VERSION}-py3-none-any.whl"
MMSEG_WHEEL_SHA256 = "dadf62bba00a65947d71b08471bc1fe2fee8e2d6eb740381eecd03991e204b47"  # PyPI's file
MMSEG_MODEL_FILES = ("models/backbones/resnet.py", "models/utils/res_layer.py", "models/utils/encoding.py",
                     "models/utils/wrappers.py", "models/decode_heads/decode_head.py", "models/decode_heads/enc_head.py",
                     "models/decode_heads/fcn_head.py", "models/losses/accuracy.py",
                     "models/losses/cross_entropy_loss.py", "models/losses/utils.py")
# Outside the repository (nothing of mmsegmentation is committed here): $ENCNET_CACHE, else ~/.cache/encnet. A machine
# without internet finds the wheel there, in wheels/, when it is copied along.
CACHE = os.environ.get("ENCNET_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "encnet")


def mmseg_files(cache=CACHE):
    """→ (folder holding mmseg/models/… of mmsegmentation 1.2.2, None), or (None, one line saying why not).

    The wheel is fetched once with `pip download --no-deps` into CACHE/wheels and its SHA-256 checked; the files
    listed in MMSEG_MODEL_FILES are unpacked beside it (atomically: a folder is complete or absent)."""
    folder = os.path.join(cache, f"mmsegmentation-{MMSEG_VERSION}")
    if all(os.path.isfile(os.path.join(folder, "mmseg", name)) for name in MMSEG_MODEL_FILES):
        return folder, None
    wheel = os.path.join(cache, "wheels", MMSEG_WHEEL)
    if not os.path.isfile(wheel):
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--retries", "0",
                   "--timeout", "20", "--dest", os.path.dirname(wheel), f"mmsegmentation=={MMSEG_VERSION}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            why = (done.stderr.strip().splitlines() or [f"pip exited with {done.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            why = "pip download took over 5 minutes"
        if not os.path.isfile(wheel):
            return None, f"not measured: the mmsegmentation {MMSEG_VERSION} wheel cannot be downloaded ({why})"
    digest = zoo.file_hash(wheel, "sha256")
    if digest != MMSEG_WHEEL_SHA256:
        return None, (f"not measured: {wheel} has sha256 {digest}, PyPI's {MMSEG_WHEEL} has {MMSEG_WHEEL_SHA256}; "
                      f"delete it to download it again")
    partial = f"{folder}.{os.getpid()}.partial"
    with zipfile.ZipFile(wheel) as archive:
        for name in MMSEG_MODEL_FILES:
            archive.extract(f"mmseg/{name}", partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder, None


# Stand-ins for the few names mmsegmentation's model files take from mmcv and mmengine, as the EncNet config
# uses them (configs/_base_/models/encnet_r50-d8.py: Conv2d, SyncBN, ReLU; no plugins, DCN or pixel sampler).

class BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """BatchNorm of inputs of any rank: what mmengine's revert_sync_batchnorm turns the config's SyncBN into on
    one GPU (its _BatchNormXd), for the B×C×H×W maps and the Encoding's B×K×C alike."""

    def _check_input_dim(self, input):
        pass


def build_norm_layer(cfg, num_features, postfix=""):
    """mmcv.cnn.build_norm_layer for BN and SyncBN → (name, layer), named 'bn{postfix}' as mmcv abbreviates it."""
    if cfg["type"] not in ("BN", "BN1d", "BN2d", "SyncBN"):
        raise NotImplementedError(f"stand-in build_norm_layer: {cfg['type']}")
    layer = BatchNormXd(num_features, eps=cfg.get("eps", 1e-5), momentum=cfg.get("momentum", 0.1))
    layer.requires_grad_(cfg.get("requires_grad", True))
    return f"bn{postfix}", layer


def build_conv_layer(cfg, *args, **kwargs):
    """mmcv.cnn.build_conv_layer for conv_cfg None (nn.Conv2d)."""
    if cfg is not None and cfg.get("type", "Conv2d") != "Conv2d":
        raise NotImplementedError(f"stand-in build_conv_layer: {cfg['type']}")
    return nn.Conv2d(*args, **kwargs)


class ConvModule(nn.Module):
    """mmcv.cnn.ConvModule as the EncNet config uses it: conv → norm → ReLU, submodules named as in mmsegmentation's
    checkpoints (conv, bn, activate); the conv has a bias only without a norm (bias='auto')."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias="auto", conv_cfg=None, norm_cfg=None, act_cfg=dict(type="ReLU"), inplace=True):
        super().__init__()
        bias = norm_cfg is None if bias == "auto" else bias
        self.conv = build_conv_layer(conv_cfg, in_channels, out_channels, kernel_size, stride, padding, dilation,
                                     groups, bias=bias)
        self.norm_name = None
        if norm_cfg is not None:
            self.norm_name, norm = build_norm_layer(norm_cfg, out_channels)
            self.add_module(self.norm_name, norm)
        if act_cfg is not None and act_cfg["type"] != "ReLU":
            raise NotImplementedError(f"stand-in ConvModule: activation {act_cfg['type']}")
        self.activate = nn.ReLU(inplace=inplace) if act_cfg is not None else None

    def forward(self, x):
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return x if self.activate is None else self.activate(x)


class BaseModule(nn.Module):
    """mmengine.model.BaseModule without its init_weights machinery: the benchmark copies one set of weights into
    both models, and initialisation does not change speed."""

    def __init__(self, init_cfg=None):
        super().__init__()
        self.init_cfg = init_cfg


class Sequential(nn.Sequential):
    """mmengine.model.Sequential (an nn.Sequential that takes init_cfg)."""

    def __init__(self, *modules, init_cfg=None):
        super().__init__(*modules)


def not_in_stand_in(*args, **kwargs):
    raise NotImplementedError("not needed by the EncNet config, so not given by bench.py's stand-ins")


def load_mmseg(folder):
    """mmsegmentation's ResNetV1c, EncHead and FCNHead classes (and its CrossEntropyLoss), imported from the files
    in `folder` as they are. Their imports from mmcv, mmengine and the rest of mmseg are answered by the stand-ins
    above; mmseg's package __init__ files (which import everything, mmcv's compiled ops included) never run.
    sys.modules is left as it was: the classes keep what they imported."""
    root = os.path.join(folder, "mmseg")

    def module(name, path=None, **names):
        m = types.ModuleType(name)
        m.__dict__.update(names)
        if path is not None:  # a package whose submodules are read from the wheel's files
            m.__path__ = [os.path.join(root, path)]
        return m

    losses = {}  # filled once cross_entropy_loss.py is imported; build_loss reads it at model construction

    def build_loss(cfg):
        cfg = dict(cfg)
        return losses[cfg.pop("type")](**cfg)

    stand_ins = [
        module("mmcv"),
        module("mmcv.cnn", ConvModule=ConvModule, build_conv_layer=build_conv_layer, build_norm_layer=build_norm_layer,
               build_plugin_layer=not_in_stand_in),
        module("mmengine"), module("mmengine.model", BaseModule=BaseModule, Sequential=Sequential),
        module("mmengine.utils"), module("mmengine.utils.dl_utils"),
        module("mmengine.utils.dl_utils.parrots_wrapper", _BatchNorm=nn.modules.batchnorm._BatchNorm),
        module("mmengine.fileio", load=not_in_stand_in),
        module("mmseg", ""), module("mmseg.registry", MODELS=SimpleNamespace(register_module=lambda: lambda c: c)),
        module("mmseg.utils", ConfigType=dict, SampleList=list),
        module("mmseg.structures", build_pixel_sampler=not_in_stand_in),
        module("mmseg.models", "models"), module("mmseg.models.builder", build_loss=build_loss),
        module("mmseg.models.backbones", "models/backbones"), module("mmseg.models.decode_heads", "models/decode_heads"),
        module("mmseg.models.losses", "models/losses"), module("mmseg.models.utils", "models/utils")]
    before = dict(sys.modules)
    sys.modules.update({m.__name__: m for m in stand_ins})
    try:
        package = {m.__name__: m for m in stand_ins}
        for name, attribute in (("utils.res_layer", "ResLayer"), ("utils.encoding", "Encoding"),
                                ("utils.wrappers", "resize"), ("losses.accuracy", "accuracy")):
            setattr(package[f"mmseg.models.{name.split('.')[0]}"], attribute,
                    getattr(importlib.import_module(f"mmseg.models.{name}"), attribute))
        losses["CrossEntropyLoss"] = importlib.import_module("mmseg.models.losses.cross_entropy_loss").CrossEntropyLoss
        return SimpleNamespace(
            ResNetV1c=importlib.import_module("mmseg.models.backbones.resnet").ResNetV1c,
            EncHead=importlib.import_module("mmseg.models.decode_heads.enc_head").EncHead,
            FCNHead=importlib.import_module("mmseg.models.decode_heads.fcn_head").FCNHead)
    finally:
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update(before)


class MmsegEncNet(nn.Module):
    """mmsegmentation 1.2.2's EncNet-R50-d8 (configs/_base_/models/encnet_r50-d8.py, 150 classes as in its ADE20K
    configs) built from its own classes: ResNetV1c, EncHead (its materialised Encoding layer), FCNHead auxiliary
    head, its CrossEntropyLoss losses. width/head_width scale it down for CPU tests (64/512: the config).

    loss(images, samples) is EncoderDecoder.loss followed by BaseModel.parse_losses → (loss, log_vars);
    forward(images) is its whole-image inference (test_cfg mode='whole'): logits at the input's size."""

    def __init__(self, mm, num_classes=150, width=64, head_width=512):
        super().__init__()
        norm = dict(type="SyncBN", requires_grad=True)
        channels = [width * 4 << i for i in range(4)]  # 256, 512, 1024, 2048
        ce = dict(type="CrossEntropyLoss", use_sigmoid=False)
        with warnings.catch_warnings():  # CrossEntropyLoss warns about its avg_non_ignore=False default
            warnings.simplefilter("ignore", UserWarning)
            self.backbone = mm.ResNetV1c(depth=50, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                                         strides=(1, 2, 1, 1), norm_cfg=norm, norm_eval=False, style="pytorch",
                                         contract_dilation=True, stem_channels=width, base_channels=width)
            self.decode_head = mm.EncHead(
                in_channels=channels[1:], in_index=(1, 2, 3), channels=head_width, num_codes=32, use_se_loss=True,
                add_lateral=False, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm, align_corners=False,
                loss_decode=dict(ce, loss_weight=1.0),
                loss_se_decode=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.2))
            self.auxiliary_head = mm.FCNHead(
                in_channels=channels[2], in_index=2, channels=channels[2] // 4, num_convs=1, concat_input=False,
                dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm, align_corners=False,
                loss_decode=dict(ce, loss_weight=0.4))

    def loss(self, images, samples):
        """images B×3×H×W normalised; samples: one object per image with .gt_sem_seg.data 1×H×W (255 = ignore)."""
        features = self.backbone(images)
        losses = {f"decode.{k}": v for k, v in self.decode_head.loss(features, samples, {}).items()}
        losses.update({f"aux.{k}": v for k, v in self.auxiliary_head.loss(features, samples, {}).items()})
        log_vars = {k: v.mean() for k, v in losses.items()}
        loss = sum(v for k, v in log_vars.items() if "loss" in k)
        return loss, {"loss": loss, **log_vars}

    def forward(self, images):
        logits = self.decode_head.forward(self.backbone(images))[0]
        return F.interpolate(logits, images.shape[2:], mode="bilinear", align_corners=False)


def mmseg_step(model, optimizer, images, samples, lr, scaler=None):
    """One iteration of mmengine's loop (IterBasedTrainLoop) for this model: PolyLR sets the lr; BaseModel.train_step
    runs the forward and loss in OptimWrapper.optim_context (AmpOptimWrapper: fp16 autocast), then update_params:
    backward, step, zero_grad (AmpOptimWrapper: GradScaler's scale(loss).backward, step, update); then
    RuntimeInfoHook.after_train_iter hands every log variable to the MessageHub, which reads it with .item()."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(images.device.type, torch.float16, enabled=scaler is not None):
        loss, log_vars = model.loss(images, samples)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad()
    return {k: v.item() for k, v in log_vars.items()}


# Profile categories, matched in this order against an op's name and then its callers' (lower case, no
# underscores): the first match from the op upwards decides, so a matmul inside the Encoding layer counts there.
PROFILE_CATEGORIES = (
    ("Encoding layer (fwd + bwd)", ("encodingfunction",)),
    ("optimizer and gradient norm", ("optimizer.", "foreachnorm")),
    ("logits at full resolution: ×8 upsampling and the losses", ("upsamplebilinear", "logsoftmax", "nllloss",
                                                                 "crossentropy", "binarycrossentropy")),
    ("convolutions", ("conv",)),
    ("BatchNorm and ReLU", ("batchnorm", "relu", "threshold")))


def profile_table(step, device, top=15):
    """One call of step() under torch.profiler → {'categories': {name: {'ms', 'pct'}}, 'top_ops': [[op, ms, pct]]},
    by device time on a GPU (the kernels each op launched itself), by CPU time on a CPU."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    own = {id(e): e.self_device_time_total if cuda else e.self_cpu_time_total for e in events}
    total = sum(own.values()) or 1
    categories = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    categories["other (residual adds, the gate, casts, copies, …)"] = 0.0
    for e in events:
        caller, found = e, None
        while caller is not None and found is None:
            key = caller.name.lower().replace("_", "")
            found = next((name for name, patterns in PROFILE_CATEGORIES if any(p in key for p in patterns)), None)
            caller = caller.cpu_parent
        categories[found or "other (residual adds, the gate, casts, copies, …)"] += own[id(e)]
    by_op = {}
    for e in events:
        by_op[e.name] = by_op.get(e.name, 0.0) + own[id(e)]
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"time": "device time of the kernels each op launched" if cuda else "CPU time of each op itself",
            "total_ms": total / 1e3,
            "categories": {k: {"ms": v / 1e3, "pct": 100 * v / total} for k, v in categories.items()},
            "top_ops": [[name, t / 1e3, 100 * t / total] for name, t in ops]}


def bench_gpu_vs_mmseg(quick, device=None, cache=CACHE):
    """EncNet-ResNet50v1c training side by side with mmsegmentation 1.2.2's own EncNet, on one GPU, in two settings:
    mmsegmentation's ADE20K config (crop 512, 4 images per GPU) and the paper's (crop 480, 16 images).

    Ours: zoo.RECIPES['mmseg_encnet_r50-d8_ade20k_80k'] (aux head, residual gate, Dropout2d, no stage-3 module)
    trained by train_seg.train_step, the loop's iteration (seed, poly lr, step, numbers kept on the device and read
    every run.SYNC_EVERY steps), in fp32 / bf16 autocast / + channels_last / + torch.compile, and bf16 +
    channels_last with the fused SGD. mmsegmentation: its classes from its wheel (mmseg_files, load_mmseg) stepped as
    mmengine does (mmseg_step), in fp32 and with its AMP (fp16 autocast, GradScaler). Both start from the same
    weights (mmsegmentation's, converted by zoo.convert), whose eval-mode logits must agree, and see the same batch;
    cudnn.benchmark is on, as mmsegmentation's runtime sets it.

    Per variant: images/s (steps in blocks of SYNC_EVERY, the variants in turns), peak memory of its own step
    (max_memory_allocated above what the others hold at rest), TFLOP/s and MFU of the model's FLOPs (ours, counted
    in fp32: the same convolutions for both), and ratios ours/mmsegmentation; one profiled step of ours (bf16 +
    channels_last). `device`: the tests run it on a CPU at --quick sizes (no compile, no memory statistics)."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else None)
    if device is None:
        return {"status": "not measured: no GPU on this machine"}
    cuda, name, peak = device_peak(device)
    width, head_width = (16, 32) if quick else (64, 512)
    # --quick: one setting (the other runs the same code at other sizes)
    settings = {"mmseg_setting": (48, 2, "mmsegmentation's ADE20K config, crop 512, 4 images per GPU")} if quick else \
        {"mmseg_setting": (512, 4, "mmsegmentation's ADE20K config, crop 512, 4 images per GPU"),
         "paper_setting": (480, 16, "the paper's, crop 480, 16 images")}
    block, repeat = (1, 1) if quick else (run.SYNC_EVERY, 3)
    result = {"device": name, "model": f"EncNet ResNet50v1c width {width}, head {head_width}, 150 classes"}
    folder, skipped = mmseg_files(cache)
    if skipped:
        result["mmsegmentation"] = skipped
        print(f"gpu_vs_mmseg: mmsegmentation {skipped}", flush=True)
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        for setting, (size, batch, what) in settings.items():
            result[setting] = side_by_side(device, size, batch, width, head_width, folder, block, repeat, peak,
                                           quick)
            result[setting]["setting"] = f"{what}: here {size}x{size}, batch {batch}"
    finally:
        torch.backends.cudnn.benchmark = benchmark
    return result


def side_by_side(device, size, batch, width, head_width, mmseg_folder, block, repeat, peak, quick):
    """One setting of bench_gpu_vs_mmseg → {variant: {images_per_s, peak_GiB, TFLOP_per_s, MFU_pct}, ratios, profile}."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 150, (batch, size, size), device=device)
    labels[:, : size // 8] = -1  # some ignored pixels, as crops padded beyond the image have
    samples = [SimpleNamespace(gt_sem_seg=SimpleNamespace(data=torch.where(label < 0, 255, label)[None]))
               for label in labels]
    mm = load_mmseg(mmseg_folder) if mmseg_folder else None
    weights = None
    if mm is not None:
        torch.manual_seed(0)
        weights = MmsegEncNet(mm, 150, width, head_width).state_dict()
    out, steps = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--recipe", "mmseg_encnet_r50-d8_ade20k_80k", "--data-root", tmp, "--out", os.path.join(tmp, "out"),
                "--width", str(width), "--head-width", str(head_width), "--batch-size", str(batch)]
        args = train_seg.get_args(argv)
    args.num_classes = 150
    variants = [("ours_fp32", False, False, False, False), ("ours_bf16", True, False, False, False),
                ("ours_bf16+channels_last", True, True, False, False),
                ("ours_bf16+channels_last+fused_sgd", True, True, False, True),
                ("ours_bf16+channels_last+compile", True, True, True, False)]
    if quick and not cuda:  # the CPU test: one variant of each kind is enough to run every code path
        variants = [v for v in variants if v[0] in ("ours_fp32", "ours_bf16+channels_last")]
    if mm is not None:
        variants += [("mmseg_fp32", False, False, False, False), ("mmseg_amp_fp16", True, False, False, False)]
    profiled = None
    for label, amp, channels_last, compiled, fused in variants:
        if compiled and not cuda:
            continue  # inductor builds C++ for minutes on a CPU
        at_rest = torch.cuda.memory_allocated(device) if cuda else 0
        torch.manual_seed(0)
        if label.startswith("mmseg"):
            model = MmsegEncNet(mm, 150, width, head_width).to(device).train()
            model.load_state_dict(weights)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            scaler = torch.amp.GradScaler(device.type) if amp else None

            def run_block(model=model, optimizer=optimizer, scaler=scaler):
                for it in range(block):
                    mmseg_step(model, optimizer, images, samples, 0.01, scaler)
                sync()
        else:
            step_args = SimpleNamespace(**{**vars(args), "amp": amp, "channels_last": channels_last,
                                           "compile": compiled})
            model = encnet.model_from_args(vars(step_args))
            if weights is not None:
                zoo.load_strict(model, zoo.convert(weights, zoo.MMSEG_KEYS), "mmsegmentation's EncNet")
            model, net = run.distribute(model.train(), 1, device, channels_last, compiled)
            optimizer = train_seg.build_optimizer(model, step_args)
            if fused:  # the same groups and hyperparameters, the fused kernel
                groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in optimizer.param_groups]
                optimizer = torch.optim.SGD(groups, lr=step_args.lr, fused=True)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            ours_images = images.contiguous(memory_format=fmt)

            def run_block(net=net, optimizer=optimizer, step_args=step_args, ours_images=ours_images):
                stats = run.StepStats(world=1)
                for it in range(block):
                    run.seed_step(0, it, 0)
                    lr = train_seg.poly_lr(optimizer, step_args.lr, it, 80000, step_args.min_lr)
                    loss, terms, grad_norm = train_seg.train_step(net, optimizer, ours_images, labels, step_args)
                    stats.add(it, loss=loss, **terms, grad_norm=grad_norm, lr=lr)
                stats.sync()
                sync()
            if label == "ours_bf16+channels_last":
                profiled = (net, optimizer, step_args, ours_images)
        for _ in range(2 if compiled else 1):  # warm-up: cudnn.benchmark's search, compilation
            run_block()
        entry = out[label] = {}
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            run_block()
            entry["peak_GiB"] = (torch.cuda.max_memory_allocated(device) - at_rest) / 2**30
        steps[label] = run_block

    # the model's FLOPs per step, counted once in fp32 eager (the same convolutions in every variant and in both
    # codes; mmsegmentation's materialised Encoding adds elementwise work that is not counted)
    step_args = SimpleNamespace(**{**vars(args), "amp": False})
    model = encnet.model_from_args(vars(step_args)).to(device).train()
    with FlopCounterMode(display=False) as counter:
        train_seg.train_step(model, train_seg.build_optimizer(model, step_args), images, labels, step_args)
    flops = counter.get_total_flops()
    out["GFLOP_per_step"] = flops / 1e9
    del model

    seconds = timeit_alternating(steps, repeat, warmup=0)
    for label, t in seconds.items():
        entry = out[label]
        entry["images_per_s"] = block * batch / t
        entry["TFLOP_per_s"] = block * flops / t / 1e12
        if "bf16" in label or "fp16" in label:
            entry["MFU_pct"] = 100 * entry["TFLOP_per_s"] / peak if peak else "no peak on record for this device"

    if weights is not None:  # the same function: eval-mode logits of both from the same weights
        mine = encnet.model_from_args(vars(args))
        zoo.load_strict(mine, zoo.convert(weights, zoo.MMSEG_KEYS), "mmsegmentation's EncNet")
        theirs = MmsegEncNet(mm, 150, width, head_width)
        theirs.load_state_dict(weights)
        with torch.no_grad():
            a, b = mine.to(device).eval()(images[:1]), theirs.to(device).eval()(images[:1])
        out["same_function_max_logit_difference_rel"] = ((a - b).abs().max() / b.abs().max()).item()
        best = max((k for k in seconds if k.startswith("ours")), key=lambda k: out[k]["images_per_s"])
        out["ours_best"] = best
        for ours, theirs_label in ((best, "mmseg_amp_fp16"), ("ours_bf16+channels_last", "mmseg_amp_fp16"),
                                   ("ours_fp32", "mmseg_fp32")):
            key = f"{ours.removeprefix('ours_')}_vs_{theirs_label}"
            out[f"speed_{key}"] = out[ours]["images_per_s"] / out[theirs_label]["images_per_s"]
            if cuda:
                out[f"memory_{key}"] = out[ours]["peak_GiB"] / out[theirs_label]["peak_GiB"]

    net, optimizer, step_args, ours_images = profiled

    def one_step():
        train_seg.train_step(net, optimizer, ours_images, labels, step_args)
        sync()
    out["profile_ours_bf16+channels_last"] = profile_table(one_step, device)
    return out


# ----------------------------------------------------------------------------- COCO polygon masks

def coco_polygons(rng, count, height, width):
    """Object outlines as COCO stores them: star-shaped polygons of 10–100 vertices, 10–200 px across,
    coordinates with 2 decimals, some crossing the image border."""
    polygons = []
    for _ in range(count):
        k = int(rng.integers(10, 101))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = rng.uniform(5, 100) * rng.uniform(0.6, 1, k)
        points = rng.uniform(0, 1, 2) * (width, height) + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
        polygons.append(points.round(2).ravel().tolist())
    return polygons


def bench_coco(quick):
    """COCO polygon → H×W mask on 640×480 images: data.segmentation_mask (NumPy) vs pycocotools (C) as
    annToMask does it (frPyObjects, merge, decode), one polygon per mask, the masks compared."""
    if coco_mask is None:
        return {"status": "not measured: pycocotools is not installed"}
    height, width = 480, 640
    count, repeat = (20, 3) if quick else (300, 9)
    polygons = coco_polygons(np.random.default_rng(0), count, height, width)

    def ours():
        return [data.segmentation_mask([polygon], height, width) for polygon in polygons]

    def theirs():
        with warnings.catch_warnings():  # pycocotools' decode under NumPy 2: a DeprecationWarning per call
            warnings.simplefilter("ignore", DeprecationWarning)
            return [coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([polygon], height, width)))
                    for polygon in polygons]

    seconds = timeit_alternating({"ours": ours, "pycocotools": theirs}, repeat)
    identical = sum(np.array_equal(a, b.astype(bool)) for a, b in zip(ours(), theirs()))
    return {"ours_masks_per_s": count / seconds["ours"], "pycocotools_masks_per_s": count / seconds["pycocotools"],
            "ours_time_vs_pycocotools": seconds["ours"] / seconds["pycocotools"],
            "identical_masks": f"{identical}/{count}"}


def todays_eval_predict(model, image, crop_size, base_size, scales=(1.0,), flip=False):
    """eval.predict as it was before the protocols, kept as the baseline of bench_eval: one forward per
    window and per mirror image, contiguous memory format. image 1×3×H×W normalised → 1×K×H×W probabilities."""
    def windows_logits(image):
        _, _, h, w = image.shape
        if h <= crop_size and w <= crop_size:
            logits = model(image).float()
            return (logits + model(image.flip(-1)).float().flip(-1)) / 2 if flip else logits
        ph, pw = max(h, crop_size), max(w, crop_size)
        padded = torch.nn.functional.pad(image, (0, pw - w, 0, ph - h))
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
                    total, count = logits.new_zeros(1, logits.shape[1], ph, pw), logits.new_zeros(1, 1, ph, pw)
                total[:, :, y:y + crop_size, x:x + crop_size] += logits
                count[:, :, y:y + crop_size, x:x + crop_size] += 1
        return (total / count)[:, :, :h, :w]

    _, _, h, w = image.shape
    probs = 0
    with torch.no_grad():
        for scale in scales:
            long_side = int(base_size * scale + 0.5)
            size = (long_side, int(w * long_side / h + 0.5)) if h >= w else (int(h * long_side / w + 0.5), long_side)
            resized = torch.nn.functional.interpolate(image, size, mode="bilinear", align_corners=False)
            logits = torch.nn.functional.interpolate(windows_logits(resized), (h, w), mode="bilinear",
                                                     align_corners=False)
            probs = probs + logits.softmax(1) / len(scales)
    return probs


def bench_eval(quick, device=None):
    """eval.py's protocol 'repo' on one 512×512 image with EncNet-ResNet50 (150 classes, crop 480, base 520):
    images/s single- and multi-scale (6 scales + flips), the baseline (todays_eval_predict) vs eval.predict
    (its defaults: on a GPU windows and mirror images 8 per batch), their largest probability difference,
    and on a GPU bf16 autocast (speed, share of pixels whose class agrees with float32). Then the class map
    of a score map at the built-in data's and ADE20K's shape: argmax(1) against eval.predicted_classes."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    backbone, kwargs, size, crop, base = ("resnet18", dict(width=8, head_width=16), 64, 48, 52) if quick else \
        ("resnet50", {}, 512, 480, 520)
    model = encnet.EncNet(150, backbone, **kwargs).eval().to(device)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, size, size), np.uint8))
    image = data.normalize(pixels.to(device))

    def synced(fn):
        def run():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        return run

    on_cpu_full = device.type == "cpu" and not quick  # a multi-scale image takes minutes on 2 cores
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "image": f"{size}x{size}, crop {crop}, base {base}, {backbone}"}
    for label, scales, flip in (("single_scale", (1.0,), False), ("multi_scale", seg_eval.MULTI_SCALES, True)):
        today = synced(lambda: todays_eval_predict(model, image, crop, base, scales, flip))
        new = synced(lambda: seg_eval.predict(model, image, crop, base, scales, flip))
        repeat, warmup = (1, 0) if quick or (on_cpu_full and flip) else (3, 1) if on_cpu_full else (5, 2)
        times = timeit_alternating({"today": today, "new": new}, repeat, warmup)
        result[f"{label}_today_images_per_s"] = 1 / times["today"]
        result[f"{label}_new_images_per_s"] = 1 / times["new"]
        result[f"{label}_speedup"] = times["today"] / times["new"]
        result[f"{label}_max_prob_difference"] = (today() - new()).abs().max().item()
        if device.type == "cuda":  # the difference above includes TF32's rounding (cuDNN's default)
            tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
            result[f"{label}_max_prob_difference_without_tf32"] = (today() - new()).abs().max().item()
            torch.backends.cudnn.allow_tf32 = tf32
            bf16 = synced(lambda: seg_eval.predict(model, image, crop, base, scales, flip, amp=True))
            times = timeit_alternating({"fp32": new, "bf16": bf16}, repeat, warmup)
            result[f"{label}_bf16_speedup_over_new_fp32"] = times["fp32"] / times["bf16"]
            agree = (bf16().argmax(1) == new().argmax(1)).double().mean().item()
            result[f"{label}_bf16_pixels_agreeing_pct"] = 100 * agree

    # the class map of the scores: argmax(1) against eval.predicted_classes (max(1).indices, the same indices)
    context = (1, len(data.CONTEXT_CLASSES), data.CONTEXT_HEIGHT, data.CONTEXT_WIDTH)
    shapes = {"context": context} if quick else {"context": context, "ade20k": (1, 150, 512, 683)}
    for label, shape in shapes.items():
        scores = torch.rand(shape, device=device)
        times = timeit_alternating({"argmax": synced(lambda: scores.argmax(1)),
                                    "max_indices": synced(lambda: seg_eval.predicted_classes(scores))},
                                   3 if quick else 10)
        result[f"class_map_{label}_argmax_ms"] = 1e3 * times["argmax"]
        result[f"class_map_{label}_max_indices_ms"] = 1e3 * times["max_indices"]
        result[f"class_map_{label}_speedup"] = times["argmax"] / times["max_indices"]
    return result


PHOTO_PROBE = """
import resource, sys, time, eval
start = time.time()
eval.main(sys.argv[1:])
print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "SECONDS", time.time() - start)
"""


def bench_photo(quick):
    """eval.py --images on a phone photo (4000×3000) with EncNet-ResNet50 of 150 classes, as a user runs it
    (one process, CPU): peak resident memory and time, against the same command on a photo that is already
    at the model's scale (520×390), whose peak is the model's own. Each in a fresh process (ru_maxrss)."""
    backbone, kwargs, big, small = ("resnet18", dict(width=8, head_width=16), (400, 300), (52, 39)) if quick else \
        ("resnet50", {}, (4000, 3000), (520, 390))
    base = small[0]
    result = {"setting": f"EncNet-{backbone}, 150 classes, base size {base}, protocol repo, float32"}
    ade = data.dataset_info("ade20k")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = encnet.EncNet(150, backbone, **kwargs)
        args = dict(data="ade20k", model="encnet", backbone=backbone, num_classes=150, crop_size=base,
                    base_size=base, **kwargs)
        torch.save({"model": model.state_dict(), "optimizer": {}, "iter": 0, "epoch": 0, "args": args,
                    "classes": ade["classes"], "palette": ade["palette"]}, os.path.join(tmp, "model.pth"))
        rng = np.random.default_rng(0)
        for label, (w, h) in (("model_scale", small), ("photo", big)):
            smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize((w, h), Image.BICUBIC)
            smooth.save(os.path.join(tmp, f"{label}.jpg"), quality=90)
            done = subprocess.run([sys.executable, "-c", PHOTO_PROBE, "--checkpoint", os.path.join(tmp, "model.pth"),
                                   "--images", os.path.join(tmp, f"{label}.jpg"), "--out",
                                   os.path.join(tmp, f"out_{label}")], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__)))
            if done.returncode != 0:
                raise RuntimeError(f"bench_photo: eval.py failed:\n{done.stderr[-2000:]}")
            words = done.stdout.split()
            peak_kib, seconds = int(words[words.index("PEAK_KIB") + 1]), float(words[words.index("SECONDS") + 1])
            result[f"{label}_{w}x{h}_peak_GiB"] = peak_kib / 2**20
            result[f"{label}_{w}x{h}_seconds"] = seconds
    result["photo_peak_above_the_models_own_GiB"] = (result[f"photo_{big[0]}x{big[1]}_peak_GiB"]
                                                     - result[f"model_scale_{small[0]}x{small[1]}_peak_GiB"])
    return result


def bench_cpu_bf16(quick, checkpoint="runs/seg/checkpoint.pth"):
    """eval.py on the built-in validation split with the quick start's model (`python train_seg.py` writes
    runs/seg/checkpoint.pth): float32 against bf16 autocast + channels_last (what --amp does on a CPU with
    native bf16) — seconds, pixAcc/mIoU, share of pixels with the same class. On a CPU without AVX512-BF16/AMX
    bf16 is emulated: the accuracy figures hold, the time does not (cpu_native_bf16 says which)."""
    if quick:  # a random tiny model on a few images: checks that the section runs
        torch.manual_seed(0)
        model, indices = encnet.EncNet(len(data.CONTEXT_CLASSES), "resnet18", width=8, head_width=16), range(8)
    elif not os.path.exists(checkpoint):
        return {"status": f"not measured: no {checkpoint} (run `python train_seg.py` first)"}
    else:
        model, indices = zoo.load_model(checkpoint)[0], None
    dataset = data.get_dataset("context", None, "val", data.CONTEXT_WIDTH, data.CONTEXT_WIDTH, mode="val")
    indices = list(indices or range(len(dataset)))
    result = {"cpu_native_bf16": run.cpu_has_fast_bf16(), "images": len(indices)}
    predictions = {}
    for label, amp in (("fp32", False), ("bf16", True)):
        model.eval().to(memory_format=torch.channels_last if amp else torch.contiguous_format)
        predictor = seg_eval.make_predictor("repo", data.CONTEXT_WIDTH, data.CONTEXT_WIDTH, "context", amp=amp)
        start = time.perf_counter()
        metric = seg_eval.evaluate(model, dataset, indices, torch.device("cpu"), predictor)
        result[f"{label}_seconds"] = time.perf_counter() - start
        result[f"{label}_pixAcc_pct"], result[f"{label}_mIoU_pct"] = (100 * v for v in metric.pixacc_miou())
        with torch.no_grad():
            predictions[label] = torch.stack([seg_eval.class_map(predictor(model, data.normalize(dataset[i][0][None])),
                                                                 dataset[i][1].shape) for i in indices])
    result["bf16_speedup"] = result["fp32_seconds"] / result["bf16_seconds"]
    result["pixels_same_class_pct"] = 100 * (predictions["fp32"] == predictions["bf16"]).double().mean().item()
    return result


def bench_export(quick):
    """The exported ONNX file in onnxruntime (CPU) against eager PyTorch, EncNet-ResNet50 150 classes at 512×512,
    batch 1, float32, timed in turns; and their largest logit difference relative to the logits' scale."""
    if onnxruntime is None:
        return {"status": "not measured: onnxruntime is not installed (pip install onnx onnxscript onnxruntime)"}
    backbone, kwargs, size = ("resnet18", dict(width=8, head_width=16), 64) if quick else ("resnet50", {}, 512)
    torch.manual_seed(0)
    model = encnet.EncNet(150, backbone, **kwargs).eval()
    info = dict(classes=[str(i) for i in range(150)], palette=[[i, i, i] for i in range(150)], dataset="ade20k",
                source="bench", crop_size=size, base_size=size)
    images = torch.randn(1, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        start = time.perf_counter()
        zoo.export(model, info, path)
        export_seconds = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores as eager
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy()}

        def eager():
            with torch.no_grad():
                return model(images)
        times = timeit_alternating({"eager": eager, "onnxruntime": lambda: session.run(None, feed)},
                                   *((1, 0) if quick else (5, 1)))
        theirs, ours = torch.from_numpy(session.run(None, feed)[0]), eager()
    return {"setting": f"EncNet-{backbone}, 150 classes, {size}x{size}, batch 1, float32, "
                       f"{torch.get_num_threads()} threads", "export_seconds": export_seconds,
            "eager_ms": 1e3 * times["eager"], "onnxruntime_ms": 1e3 * times["onnxruntime"],
            "onnxruntime_speedup": times["eager"] / times["onnxruntime"],
            "max_logit_difference_rel": ((theirs - ours).abs().max() / ours.abs().max()).item()}


SECTIONS = {"encoding": bench_encoding, "models": bench_models, "data": bench_data, "syncbn": bench_syncbn,
            "train": bench_train, "cifar": bench_cifar, "coco": bench_coco, "gpu": bench_gpu,
            "gpu_vs_mmseg": bench_gpu_vs_mmseg, "eval": bench_eval, "photo": bench_photo,
            "cpu_bf16": bench_cpu_bf16, "export": bench_export}


def cpu_model():
    """The processor's name ('model name' of /proc/cpuinfo on Linux): every figure is stated with it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def print_results(results, indent=2):
    """A section's results, one line per number; nested tables (a setting, a profile) indented under their name."""
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"{' ' * indent}{key}")
            print_results(value, indent + 2)
        else:
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"{' ' * indent}{key:<{42 - indent}} {text}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that every section runs")
    p.add_argument("--json", help="where to write the results (default bench_results.json; with --quick, whose "
                                  "numbers mean nothing, no file unless named; with --only, the other sections "
                                  "already in the file are kept)")
    args = p.parse_args(argv)
    if args.json is None and not args.quick:
        args.json = "bench_results.json"
    machine = {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    results = {}
    if args.only and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    results["machine"] = machine
    for name in args.only or SECTIONS:
        start = time.time()
        results[name] = SECTIONS[name](args.quick)
        print(f"\n## {name} ({time.time() - start:.0f} s)")
        print_results(results[name])
    if args.json:  # written whole, then renamed: an interrupted bench leaves the previous file intact
        with open(f"{args.json}.partial", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(f"{args.json}.partial", args.json)
        print(f"\n→ {args.json}")
    return results


if __name__ == "__main__":
    main()
