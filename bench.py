"""Benchmarks behind the README's performance table: `python bench.py` (about 18 minutes on 2 CPU cores).

Every claim is a ratio against its alternative measured in the same run, so it holds on a noisy
machine. Sections (--only NAME runs one):

    encoding   Encoding layer fwd+bwd vs the materialised formula (time, peak memory) and vs the six
               matrix products it cannot avoid; plain autograd and torch.compile of the same algebra
    models     EncNet vs FCN, ResNet-50 at 480×480: FLOPs, parameters, fwd+bwd time
    data       training augmentation items/s per core: one affine warp vs the sequential Pillow pipeline
    syncbn     SyncBatchNorm in 2 gloo processes vs local BatchNorm; collectives per step
    train      training images/s of EncNet and FCN on the built-in data (train_seg.py defaults); the loop's
               host syncs: numbers read every step vs kept on the device and read every 10 steps
    cifar      training images/s of the four Table-6 networks, i.e. the CPU time of one epoch
    coco       COCO polygon → mask, masks/s of data.py's NumPy rasteriser vs pycocotools' C (same masks)
    eval       eval.py's evaluation images/s, single- and multi-scale: windows batched (on a GPU) vs the
               former one-window-at-a-time path (same probabilities up to rounding), bf16 on a GPU
    gpu        on a GPU, when one is present: EncNet-ResNet50 training step in fp32 / bf16 / +channels_last /
               +compile (images/s, memory, MFU), Encoding layer eager vs compiled

Writes the table to stdout and to --json (default bench_results.json). --quick shrinks every
section to seconds (used by the tests to keep this file working).
"""
import argparse
import json
import os
import platform
import socket
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image, ImageOps
from torch.utils._python_dispatch import TorchDispatchMode

import data
import encnet
import layers
import run
import syncbn


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
    from torch.utils.flop_counter import FlopCounterMode
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
    files (683×512, JPEG quality 90), one core, crop 480 / base 520, the same random draws for both."""
    crop_size, base_size = 480, 520
    num_images, epochs = (4, 1) if quick else (8, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    seconds = {"warp": 0.0, "sequential": 0.0}
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
                for name, item in (("warp", lambda i: dataset[i]),
                                   ("sequential", lambda i: sequential_item(dataset, i, crop_size, base_size))):
                    start = time.perf_counter()
                    item(index)
                    seconds[name] += time.perf_counter() - start
    torch.set_num_threads(threads)
    items = epochs * num_images
    warp = items / seconds["warp"]
    return {"warp_items_per_s_per_core": warp, "sequential_items_per_s_per_core": items / seconds["sequential"],
            "speedup": seconds["sequential"] / seconds["warp"],
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
    import train_seg
    result = {}
    for name in ("fcn", "encnet"):
        args = train_seg.get_args(["--model", name])
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


def bench_gpu(quick, device=None):
    """On one GPU: an EncNet-ResNet50 training step (crop 480, batch 16) in fp32 / bf16 autocast /
    + channels_last / + torch.compile: images/s, peak memory, TFLOP/s and MFU; and the Encoding layer
    eager vs compiled. `device` lets the tests run the same code on a CPU at --quick sizes."""
    if device is None:
        if not torch.cuda.is_available():
            return {"status": "not measured: no GPU on this machine"}
        device = torch.device("cuda")
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else str(device)
    peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)
    size, batch, backbone = (32, 2, "resnet18") if quick else (480, 16, "resnet50")
    result = {"device": name, "setting": f"EncNet {backbone}, {size}x{size}, batch {batch}, 150 classes"}

    def synchronised(fn):
        def run():
            fn()
            if cuda:
                torch.cuda.synchronize()
        return run

    from torch.utils.flop_counter import FlopCounterMode
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
    try:
        import pycocotools.mask as coco_mask
    except ImportError:
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
    import eval as seg_eval
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
    shapes = {"context": (1, 6, 64, 320)} if quick else {"context": (1, 6, 64, 320), "ade20k": (1, 150, 512, 683)}
    for label, shape in shapes.items():
        scores = torch.rand(shape, device=device)
        times = timeit_alternating({"argmax": synced(lambda: scores.argmax(1)),
                                    "max_indices": synced(lambda: seg_eval.predicted_classes(scores))},
                                   3 if quick else 10)
        result[f"class_map_{label}_argmax_ms"] = 1e3 * times["argmax"]
        result[f"class_map_{label}_max_indices_ms"] = 1e3 * times["max_indices"]
        result[f"class_map_{label}_speedup"] = times["argmax"] / times["max_indices"]
    return result


SECTIONS = {"encoding": bench_encoding, "models": bench_models, "data": bench_data, "syncbn": bench_syncbn,
            "train": bench_train, "cifar": bench_cifar, "coco": bench_coco, "gpu": bench_gpu,
            "eval": bench_eval}


def cpu_model():
    """The processor's name ('model name' of /proc/cpuinfo on Linux): every figure is stated with it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that every section runs")
    p.add_argument("--json", default="bench_results.json",
                   help="where to write the results (with --only, the other sections already there are kept)")
    args = p.parse_args(argv)
    machine = {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    results = {}
    if args.only and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    results["machine"] = machine
    for name in args.only or SECTIONS:
        start = time.time()
        results[name] = SECTIONS[name](args.quick)
        print(f"\n## {name} ({time.time() - start:.0f} s)")
        for key, value in results[name].items():
            print(f"  {key:<40} {value:.3f}" if isinstance(value, float) else f"  {key:<40} {value}")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n→ {args.json}")
    return results


if __name__ == "__main__":
    main()
