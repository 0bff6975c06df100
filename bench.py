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
    coco          COCO polygon → mask, masks/s of coco_masks.py's NumPy rasteriser vs pycocotools' C (same masks)
    resize        OpenCV's bilinear in NumPy (cv_resize, mmsegmentation's protocol and recipes) vs F.interpolate + round
    eval          eval.py's evaluation images/s, single- and multi-scale: windows batched (on a GPU) vs the
                  former one-window-at-a-time path (same probabilities up to rounding), bf16 on a GPU
    photo         eval.py --images on a 4000×3000 photo: peak memory and time against a photo at model scale
    cpu_bf16      evaluation of the built-in data in float32 vs bf16 autocast + channels_last: time, mIoU
    export        the exported ONNX file in onnxruntime vs eager PyTorch on the CPU
    memory        one training step's peak memory (fresh processes, peak RSS above baseline) beside mmsegmentation
                  1.2.2's own EncNet at 512² and the paper's 480², batch 2, and our step's time with and without
                  its savings (bench_memory.py)
    gpu           on a GPU, when one is present: EncNet-ResNet50 training step in fp32 / bf16 / +channels_last /
                  +compile (images/s, memory, MFU), Encoding layer eager vs compiled
    gpu_vs_mmseg  on a GPU: training side by side with mmsegmentation 1.2.2's own EncNet (from its wheel)

Writes the table to stdout and to --json (default bench_results.json). --quick shrinks every
section to seconds (used by the tests to keep this file working; its numbers are not written unless --json
names a file).
"""

import argparse
import inspect
import json
import os
import socket
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import context_data
import encnet
import layers
import run
import syncbn
import train_seg
import zoo
from bench_inference import bench_coco, bench_cpu_bf16, bench_data, bench_eval, bench_export, bench_photo, bench_resize
from bench_memory import bench_memory
from measure import cpu_model, device_peak, peak_bytes, profile_table, timeit, timeit_alternating
from mmseg_peer import CACHE, MmsegEncNet, load_mmseg, mmseg_files, mmseg_step


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


def bench_train(quick, device="cpu"):
    """Training step of `python train_seg.py [--model fcn]` (its defaults) on random data."""
    result = {}
    for name in ("fcn", "encnet"):
        # the defaults of `python train_seg.py`; --out only to a folder that cannot hold a run (the real
        # runs/seg may: get_args refuses a folder with a run in it)
        with tempfile.TemporaryDirectory() as tmp:
            args = train_seg.get_args(["--model", name, "--out", os.path.join(tmp, "run")])
        args.num_classes = len(context_data.CONTEXT_CLASSES)
        batch = 4 if quick else args.batch_size
        torch.manual_seed(0)
        model = encnet.model_from_args(vars(args)).to(device).train()
        optimizer = train_seg.build_optimizer(model, args)
        images = torch.randn(batch, 3, context_data.CONTEXT_HEIGHT, context_data.CONTEXT_WIDTH, device=device)
        labels = torch.randint(0, args.num_classes, (batch, context_data.CONTEXT_HEIGHT, context_data.CONTEXT_WIDTH), device=device)

        def step():  # the loop's own step: loss divisors, autocast (off by default), the gradient norm
            return train_seg.train_step(model, optimizer, images, labels, args)
        result[f"{name}_images_per_s"] = batch / timeit(step, *((1, 0) if quick else (20, 2)))
        result["setting"] = (f"{args.backbone} width {args.width}, {context_data.CONTEXT_HEIGHT}x{context_data.CONTEXT_WIDTH}, "
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


def bench_gpu_vs_mmseg(quick, device=None, cache=CACHE):
    """EncNet-ResNet50v1c training side by side with mmsegmentation 1.2.2's own EncNet, on one GPU, in two settings:
    mmsegmentation's ADE20K config (crop 512, 4 images per GPU) and the paper's (crop 480, 16 images).

    Ours: recipes.RECIPES['mmseg_encnet_r50-d8_ade20k_80k'] (aux head, residual gate, Dropout2d, no stage-3 module)
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
                    run.seed_step(0, it, net, 0, len(labels))
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


SECTIONS = {"encoding": bench_encoding, "models": bench_models, "data": bench_data, "syncbn": bench_syncbn,
            "train": bench_train, "cifar": bench_cifar, "coco": bench_coco, "resize": bench_resize, "gpu": bench_gpu,
            "gpu_vs_mmseg": bench_gpu_vs_mmseg, "eval": bench_eval, "photo": bench_photo,
            "cpu_bf16": bench_cpu_bf16, "export": bench_export, "memory": bench_memory}


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
    p.add_argument("--device", help="the device of the sections that take one (gpu, gpu_vs_mmseg, eval), e.g. cpu "
                                    "to run the GPU sections' code there (default: a GPU where there is one)")
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
        takes_device = args.device and "device" in inspect.signature(SECTIONS[name]).parameters
        results[name] = SECTIONS[name](args.quick, **({"device": torch.device(args.device)} if takes_device else {}))
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
