"""Tests of the whole repo, all on CPU: `python -m pytest -q test_all.py` (CI runs all of them);

`python -m pytest -q -m "not slow" test_all.py` leaves out the tests that run scripts as subprocesses.

Numerics are checked against direct formulas in float64, gradients with gradcheck, and
distributed code in real multi-process gloo groups against single-process runs.

Contents, in the order of the import graph (shared helpers and fixtures: conftest.py):
     1. layers.py: the Encoding layer, EncodingDrop, the Context Encoding Module
     2. syncbn.py: synchronized BatchNorm
     3. cv_resize.py: OpenCV's resize, bit for bit
     4. encnet.py: backbones, FCN, EncNet, seg_loss, Table 6's networks
     5. transforms.py: augmentation, photometric distortion, normalisation
     6. coco_masks.py: COCO's masks as pycocotools makes them
     7. context_data.py: the built-in data
     8. data.py, layouts.py: the datasets in their layouts, your own folder, the checks, the sampler
     9. zoo.py: checkpoints, downloads, both zoos
    10. export.py: ONNX and torch.export
    11. protocols.py: the test-time procedures
    12. metric.py: pixAcc and mIoU
    13. explain.py: what the Context Encoding Module sees
    14. run.py: checkpoints, signals, loader workers, full and read-only disks
    15. eval.py: the command line, photos, outputs
    16. train_seg.py: recipes, the step, the loop, multi-process runs, resume, one-line errors
    17. train_cifar.py: the CIFAR-10 experiment
    18. hubconf.py: torch.hub
    19. bench.py: every section runs
    20. the project: import graph, Python 3.10
"""

import ast
import colorsys
import contextlib
import copy
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import resource
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
import zipfile
from argparse import Namespace
from functools import partial
from pathlib import Path

import cv2  # opencv-python-headless, test-only: the reference of cv_resize
import numpy as np
import onnxruntime  # installed by requirements.txt's test section, as the two below: exports must run in it
import pycocotools.mask as coco_mask  # installed by .ci/run: the reference our COCO masks must equal
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck
from PIL import Image, ImageOps, JpegImagePlugin
from pycocotools import _mask as coco_mask_c  # frPoly: the polygon rasteriser alone, for any vertex count
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import coco_masks
import context_data
import cv_resize
import data
import deploy
import encnet
import errors
import eval as seg_eval  # `eval` shadows the builtin
import explain
import export
import layers
import layouts
import mmseg_peer
import protocols
import recipes
import run as run_plumbing  # `run` is this file's subprocess helper
import syncbn
import train_seg
import transforms
import zoo

from conftest import (assert_same_update, assert_same_weights, blocks, cityscapes_ids,
    coordinate_image, direct_repo_predict, fake_zoo, free_port, HERE, killed_at, main_exit, make_ade, make_cityscapes,
    make_coco, make_voc, offline, re_search, rectangle, rle_counts, rle_string, run, TESTDATA, TINY,
    tiny, tiny_checkpoint, tiny_encnet, train_seg_failure, weights, write_jpeg, write_png, zoo_file)


# ============================================================================= 1. layers.py: the Encoding layer, EncodingDrop, the Context Encoding Module


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def encoding_inputs(B=2, C=6, H=3, W=5, K=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype, requires_grad=True)
    codewords = torch.randn(K, C, generator=g, dtype=dtype, requires_grad=True)
    scale = torch.rand(K, generator=g, dtype=dtype).add(0.2).requires_grad_()
    return x, codewords, scale


def test_encoding_matches_materialised_formula_float64():
    x, codewords, scale = encoding_inputs()
    ours = layers.encode(x, codewords, scale)
    ref = layers.encode_materialised(x, codewords, scale)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, (x, codewords, scale), grad)
    g_ref = torch.autograd.grad(ref, (x, codewords, scale), grad)
    for name, a, b in zip(("x", "codewords", "scale"), g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")


def test_encoding_gradcheck():
    x, codewords, scale = encoding_inputs(B=2, C=3, H=2, W=3, K=3)
    assert torch.autograd.gradcheck(layers.encode, (x, codewords, scale))
    # B×C×N input too
    assert torch.autograd.gradcheck(layers.encode, (x.detach().flatten(2).requires_grad_(), codewords, scale))


def test_encoding_module_shapes_init_and_channels_last():
    enc = layers.Encoding(16, 8)
    assert enc.codewords.shape == (8, 16) and enc.scale.shape == (8,)
    bound = (8 * 16) ** -0.5
    assert enc.codewords.abs().max() <= bound and (enc.scale >= 0).all() and (enc.scale <= 1).all()
    x = torch.randn(3, 16, 5, 7)
    out = enc(x)
    assert out.shape == (3, 8, 16)
    torch.testing.assert_close(enc(x.to(memory_format=torch.channels_last)), out)
    torch.testing.assert_close(enc(x.flatten(2)), out)


def test_encoding_never_builds_the_residual_tensor():
    B, C, H, W, K = 2, 64, 16, 16, 32
    enc = layers.Encoding(C, K)
    x = torch.randn(B, C, H, W, requires_grad=True)
    with LargestTensor() as mode:
        enc(x).square().sum().backward()
    N = H * W
    assert mode.largest <= B * N * C, (mode.largest, B * N * K * C)  # at most the size of x itself
    # and the reference really is K times larger, so the check has teeth
    with LargestTensor() as mode_ref:
        layers.encode_materialised(x, enc.codewords, enc.scale).square().sum().backward()
    assert mode_ref.largest >= B * N * K * C


def test_encoding_nearest_codeword_gets_largest_weight():
    # With equal smoothing factors the soft assignment must peak at the nearest codeword.
    # (An implementation that squares or flips the sign of the scale picks the farthest one.)
    torch.manual_seed(0)
    codewords = torch.randn(5, 3)
    x = torch.randn(1, 3, 200)
    scale = torch.full((5,), 0.7)
    dist_sq = torch.cdist(x[0].t(), codewords).square()  # N×K
    logits = -scale * dist_sq
    assign = torch.softmax(logits, dim=1)
    # Recover the layer's assignment through its output: with a single feature, e_k = a_k (x − d_k).
    for i in range(20):
        xi = x[:, :, i:i + 1]
        e = layers.encode(xi, codewords, scale)[0]  # K×C
        a = (e / (xi[0, :, 0] - codewords)).mean(1)
        torch.testing.assert_close(a, assign[i], rtol=1e-4, atol=1e-6)
        assert a.argmax() == dist_sq[i].argmin()


def test_encoding_autocast_bf16_close_to_fp32():
    torch.manual_seed(0)
    enc = layers.Encoding(32, 8)
    # features close to the codewords: the regime where ‖x‖² − 2x·d + ‖d‖² cancels in bf16
    x = (enc.codewords.detach()[torch.randint(0, 8, (2 * 49,))] + 0.01 * torch.randn(2 * 49, 32))
    x = x.view(2, 49, 32).transpose(1, 2).reshape(2, 32, 7, 7).contiguous()
    ref = enc(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-3)
    out.float().sum().backward()
    assert torch.isfinite(enc.codewords.grad).all() and torch.isfinite(enc.scale.grad).all()


def test_encoding_drop_redraws_scale_in_training_and_uses_half_in_eval():
    torch.manual_seed(0)
    enc = layers.EncodingDrop(8, 4)
    assert "scale" not in dict(enc.named_parameters())
    x = torch.randn(2, 8, 3, 3)
    draws = []
    for _ in range(5):
        enc(x)
        draws.append(enc.scale.clone())
    assert all((d >= 0).all() and (d <= 1).all() for d in draws)
    assert len({tuple(d.tolist()) for d in draws}) == 5
    enc.eval()
    out = enc(x)
    assert (enc.scale == 0.5).all()
    torch.testing.assert_close(out, layers.encode(x, enc.codewords, torch.full((4,), 0.5)))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("num_codes", [0, 8])
def test_enc_module_output_is_gated_input(residual, num_codes):
    torch.manual_seed(0)
    module = layers.EncModule(16, num_classes=5, num_codes=num_codes, residual=residual).eval()
    x = torch.randn(2, 16, 6, 6)
    y, se_logits = module(x)
    assert y.shape == x.shape and se_logits.shape == (2, 5)
    # recompute γ from the module's parts: y = x ⊗ γ (paper) or relu(x + x ⊗ γ) (released code)
    features = module.reduce(x)
    semantics = module.encoding(features).mean(1) if num_codes else features.mean((2, 3))
    gamma = torch.sigmoid(module.attention(semantics))[:, :, None, None]
    expected = F.relu(x + x * gamma) if residual else x * gamma
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(se_logits, module.se_classifier(semantics))
    assert layers.EncModule(16, 5, se_loss=False)(x)[1] is None


def test_se_targets_ignore_pixels():
    labels = torch.tensor([[[0, 2], [2, -1]], [[-1, -1], [4, 4]]])
    expected = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1.]])
    torch.testing.assert_close(layers.se_targets(labels, 5), expected)
    torch.testing.assert_close(layers.se_targets(torch.full((1, 3, 3), 255), 3, ignore_index=255),
                               torch.zeros(1, 3))


def test_sample_dropout_draws_each_samples_mask_from_its_own_seed():
    x = torch.randn(4, 6, 5, 7)
    for channelwise in (False, True):
        drop = layers.SampleDropout(0.3, channelwise).train()
        layers.seed_samples(drop, [11, 12, 13, 14])
        whole = drop(x)
        layers.seed_samples(drop, [11, 12])  # the batch split over two processes: each sample keeps its mask
        first = drop(x[:2])
        layers.seed_samples(drop, [13, 14])
        assert torch.equal(torch.cat([first, drop(x[2:])]), whole)
        kept = whole != 0
        torch.testing.assert_close(whole[kept], x[kept] / 0.7)  # inverted dropout: kept units scaled by 1/(1 − p)
        if channelwise:  # whole channels
            assert torch.equal(kept.any((2, 3)), kept.all((2, 3)))
        layers.seed_samples(drop, [11, 99, 13, 14])
        other = drop(x)
        assert torch.equal(other[0], whole[0]) and not torch.equal(other[1], whole[1])
    big = layers.SampleDropout(0.3).train()
    layers.seed_samples(big, range(8))
    dropped = (big(torch.ones(8, 64, 32, 32)) == 0).double().mean().item()
    assert abs(dropped - 0.3) < 0.01  # 524,288 Bernoulli(0.3) draws: std 6e-4
    assert torch.equal(layers.SampleDropout(0.3).eval()(x), x)
    with pytest.raises(ValueError, match="2 seeds for a batch of 4"):
        layers.seed_samples(drop, [1, 2])
        drop(x)


# ============================================================================= 2. syncbn.py: synchronized BatchNorm


def _run_worker(rank, world_size, port, fn, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size=2, *args):
    """Run fn(rank, world_size, *args) in `world_size` gloo processes; a failing assert fails the test."""
    mp.spawn(_run_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def _count_all_reduce(counter):
    """Wrap dist.all_reduce (as syncbn calls it) to count the collectives."""
    original = dist.all_reduce

    def counting(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)
    dist.all_reduce = counting
    return original


def _syncbn_worker(rank, world_size, shapes, dtype, steps):
    sizes = [3, 5]  # unequal batches: the global count must be summed, not assumed
    torch.manual_seed(0)
    for shape in shapes:
        C = shape[0]
        bn_ref = nn.BatchNorm1d(C) if len(shape) < 3 else nn.BatchNorm2d(C)
        bn_ref = bn_ref.to(dtype)
        with torch.no_grad():
            bn_ref.weight.uniform_(0.5, 1.5)
            bn_ref.bias.uniform_(-0.5, 0.5)
        bn = syncbn.convert_sync_batchnorm(type(bn_ref)(C).to(dtype))
        bn.load_state_dict(bn_ref.state_dict())
        assert isinstance(bn, syncbn.SyncBatchNorm)
        for step in range(steps):
            g = torch.Generator().manual_seed(100 * step + len(shape))
            full = torch.randn(sum(sizes), *shape, generator=g, dtype=dtype) * 3 + 2
            grad_full = torch.randn(full.shape, generator=g, dtype=dtype)
            lo = sum(sizes[:rank])
            x = full[lo:lo + sizes[rank]].clone().requires_grad_()
            if len(shape) == 3 and step % 2:
                x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
            ref_in = full.clone().requires_grad_()
            ref_out = bn_ref(ref_in)
            ref_out.backward(grad_full)

            counter = [0]
            original = _count_all_reduce(counter)
            try:
                out = bn(x)
                assert counter[0] == 1, f"{counter[0]} collectives in forward"
                out.backward(grad_full[lo:lo + sizes[rank]])
                assert counter[0] == 2, f"{counter[0] - 1} collectives in backward"
            finally:
                dist.all_reduce = original
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                assert out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out, ref_out[lo:lo + sizes[rank]])
            torch.testing.assert_close(x.grad, ref_in.grad[lo:lo + sizes[rank]])
            for p_name in ("weight", "bias"):
                summed = getattr(bn, p_name).grad.clone()
                dist.all_reduce(summed)
                torch.testing.assert_close(summed, getattr(bn_ref, p_name).grad, msg=p_name)
            for b_name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(bn, b_name), getattr(bn_ref, b_name), msg=b_name)
            bn.zero_grad()
            bn_ref.zero_grad()

        # eval: exactly nn.BatchNorm, no collective
        bn.eval()
        bn_ref.eval()
        counter = [0]
        original = _count_all_reduce(counter)
        try:
            x = torch.randn(sizes[rank], *shape, dtype=dtype)
            torch.testing.assert_close(bn(x), bn_ref(x))
        finally:
            dist.all_reduce = original
        assert counter[0] == 0


@pytest.mark.slow
def test_syncbn_two_processes_match_batchnorm_on_concatenated_batch():
    shapes = [(4,), (4, 7), (4, 5, 6)]  # (B,C), (B,C,L), (B,C,H,W)
    run_distributed(_syncbn_worker, 2, shapes, torch.float64, 3)


def _syncbn_large_mean_worker(rank, world_size):
    sizes = [3, 5]
    g = torch.Generator().manual_seed(1)
    full64 = torch.randn(sum(sizes), 3, 8, 8, generator=g, dtype=torch.float64) + 1000.0
    ref = F.batch_norm(full64, None, None, training=True)
    lo = sum(sizes[:rank])
    x = full64[lo:lo + sizes[rank]].float()
    bn = syncbn.SyncBatchNorm(3)  # running_mean starts at 0: no help from a shift by it
    out = bn(x)
    expected = ref[lo:lo + sizes[rank]].float()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * full64.mean((0, 2, 3)), rtol=1e-6, atol=0)

    # bf16 input (as under autocast): statistics in fp32, output and input gradient in bf16
    full = torch.randn(8, 3, 5, 5, generator=g)
    projection = torch.randn(8, 3, 5, 5, generator=g)
    ref_in = full.bfloat16().float().requires_grad_()
    (F.batch_norm(ref_in, None, None, training=True) * projection).sum().backward()
    x = full[4 * rank:4 * rank + 4].bfloat16().requires_grad_()
    y = syncbn.SyncBatchNorm(3)(x)
    (y.float() * projection[4 * rank:4 * rank + 4]).sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), ref_in.grad[4 * rank:4 * rank + 4], rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_syncbn_float32_large_mean_and_bf16():
    run_distributed(_syncbn_large_mean_worker, 2)


def test_syncbn_without_process_group_is_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5)
    bn = syncbn.SyncBatchNorm(5)
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert not dist.is_initialized()


def test_convert_sync_batchnorm_keeps_weights_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_()
                m.running_mean.uniform_()
                m.running_var.uniform_(1, 2)
                m.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = syncbn.convert_sync_batchnorm(model)
    assert isinstance(converted[1], syncbn.SyncBatchNorm) and isinstance(converted[2][0], syncbn.SyncBatchNorm)
    after = converted.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k])


# ============================================================================= 3. cv_resize.py: OpenCV's resize, bit for bit


def cv_size_pairs():
    """(src_h, src_w, dst_h, dst_w): hand-picked edge cases plus seeded random ones."""
    pairs = [
        # exact 2x up / 0.5x down (0.5x in both axes is OpenCV's INTER_AREA path)
        (16, 16, 32, 32), (17, 23, 34, 46), (32, 32, 16, 16), (46, 34, 23, 17),
        (2, 2, 1, 1), (2, 6, 1, 3), (64, 48, 32, 24),
        # 2x in one axis only (stays bilinear), other integer factors
        (32, 32, 16, 32), (32, 32, 32, 16), (30, 30, 10, 10), (40, 40, 10, 10),
        (10, 10, 30, 30), (9, 9, 36, 36), (12, 7, 36, 21),
        # 1-pixel edges, to 1x1, from 1x1
        (1, 1, 1, 1), (1, 1, 5, 7), (1, 1, 1, 9), (1, 1, 9, 1),
        (1, 17, 1, 5), (1, 17, 1, 40), (17, 1, 5, 1), (17, 1, 40, 1),
        (1, 17, 4, 9), (17, 1, 9, 4), (13, 11, 1, 1), (13, 11, 1, 7), (13, 11, 7, 1),
        (1, 2, 1, 1), (2, 1, 1, 1), (1, 2, 3, 5), (5, 5, 1, 2),
        # odd sizes, non-integer ratios, near-identity
        (7, 9, 11, 13), (11, 13, 7, 9), (31, 47, 30, 48), (100, 100, 99, 101),
        (99, 101, 100, 100), (3, 5, 200, 150), (200, 150, 3, 5), (57, 91, 131, 37),
        (64, 64, 63, 65), (97, 89, 193, 177), (250, 333, 111, 222),
        # identity (copy)
        (23, 29, 23, 29),
    ]
    rng = np.random.default_rng(34)
    while len(pairs) < 120:
        sh, sw = (int(v) for v in rng.integers(1, 160, 2))
        kind = len(pairs) % 3
        if kind == 0:      # free sizes
            dh, dw = (int(v) for v in rng.integers(1, 260, 2))
        else:              # keep-ratio-like scaling, up (kind 1) or down (kind 2)
            f = rng.uniform(1.05, 3.0) if kind == 1 else rng.uniform(0.2, 0.95)
            dh, dw = max(1, int(sh * f + 0.5)), max(1, int(sw * f + 0.5))
        pairs.append((sh, sw, dh, dw))
    return pairs


CV_SIZE_PAIRS = cv_size_pairs()


def _random_image(rng, h, w, cn):
    return rng.integers(0, 256, (h, w, cn), dtype=np.uint8)


def _smooth_image(rng, h, w, cn):
    """Gradients + low-frequency waves + noise: values like a real photo's."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = (90 + 70 * yy / max(h - 1, 1) + 50 * xx / max(w - 1, 1)
            + 30 * np.sin(xx / 7.0) * np.cos(yy / 11.0))
    chans = [base + 25 * c - 20 * np.cos((xx + yy) / (9.0 + c)) for c in range(cn)]
    img = np.stack(chans, axis=-1) + rng.normal(0, 6, (h, w, cn))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _cv2_linear(img, dh, dw):
    out = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_LINEAR)
    return out.reshape(dh, dw, -1) if img.ndim == 3 else out


def _assert_same(ours, ref):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    if not np.array_equal(ours, ref):
        diff = ours.astype(np.int64) - ref.astype(np.int64)
        raise AssertionError(f"{np.count_nonzero(diff)} of {diff.size} values differ, "
                             f"max |diff| {np.abs(diff).max()}")


def test_cv_resize_cases_cover_enoughcv_size_pairs():
    assert len(CV_SIZE_PAIRS) >= 100
    assert len(set(CV_SIZE_PAIRS)) >= 100


@pytest.mark.parametrize("sh,sw,dh,dw", CV_SIZE_PAIRS)
def test_cv_resize_linear_equals_opencv(sh, sw, dh, dw):
    rng = np.random.default_rng(sh * 100003 + sw * 1009 + dh * 31 + dw)
    for cn in (3, 1):
        for make in (_random_image, _smooth_image):
            img = make(rng, sh, sw, cn)
            _assert_same(cv_resize.resize_linear(img, (dh, dw)), _cv2_linear(img, dh, dw))
    gray = _smooth_image(rng, sh, sw, 1)[:, :, 0]          # plain H x W input
    _assert_same(cv_resize.resize_linear(gray, (dh, dw)), _cv2_linear(gray, dh, dw))


@pytest.mark.parametrize("sh,sw,dh,dw", CV_SIZE_PAIRS[::3])
def test_cv_resize_linear_equals_opencv_with_4_and_2_channels(sh, sw, dh, dw):
    rng = np.random.default_rng(dh * 7919 + dw)
    for cn in (4, 2):
        img = _random_image(rng, sh, sw, cn)
        _assert_same(cv_resize.resize_linear(img, (dh, dw)), _cv2_linear(img, dh, dw))


def _mmseg_keep_ratio(h, w, long_max, short_max):
    """mmcv.imrescale(keep_ratio) size: (new_h, new_w)."""
    scale = min(long_max / max(h, w), short_max / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


@pytest.mark.parametrize("long_max,short_max,expect", [
    (2048, 512, (512, 767)),   # mmsegmentation test scale
    (384, 256, (256, 384)),
])
def test_cv_resize_equals_opencv_at_mmsegmentations_test_sizes(long_max, short_max, expect):
    rng = np.random.default_rng(640)
    img = _smooth_image(rng, 427, 640, 3)
    size = _mmseg_keep_ratio(427, 640, long_max, short_max)
    assert size == expect
    ours = cv_resize.resize_linear(img, size)
    ref = _cv2_linear(img, *size)
    _assert_same(ours, ref)
    # the rounding of a float bilinear resize is what we must not reproduce
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    f = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    naive = f[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    frac = np.mean(naive != ref)
    assert 0.01 < frac < 0.5
    assert np.abs(naive.astype(int) - ref).max() <= 1


def test_cv_resize_half_size_is_opencvs_area_rounding():
    """0.5x in both axes: (sum of 2x2 block + 2) >> 2 (cn 1/3/4), half-to-even (cn 2)."""
    block = np.array([[1, 0], [0, 1]], dtype=np.uint8)    # sum 2 -> 0.5
    img = np.tile(block, (4, 4))
    for cn in (1, 3, 4):
        x = np.repeat(img[:, :, None], cn, axis=2)
        out = cv_resize.resize_linear(x, (4, 4))
        assert np.all(out == 1)
        _assert_same(out, _cv2_linear(x, 4, 4))
    x = np.repeat(img[:, :, None], 2, axis=2)
    out = cv_resize.resize_linear(x, (4, 4))
    assert np.all(out == 0)                                  # 0.5 rounds to even
    _assert_same(out, _cv2_linear(x, 4, 4))


def test_cv_resize_same_size_is_a_copy():
    img = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    out = cv_resize.resize_linear(img, (9, 7))
    assert out is not img and np.array_equal(out, img)
    out[0, 0, 0] ^= 1
    assert not np.array_equal(out, img)


def test_cv_resize_takes_non_contiguous_input():
    rng = np.random.default_rng(2)
    img = _smooth_image(rng, 60, 80, 3)
    view = img[::-1, 5:70, ::-1]                      # flipped, cropped, BGR->RGB view
    _assert_same(cv_resize.resize_linear(view, (47, 101)), _cv2_linear(np.ascontiguousarray(view), 47, 101))


def test_cv_resize_rejects_bad_input():
    with pytest.raises(TypeError):
        cv_resize.resize_linear(np.zeros((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError):
        cv_resize.resize_linear(np.zeros((4, 4, 3), np.uint8), (0, 2))
    with pytest.raises(ValueError):
        cv_resize.resize_nearest(np.zeros((4, 4), np.uint8), (2,))


LABEL_DTYPES = [np.uint8, np.int32, np.uint16, np.int16]


@pytest.mark.parametrize("sh,sw,dh,dw", CV_SIZE_PAIRS[::2])
def test_cv_resize_nearest_equals_opencv(sh, sw, dh, dw):
    rng = np.random.default_rng(sh * 31 + sw * 7 + dh * 3 + dw)
    for dtype in LABEL_DTYPES:
        lab = rng.integers(0, 151, (sh, sw)).astype(dtype)
        lab[rng.random((sh, sw)) < 0.1] = 255 if dtype == np.uint8 else -1 if dtype in (np.int32, np.int16) else 65535
        ref = cv2.resize(lab, (dw, dh), interpolation=cv2.INTER_NEAREST)
        ours = cv_resize.resize_nearest(lab, (dh, dw))
        assert ours.dtype == lab.dtype
        _assert_same(ours, ref)


def test_cv_resize_nearest_equals_opencv_at_mmsegmentations_label_sizes():
    rng = np.random.default_rng(5)
    lab = np.repeat(np.repeat(rng.integers(0, 21, (43, 64)), 10, 0), 10, 1)[:427, :640].astype(np.uint8)
    for size in [(512, 767), (256, 384), (1024, 1535)]:
        ref = cv2.resize(lab, size[::-1], interpolation=cv2.INTER_NEAREST)
        _assert_same(cv_resize.resize_nearest(lab, size), ref)


def test_cv_resize_nearest_is_opencvs_nearest_not_nearest_exact():
    """mmcv 'nearest' is INTER_NEAREST (floor(dx*src/dst)), not the pixel-centre rule."""
    lab = np.arange(10, dtype=np.uint8)[None, :].repeat(2, 0)
    ours = cv_resize.resize_nearest(lab, (2, 4))
    assert np.array_equal(ours[0], [0, 2, 5, 7])
    assert np.array_equal(ours, cv2.resize(lab, (4, 2), interpolation=cv2.INTER_NEAREST))
    exact = cv2.resize(lab, (4, 2), interpolation=cv2.INTER_NEAREST_EXACT)
    assert not np.array_equal(ours, exact)


def test_cv_resize_windows_are_the_same_bits_as_cv2():
    # window=(top, bottom, left, right): that part of cv2.resize's output, computed alone (a training crop's part
    # of a resized image), on each path: bilinear up and down, OpenCV's exact-2× area path, the same size, nearest
    rng = np.random.default_rng(9)
    for (sh, sw), (dh, dw) in [((37, 53), (91, 120)), ((90, 64), (31, 40)), ((40, 60), (20, 30)), ((25, 33), (25, 33)),
                               ((17, 1), (40, 3))]:
        img = _smooth_image(rng, sh, sw, 3)
        lab = rng.integers(0, 151, (sh, sw)).astype(np.uint8)
        full, full_label = _cv2_linear(img, dh, dw), cv2.resize(lab, (dw, dh), interpolation=cv2.INTER_NEAREST)
        for _ in range(6):
            top, left = int(rng.integers(0, dh)), int(rng.integers(0, dw))
            bottom, right = int(rng.integers(top + 1, dh + 1)), int(rng.integers(left + 1, dw + 1))
            window = (top, bottom, left, right)
            _assert_same(cv_resize.resize_linear(img, (dh, dw), window), full[top:bottom, left:right])
            _assert_same(cv_resize.resize_nearest(lab, (dh, dw), window), full_label[top:bottom, left:right])
    for bad in [(0, 0, 0, 5), (0, 5, 3, 2), (-1, 4, 0, 4), (0, 92, 0, 4)]:
        with pytest.raises(ValueError, match="window"):
            cv_resize.resize_linear(img, (91, 120), bad)


def test_cv_resize_imports_no_opencv():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(cv_resize))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    assert names <= {"numpy", "torch"}, names


# ============================================================================= 4. encnet.py: backbones, FCN, EncNet, seg_loss, Table 6's networks


def torchvision_resnet_shapes(blocks, bottleneck):
    """Keys and shapes of torchvision's ResNet state_dict minus fc.*, written out independently."""
    shapes = {}

    def bn(prefix, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), 1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            if bottleneck:
                out = planes * 4
                convs = [(planes, inplanes, 1), (planes, planes, 3), (out, planes, 1)]
            else:
                out = planes
                convs = [(planes, inplanes, 3), (planes, planes, 3)]
            for i, (co, ci, k) in enumerate(convs, 1):
                shapes[f"{p}.conv{i}.weight"] = (co, ci, k, k)
                bn(f"{p}.bn{i}", co)
            if b == 0 and inplanes != out or b == 0 and stage > 1:
                shapes[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    return shapes


@pytest.mark.parametrize("name,blocks,bottleneck,params_with_fc", [
    ("resnet18", [2, 2, 2, 2], False, 11_689_512),
    ("resnet50", [3, 4, 6, 3], True, 25_557_032),
    ("resnet101", [3, 4, 23, 3], True, 44_549_160),
    ("resnet152", [3, 8, 36, 3], True, 60_192_808),
])
def test_backbone_has_torchvision_keys_and_shapes(name, blocks, bottleneck, params_with_fc):
    with torch.device("meta"):
        backbone = encnet.resnet(name)
    ours = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    assert ours == torchvision_resnet_shapes(blocks, bottleneck)
    fc = 512 * (4 if bottleneck else 1) * 1000 + 1000
    assert sum(p.numel() for p in backbone.parameters()) + fc == params_with_fc  # torchvision's published counts


def test_deep_stem_variant():
    backbone = encnet.resnet("resnet50s")
    keys = backbone.state_dict().keys()
    assert {"conv1.0.weight", "conv1.3.weight", "conv1.6.weight"} <= keys and "bn1.weight" in keys
    assert backbone.conv1[6].out_channels == 128 and backbone.layer1[0].conv1.in_channels == 128
    features = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in features] == [16, 8, 8, 8]


def test_backbone_dilation_and_output_stride():
    backbone = encnet.resnet("resnet18", width=8).eval()
    assert [m.dilation for m in (backbone.layer3[0].conv1, backbone.layer3[1].conv1,
                                 backbone.layer4[0].conv1, backbone.layer4[1].conv1)] == [(1, 1), (2, 2), (2, 2), (4, 4)]
    c1, c2, c3, c4 = backbone(torch.randn(2, 3, 80, 64))
    assert c1.shape[-2:] == (20, 16) and c2.shape[-2:] == c3.shape[-2:] == c4.shape[-2:] == (10, 8)


def test_segmentation_models_outputs():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 40, 56)
    for model in (tiny(encnet.FCN), tiny(encnet.FCN, aux=True), tiny(encnet.EncNet),
                  tiny(encnet.EncNet, aux=True, lateral=True, residual_gate=True, num_codes=0)):
        model.eval()
        assert model(images).shape == (2, 5, 40, 56)
        model.train()
        out = model(images)
        assert out["seg"].shape == (2, 5, 40, 56)
        if isinstance(model, encnet.EncNet):
            assert [s.shape for s in out["se"]] == [(2, 5), (2, 5)]  # stage 4 and stage 3 (Fig. 3)
        assert ("aux" in out) == (model.aux_head is not None)
    assert "se" not in tiny(encnet.EncNet, se_loss=False).train()(images)


def test_seg_loss_terms():
    torch.manual_seed(0)
    labels = torch.randint(-1, 5, (2, 8, 8))
    outputs = {"seg": torch.randn(2, 5, 8, 8), "se": [torch.randn(2, 5), torch.randn(2, 5)],
               "aux": torch.randn(2, 5, 8, 8)}
    loss, terms = encnet.seg_loss(outputs, labels, 5, se_weight=0.3, aux_weight=0.4)
    valid = labels != -1
    ce = lambda logits: -logits.log_softmax(1).permute(0, 2, 3, 1)[valid].gather(1, labels[valid][:, None]).mean()
    present = torch.stack([torch.stack([(labels[b] == c).any() for c in range(5)]) for b in range(2)]).float()
    bce = lambda z: -(present * F.logsigmoid(z) + (1 - present) * F.logsigmoid(-z)).mean()
    torch.testing.assert_close(terms["seg"], ce(outputs["seg"]))
    torch.testing.assert_close(terms["aux"], ce(outputs["aux"]))
    torch.testing.assert_close(terms["se"], bce(outputs["se"][0]) + bce(outputs["se"][1]))
    torch.testing.assert_close(loss, terms["seg"] + 0.3 * terms["se"] + 0.4 * terms["aux"])
    # a given pixel count replaces this batch's (distributed runs pass the global mean)
    loss_n, _ = encnet.seg_loss({"seg": outputs["seg"]}, labels, 5, num_pixels=torch.tensor(1000.0))
    torch.testing.assert_close(loss_n, terms["seg"] * valid.sum() / 1000)


@pytest.mark.parametrize("model_class", [encnet.FCN, encnet.EncNet])
def test_loss_decreases_on_a_fixed_batch(model_class):
    torch.manual_seed(0)
    model = tiny(model_class, aux=True).train()
    images = torch.randn(4, 3, 32, 32)
    labels = (images[:, 0] > 0).long() + 2 * (images[:, 1] > 0.5).long()  # a function of the pixels
    labels[:, :4] = -1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss, _ = encnet.seg_loss(model(images), labels, 5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_flops_encnet_within_5_percent_of_fcn():
    flops = {}
    for model_class in (encnet.FCN, encnet.EncNet):
        with torch.device("meta"):
            model = model_class(150, "resnet50").eval()
            images = torch.empty(1, 3, 480, 480)
        with FlopCounterMode(display=False) as counter:
            model(images)
        flops[model_class.__name__] = counter.get_total_flops()
    overhead = flops["EncNet"] / flops["FCN"] - 1
    assert 0 < overhead <= 0.05, overhead


def test_cifar_parameter_counts_match_table_6():
    table6 = {"resnet64d": 2.7e6, "se_resnet64d": 2.8e6, "encnet16k64d": 3.5e6, "encnet32k128d": 16.8e6}
    for name, expected in table6.items():
        with torch.device("meta"):
            model = encnet.build_cifar(name)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count / expected - 1) < 0.05, (name, count)
    model = encnet.build_cifar("encnet16k64d")
    assert isinstance(model.blocks[0].gate.encoding, layers.EncodingDrop)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_models_under_channels_last_bf16_and_compile():
    torch.manual_seed(0)
    model = tiny(encnet.EncNet).eval()
    images = torch.randn(2, 3, 32, 32)
    ref = model(images)
    torch.testing.assert_close(model.to(memory_format=torch.channels_last)(
        images.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(images)
    assert (out.float().argmax(1) == ref.argmax(1)).float().mean() > 0.9
    # graph capture through the custom autograd.Function (the inductor backend is timed in bench.py)
    compiled = torch.compile(tiny(encnet.EncNet).train(), backend="aot_eager")
    out = compiled(images)
    encnet.seg_loss(out, torch.randint(0, 5, (2, 32, 32)), 5)[0].backward()


# the training step in less memory: the banded cross-entropy, BatchNorm → ReLU recomputed, the same numbers

def plain_per_image(logits, labels, size, align_corners):
    full = F.interpolate(logits, size, mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(full, labels, ignore_index=-1, reduction="none").flatten(1).sum(1)


UPSAMPLE_SHAPES = [  # (h, w, H, W): ×8 as the models, non-integer ratios, no upsampling, one source pixel
    (5, 7, 40, 56), (3, 4, 13, 9), (4, 3, 4, 3), (1, 1, 5, 3), (6, 5, 11, 17)]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("h,w,H,W", UPSAMPLE_SHAPES)
def test_matrix_is_f_interpolate(h, w, H, W, align_corners):
    z = torch.randn(2, 3, h, w, dtype=torch.float64)
    rows = encnet.interpolation_matrix(h, H, align_corners)
    cols = encnet.interpolation_matrix(w, W, align_corners)
    ref = F.interpolate(z, (H, W), mode="bilinear", align_corners=align_corners)
    torch.testing.assert_close(rows @ z @ cols.T, ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("h,w,H,W", UPSAMPLE_SHAPES)
@pytest.mark.parametrize("band_elements", [1, 100, 10 ** 7])  # one row a band, bands not dividing H, one band
def test_banded_cross_entropy_values_float64(h, w, H, W, align_corners, band_elements):
    torch.manual_seed(h * 100 + W)
    z = torch.randn(2, 3, h, w, dtype=torch.float64) * 3
    labels = torch.randint(-1, 3, (2, H, W))  # about a quarter ignored
    labels[1, 0] = -1
    ours = encnet.upsampled_cross_entropy(z, labels, (H, W), align_corners, band_elements)
    ref = plain_per_image(z, labels, (H, W), align_corners)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=0)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("band_elements", [1, 7 * 3 * 2 * 2, 10 ** 7])
def test_banded_cross_entropy_gradcheck(align_corners, band_elements):
    # H = 13 rows in bands of 2 (7·3·2·2 elements / (B·K·W)), of 1, and one band; ignored pixels included;
    # a ratio of 13/3 so that bands share source rows (their gradients add up)
    torch.manual_seed(1)
    z = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(-1, 3, (2, 13, 7))
    labels[0, :, 0] = -1
    assert (labels == -1).any() and (labels != -1).any()
    fn = lambda z: encnet.upsampled_cross_entropy(z, labels, (13, 7), align_corners, band_elements)
    assert gradcheck(fn, (z,))  # (its default tolerances: F.interpolate + F.cross_entropy fail tighter ones here)
    # and the gradient equals autograd's through F.interpolate + F.cross_entropy, to rounding
    w = torch.rand(2, dtype=torch.float64)
    g_ours, = torch.autograd.grad((fn(z) * w).sum(), z)
    g_ref, = torch.autograd.grad((plain_per_image(z, labels, (13, 7), align_corners) * w).sum(), z)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-14)


def test_banded_cross_entropy_all_ignored_and_bad_labels():
    z = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.full((1, 16, 16), -1)
    loss = encnet.upsampled_cross_entropy(z, labels, (16, 16))
    loss.sum().backward()
    assert loss.item() == 0 and z.grad.abs().max() == 0
    with pytest.raises(ValueError):
        encnet.upsampled_cross_entropy(z, labels[:, :8], (16, 16))
    with pytest.raises((RuntimeError, IndexError)):  # a class beyond K, as F.cross_entropy refuses it
        encnet.upsampled_cross_entropy(z, torch.full((1, 16, 16), 5), (16, 16))


@pytest.mark.parametrize("frozen", ["none", "bn", "conv", "input"])
def test_bn_relu_conv_gradcheck_and_running_statistics(frozen):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4).double()
    conv = torch.nn.Conv2d(4, 3, 3, 2, 2, 2, bias=False).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=frozen != "input")
    if frozen == "bn":
        bn.requires_grad_(False)
    if frozen == "conv":
        conv.requires_grad_(False)
    params = [t for t in (x, bn.weight, bn.bias, conv.weight) if t.requires_grad]

    def fused(*_):
        buffers = {k: v.clone() for k, v in bn.named_buffers()}
        out = encnet.bn_relu_conv(bn, torch.nn.ReLU(inplace=True), conv, x)
        with torch.no_grad():  # gradcheck calls it many times: the running estimates as they were
            for k, v in bn.named_buffers():
                v.copy_(buffers[k])
        return out
    assert gradcheck(fused, tuple(params))
    plain = copy.deepcopy(bn)
    ref = conv(torch.relu(plain(x)))
    out = encnet.bn_relu_conv(bn, torch.nn.ReLU(inplace=True), conv, x)
    assert out.grad_fn.name().endswith("_BatchNormReLUConvBackward")  # the recomputing path was taken
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    for k, v in plain.state_dict().items():  # the running estimates moved once, as BatchNorm's
        torch.testing.assert_close(bn.state_dict()[k], v, rtol=1e-14, atol=1e-14)
    g = torch.randn_like(ref)
    ref_params = [{id(bn.weight): plain.weight, id(bn.bias): plain.bias}.get(id(t), t) for t in params]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, ref_params, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_bn_relu_conv_falls_back_where_it_should():
    bn, conv = torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 3, 1, bias=False)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    plain_name = lambda out: out.grad_fn.name()
    assert "BatchNormReLUConv" in plain_name(encnet.bn_relu_conv(bn, torch.nn.ReLU(), conv, x))
    assert "BatchNormReLUConv" not in plain_name(encnet.bn_relu_conv(bn, torch.nn.ReLU(), conv, x, False))
    with torch.autocast("cpu", torch.bfloat16):  # autocast: the modules (conv in bf16 as before)
        assert "BatchNormReLUConv" not in plain_name(encnet.bn_relu_conv(bn, torch.nn.ReLU(), conv, x))
    bn.eval()
    assert "BatchNormReLUConv" not in plain_name(encnet.bn_relu_conv(bn, torch.nn.ReLU(), conv, x))
    bn.train()
    import syncbn
    sync = syncbn.convert_sync_batchnorm(torch.nn.Sequential(copy.deepcopy(bn)))[0]  # one process: BatchNorm's
    out = encnet.bn_relu_conv(sync, torch.nn.ReLU(), conv, x)  # fusion (across processes: the step test below)
    assert "BatchNormReLUConv" in plain_name(out)
    torch.testing.assert_close(out, encnet.bn_relu_conv(bn, torch.nn.ReLU(), conv, x))
    torch.testing.assert_close(sync.running_var, bn.running_var)
    with torch.no_grad():
        assert encnet.bn_relu_conv(bn, torch.nn.ReLU(), conv, x).grad_fn is None


def test_recompute_stages_flag_trains_the_same_weights(tmp_path, capsys):
    # train_seg.py --recompute-stages: the backbone's stages recomputed in backward (torch.utils.checkpoint, running
    # statistics counted once) give the run of every activation kept, bit for bit
    for name, flags in (("kept", []), ("recomputed", ["--recompute-stages", "1,2,3,4"])):
        train_seg.main([*TINY, "--max-iters", "2", *flags, "--out", str(tmp_path / name)])
    assert "recompute-stages 1,2,3,4" in capsys.readouterr().out
    assert_same_weights(weights(tmp_path / "kept"), weights(tmp_path / "recomputed"))


def test_checkpoint_stages_same_step_and_statistics_once():
    model = memory_model("mmseg")
    images, labels = memory_batch(torch.float64)
    args = (images, labels, 0.2, 0.4, float(labels.numel()))
    loss, grads = step_grads(saving_step, model, *args)
    ckpt = memory_model("mmseg")
    ckpt.backbone.checkpoint_stages = (1, 2, 3, 4)
    loss_c, grads_c = step_grads(saving_step, ckpt, *args)
    assert abs(loss_c - loss) <= 1e-14 * abs(loss) and relative_grad_error(grads_c, grads) <= 1e-12
    for k, v in model.state_dict().items():  # running statistics: updated once, not again in the recomputation
        torch.testing.assert_close(ckpt.state_dict()[k], v, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", ["paper", "mmseg"])
def test_channels_last_step(kind):
    # channels_last (train_seg --channels-last) in float64: the new step against the plain one, same format
    model = memory_model(kind).to(memory_format=torch.channels_last)
    images, labels = memory_batch(torch.float64)
    images = images.contiguous(memory_format=torch.channels_last)
    args = (images, labels, 0.2, 0.4, 1000.0)
    loss_ref, g_ref = step_grads(plain_reference_step, model, *args)
    loss_new, g_new = step_grads(saving_step, model, *args)
    assert abs(loss_new - loss_ref) <= 1e-13 * abs(loss_ref) and relative_grad_error(g_new, g_ref) <= 1e-12


def memory_model(kind, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    if kind == "mmseg":  # mmsegmentation's architecture, small
        m = encnet.EncNet(5, "resnet50v1c", width=8, head_width=16, aux=True, residual_gate=True,
                          stage3_encoding=False, dropout2d=True, **kw)
    elif kind == "paper":
        m = encnet.EncNet(5, "resnet18", width=8, head_width=16, **kw)
    elif kind == "released":
        m = encnet.EncNet(5, "resnet50s", width=8, head_width=16, aux=True, residual_gate=True, lateral=True,
                          stage3_encoding=False, align_corners=True, **kw)
    else:
        m = encnet.FCN(5, "resnet18", width=8, head_width=16, aux=True, **kw)
    return m.to(dtype).train()


def memory_batch(dtype, size=(40, 56)):
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size, dtype=dtype)
    labels = torch.randint(0, 5, (2, *size))
    labels[:, :5] = -1
    labels[1, :, -7:] = -1
    return images, labels


def plain_reference_step(model, images, labels, se_weight, aux_weight, num_pixels):
    """The plain step written out: full-resolution F.interpolate (the model's plain path), F.cross_entropy with
    ignore_index=-1 summed per image and divided by num_pixels, the SE-losses' BCE, the aux CE."""
    encnet.memory_saving(model, False)
    out = model(images)
    encnet.memory_saving(model, True)
    assert torch.is_tensor(out["seg"]) and out["seg"].shape[-2:] == labels.shape[-2:]

    def ce(logits):
        per_image = F.cross_entropy(logits, labels, ignore_index=-1, reduction="none").flatten(1).sum(1)
        return (per_image / num_pixels).sum()
    loss = ce(out["seg"])
    if "se" in out:
        targets = layers.se_targets(labels, 5).to(images.dtype)
        loss = loss + se_weight * sum(F.binary_cross_entropy_with_logits(s, targets) for s in out["se"])
    if "aux" in out:
        loss = loss + aux_weight * ce(out["aux"])
    return loss


def saving_step(model, images, labels, se_weight, aux_weight, num_pixels):
    out = model(images)
    assert isinstance(out["seg"], encnet.Upsampled)
    return encnet.seg_loss(out, labels, 5, se_weight, aux_weight, num_pixels)[0]


def step_grads(step, model, *args, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both steps
    loss = step(model, *args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def memory_divisors(kind, labels):
    if kind == "labelled":  # PyTorch's mean over labelled pixels (seg_loss's default)
        return (labels != -1).sum().clamp_min(1)
    if kind == "all":  # mmsegmentation: all pixels
        return float(labels.numel())
    return (labels != -1).flatten(1).sum(1).double()  # one per image (the released code's per-GPU mean)


@pytest.mark.parametrize("kind,divisor", [("mmseg", "all"), ("paper", "labelled"), ("released", "per_image"),
                                          ("fcn", "labelled")])
def test_step_float64_equals_plain_reference(kind, divisor):
    model = memory_model(kind)
    images, labels = memory_batch(torch.float64)
    args = (images, labels, 0.2, 0.4, memory_divisors(divisor, labels))
    loss_ref, g_ref = step_grads(plain_reference_step, model, *args)
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    loss_new, g_new = step_grads(saving_step, model, *args)
    assert abs(loss_new - loss_ref) <= 1e-13 * abs(loss_ref)
    assert g_new.keys() == g_ref.keys() and len(g_ref) == len(list(model.parameters()))
    # float64 rounding (1e-16) amplified by backward through ~50 BatchNorms in training mode: the whole
    # gradient to ~1e-13, each tensor to ~1e-12 (measured ≤ 2e-12 for the smallest ones)
    assert relative_grad_error(g_new, g_ref) <= 1e-12
    for name in g_ref:
        err = (g_new[name] - g_ref[name]).norm() / g_ref[name].norm().clamp_min(1e-300)
        assert err <= 1e-10, (name, err.item())
    # the running statistics: the new step updates them once, as the plain one (fresh model, same memory_batch)
    after_new = {k: v.clone() for k, v in model.state_dict().items()}
    plain = memory_model(kind)
    step_grads(plain_reference_step, plain, *args)
    fresh = memory_model(kind)
    step_grads(saving_step, fresh, *args)
    for k, v in plain.state_dict().items():
        if "running" in k or "num_batches" in k:
            torch.testing.assert_close(fresh.state_dict()[k], v, rtol=1e-12, atol=1e-13)
    assert all(after_new[k].item() == 2 for k in after_new if "num_batches_tracked" in k)  # two forwards
    del running


def _syncbn_saving_worker(rank, world_size):
    encnet.RECOMPUTE_MIN_ELEMENTS = 0  # (a spawned process: conftest's fixture does not reach it)
    images, labels = memory_batch(torch.float64)
    mine = slice(rank, rank + 1)  # one image per process
    found = {}
    for saving in (True, False):
        model = encnet.memory_saving(syncbn.convert_sync_batchnorm(memory_model("mmseg")), saving)
        bn_calls, collectives = [0], [0]
        for m in model.modules():
            if isinstance(m, syncbn.SyncBatchNorm):
                m.register_forward_hook(lambda *a: bn_calls.__setitem__(0, bn_calls[0] + 1))
        original = _count_all_reduce(collectives)
        try:
            loss, grads = step_grads(lambda m, *a: encnet.seg_loss(m(a[0]), *a[1:])[0], model, images[mine],
                                     labels[mine], 5, 0.2, 0.4, float(labels.numel()))
        finally:
            dist.all_reduce = original
        for g in [loss, *grads.values()]:
            dist.all_reduce(g)  # the global batch's loss and gradients (DDP sums; one process would too)
        found[saving] = loss, grads, model.state_dict(), bn_calls[0], collectives[0]
    (loss, grads, state, calls, collectives), (loss_ref, grads_ref, state_ref, calls_ref, collectives_ref) = \
        found[True], found[False]
    assert calls < calls_ref  # the BatchNorms bn_relu_conv fused did not run as modules …
    assert collectives == collectives_ref  # … yet each synchronised once forward, once backward
    assert abs(loss - loss_ref) <= 1e-13 * abs(loss_ref) and relative_grad_error(grads, grads_ref) <= 1e-12
    for k, v in state_ref.items():
        if "running" in k or "num_batches" in k:
            torch.testing.assert_close(state[k], v, rtol=1e-12, atol=1e-13, msg=k)


@pytest.mark.slow
def test_step_with_syncbn_fuses_batchnorm_relu_and_equals_the_plain_step():
    # under torchrun BatchNorm is SyncBatchNorm: bn_relu_conv takes it over too (its global statistics, its one
    # backward all-reduce), and the two processes' step equals their plain step's, loss, gradients and statistics
    run_distributed(_syncbn_saving_worker, 2)


@pytest.mark.parametrize("kind", ["paper", "mmseg"])
def test_step_float32_within_rounding_of_the_plain_one(kind):
    # float32: the new step and today's (memory_saving off: F.interpolate + F.cross_entropy on the full-resolution
    # logits, BatchNorm and ReLU as modules) compute the same function with different roundings: the BatchNorm
    # statistics (var_mean instead of batch_norm's kernel), the upsampling (a matrix and a 1-D interpolation
    # instead of one 2-D one), the cross-entropy's sums (by band). Each is a few float32 ulps (eps = 1.2e-7) in
    # a forward value. The bound is therefore what such a perturbation does to today's step itself: `noise`,
    # today's step on the images rounded differently (× (1 + eps·N(0, 1))), or today's float32 error against
    # float64, whichever is larger. Backward through BatchNorm in training mode on tiny maps amplifies it a lot
    # in the mmseg toy (measured: a 1e-7 change of the input moves its gradient by ~1e-2; the paper toy 1e-5).
    model64 = memory_model(kind)
    model32 = copy.deepcopy(model64).float()
    images, labels = memory_batch(torch.float64)
    n = float(labels.numel())
    loss64, g64 = step_grads(plain_reference_step, model64, images, labels, 0.2, 0.4, n)
    plain = lambda m, *a: (encnet.memory_saving(m, False), encnet.seg_loss(m(a[0]), *a[1:])[0],
                           encnet.memory_saving(m, True))[1]
    loss_old, g_old = step_grads(plain, model32, images.float(), labels, 5, 0.2, 0.4, n)
    loss_new, g_new = step_grads(saving_step, model32, images.float(), labels, 0.2, 0.4, n)
    eps = torch.finfo(torch.float32).eps
    torch.manual_seed(11)
    rounded = (images * (1 + eps * torch.randn_like(images))).float()
    loss_noise, g_noise = step_grads(plain, model32, rounded, labels, 5, 0.2, 0.4, n)
    # the loss: a float32 sum over 2·40·56 pixels, to a few eps·log2(N) ≈ 1e-6
    assert abs(loss_old - loss64) <= 16 * eps * abs(loss64)
    assert abs(loss_new - loss64) <= 16 * eps * abs(loss64)
    g64_32 = {k: v.float() for k, v in g64.items()}
    own_error = max(relative_grad_error(g_old, g64_32), relative_grad_error(g_noise, g_old))
    difference = relative_grad_error(g_new, g_old)
    assert difference <= 3 * own_error + 1e-6, (difference, relative_grad_error(g_old, g64_32), relative_grad_error(g_noise, g_old))
    assert relative_grad_error(g_new, g64_32) <= 4 * own_error + 1e-6


def test_training_output_stands_for_the_full_resolution_logits():
    model = memory_model("mmseg", torch.float32)
    images, labels = memory_batch(torch.float32)
    torch.manual_seed(0)
    out = model(images)
    up = out["seg"]
    assert up.shape == (2, 5, 40, 56) and up.size(1) == 5 and up.dim() == 4 and up.ndim == 4
    assert up.dtype == torch.float32 and up.device == images.device and up.requires_grad and len(up) == 2
    assert out["aux"].shape == (2, 5, 40, 56) and [s.shape for s in out["se"]] == [(2, 5)]
    full = F.interpolate(up.source, (40, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up.materialize(), full, rtol=0, atol=0)
    torch.testing.assert_close(F.softmax(up, 1), F.softmax(full, 1))  # torch functions
    torch.testing.assert_close(up.argmax(1), full.argmax(1))  # tensor methods
    torch.testing.assert_close(up.float()[0], full[0])
    torch.testing.assert_close(up + 1, full + 1)  # operators
    torch.testing.assert_close(up[:, 1], full[:, 1])
    torch.testing.assert_close(torch.cat([up, full]), torch.cat([full, full]))
    # the plain path of seg_loss on the materialised tensors gives the same loss
    loss, terms = encnet.seg_loss(out, labels, 5)
    loss_t, terms_t = encnet.seg_loss({k: (v.materialize() if isinstance(v, encnet.Upsampled) else v)
                                       for k, v in out.items()}, labels, 5)
    torch.testing.assert_close(loss, loss_t)
    # eval mode: a tensor, as before
    model.eval()
    assert torch.is_tensor(model(images)) and model(images).shape == (2, 5, 40, 56)


def test_state_dict_and_modules_unchanged():
    # no module, parameter or buffer added: the option is a plain class attribute; checkpoints load strictly
    model = memory_model("paper", torch.float32)
    keys = list(model.state_dict())
    model.upsample_in_loss = False
    assert list(model.state_dict()) == keys and "upsample_in_loss" not in str(keys)
    fresh = memory_model("paper", torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in fresh.named_modules()]


def relative_grad_error(grads, ref):
    return math.sqrt(sum(((grads[k] - ref[k]).double().norm() ** 2).item() for k in ref)
                     / sum((ref[k].double().norm() ** 2).item() for k in ref))


def test_compile_ddp_autocast_step():
    model = memory_model("mmseg", torch.float32)
    images, labels = memory_batch(torch.float32, (32, 32))
    ref_loss, ref = step_grads(saving_step, model, images, labels, 0.2, 0.4, 1024.0)
    # torch.compile (aot_eager: graph capture through Upsampled and the custom Functions), no graph break
    explained = torch._dynamo.explain(model)(images)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    loss, grads = step_grads(saving_step, compiled, images, labels, 0.2, 0.4, 1024.0)
    torch.testing.assert_close(loss, ref_loss)
    # (aot_eager decomposes BatchNorm: float32 rounding, amplified by backward through BatchNorm, differs)
    assert relative_grad_error({k: grads["_orig_mod." + k] for k in ref}, ref) < 1e-4
    # DDP on one gloo process, with find_unused_parameters and static_graph (its hooks route the outputs)
    import tempfile
    import torch.distributed as dist
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            for kw in (dict(), dict(find_unused_parameters=True), dict(static_graph=True)):
                ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model), **kw)
                for _ in range(2):  # static_graph's first iteration differs
                    loss, grads = step_grads(saving_step, ddp, images, labels, 0.2, 0.4, 1024.0)
                assert relative_grad_error({k: grads["module." + k] for k in ref}, ref) < 1e-5, kw
        finally:
            dist.destroy_process_group()
    # bf16 autocast around the forward (train_seg --amp): runs, the loss in float32 close to the fp32 one
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(images)
    assert out["seg"].dtype == torch.bfloat16
    loss, _ = encnet.seg_loss(out, labels, 5, 0.2, 0.4, 1024.0)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss - ref_loss) < 0.05 * ref_loss
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_export_eval_mode():
    model = memory_model("paper", torch.float32).eval()
    images = torch.randn(1, 3, 32, 32)
    program = torch.export.export(model, (images,))
    torch.testing.assert_close(program.module()(images), model(images))


def test_where_the_memory_goes():
    # bench_memory.saved_for_backward's breakdown, part by part, against what each saving removes: the two heads'
    # B×K×H×W log-probabilities (banded CE), and the ReLU output after each BatchNorm that bn_relu_conv takes over
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_memory
    images, labels = bench_memory.batch(64)
    parts, called = {}, {}
    for kind in ("ours", "ours_plain"):
        model = bench_memory.our_model("mmseg512", 16, 64, kind)
        called[kind] = {}
        for name, bn in model.backbone.named_modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.register_forward_hook(lambda m, a, out, name=name: called[kind].update({name: out.numel()}))
        parts[kind] = bench_memory.saved_for_backward(
            model, bench_memory.our_loss_fn("mmseg512", model, images, labels))  # the step the bench measures
    logits_bytes = labels.numel() * 150 * 4  # one head's B×K×H×W float32
    assert parts["ours_plain"]["logits and loss"] >= 2 * logits_bytes / 2**30
    assert parts["ours"]["logits and loss"] < 0.05 * logits_bytes / 2**30
    taken_over = set(called["ours_plain"]) - set(called["ours"])  # the BatchNorms bn_relu_conv computes itself
    relu_bytes = sum(called["ours_plain"][name] for name in taken_over) * 4
    backbone = ["stem", "stage 1", "stage 2", "stage 3", "stage 4"]
    saved = sum(parts["ours_plain"][p] - parts["ours"][p] for p in backbone) * 2**30
    channels = sum(dict(model.backbone.named_modules())[name].num_features for name in taken_over)
    assert relu_bytes <= saved <= relu_bytes + 16 * channels  # (+ per-channel statistics the plain step keeps)
    assert parts["ours"]["heads"] == parts["ours_plain"]["heads"] and len(taken_over) >= 2 * 16


# ============================================================================= 5. transforms.py: augmentation, photometric distortion, normalisation


def test_augment_is_an_exact_crop_at_scale_one():
    image, label = coordinate_image(120, 90)
    flips = set()
    for seed in range(12):
        out, out_label = transforms.augment_train(image, label, np.random.default_rng(seed), 64, 120,
                                            scale_range=(1, 1), max_rotation=0)
        assert out.size == out_label.size == (64, 64) and out.mode == "RGB" and out_label.mode == "L"
        r, g = np.asarray(out)[0, 0, :2].astype(int)
        flipped = np.asarray(out)[0, 1, 0] < r
        source_image, source_label = (ImageOps.mirror(image), ImageOps.mirror(label)) if flipped else (image, label)
        x1 = 119 - r if flipped else r  # column of the crop in the (mirrored) image
        box = (x1, g, x1 + 64, g + 64)
        assert np.array_equal(np.asarray(out), np.asarray(source_image.crop(box)))
        assert np.array_equal(np.asarray(out_label), np.asarray(source_label.crop(box)))
        flips.add(bool(flipped))
    assert flips == {True, False}


def test_augment_matches_the_sequential_pipeline():
    """One warp = flip → resize → rotate → pad → crop of the released code, up to resampling differences."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((97, 73), Image.BICUBIC)
    label = Image.fromarray(rng.integers(0, 20, (5, 7), np.uint8)).resize((97, 73), Image.NEAREST)
    crop, base = 64, 80
    agreement, error = [], []
    for seed in range(8):
        r = np.random.default_rng(seed)  # the parameters drawn in augment_train's order
        img, lab = (ImageOps.mirror(image), ImageOps.mirror(label)) if r.random() < 0.5 else (image, label)
        long_side = int(r.integers(base // 2, base * 2, endpoint=True))
        sw, sh = long_side, int(73 * long_side / 97 + 0.5)
        img, lab = img.resize((sw, sh), Image.BILINEAR), lab.resize((sw, sh), Image.NEAREST)
        angle = r.uniform(-10, 10)
        img, lab = img.rotate(angle, Image.BILINEAR), lab.rotate(angle, Image.NEAREST, fillcolor=255)
        pw, ph = max(crop - sw, 0), max(crop - sh, 0)
        img, lab = ImageOps.expand(img, (0, 0, pw, ph), 0), ImageOps.expand(lab, (0, 0, pw, ph), 255)
        x1, y1 = int(r.integers(0, sw + pw - crop, endpoint=True)), int(r.integers(0, sh + ph - crop, endpoint=True))
        box = (x1, y1, x1 + crop, y1 + crop)
        out, out_label = transforms.augment_train(image, label, np.random.default_rng(seed), crop, base)
        agreement.append((np.asarray(out_label) == np.asarray(lab.crop(box))).mean())
        error.append(np.abs(np.asarray(out, float) - np.asarray(img.crop(box), float)).mean())
    assert min(agreement) > 0.9 and np.mean(agreement) > 0.95 and max(error) < 5


def test_scale_rules_blur_and_padding_colour_of_the_recipes():
    # the scaled image's size, read off the labelled region of a crop large enough to hold it whole, equals
    # each reference's own arithmetic on the same draws (flip first, then the scale)
    image, label = coordinate_image(40, 30)
    for seed in range(6):
        r = np.random.default_rng(seed)
        r.random()  # the flip
        short = int(r.integers(20, 80, endpoint=True))  # released v0.5.0: random.randint(0.5·base, 2·base)
        expected = {"short": (int(40 * short / 30), short)}  # the long side truncated: int(1.0·w·oh/h)
        r = np.random.default_rng(seed)
        r.random()
        ratio = r.uniform(0.5, 2.0)  # mmsegmentation RandomResize: the box × U(0.5, 2), mmcv's rescale_size
        factor = min(int(2048 * ratio) / 40, int(16 * ratio) / 30)
        expected["box"] = (int(40 * factor + 0.5), int(30 * factor + 0.5))
        for rule, size in expected.items():
            _, out_label = transforms.augment_train(image, label, np.random.default_rng(seed), 200, 40, max_rotation=0,
                                              scale_rule=rule, scale_box=(2048, 16))
            inside = np.asarray(out_label) < 255
            assert (inside.any(0).sum(), inside.any(1).sum()) == size, (rule, seed)
    # blur: half of the crops, the image only; padding: black or the mean colour (mmsegmentation pads with the
    # normalised 0, i.e. the mean, which whole pixel levels approach within half a level)
    blurred = 0
    for seed in range(16):
        sharp, sharp_label = transforms.augment_train(image, label, np.random.default_rng(seed), 64, 40, max_rotation=0)
        soft, soft_label = transforms.augment_train(image, label, np.random.default_rng(seed), 64, 40, max_rotation=0,
                                              blur=True)
        assert np.array_equal(np.asarray(sharp_label), np.asarray(soft_label))
        blurred += not np.array_equal(np.asarray(sharp), np.asarray(soft))
    assert 3 <= blurred <= 13
    out, out_label = transforms.augment_train(image, label, np.random.default_rng(0), 64, 40, scale_range=(1, 1),
                                        max_rotation=0, image_fill=transforms.PAD_COLOURS["mean"])
    assert (np.asarray(out)[35:, 45:] == (124, 116, 104)).all() and (np.asarray(out_label)[35:, 45:] == 255).all()
    assert (transforms.normalize(torch.tensor(transforms.PAD_COLOURS["mean"], dtype=torch.uint8).view(1, 3, 1, 1)).abs()
            < 0.5 / 57).all()


def test_box_rule_is_mmsegmentations_resize_flip_crop_bit_for_bit(monkeypatch):
    # RandomResize (cv2.resize of the whole image, labels nearest) → flip → pad → crop, written with cv2 on the
    # same draws, equals augment_train's crop, which resizes only the crop's window (transforms.resized_window);
    # with a rotation, the window gives what the whole resized image gives
    rng = np.random.default_rng(4)
    pixels = _smooth_image(rng, 47, 61, 3)
    raw = rng.integers(0, 5, (47, 61)).astype(np.uint8)
    image, label = Image.fromarray(pixels), Image.fromarray(raw)
    options = dict(scale_rule="box", scale_box=(80, 40), max_rotation=0)
    for seed in range(12):
        crop_h, crop_w = (32, 48) if seed % 2 else (64, 24)  # crops inside, and crops padded at the bottom
        out, out_label = transforms.augment_train(image, label, np.random.default_rng(seed), (crop_h, crop_w), 0,
                                                  **options)
        r = np.random.default_rng(seed)
        flip, ratio = r.random() < 0.5, r.uniform(0.5, 2.0)
        r.uniform(0, 0)  # the rotation's draw
        factor = min(int(80 * ratio) / 61, int(40 * ratio) / 47)
        sw, sh = int(61 * factor + 0.5), int(47 * factor + 0.5)
        ref = cv2.resize(pixels, (sw, sh), interpolation=cv2.INTER_LINEAR)
        ref_label = cv2.resize(raw, (sw, sh), interpolation=cv2.INTER_NEAREST)
        if flip:
            ref, ref_label = ref[:, ::-1], ref_label[:, ::-1]
        pad = ((0, max(crop_h - sh, 0)), (0, max(crop_w - sw, 0)))
        ref, ref_label = np.pad(ref, pad + ((0, 0),)), np.pad(ref_label, pad, constant_values=255)
        x1 = int(r.integers(0, max(sw, crop_w) - crop_w, endpoint=True))
        y1 = int(r.integers(0, max(sh, crop_h) - crop_h, endpoint=True))
        assert np.array_equal(np.asarray(out), ref[y1:y1 + crop_h, x1:x1 + crop_w]), seed
        assert np.array_equal(np.asarray(out_label), ref_label[y1:y1 + crop_h, x1:x1 + crop_w]), seed
    windowed = [transforms.augment_train(image, label, np.random.default_rng(seed), 40, 0, scale_rule="box",
                                         scale_box=(80, 40), max_rotation=30) for seed in range(6)]
    monkeypatch.setattr(transforms, "resized_window", lambda pixels, size, matrix, crop: (
        Image.fromarray(cv_resize.resize_linear(pixels, size)), matrix))  # the whole resized image
    for seed, (out, out_label) in enumerate(windowed):
        whole, whole_label = transforms.augment_train(image, label, np.random.default_rng(seed), 40, 0,
                                                      scale_rule="box", scale_box=(80, 40), max_rotation=30)
        assert np.array_equal(np.asarray(out), np.asarray(whole)) and np.array_equal(np.asarray(out_label),
                                                                                     np.asarray(whole_label))


def test_jpeg_draft_keeps_the_geometry(tmp_path):
    """A JPEG decoded at reduced size (scale ≤ 1/2) lands where the fully decoded one does."""
    write_jpeg(tmp_path / "big.jpg", 400, 300)
    label = Image.new("L", (400, 300))
    reduced = 0
    for seed in range(4):  # long side 80..320 of 400: some draws decode at 1/2 or 1/4
        lazy = Image.open(tmp_path / "big.jpg")
        out, _ = transforms.augment_train(lazy, label, np.random.default_rng(seed), 96, 160)
        reduced += lazy.size != (400, 300)
        full = Image.open(tmp_path / "big.jpg").convert("RGB")  # already decoded: no reduction possible
        full, _ = transforms.augment_train(full, label, np.random.default_rng(seed), 96, 160)
        assert np.abs(np.asarray(out, float) - np.asarray(full, float)).mean() < 3
    assert reduced


def test_normalize_values_and_channels_last():
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = transforms.normalize(images)
    expected = (images.float() / 255 - torch.tensor(transforms.MEAN).view(3, 1, 1)) / torch.tensor(transforms.STD).view(3, 1, 1)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(transforms.normalize(images[:, :, :1, :1], data.CIFAR_MEAN, data.CIFAR_STD)[0, :, 0, 0],
                          (images[0, :, 0, 0].float() / 255 - torch.tensor(data.CIFAR_MEAN)) / torch.tensor(data.CIFAR_STD))


def asarrays(*images):
    return [np.asarray(i) for i in images]


def test_non_square_crop_is_an_exact_crop_at_scale_one():
    image, label = coordinate_image(120, 90)
    flips = set()
    for seed in range(12):
        out, out_label = transforms.augment_train(image, label, np.random.default_rng(seed), (40, 64), 120,
                                            scale_range=(1, 1), max_rotation=0)
        assert out.size == out_label.size == (64, 40)  # (height 40, width 64) → PIL's (width, height)
        r, g = np.asarray(out)[0, 0, :2].astype(int)
        flipped = np.asarray(out)[0, 1, 0] < r
        source_image, source_label = (ImageOps.mirror(image), ImageOps.mirror(label)) if flipped else (image, label)
        x1 = 119 - r if flipped else r
        box = (x1, g, x1 + 64, g + 40)
        assert np.array_equal(np.asarray(out), np.asarray(source_image.crop(box)))
        assert np.array_equal(np.asarray(out_label), np.asarray(source_label.crop(box)))
        flips.add(bool(flipped))
    assert flips == {True, False}

    # a crop taller than the scaled image is padded below only, wider than it to the right only
    out, out_label = transforms.augment_train(image, label, np.random.default_rng(0), (100, 50), 120,
                                        scale_range=(1, 1), max_rotation=0)
    out, out_label = asarrays(out, out_label)
    assert out.shape == (100, 50, 3) and (out_label[90:] == 255).all() and (out_label[:90] < 255).all()
    assert (out[90:] == 0).all()


def varied(classes, ratio):
    """mmsegmentation's rule, written out: more than one class, the largest under `ratio` of the labelled."""
    _, counts = np.unique(classes[classes >= 0], return_counts=True)
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_crop_is_varied_rule():
    assert not transforms.crop_is_varied(np.array([0, 0, 0, 1, -1, -1]), 0.75)  # 3/4 is not below 0.75
    assert transforms.crop_is_varied(np.array([0, 0, 1, -1, -1, -1]), 0.75)      # ignored pixels do not count
    assert not transforms.crop_is_varied(np.array([[3, 3], [-1, -1]]), 0.75)     # a single class
    assert not transforms.crop_is_varied(np.full(5, -1), 0.75)                  # nothing labelled


def test_cat_max_ratio_redraws_only_the_offset():
    """Replays the draws: the first of 10 checked offsets that passes, else the 11th, as mmsegmentation."""
    w, h, crop = 200, 40, 40
    raw = np.zeros((h, w), np.uint8)
    raw[:, 90:110], raw[:, 110:] = 1, 9  # class 0, a 20-column band of class 1, then raw 9 = ignored
    label = Image.fromarray(raw)
    image, _ = coordinate_image(w, h)  # R = x: the image must come from the label's window
    classes = np.arange(256)
    classes[[9, 255]] = -1
    redrawn = fallback = 0
    for seed in range(40):
        r = np.random.default_rng(seed)  # augment_train's draws: flip, long side, angle, then the offsets
        flip = r.random() < 0.5
        r.integers(w, w, endpoint=True), r.uniform(0, 0)
        offsets = []
        for _ in range(11):  # x1, then y1 (always 0: the image is as high as the crop)
            offsets.append(int(r.integers(0, w - crop, endpoint=True)))
            r.integers(0, 0, endpoint=True)
        source = raw[:, ::-1] if flip else raw
        passing = [x for x in offsets[:10] if varied(classes[source[:, x:x + crop]], 0.75)]
        x1 = passing[0] if passing else offsets[10]
        redrawn += bool(passing) and passing[0] != offsets[0]
        fallback += not passing

        out, out_label = transforms.augment_train(image, label, np.random.default_rng(seed), crop, w, scale_range=(1, 1),
                                            max_rotation=0, cat_max_ratio=0.75, label_classes=classes)
        out, out_label = asarrays(out, out_label)
        assert np.array_equal(out_label, source[:, x1:x1 + crop])
        columns = np.arange(w)[::-1] if flip else np.arange(w)
        assert np.array_equal(out[0, :, 0], columns[x1:x1 + crop])  # the image's window is the label's
        again = transforms.augment_train(image, label, np.random.default_rng(seed), crop, w, scale_range=(1, 1),
                                   max_rotation=0, cat_max_ratio=0.75, label_classes=classes)
        assert all(np.array_equal(a, b) for a, b in zip(asarrays(*again), (out, out_label)))  # deterministic
    assert redrawn >= 10 and fallback >= 1  # both branches of the rule ran


def test_cat_max_ratio_default_classes_ignore_the_fill():
    """Without label_classes every raw value but label_fill is a class; padding never counts."""
    raw = np.zeros((20, 30), np.uint8)
    raw[:, 20:] = 4  # 4 of the 7 offsets of a 24-wide window pass; counting the 4 padded rows, all 7 would

    def passing(cat_max_ratio):
        found = 0
        for seed in range(20):
            _, out_label = transforms.augment_train(Image.new("RGB", (30, 20)), Image.fromarray(raw),
                                              np.random.default_rng(seed), 24, 30, scale_range=(1, 1),
                                              max_rotation=0, cat_max_ratio=cat_max_ratio)
            out_label = np.asarray(out_label).astype(int)
            assert (out_label[20:] == 255).all()
            out_label[out_label == 255] = -1
            found += varied(out_label, 0.75)
        return found
    assert passing(0.75) == 20 and passing(None) < 16


class ScriptedRng:
    """Stands in for np.random.Generator: returns scripted values, records the ranges asked for."""

    def __init__(self, integers=(), uniforms=()):
        self.ints, self.floats, self.calls = list(integers), list(uniforms), []

    def integers(self, low, high=None):
        self.calls.append(("integers", low, high))
        return self.ints.pop(0)

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self.floats.pop(0)


def test_photometric_identity_when_every_step_is_skipped():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    rng = ScriptedRng(integers=[0] * 5)  # brightness off, contrast last, contrast/saturation/hue off
    out = transforms.photometric_distortion(pixels, rng)
    assert np.array_equal(out, pixels) and out.dtype == np.uint8
    assert rng.calls == [("integers", 2, None)] * 5 and not rng.ints  # no value is drawn for a skipped step


def test_photometric_ranges_order_and_hue_units():
    red = np.array([[[255, 0, 0], [100, 50, 50]]], np.uint8)
    # every step on, contrast first (mode 1): brightness 0, contrast 1, saturation 1, hue −18 (= −36°)
    rng = ScriptedRng(integers=[1, 1, 1, 1, 1, -18], uniforms=[0.0, 1.0, 1.0])
    out = transforms.photometric_distortion(red, rng)
    assert rng.calls == [("integers", 2, None), ("uniform", -32, 32), ("integers", 2, None),
                         ("integers", 2, None), ("uniform", 0.5, 1.5), ("integers", 2, None), ("uniform", 0.5, 1.5),
                         ("integers", 2, None), ("integers", -18, 18)]
    assert out[0, 0].tolist() == [255, 0, 153]  # hue 0° → 324°: red plus 3/5 blue
    # contrast last (mode 0), each step truncated to uint8: 100 + 30.6 → 130, · 1.5 → 195 (rounding: 196)
    rng = ScriptedRng(integers=[1, 0, 0, 0, 1], uniforms=[30.6, 1.5])
    assert transforms.photometric_distortion(red, rng)[0, 1].tolist() == [195, 120, 120]
    # brightness clips at 0 and 255 before the truncation, as mmsegmentation's convert
    rng = ScriptedRng(integers=[1, 0, 0, 0, 0], uniforms=[-31.9])
    assert transforms.photometric_distortion(red, rng)[0].tolist() == [[223, 0, 0], [68, 18, 18]]


def hsv_step(pixels, saturation_factor=1.0, hue_shift=0.0):
    """Saturation and hue in HSV with the standard library's colorsys, pixel by pixel, rounded."""
    out = np.empty_like(pixels)
    for index in np.ndindex(pixels.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(pixels[index] / 255.0))
        rgb = colorsys.hsv_to_rgb((h + hue_shift / 360) % 1.0, min(s * saturation_factor, 1.0), v)
        out[index] = np.clip(np.rint(np.array(rgb) * 255), 0, 255)
    return out


def photometric_by_hand(pixels, rng):
    """mmsegmentation's PhotoMetricDistortion written out, with its ranges, drawing as it does."""
    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    steps = []
    if rng.integers(2):
        pixels = convert(pixels, beta=rng.uniform(-32, 32))
        steps.append("brightness")
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        pixels = convert(pixels, alpha=rng.uniform(0.5, 1.5))
        steps.append("contrast first")
    if rng.integers(2):
        pixels = hsv_step(pixels, saturation_factor=rng.uniform(0.5, 1.5))
        steps.append("saturation")
    if rng.integers(2):
        pixels = hsv_step(pixels, hue_shift=2 * rng.integers(-18, 18))  # OpenCV's 8-bit hue: 2° units
        steps.append("hue")
    if mode == 0 and rng.integers(2):
        pixels = convert(pixels, alpha=rng.uniform(0.5, 1.5))
        steps.append("contrast last")
    return pixels, steps


def test_photometric_matches_a_direct_computation():
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (6, 6, 3), np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [90, 90, 90]]  # greys: no hue
    pixels[1, :2] = [[255, 0, 0], [0, 0, 255]]
    seen = set()
    for seed in range(64):
        expected, steps = photometric_by_hand(pixels, np.random.default_rng(seed))
        out = transforms.photometric_distortion(pixels, np.random.default_rng(seed))
        difference = np.abs(out.astype(int) - expected)
        if not {"saturation", "hue"} & set(steps):
            assert difference.max() == 0, steps  # float32 math, clipped and truncated as mmsegmentation
        else:
            assert difference.max() <= 2 and difference.mean() < 0.1, steps  # float HSV vs colorsys' float64
        seen.update(steps)
        seen.add(len(steps))
    assert seen >= {"brightness", "contrast first", "contrast last", "saturation", "hue", 0, 4}


def test_photometric_in_augment_train_keeps_the_padding_and_follows_the_geometry():
    image, label = coordinate_image(40, 30)
    brightened = 0
    for seed in range(24):
        out, out_label = transforms.augment_train(image, label, np.random.default_rng(seed), 48, 40, scale_range=(1, 1),
                                            max_rotation=0, photometric=True)
        plain, plain_label = transforms.augment_train(image, label, np.random.default_rng(seed), 48, 40,
                                                scale_range=(1, 1), max_rotation=0)
        r = np.random.default_rng(seed)
        r.random(), r.integers(40, 40, endpoint=True), r.uniform(0, 0)  # flip, long side, angle
        r.integers(0, 0, endpoint=True), r.integers(0, 0, endpoint=True)  # the crop's offset: 48 covers 40×30
        state = r.bit_generator.state
        expected = transforms.photometric_distortion(np.asarray(plain), r)  # then the distortion's draws
        r.bit_generator.state = state
        brightened += bool(r.integers(2)) and r.uniform(-32, 32) > 0  # what would lift the black padding
        out = np.asarray(out)
        assert np.array_equal(np.asarray(out_label), np.asarray(plain_label))
        assert np.array_equal(out[:30, :40], expected[:30, :40])
        assert (out[30:] == 0).all() and (out[:, 40:] == 0).all()  # padding stays 0, as before normalising
    assert brightened


# ============================================================================= 6. coco_masks.py: COCO's masks as pycocotools makes them


def test_rle_string_decoding():
    assert coco_masks.rle_string_counts("537OM") == [5, 3, 7, 2, 4]  # worked by hand: a negative delta at i ≥ 3
    assert coco_masks.rle_string_counts("T3") == [100]
    counts = [17, 250, 3, 4000, 1, 70000]
    assert coco_masks.rle_string_counts(rle_string(counts)) == counts


def decode(rle):
    """pycocotools' decode as bool, without its DeprecationWarning under NumPy 2 (copy=False in __array__)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)


def random_polygon(rng, h, w):
    """One polygon of a random kind: [x1, y1, ...] (the kinds are the rasteriser's corner cases)."""
    kind = rng.integers(8)
    k = int(rng.integers(3, 40))
    if kind == 0:  # star-shaped, like an object outline, maybe partly off the image
        centre, radius = rng.uniform(-0.2, 1.2, 2) * (w, h), rng.uniform(0.5, 0.7 * max(h, w))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = radius * rng.uniform(0.2, 1, k)
        points = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
    elif kind == 1:  # arbitrary, self-intersecting vertices
        points = rng.uniform(-0.3, 1.3, (k, 2)) * (w, h)
    elif kind == 2:  # tiny: within a pixel or two
        points = rng.uniform(0, 1, 2) * (w, h) + rng.uniform(0, 2, (k % 5 + 1, 2))
    elif kind == 3:  # integer and half-integer vertices: ties of the rounding on the 5× grid
        points = np.round(rng.uniform(-2, 1.1, (k, 2)) * (w, h) * 2) / 2
    elif kind == 4:  # degenerate: fewer than 3 points
        points = rng.uniform(-0.1, 1.1, (int(rng.integers(1, 3)), 2)) * (w, h)
    elif kind == 5:  # zero area: collinear points, or one point repeated
        a, b = rng.uniform(0, 1, (2, 2)) * (w, h)
        points = a + rng.uniform(0, 1, (k, 1)) * (b - a) * (rng.random() < 0.7)
    elif kind == 6:  # all outside the image, on one side
        side = rng.integers(4)
        points = rng.uniform(0, 1, (k, 2)) * (w, h)
        axis = side % 2
        points[:, axis] = -1 - rng.uniform(0, 20, k) if side < 2 else (1 + rng.uniform(0, 1, k)) * (w, h)[axis]
    else:  # an axis-aligned box, maybe with fractional corners
        x0, y0 = rng.uniform(-0.2, 1, 2) * (w, h)
        x1, y1 = x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)
        points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    return points.ravel().tolist()


def test_polygon_masks_equal_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(400):
        h, w = (int(v) for v in rng.integers(1, 80 if trial % 4 else 500, 2))
        parts = [random_polygon(rng, h, w) for _ in range(int(rng.integers(1, 4)))]
        for polygon in parts:  # each part alone, through pycocotools' polygon → RLE, whatever its length
            expected = decode(coco_mask_c.frPoly([polygon], h, w))[:, :, 0]
            assert np.array_equal(coco_masks.segmentation_mask([polygon], h, w), expected), (h, w, polygon)
        if all(len(p) > 4 for p in parts):  # several parts: the union, as annToMask merges them
            expected = decode(coco_mask.merge(coco_mask.frPyObjects(parts, h, w)))
            assert np.array_equal(coco_masks.segmentation_mask(parts, h, w), expected), (h, w, parts)


def test_polygon_edge_cases():
    square = [5, 5, 45, 5, 45, 35, 5, 35]  # a pixel is in when its centre is: columns 5..44, rows 5..34
    expected = np.zeros((50, 60), bool)
    expected[5:35, 5:45] = True
    assert np.array_equal(coco_masks.segmentation_mask([square], 50, 60), expected)
    assert np.array_equal(coco_masks.segmentation_mask([square + [7]], 50, 60), expected)  # odd count: last ignored
    assert not coco_masks.segmentation_mask([], 50, 60).any() and not coco_masks.segmentation_mask([[]], 50, 60).any()
    covering = [-100, -100, 500, -100, 500, 500, -100, 500]
    assert coco_masks.segmentation_mask([covering], 50, 60).all()
    for bad in ([0, 0, float("nan"), 3, 4, 4], [0, 0, 1e9, 0, 5, 5]):  # damaged, not a polygon: no huge walk
        with pytest.raises(ValueError):
            coco_masks.segmentation_mask([bad], 50, 60)


def test_rle_decoding_equals_pycocotools():
    rng = np.random.default_rng(1)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        mask = rng.random((h, w)) < rng.uniform(0, 1)
        if rng.random() < 0.5:  # long runs as well as speckle
            mask = np.repeat(np.repeat(mask[::4, ::4], 4, 0), 4, 1)[:h, :w]
            h, w = mask.shape
        compressed = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        string = {"size": [h, w], "counts": compressed["counts"].decode()}  # as stored in the JSON
        counts = {"size": [h, w], "counts": rle_counts(mask)}  # iscrowd annotations: a list of run lengths
        assert np.array_equal(decode(coco_mask.frPyObjects(counts, h, w)), mask)
        assert np.array_equal(coco_masks.segmentation_mask(string, h, w), mask)
        assert np.array_equal(coco_masks.segmentation_mask(counts, h, w), mask)


def test_coco_labels_equal_pycocotools_and_cache_follows_the_rasteriser(tmp_path, monkeypatch):
    make_coco(tmp_path)
    annotations = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    dataset = data.get_dataset("coco", tmp_path, "train", mode="val")
    for index, image_id in enumerate((1, 2)):  # the released code's label: the first object keeps its pixels
        expected = np.zeros((50, 60), np.int64)
        for a in annotations["annotations"]:
            if a["image_id"] == image_id and a["category_id"] in coco_masks.VOC_CLASS_OF_COCO:
                segmentation = a["segmentation"]  # pycocotools' annToRLE, then decode
                if isinstance(segmentation, list):
                    rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, 50, 60))
                elif isinstance(segmentation["counts"], list):
                    rle = coco_mask.frPyObjects(segmentation, 50, 60)
                else:
                    rle = segmentation
                mask = decode(rle)
                expected[mask & (expected == 0)] = coco_masks.VOC_CLASS_OF_COCO[a["category_id"]]
        assert torch.equal(dataset[index][1], torch.from_numpy(expected))

    cache = tmp_path / "annotations" / "encnet_voc_index_train2017.json"
    stored = json.loads(cache.read_text())
    assert stored["ids"] == [1, 2] and stored["rasteriser"] == coco_masks.coco_label_version()
    cache.write_text(json.dumps({**stored, "ids": [2]}))
    assert len(data.get_dataset("coco", tmp_path, "train")) == 1  # same code, same file: believed
    monkeypatch.setattr(layouts, "coco_label_version", lambda: "another rasteriser")
    assert len(data.get_dataset("coco", tmp_path, "train")) == 2  # recomputed
    assert json.loads(cache.read_text())["rasteriser"] == "another rasteriser"
    cache.write_text(json.dumps({"annotation_bytes": stored["annotation_bytes"], "ids": [2]}))  # older format
    assert len(data.get_dataset("coco", tmp_path, "train")) == 2


# ============================================================================= 7. context_data.py: the built-in data


def test_context_scenes_tell_what_things_are_only_by_the_tree(tmp_path, monkeypatch):
    """The built-in data's premise (data.py): each panorama holds ground, water, a tree at one end and one
    scene's white things beyond it; ground, water and things have the same colours in every scene, so only the
    tree's colour tells what the things are. Large things (sheep, swans) in two scenes, small in the others."""
    h, w, zone = context_data.CONTEXT_HEIGHT, context_data.CONTEXT_WIDTH, context_data.TREE_ZONE
    areas = {}
    for i in range(60):
        image, label = context_data.context_scene(np.random.default_rng([9, i]))
        assert image.shape == (h, w, 3) and image.dtype == np.uint8 and label.shape == (h, w)
        scene = int(label.max()) - 3  # the things' class tells the scene
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3 + scene}
        tree, things = (np.nonzero((label == k).any(0))[0] for k in (2, 3 + scene))
        if tree.min() >= w / 2:  # mirror a panorama whose tree is on the right
            tree, things = w - 1 - tree, w - 1 - things
        # the tree's centre within `zone` of the end and its half-width ≤ 14; the things ≥ zone + 10 from it
        assert tree.max() < zone + context_data.TREE_HALF_WIDTH[1] and things.min() >= zone + 10
        for kind, rgb in ((0, context_data.GROUND_RGB), (1, context_data.WATER_RGB)):
            # the mean of ≥ 3,000 pixels of (rgb + N(0, 18²)) · brightness U(0.85, 1.15): the noise moves each
            # channel's ratio by std ≤ 18/√3000/60 < 0.006, clipping at 0 or 255 by less; uint8 truncation −0.5
            ratio = (image[label == kind].mean(0) + 0.5) / np.array(rgb)
            assert 0.85 - 0.02 < ratio.min() and ratio.max() < 1.15 + 0.02 and np.ptp(ratio) < 0.03, (scene, kind)
        # the things are white in every scene: (235 + N(0, 10²) per thing and channel) · brightness ≥ 0.85 is
        # above 150 unless a draw is 5 σ low; every tree has a channel of at most 60 + 10 · 5, times 1.15
        assert image[label == 3 + scene].min() >= 150 and image[label == 2].mean(0).min() < 130
        areas.setdefault(scene, []).append((label == 3 + scene).mean())
    # every scene drawn; count × π r² of context_data.CONTEXT_SCENES: large things ≥ 3 · π 12² = 6.6 % of a panorama,
    # small ones ≤ 6 · π 9² = 7.5 % (a disc's pixel count is within 2πr + 4 of π r²)
    assert sorted(areas) == [0, 1, 2, 3]
    large, small = (np.mean([a for s in group for a in areas[s]]) for group in ((0, 1), (2, 3)))
    assert large > 0.1 and small < 0.06 and min(min(areas[0]), min(areas[1])) > max(max(areas[2]), max(areas[3])) - 0.02
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(context_data, "CONTEXT_SIZES", {"train": 8, "val": 40})
    context_data.save_context_samples(tmp_path / "samples.png")
    picture = np.asarray(Image.open(tmp_path / "samples.png"))
    n = len(context_data.CONTEXT_SCENES)
    assert picture.shape == (n * h + (n - 1) * 4, 2 * w + 4, 3)  # one panorama per scene
    images, labels = context_data.context_split("val")
    first = int((labels.flatten(1).max(1).values == 3).nonzero()[0, 0])  # the first field panorama: row 0
    assert (picture[:h, :w] == images[first].permute(1, 2, 0).numpy()).all()
    assert (picture[:h, w + 4:] == np.array(context_data.CONTEXT_PALETTE, np.uint8)[labels[first].numpy()]).all()


def test_context_cache_follows_the_generator(tmp_path, monkeypatch):
    """The cache of the built-in data is keyed by the generator's source and constants: a changed constant
    generates afresh instead of reading the images the old constant drew; a damaged file is generated again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(context_data, "CONTEXT_SIZES", {"train": 2, "val": 6})
    before = context_data.context_split("val")[1]
    cached = set((tmp_path / "encnet").glob("context-val-*.npz"))
    monkeypatch.setattr(context_data, "TREE_ZONE", 60)
    labels = context_data.context_split("val")[1]
    (new_file,) = set((tmp_path / "encnet").glob("context-val-*.npz")) - cached
    assert len(cached) == 1 and not torch.equal(labels, before)
    things = (labels >= 3).any(1)  # N×W: columns holding a thing
    w = context_data.CONTEXT_WIDTH
    assert all(c.min() >= 70 or c.max() < w - 70 for c in (row.nonzero()[:, 0] for row in things))
    new_file.write_bytes(b"damaged")
    assert torch.equal(context_data.context_split("val")[1], labels) and new_file.stat().st_size > 100


# ============================================================================= 8. data.py, layouts.py: the datasets in their layouts, your own folder, the checks, the sampler


def test_ade20k_labels_and_shapes(tmp_path):
    make_ade(tmp_path)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):  # the parent or the folder itself
        dataset = data.get_dataset("ade20k", root, "val")
        assert len(dataset) == 3 and dataset.num_classes == 150 and len(dataset.palette) == 150
        image, label = dataset[0]
        assert image.dtype == torch.uint8 and image.shape == (3, 30, 40) and image.is_contiguous()
        assert label.dtype == torch.int64
        assert torch.equal(label, torch.from_numpy(blocks(40, 30, (-1, 0, 74, 149))))  # 0 → ignore, v → v−1
    assert len(data.get_dataset("ade20k", tmp_path, "train+val")) == 6


def test_voc_aug_and_pcontext_labels(tmp_path):
    make_voc(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", "train", ["a", "b"], (0, 20, 255), True)
    make_voc(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", "val", ["c"], (0, 20, 255), True)
    voc = data.get_dataset("pascal_voc", tmp_path, "train+val", mode="val")
    assert len(voc) == 3 and voc.num_classes == 21 and voc.classes[0] == "background"
    assert torch.equal(voc[2][1], torch.from_numpy(blocks(40, 30, (0, 20, -1))))  # palette indices, 255 → ignore

    make_voc(tmp_path, "VOC2012", "SegmentationClassAug", "SegmentationAug", "train_aug", ["a", "b", "c"],
             (7, 255), False)
    assert len(data.get_dataset("pascal_aug", tmp_path, "train_aug")) == 3
    aug_val = data.get_dataset("pascal_aug", tmp_path, "val")  # VOC's val list, labels from SegmentationClassAug
    assert len(aug_val) == 1 and torch.equal(aug_val[0][1], torch.from_numpy(blocks(40, 30, (7, -1))))

    make_voc(tmp_path, "VOC2010", "SegmentationClassContext", "SegmentationContext", "val", ["d"], (0, 1, 59), False)
    context = data.get_dataset("pcontext", tmp_path / "VOCdevkit", "val")
    assert context.num_classes == 59
    assert torch.equal(context[0][1], torch.from_numpy(blocks(40, 30, (-1, 0, 58))))  # background → ignore


def test_item_modes(tmp_path):
    make_ade(tmp_path)
    for mode, shape in (("train", (24, 24)), ("center", (24, 24)), ("val", (30, 40))):
        image, label = data.get_dataset("ade20k", tmp_path, "train", crop_size=24, base_size=40, mode=mode)[1]
        assert image.shape == (3, *shape) and image.dtype == torch.uint8 and image.is_contiguous()
        assert label.shape == shape and label.dtype == torch.int64
        assert label.min() >= -1 and label.max() <= 149
    assert data.get_dataset("ade20k", tmp_path, "val").mode == "val"
    assert data.get_dataset("ade20k", tmp_path, "train").mode == "train"


def test_augment_pads_with_zero_and_ignore(tmp_path):
    image, label = coordinate_image(40, 30)
    out, out_label = transforms.augment_train(image, label, np.random.default_rng(0), 64, 40, scale_range=(1, 1),
                                        max_rotation=0)
    out, out_label = np.asarray(out), np.asarray(out_label)
    assert (out_label[30:] == 255).all() and (out_label[:, 40:] == 255).all() and (out_label[:30, :40] < 255).all()
    assert (out[30:] == 0).all() and (out[:, 40:] == 0).all()

    make_ade(tmp_path)  # through the dataset: the long side is at most 2·20 = 40 < 48, so always padded
    image, label = data.get_dataset("ade20k", tmp_path, "train", crop_size=48, base_size=20)[0]
    assert (label[-1] == -1).all() and (label[:, -1] == -1).all() and (image[:, -1] == 0).all()
    assert (label >= 0).any()


def assert_deterministic_and_worker_independent(dataset, index, batches, image_shape):
    """An item is the same when read again and changes with the epoch; epoch 1 in batches of 2 is the same
    through 0 and 2 DataLoader workers."""
    first = dataset[index]
    assert all(torch.equal(a, b) for a, b in zip(first, dataset[index]))
    dataset.set_epoch(1)
    assert not torch.equal(first[0], dataset[index][0])

    def epoch_batches(workers):
        sampler = data.ShardedBatchSampler(len(dataset), 2, seed=3)
        sampler.set_epoch(1)
        return list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers))
    serial, parallel = epoch_batches(workers=0), epoch_batches(workers=2)
    assert len(serial) == batches
    for (image_a, label_a), (image_b, label_b) in zip(serial, parallel):
        assert image_a.shape == (2, *image_shape) and torch.equal(image_a, image_b) and torch.equal(label_a, label_b)


def test_items_are_deterministic_and_worker_independent(tmp_path):
    make_ade(tmp_path, n=6)
    dataset = data.get_dataset("ade20k", tmp_path, "train", crop_size=24, base_size=40, seed=3)
    assert_deterministic_and_worker_independent(dataset, 2, batches=3, image_shape=(3, 24, 24))


def test_sharded_batch_sampler():
    def epoch_batches(world_size, per_rank, epoch=0, **kwargs):
        samplers = [data.ShardedBatchSampler(22, per_rank * world_size, rank, world_size, seed=5, **kwargs)
                    for rank in range(world_size)]
        for s in samplers:
            s.set_epoch(epoch)
        return [sum(parts, []) for parts in zip(*samplers)]  # concatenated over ranks, batch by batch

    single = epoch_batches(1, 4)
    assert single == epoch_batches(2, 2) == epoch_batches(4, 1)
    assert len(single) == 5 and all(len(b) == 4 for b in single)  # 22 items: the last 2 are dropped
    assert len(set(sum(single, []))) == 20
    assert single != epoch_batches(1, 4, epoch=1)
    last = epoch_batches(2, 2, drop_last=False)
    assert len(last) == 6 and sorted(sum(last, [])) == list(range(22))
    assert epoch_batches(1, 4, shuffle=False)[1] == [4, 5, 6, 7]

    resumed = data.ShardedBatchSampler(22, 4, seed=5)
    resumed.set_epoch(0, start_batch=3)
    assert len(resumed) == 2 and list(resumed) == single[3:]
    resumed.set_epoch(1)
    assert resumed.start_batch == 0 and len(resumed) == 5
    with pytest.raises(ValueError):
        data.ShardedBatchSampler(22, 4, world_size=3)


def test_shard_indices_cover_every_item_once():
    shards = [data.shard_indices(11, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(11)) and shards[1] == [1, 4, 7, 10]


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(errors.DataError, match="nowhere.*expected ROOT/ADEChallengeData2016"):
        data.get_dataset("ade20k", tmp_path / "nowhere", "train")
    with pytest.raises(errors.DataError, match="nowhere.*VOCdevkit/VOC2010"):
        data.get_dataset("pcontext", tmp_path / "nowhere", "train")
    with pytest.raises(errors.DataError, match="cifar-10-batches-py"):
        data.get_dataset("cifar10", tmp_path, "train")


def test_bad_files_raise_data_error_naming_them(tmp_path):
    make_ade(tmp_path)
    images = tmp_path / "ADEChallengeData2016" / "images" / "training"
    labels = tmp_path / "ADEChallengeData2016" / "annotations" / "training"
    jpeg = (images / "ADE_0.jpg").read_bytes()
    (images / "ADE_0.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    write_png(labels / "ADE_1.png", blocks(41, 30, (1,)))
    write_png(labels / "ADE_2.png", blocks(40, 30, (3, 151)))
    dataset = data.get_dataset("ade20k", tmp_path, "train", crop_size=24, base_size=40)
    with pytest.raises(errors.DataError, match="(?i)ADE_0.jpg.*truncated"):
        dataset[0]
    with pytest.raises(errors.DataError, match=r"ADE_1.png.*41×30.*40×30"):
        dataset[1]
    with pytest.raises(errors.DataError, match="ADE_2.png.*value 151"):
        dataset[2]
    (labels / "ADE_2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(errors.DataError, match="ADE_2.png"):
        dataset[2]

    make_voc(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", "train", ["a"], (0,), True)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").write_text("a\nmissing_id\n")
    with pytest.raises(errors.DataError, match="missing_id.jpg"):
        data.get_dataset("pascal_voc", tmp_path, "train")
    with pytest.raises(errors.DataError, match="val.txt"):
        data.get_dataset("pascal_voc", tmp_path, "val")


def test_coco_to_voc(tmp_path, capsys):
    make_coco(tmp_path)
    dataset = data.get_dataset("coco", tmp_path, "train", mode="val")
    assert len(dataset) == 2 and dataset.num_classes == 21 and dataset.classes[15] == "person"
    expected = np.zeros((50, 60), np.int64)
    expected[rectangle(30, 20, 55, 40)] = 2
    expected[rectangle(5, 5, 45, 35)] = 15
    assert torch.equal(dataset[0][1], torch.from_numpy(expected))
    assert torch.equal(dataset[1][1], torch.from_numpy(rectangle(10, 10, 60, 40) * 7))

    cache = tmp_path / "annotations" / "encnet_voc_index_train2017.json"
    assert json.loads(cache.read_text())["ids"] == [1, 2]
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "ids": [2]}))  # a reused cache is believed
    assert len(data.get_dataset("coco", tmp_path, "train")) == 1

    cache.unlink()
    cache.mkdir()  # the cache path cannot be written: say so and go on
    assert len(data.get_dataset("coco", tmp_path, "train")) == 2
    assert "encnet_voc_index_train2017.json" in capsys.readouterr().err


def write_cifar(base, n=4):
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (base / name).write_bytes(pickle.dumps(batch))


def test_cifar10(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    train = data.get_dataset("cifar10", tmp_path, "train")
    test = data.get_dataset("cifar10", tmp_path / "cifar-10-batches-py", "test")
    assert len(train) == 20 and len(test) == 4 and train.num_classes == 10
    stored = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    image, label = test[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label.dtype == torch.int64
    assert label.ndim == 0 and label == stored[b"labels"][1]
    assert np.array_equal(image.numpy().ravel(), stored[b"data"][1])

    original = data.get_dataset("cifar10", tmp_path, "train", mode="val")[7][0]
    padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
    windows = {(x, y, f) for x in range(9) for y in range(9) for f in (0, 1)}
    seen = set()
    for epoch in range(6):
        train.set_epoch(epoch)
        augmented = train[7][0]
        assert augmented.shape == (3, 32, 32) and augmented.is_contiguous()
        match = [(x, y, f) for x, y, f in windows
                 if torch.equal(augmented, padded[:, y:y + 32, x:x + 32].flip(2) if f else padded[:, y:y + 32, x:x + 32])]
        assert match  # a 32×32 window of the zero-padded image, maybe mirrored
        seen.add(match[0])
    assert len(seen) > 1

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(errors.DataError, match="data_batch_3"):
        data.get_dataset("cifar10", tmp_path, "train")


def test_dataset_info():
    assert data.dataset_info("ade20k")["num_classes"] == 150
    assert data.dataset_info("pascal_aug") == data.dataset_info("pascal_voc")
    cifar = data.dataset_info("cifar10")
    assert cifar["num_classes"] == 10 and len({tuple(c) for c in cifar["palette"]}) == 10


def test_cityscapes_label_ids_map_to_the_19_classes(tmp_path):
    make_cityscapes(tmp_path / "cityscapes")
    for root in (tmp_path, tmp_path / "cityscapes"):  # the parent or the folder itself
        train = data.get_dataset("cityscapes", root, "train", mode="val")
        assert len(train) == 4 and train.num_classes == 19 and train.classes[0] == "road"
        assert train.classes[18] == "bicycle" and len(train.palette) == 19
    expected = np.full(34, -1)
    expected[data.CITYSCAPES_LABEL_IDS] = np.arange(19)  # 7 road, 8 sidewalk, ..., 33 bicycle; others ignored
    image, label = train[3]
    assert image.shape == (3, 4, 34) and image.dtype == torch.uint8
    assert torch.equal(label, torch.from_numpy(expected[cityscapes_ids()]))
    assert str(train.samples[3][1]).endswith("bremen/bremen_000001_000001_gtFine_labelIds.png")
    assert len(data.get_dataset("cityscapes", tmp_path, "train+val")) == 6
    test = data.get_dataset("cityscapes", tmp_path, "test")
    assert test.mode == "val" and (test[0][1] == -1).all()
    assert data.get_dataset("cityscapes", tmp_path, "train", crop_size=8, base_size=34)[0][0].shape == (3, 8, 8)

    table = json.loads((data.Path(data.__file__).with_name("classes.json")).read_text())["cityscapes"]
    assert table["label_ids"] == data.CITYSCAPES_LABEL_IDS and data.dataset_info("cityscapes")["num_classes"] == 19
    classes = np.array([[0, 18, -1], [7, 13, 10]])  # road, bicycle, ignore; traffic sign, car, sky
    ids = data.train_ids_to_label_ids(classes)
    assert ids.dtype == np.uint8 and ids.tolist() == [[7, 33, 0], [20, 26, 23]]
    assert torch.equal(data.train_ids_to_label_ids(torch.from_numpy(classes)), torch.from_numpy(ids))
    assert np.array_equal(expected[data.train_ids_to_label_ids(np.arange(19))], np.arange(19))  # round trip


def test_cityscapes_prefers_train_ids(tmp_path):
    make_cityscapes(tmp_path, train_ids=True)
    train = data.get_dataset("cityscapes", tmp_path, "train", mode="val")
    assert str(train.samples[0][1]).endswith("_gtFine_labelTrainIds.png")
    assert torch.equal(train[0][1], torch.from_numpy(blocks(34, 4, (0, 18, -1))))  # 255 → ignore
    write_png(tmp_path / "gtFine/train/aachen/aachen_000000_000000_gtFine_labelTrainIds.png", blocks(34, 4, (19,)))
    with pytest.raises(errors.DataError, match="aachen_000000_000000_gtFine_labelTrainIds.png.*value 19.*0..18, 255"):
        train[0]
    # some images lack them: the label ids of the download are read for all
    (tmp_path / "gtFine/train/bremen/bremen_000001_000001_gtFine_labelTrainIds.png").unlink()
    train = data.get_dataset("cityscapes", tmp_path, "train", mode="val")
    assert all(str(label).endswith("_gtFine_labelIds.png") for _, label in train.samples)


def test_cityscapes_errors_name_the_file(tmp_path):
    with pytest.raises(errors.DataError, match="nowhere.*expected ROOT/leftImg8bit/SPLIT/CITY"):
        data.get_dataset("cityscapes", tmp_path / "nowhere", "train")
    make_cityscapes(tmp_path)
    labels = tmp_path / "gtFine" / "train" / "aachen"
    write_png(labels / "aachen_000000_000000_gtFine_labelIds.png", blocks(35, 4, (7,)))
    write_png(labels / "aachen_000000_000001_gtFine_labelIds.png", blocks(34, 4, (7, 34)))
    train = data.get_dataset("cityscapes", tmp_path, "train", mode="val")
    with pytest.raises(errors.DataError, match=r"aachen_000000_000000_gtFine_labelIds.png.*35×4.*34×4"):
        train[0]
    with pytest.raises(errors.DataError, match="000001_gtFine_labelIds.png: label value 34, legal values are 0..33$"):
        train[1]

    (labels / "aachen_000000_000001_gtFine_labelIds.png").unlink()
    with pytest.raises(errors.DataError, match="aachen_000000_000001_gtFine_labelIds.png not found.*leftImg8bit"):
        data.get_dataset("cityscapes", tmp_path, "train")
    write_png(labels / "aachen_000000_000001_gtFine_labelIds.png", cityscapes_ids())
    write_png(labels / "aachen_000000_000007_gtFine_labelIds.png", cityscapes_ids())  # a label without image
    with pytest.raises(errors.DataError, match="aachen_000000_000007_gtFine_labelIds.png has no image"):
        data.get_dataset("cityscapes", tmp_path, "train")
    (labels / "aachen_000000_000007_gtFine_labelIds.png").unlink()
    (tmp_path / "gtFine" / "train" / "ulm").mkdir()  # a city of labels without images
    with pytest.raises(errors.DataError, match="gtFine/train/ulm have no images"):
        data.get_dataset("cityscapes", tmp_path, "train")
    shutil.rmtree(tmp_path / "leftImg8bit" / "val" / "frankfurt")
    shutil.rmtree(tmp_path / "gtFine" / "val" / "frankfurt")
    with pytest.raises(errors.DataError, match="no images.*leftImg8bit/val"):
        data.get_dataset("cityscapes", tmp_path, "val")
    with pytest.raises(errors.DataError, match="train, val, test"):
        data.get_dataset("cityscapes", tmp_path, "train_extra")


def test_empty_splits_are_data_errors_naming_the_folder_or_list(tmp_path):
    make_ade(tmp_path)
    for f in (tmp_path / "ADEChallengeData2016" / "images" / "validation").iterdir():
        f.unlink()
    with pytest.raises(errors.DataError, match="no images.*images/validation"):
        data.get_dataset("ade20k", tmp_path, "val")
    make_voc(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", "val", ["a"], (0,), True)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(errors.DataError, match="Segmentation/val.txt is empty"):
        data.get_dataset("pascal_voc", tmp_path, "val")
    coco = tmp_path / "coco"
    make_coco(coco)
    instances = coco / "annotations" / "instances_train2017.json"
    content = json.loads(instances.read_text())
    instances.write_text(json.dumps({**content, "annotations": content["annotations"][4:]}))  # none selected
    with pytest.raises(errors.DataError, match="instances_train2017.json.*1,000 pixels"):
        data.get_dataset("coco", coco, "train")


def test_check_dataset_reports_the_first_bad_item_for_any_worker_count(tmp_path):
    make_ade(tmp_path, n=40)
    dataset = data.get_dataset("ade20k", tmp_path, "train")
    assert data.check_dataset(dataset, workers=1) == 40 and data.check_dataset(dataset, workers=64) == 40
    labels = tmp_path / "ADEChallengeData2016" / "annotations" / "training"
    images = tmp_path / "ADEChallengeData2016" / "images" / "training"
    write_png(labels / "ADE_33.png", blocks(40, 30, (151,)))
    write_png(labels / "ADE_21.png", blocks(41, 30, (1,)))
    (images / "ADE_35.jpg").write_bytes(b"not a jpeg")
    dataset = data.get_dataset("ade20k", tmp_path, "train")
    for workers in (1, 2):
        with pytest.raises(errors.DataError, match=r"^\S*ADE_21.png: label is 41×30 but image \S*ADE_21.jpg is 40×30$"):
            data.check_dataset(dataset, workers=workers, chunk=4)
    write_png(labels / "ADE_21.png", blocks(40, 30, (1,)))
    with pytest.raises(errors.DataError, match="ADE_33.png: label value 151"):
        data.check_dataset(dataset, workers=2)
    write_png(labels / "ADE_33.png", blocks(40, 30, (1,)))
    with pytest.raises(errors.DataError, match="ADE_35.jpg: cannot read"):
        data.check_dataset(dataset, workers=2)
    # a truncated JPEG has a valid header: only decoding the body finds it
    jpeg = (images / "ADE_3.jpg").read_bytes()
    (images / "ADE_35.jpg").write_bytes(jpeg)
    (images / "ADE_3.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    with pytest.raises(errors.DataError, match="(?i)ADE_3.jpg.*truncated"):
        data.check_dataset(dataset, workers=2)
    # a label whose image is missing from the download is found when the split is listed
    (images / "ADE_3.jpg").unlink()
    with pytest.raises(errors.DataError, match=r"ADE_3.jpg not found \(its label \S*ADE_3.png is there\)"):
        data.get_dataset("ade20k", tmp_path, "train")


def test_check_dataset_accepts_every_dataset_type(tmp_path):
    make_voc(tmp_path, "VOC2012", "SegmentationClass", "Segmentation", "val", ["a", "b"], (0, 20, 255), True)
    make_voc(tmp_path, "VOC2012", "SegmentationClassAug", "SegmentationAug", "train_aug", ["a"], (7, 255), False)
    make_voc(tmp_path, "VOC2010", "SegmentationClassContext", "SegmentationContext", "val", ["d"], (0, 59), False)
    make_coco(tmp_path / "coco")
    make_cityscapes(tmp_path / "cityscapes")
    write_cifar(tmp_path / "cifar-10-batches-py")
    for name, root, split, size in (("pascal_voc", tmp_path, "val", 2), ("pascal_aug", tmp_path, "train_aug", 1),
                                    ("pcontext", tmp_path, "val", 1), ("coco", tmp_path / "coco", "train", 2),
                                    ("cityscapes", tmp_path, "train+val+test", 8), ("cifar10", tmp_path, "val", 4)):
        assert data.check_dataset(data.get_dataset(name, root, split), workers=2, chunk=1) == size, name
    write_jpeg(tmp_path / "coco" / "train2017" / f"{2:012d}.jpg", 60, 51)  # not the annotation's size
    with pytest.raises(errors.DataError, match=r"instances_train2017.json \(image id 2\): label is 60×50 but image"):
        data.check_dataset(data.get_dataset("coco", tmp_path / "coco", "train"), workers=1)


def test_non_square_crops_through_the_dataset(tmp_path):
    make_ade(tmp_path)  # 40×30 images
    for mode in ("train", "center"):
        image, label = data.get_dataset("ade20k", tmp_path, "train", crop_size=(16, 24), base_size=40, mode=mode)[0]
        assert image.shape == (3, 16, 24) and label.shape == (16, 24)
    image, label = data.get_dataset("ade20k", tmp_path, "train", crop_size=(16, 24), mode="val")[0]
    assert image.shape == (3, 30, 40)

    # center: scaled to just cover the crop, then its middle. A 2:1 crop of a 4:3 image keeps the full width.
    picture, plain = coordinate_image(40, 30)
    out, out_label = transforms.center_crop(picture, plain, (10, 20))
    box = (0, 5, 40, 25)
    assert np.array_equal(np.asarray(out), np.asarray(picture.resize((20, 10), Image.BILINEAR, box)))
    assert np.array_equal(np.asarray(out_label), np.asarray(plain.resize((20, 10), Image.NEAREST, box)))
    out, _ = transforms.center_crop(picture, plain, (30, 10))  # a tall crop keeps the full height
    assert out.size == (10, 30) and np.asarray(out)[:, :, 1].min() == 0 and np.asarray(out)[:, :, 1].max() >= 28


def test_items_with_the_options_are_deterministic_and_worker_independent(tmp_path):
    make_cityscapes(tmp_path)  # 34×4 images, labels with every id
    options = dict(crop_size=(4, 16), base_size=34, seed=3, max_rotation=0.0, cat_max_ratio=0.75,
                   photometric=True)
    dataset = data.get_dataset("cityscapes", tmp_path, "train", **options)
    assert dataset[1][0].shape == (3, 4, 16) and dataset[1][1].shape == (4, 16)
    assert_deterministic_and_worker_independent(dataset, 1, batches=2, image_shape=(3, 4, 16))


def test_mmseg_cityscapes_recipe_and_option_errors(tmp_path):
    make_cityscapes(tmp_path)
    recipe = recipes.RECIPES["mmseg_encnet_r50-d8_cityscapes_80k"]
    dataset = data.get_dataset("cityscapes", tmp_path, "train", recipe["crop_size"], recipe["base_size"],
                               max_rotation=recipe["max_rotation"], cat_max_ratio=recipe["cat_max_ratio"],
                               photometric=recipe["photometric"], scale_rule=recipe["random_scale"],
                               scale_box=recipe["scale_box"], pad=recipe["pad"])
    image, label = dataset[0]
    assert image.shape == (3, 512, 1024) and label.shape == (512, 1024)
    assert (label >= 0).any() and (label[-1] == -1).all()  # 34×4 at ≥ 1024 wide is < 512 high: padded
    center = data.get_dataset("cityscapes", tmp_path, "val", mode="center", crop_size=(8, 16))[0][0]
    assert center.shape == (3, 8, 16)
    with pytest.raises(errors.UserError, match="own fixed augmentation"):
        data.get_dataset("context", None, "val", context_data.CONTEXT_WIDTH, context_data.CONTEXT_WIDTH, photometric=True)
    with pytest.raises(errors.UserError, match="own fixed augmentation"):
        data.get_dataset("cifar10", tmp_path, "train", cat_max_ratio=0.75)


def test_label_pngs_in_each_datasets_encoding():
    pred = torch.tensor([[0, 1, 18], [2, 10, 0]])
    ids = np.asarray(data.label_png(pred, "cityscapes"))
    assert ids.tolist() == [[7, 8, 33], [11, 23, 7]]  # Cityscapes' official label ids, not train ids
    assert np.asarray(data.label_png(pred, "ade20k")).tolist() == [[1, 2, 19], [3, 11, 1]]  # class + 1
    voc = data.label_png(pred, "pascal_voc")
    assert voc.mode == "P" and np.asarray(voc).tolist() == pred.tolist()


# your own data: --data folder (the layout of README.md), trained, resumed, evaluated, fine-tuned onto

FOLDER_CLASSES = ["road", "car", "tree", "boat"]
FOLDER_PALETTE = [[128, 64, 128], [0, 0, 142], [107, 142, 35], [0, 80, 100]]
FOLDER_RUN = ["--backbone", "resnet18", "--width", "8", "--head-width", "16", "--crop-size", "32", "--base-size", "40",
            "--batch-size", "2", "--pretrained", "none", "--workers", "0", "--log-every", "0"]


def folder_class_map(w, h, split, i):
    """The true classes of an image: stripes of road, car, tree (boat in the validation split only), a band of
    unlabelled (−1) pixels."""
    values = [0, 1, 2, 3] if split == "val" else [0, 1, 2]
    classes = np.resize(np.repeat(np.roll(values, i), 4), w)[None].repeat(h, 0).astype(np.int64)
    classes[:, 6:8] = -1
    return classes


def write_label(path, classes, kind):
    """classes (−1 unlabelled) as a label PNG: 'index' (L, 255 unlabelled), 'colour' (RGB palette colours,
    black unlabelled), 'reduce' (ADE20K's: raw class+1, 0 unlabelled)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "colour":
        rgb = np.array(FOLDER_PALETTE + [[0, 0, 0]], np.uint8)[classes]
        Image.fromarray(rgb, mode="RGB").save(path)
    else:
        raw = np.where(classes < 0, 0 if kind == "reduce" else 255, classes + (kind == "reduce"))
        Image.fromarray(raw.astype(np.uint8), mode="L").save(path)


def make_folder(root, kind="index", nested=False, n=(4, 2), spec=None):
    """ROOT/classes.json, images/{train,val}/[sub/]NAME.jpg, labels/... → {split: [(image, true classes)]}."""
    spec = spec or {"classes": FOLDER_CLASSES, **({"palette": FOLDER_PALETTE} if kind != "reduce" else {}),
                    **({"reduce_zero_label": True} if kind == "reduce" else {})}
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(spec))
    truth = {}
    for split, count in zip(("train", "val"), n):
        truth[split] = []
        for i in range(count):
            stem = f"sub{i % 2}/deeper/img{i}" if nested else f"img{i}"
            image = root / "images" / split / f"{stem}.jpg"
            write_jpeg(image, 40, 30, seed=i)
            classes = folder_class_map(40, 30, split, i)
            write_label(root / "labels" / split / f"{stem}.png", classes, kind)
            truth[split].append((image, classes))
    return truth


@pytest.mark.parametrize("kind,nested", [("index", True), ("colour", False), ("reduce", False)])
def test_folder_dataset_reads_each_label_format(kind, nested, tmp_path):
    truth = make_folder(tmp_path, kind, nested)
    for split in ("train", "val"):
        dataset = data.get_dataset("folder", tmp_path, split, 32, 40, mode="val")
        assert dataset.classes == FOLDER_CLASSES and dataset.num_classes == 4
        assert dataset.palette == (FOLDER_PALETTE if kind != "reduce" else layouts.distinct_palette(4))
        assert [s[0] for s in dataset.samples] == sorted(image for image, _ in truth[split])
        by_image = dict(truth[split])
        for i, (image_path, _) in enumerate(dataset.samples):
            image, label = dataset[i]
            assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
            assert torch.equal(label, torch.from_numpy(by_image[image_path])), (kind, image_path)
    histogram = np.zeros(256, np.int64)
    train = data.get_dataset("folder", tmp_path, "train", 32, 40)
    assert data.check_dataset(train, workers=1, histogram=histogram) == 4
    counts = data.class_pixel_counts(train, histogram)
    expected = np.bincount(np.concatenate([c.ravel() for _, c in truth["train"]]) + 1, minlength=5)[1:]
    assert counts.tolist() == expected.tolist() and counts[3] == 0
    lines = data.class_frequencies(FOLDER_CLASSES, counts)
    assert f"road {100 * expected[0] / expected.sum():.2f} %, car" in lines[1]
    assert lines[-1].endswith("1 class has no pixel in the training split (cannot be learnt from it): boat")
    assert data.dataset_info("folder", tmp_path)["classes"] == FOLDER_CLASSES


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Two iterations of train_seg.py --data folder (index labels in subfolders) → (root, run folder, stdout)."""
    tmp = tmp_path_factory.mktemp("folder_run")
    make_folder(tmp / "mine", "index", nested=True)
    capture = pytest.MonkeyPatch()
    out = io.StringIO()
    capture.setattr(sys, "stdout", out)
    try:
        train_seg.main([*FOLDER_RUN, "--data", "folder", "--data-root", str(tmp / "mine"), "--max-iters", "2",
                        "--out", str(tmp / "run")])
    finally:
        capture.undo()
    return tmp / "mine", tmp / "run", out.getvalue()


def test_train_resume_evaluate_and_colour_with_the_folders_classes(folder_run, tmp_path, capsys):
    root, run_dir, stdout = folder_run
    # the class frequencies of the training split, once, before the first iteration
    assert stdout.count("class frequencies of the training (train) split") == 1
    assert re_search(r"road \d+\.\d\d %, car \d+\.\d\d %, tree \d+\.\d\d %, boat 0\.00 %", stdout)
    assert "1 class has no pixel in the training (train) split (cannot be learnt from it): boat" in stdout
    assert stdout.index("class frequencies") < stdout.index("final: pixAcc")
    checkpoint = zoo.read_checkpoint(run_dir / "checkpoint.pth")
    assert checkpoint["classes"] == FOLDER_CLASSES and checkpoint["palette"] == FOLDER_PALETTE
    assert checkpoint["args"]["data"] == "folder" and checkpoint["args"]["num_classes"] == 4
    table = (run_dir / "per_class_iou.txt").read_text()
    assert all(re.search(rf"^{name} ", table, re.M) for name in FOLDER_CLASSES), table

    # resume: the dataset is found again from the checkpoint's own arguments
    train_seg.main(["--resume", "--out", str(run_dir), "--max-iters", "3"])
    assert zoo.read_checkpoint(run_dir / "checkpoint.pth")["iter"] == 3

    # eval.py: the data from the checkpoint, the table with the folder's class names
    seg_eval.main(["--checkpoint", str(run_dir / "checkpoint.pth"), "--out", str(tmp_path / "eval")])
    table = (tmp_path / "eval" / "per_class_iou_folder_val_repo.txt").read_text()
    assert all(re.search(rf"^{name} ", table, re.M) for name in FOLDER_CLASSES), table
    assert "folder val: pixAcc" in capsys.readouterr().out

    # colour PNGs in the folder's palette, and its classes and palette in the export's metadata
    photo = tmp_path / "photo.jpg"
    write_jpeg(photo, 53, 37, seed=9)
    seg_eval.main(["--checkpoint", str(run_dir / "checkpoint.pth"), "--images", str(photo), "--out",
                   str(tmp_path / "pred")])
    colours = {c for _, c in Image.open(tmp_path / "pred" / "photo.png").getcolors(1 << 16)}
    assert colours <= {tuple(c) for c in FOLDER_PALETTE} and colours
    model, info = zoo.load_model(str(run_dir / "checkpoint.pth"))
    predicted = protocols.segment(model, Image.open(photo).convert("RGB"), info)
    assert {tuple(FOLDER_PALETTE[c]) for c in predicted.unique().tolist()} == colours
    metadata = export.export_metadata(info)
    assert json.loads(metadata["classes"]) == FOLDER_CLASSES and json.loads(metadata["palette"]) == FOLDER_PALETTE


def test_recipe_on_own_data_and_data_checks(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path / "mine", "colour")
    args = train_seg.get_args(["--recipe", "mmseg_encnet_r50-d8_ade20k_80k", "--data", "folder", "--data-root",
                               str(tmp_path / "mine"), "--out", str(tmp_path / "r")])
    assert args.data == "folder" and args.backbone == "resnet50v1c" and args.protocol == "repo"  # no mmseg box
    (tmp_path / "r").mkdir()  # a run of it to --resume: its data stays the folder, not the recipe's ADE20K
    torch.save({"args": {**vars(args), "num_classes": 4}, "model": {}}, tmp_path / "r" / "checkpoint.pth")
    resumed = train_seg.get_args(["--resume", "--out", str(tmp_path / "r")])
    assert (resumed.data, resumed.data_root, resumed.recipe) == ("folder", str(tmp_path / "mine"), args.recipe)
    shutil.rmtree(tmp_path / "r")
    assert train_seg.get_args(["--data", "folder", "--data-root", str(tmp_path / "mine"), "--out",
                               str(tmp_path / "r")]).epochs == recipes.DATASET_RECIPES["folder"]["epochs"] == 50
    stderr = train_seg_failure(["--recipe", "encnet_resnet50s_ade", "--data", "pcontext", "--data-root", tmp_path],
                               monkeypatch, capsys)
    assert "--data folder, your own data, may replace it" in stderr
    # a bad label is found before training, in one line naming the file, and nothing is created
    label = tmp_path / "mine" / "labels" / "val" / "img1.png"
    rgb = np.array(Image.open(label))
    rgb[5, 11] = [1, 2, 3]
    Image.fromarray(rgb).save(label)
    stderr = train_seg_failure([*FOLDER_RUN, "--data", "folder", "--data-root", tmp_path / "mine", "--max-iters", 1,
                                "--out", tmp_path / "bad"], monkeypatch, capsys)
    assert len(stderr.strip().splitlines()) == 1 and str(label) in stderr
    assert "colour (1, 2, 3) at pixel (x=11, y=5) is not in the palette" in stderr
    assert not (tmp_path / "bad").exists()


def one_line_error(make, match):
    with pytest.raises(errors.DataError) as e:
        make()
    message = str(e.value)
    assert "\n" not in message and match in message, message
    return message


def test_each_bad_case_is_one_line_naming_the_file(tmp_path):
    def fresh(name, kind="index", **kwargs):
        root = tmp_path / name
        make_folder(root, kind, **kwargs)
        return root

    def check(root, split="train"):
        return data.check_dataset(data.get_dataset("folder", root, split, 32, 40), workers=1)

    root = fresh("no_label")
    os.remove(root / "labels" / "train" / "img2.png")
    one_line_error(lambda: check(root), f"{root}/images/train/img2.jpg has no label: expected "
                                        f"{root}/labels/train/img2.png")
    root = fresh("no_image", nested=True)
    os.remove(root / "images" / "val" / "sub1" / "deeper" / "img1.jpg")
    one_line_error(lambda: check(root, "val"), f"{root}/labels/val/sub1/deeper/img1.png has no image")
    root = fresh("size")
    Image.fromarray(np.zeros((30, 41), np.uint8)).save(root / "labels" / "train" / "img1.png")
    one_line_error(lambda: check(root), f"{root}/labels/train/img1.png: label is 41×30 but image")
    root = fresh("index")
    raw = np.array(Image.open(root / "labels" / "train" / "img3.png"))
    raw[4, 9] = 4  # K = 4 classes: 0..3
    Image.fromarray(raw).save(root / "labels" / "train" / "img3.png")
    one_line_error(lambda: check(root), f"{root}/labels/train/img3.png: label value 4 at pixel (x=9, y=4), but "
                                        f"{root}/classes.json names 4 classes: values 0..3, 255 = unlabelled")
    root = fresh("reduce", "reduce")
    raw = np.array(Image.open(root / "labels" / "train" / "img0.png"))
    raw[0, 0] = 5  # classes are raw 1..4 there
    Image.fromarray(raw).save(root / "labels" / "train" / "img0.png")
    one_line_error(lambda: check(root), "label value 5 at pixel (x=0, y=0)")
    root = fresh("colour", "colour")
    rgb = np.array(Image.open(root / "labels" / "train" / "img2.png"))
    rgb[7, 3] = [10, 20, 30]
    Image.fromarray(rgb).save(root / "labels" / "train" / "img2.png")
    one_line_error(lambda: check(root), f"{root}/labels/train/img2.png: colour (10, 20, 30) at pixel (x=3, y=7) is "
                                        f"not in the palette of {root}/classes.json")
    root = fresh("no_palette", "colour", spec={"classes": FOLDER_CLASSES})
    one_line_error(lambda: check(root), f"{root}/labels/train/img0.png: an RGB label, but {root}/classes.json has "
                                        f'no "palette"')
    root = fresh("jpeg_label")
    Image.open(root / "labels" / "train" / "img0.png").convert("RGB").save(root / "labels" / "train" / "img9.jpg")
    one_line_error(lambda: check(root), "img9.jpg: labels must be PNG files")
    root = fresh("twins")
    write_jpeg(root / "images" / "train" / "img1.png", 40, 30)
    one_line_error(lambda: check(root), "two images of one name")

    # classes.json: missing, malformed, or not what is expected, each saying what is
    root = fresh("json")
    os.remove(root / "classes.json")
    one_line_error(lambda: check(root), f'{root}/classes.json not found: a folder dataset')
    for text, match in (('{"classes": ["a", "b"', "not valid JSON (Expecting"),
                        ('["a", "b"]', 'expected an object with "classes"'),
                        ('{"classes": "road car"}', '"classes" must be a non-empty list of class names'),
                        ('{"classes": ["a", "a"]}', 'class name "a" appears twice'),
                        ('{"classes": ["a", "b"], "palette": [[1, 2, 3]]}', '"palette" has 1 colours for 2 classes'),
                        ('{"classes": ["a", "b"], "palette": [[1, 2, 3], [1, 2, 300]]}', "palette entry 1"),
                        ('{"classes": ["a", "b"], "pallete": []}', 'unknown key "pallete"'),
                        ('{"classes": ["a", "b"], "ignore_index": 1}', '"ignore_index" 1 is the label value of '
                                                                       'class 1')):
        (root / "classes.json").write_text(text)
        message = one_line_error(lambda: check(root), match)
        assert str(root / "classes.json") in message


@pytest.fixture(scope="module")
def released_file(tmp_path_factory):
    """A file in the authors' zoo format with the weights of testdata's rule (what zoo_file writes)."""
    path = tmp_path_factory.mktemp("zoo") / "released.pth"
    zoo_file("released_encnet_resnet50s_ade", path)
    return path


def test_init_from_a_published_file_starts_the_class_layers_fresh(released_file, tmp_path, capsys):
    make_folder(tmp_path / "mine", "colour", n=(2, 1))
    train_seg.main([*FOLDER_RUN[FOLDER_RUN.index("--crop-size"):], "--data", "folder", "--data-root",
                    str(tmp_path / "mine"), "--init", str(released_file), "--max-iters", "1",
                    "--out", str(tmp_path / "tuned")])
    out = capsys.readouterr().out
    fresh = re_search(r"start fresh \(the file predicts 150 classes of ade20k, --data folder has 4\): (.*)", out)
    assert fresh.group(1) == "aux_head.2, classifier.1, enc_module.se_classifier, stage3_encoding"
    tuned = weights(tmp_path / "tuned")
    assert tuned["classifier.1.weight"].shape[0] == 4 and tuned["aux_head.2.weight"].shape[0] == 4
    reference = zoo.convert(torch.load(released_file, weights_only=True), zoo.RELEASED_KEYS)
    assert 0 < (tuned["conv5.0.weight"] - reference["conv5.0.weight"]).abs().max() < 1e-2  # kept, one step away
    assert zoo.read_checkpoint(tmp_path / "tuned" / "checkpoint.pth")["classes"] == FOLDER_CLASSES


def test_init_with_as_many_classes_of_other_names_starts_them_fresh(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "tiny.pth")  # classes a..e
    argv = [*FOLDER_RUN, "--max-iters", "1", "--init", str(tmp_path / "tiny.pth")]
    for names, fresh in ((list("vwxyz"), True), (list("abcde"), False)):
        root = tmp_path / "".join(names)
        make_folder(root, "index", n=(2, 1), spec={"classes": names})
        train_seg.main([*argv, "--data", "folder", "--data-root", str(root), "--out", str(tmp_path / f"{fresh}")])
        out = capsys.readouterr().out
        assert ("--data folder has 5 other)" in out and "classifier.1" in out) == fresh, out


def test_16_bit_training_images_are_scaled_as_eval_reads_photos_and_32_bit_ones_refused(tmp_path, monkeypatch):
    # issue 33 item 5: one image reader for every path (transforms.to_rgb): a 16-bit PNG in a dataset is its
    # values >> 8, as eval.py --images reads it, in every mode of the dataset; a 32-bit image is a DataError
    root = make_ade(tmp_path / "data", n=2)
    images = root / "ADEChallengeData2016" / "images"
    deep = np.random.default_rng(0).integers(0, 200 * 256, (30, 40), np.uint16)  # >> 8: below 200
    for split in ("training", "validation"):
        Image.fromarray(deep).save(images / split / "ADE_0.jpg", format="PNG")  # the name says JPEG: content rules
    assert Image.open(images / "validation" / "ADE_0.jpg").mode == "I;16"
    expected = np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, -1)
    val = data.get_dataset("ade20k", root, "val", 32, 40, mode="val")
    assert data.check_dataset(val, 1) == 2
    assert np.array_equal(val[0][0].permute(1, 2, 0).numpy(), expected)
    assert np.array_equal(np.asarray(seg_eval.read_photo(images / "validation" / "ADE_0.jpg")), expected)
    assert val[0][0].max() < 200  # Pillow's own conversion clips to 255 (white)

    seen = []
    real = data.augment_train

    def augment_train(image, *args, **kwargs):
        seen.append((type(image), bool(getattr(image, "tile", None))))  # tiles left: not decoded yet
        return real(image, *args, **kwargs)
    monkeypatch.setattr(data, "augment_train", augment_train)
    train = data.get_dataset("ade20k", root, "train", 32, 40)
    for i in range(6):
        train.set_epoch(i)
        image, label = train[0]
        assert image.max() < 200 and (image[:, label >= 0] > 0).any()  # scaled, not white, not black
    image, _ = train[1]
    # a JPEG is not decoded before the augmentation, which decodes it reduced (draft) where the scale allows
    assert seen[-1] == (JpegImagePlugin.JpegImageFile, True)

    Image.fromarray(deep.astype(np.int32) * 300).save(images / "training" / "ADE_1.jpg", format="TIFF")
    assert Image.open(images / "training" / "ADE_1.jpg").mode == "I"
    with pytest.raises(data.DataError, match=r"ADE_1\.jpg: a 32-bit integer image, not a photo"):
        data.check_dataset(data.get_dataset("ade20k", root, "train", 32, 40), 1)
    with pytest.raises(data.DataError, match=r"ADE_1\.jpg: a 32-bit integer image"):
        train[1]


# ============================================================================= 9. zoo.py: checkpoints, downloads, both zoos


def test_pretrained_loads_strictly_from_file_and_url(tmp_path, monkeypatch):
    source = encnet.resnet("resnet18", width=64)
    state = dict(source.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # as torchvision ships it
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    model = encnet.FCN(5, "resnet18")
    zoo.load_backbone_weights(model.backbone, str(path), "resnet18")
    for k, v in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v)
    # the URL path goes through torch.hub's cache (a file:// URL: no network in tests)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    model = encnet.EncNet(5, "resnet18")
    zoo.load_backbone_weights(model.backbone, path.as_uri(), "resnet18")
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert (tmp_path / "hub" / "hub" / "checkpoints" / path.name).is_file()

    del state["layer4.1.bn2.running_var"]
    state["layer9.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, path)
    with pytest.raises(errors.CheckpointError) as error:
        zoo.load_backbone_weights(model.backbone, str(path), "resnet18")
    message = str(error.value)
    assert "layer4.1.bn2.running_var" in message and "layer9.weight" in message and "conv1.weight" in message
    with pytest.raises(errors.CheckpointError, match="nowhere.pth"):
        zoo.load_backbone_weights(model.backbone, str(tmp_path / "nowhere.pth"), "resnet18")
    with pytest.raises(errors.CheckpointError, match="no published ImageNet weights are known for resnet152s"):
        zoo.load_backbone_weights(encnet.resnet("resnet152s", width=8), "imagenet", "resnet152s")


def mmcv_names(state):
    """This repo's ResNetV1c keys → mmcv's (stem.0 … stem.7), as open-mmlab's ImageNet files name them."""
    inverse = [(new.removeprefix("backbone."), old.removeprefix("backbone."))
               for old, new in zoo.MMSEG_KEYS if old.startswith("backbone.stem.")]
    out = {}
    for key, value in state.items():
        new, old = next(((n, o) for n, o in inverse if key.startswith(n)), ("", ""))
        out[old + key[len(new):]] = value
    return out


def test_published_backbone_weights_by_name_and_as_copied_files(hub, tmp_path, monkeypatch):
    # open-mmlab's resnet50_v1c is a {'state_dict': …} of mmcv's ResNetV1c names plus the ImageNet fc
    source = encnet.resnet("resnet50v1c", width=8)
    state = {**mmcv_names(source.state_dict()), "fc.weight": torch.zeros(10, 256), "fc.bias": torch.zeros(10)}
    assert "stem.7.running_var" in state and "bn1.weight" not in state
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "v1c.pth")
    model = encnet.resnet("resnet50v1c", width=8)
    zoo.load_backbone_weights(model, str(tmp_path / "v1c.pth"), "resnet50v1c")
    assert_same_weights(model.state_dict(), source.state_dict())
    # the authors' resnet50s: this repo's names plus fc.*, as a plain state_dict
    source = encnet.resnet("resnet50s", width=8)
    torch.save({**source.state_dict(), "fc.weight": torch.zeros(10, 256)}, tmp_path / "s.pth")
    model = encnet.resnet("resnet50s", width=8)
    zoo.load_backbone_weights(model, str(tmp_path / "s.pth"), "resnet50s")
    assert_same_weights(model.state_dict(), source.state_dict())

    # 'imagenet' by name: every published backbone has a URL and a published hash; offline, one line says where
    # a copy goes; a copy put there by hand is checked against the published hash too, refused and kept
    assert set(zoo.IMAGENET_WEIGHTS) >= {"resnet50", "resnet50s", "resnet101s", "resnet50v1c", "resnet101v1c"}
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(errors.DownloadError) as error:
        zoo.load_backbone_weights(encnet.resnet("resnet50v1c", width=8), "imagenet", "resnet50v1c")
    message = str(error.value)
    assert "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth" in message
    assert str(hub / "resnet50_v1c-2cccc1ad.pth") in message and "\n" not in message
    hub.mkdir(parents=True, exist_ok=True)
    copied = hub / "resnet50s-a75c83cf.pth"
    copied.write_bytes((tmp_path / "s.pth").read_bytes())  # not the published file
    with pytest.raises(errors.DownloadError, match="the published resnet50s-a75c83cf.pth has a75c83cf"):
        zoo.load_backbone_weights(encnet.resnet("resnet50s", width=8), "imagenet", "resnet50s")
    assert copied.read_bytes() == (tmp_path / "s.pth").read_bytes()  # the user's file stays where it was


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch.hub's cache in the test's tmp dir; returns its checkpoints folder."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


@pytest.mark.parametrize("name,backbone", [("released_encnet_resnet50s_ade", "resnet50s"),
                                           ("mmseg_encnet_r50-d8_ade20k", "resnet50v1c")])
def test_zoo_file_gives_reference_logits(name, backbone, tmp_path):
    ade = data.dataset_info("ade20k")
    meta = {"CLASSES": tuple(ade["classes"]), "PALETTE": ade["palette"]}  # as the 2020 mmseg files
    spec, _ = zoo_file(name, tmp_path / f"{name}.pth", meta=meta)
    model, info = zoo.load_model(str(tmp_path / f"{name}.pth"))
    assert not model.training and info["backbone"] == backbone and info["format"] == spec["format"]
    assert info["dataset"] == "ade20k" and info["classes"] == ade["classes"] and info["palette"] == ade["palette"]
    assert (info["crop_size"], info["base_size"]) == ((480, 520) if spec["format"] == "released" else (683, 683))
    assert info["name"] == name and info["source"] == str(tmp_path / f"{name}.pth")

    ref = torch.load(TESTDATA / f"{name}.reference.pt", weights_only=True)
    with torch.no_grad():
        logits32 = model(ref["input"].float())[0].double()
        logits = model.double()(ref["input"])[0]
    assert logits.dtype == torch.float64 and logits.shape[-2:] == ref["argmax"].shape
    at_pixels = logits[:, ref["pixels_y"], ref["pixels_x"]]
    assert (at_pixels - ref["logits_at_pixels"]).abs().max() < 1e-10
    assert torch.equal(logits.argmax(0).to(torch.uint8), ref["argmax"])

    # float32, as load_model returns it: max |Δ| / max |logit| measured 2.0–2.6e-6 (1 and 2 threads, both
    # files); 5e-5 leaves 20× room for other kernels, while a real difference (a sign, align_corners,
    # a BN) moves logits by a good fraction of their scale
    assert (logits32 - logits).abs().max() / logits.abs().max() < 5e-5


@pytest.mark.parametrize("name,backbone,dataset,classes", [
    ("released_encnet_resnet101s_pcontext", "resnet101s", "pcontext", 59),
    ("mmseg_encnet_r101-d8_cityscapes", "resnet101v1c", "cityscapes", 19)])
def test_zoo_file_loads_strictly(name, backbone, dataset, classes, tmp_path):
    path = tmp_path / f"{name}.pth"
    names = [f"city{i}" for i in range(classes)]  # the newer mmseg layout: meta['dataset_meta']
    meta = {"dataset_meta": {"classes": names, "palette": [[i, i, i] for i in range(classes)]}}
    spec, state = zoo_file(name, path, meta)
    model, info = zoo.load_model(str(path))
    assert (info["backbone"], info["dataset"], info["num_classes"]) == (backbone, dataset, classes)
    assert len(info["classes"]) == len(info["palette"]) == classes
    assert (model.lateral is not None) == spec["lateral"] and model.aux_head is not None
    assert model.align_corners == (spec["format"] == "released") and model.stage3_encoding is None
    if spec["format"] == "mmseg":
        assert info["classes"] == names and (info["crop_size"], info["base_size"]) == (2048, 2048)
        assert isinstance(model.classifier[0], layers.SampleDropout) and model.classifier[0].channelwise
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, classes, 32, 32) and logits.dtype == torch.float32 and logits.isfinite().all()

    # strict: a key the converter does not know keeps its name and is reported, so is a missing one
    # (in this repo's names); checked on the converted dict, as load_model does, to skip a second file
    mmseg = spec["format"] == "mmseg"
    rules = zoo.MMSEG_KEYS if mmseg else zoo.RELEASED_KEYS
    unknown = "decode_head.unknown.weight" if mmseg else "head.unknown.weight"
    del state["auxiliary_head.conv_seg.bias" if mmseg else "auxlayer.conv5.4.bias"]
    state[unknown] = torch.zeros(1)
    with pytest.raises(errors.CheckpointError, match=rf"missing keys in aux_head: aux_head.2.bias\n.*unexpected.*{unknown}"):
        zoo.load_strict(model, zoo.convert(state, rules), path)


def test_train_seg_checkpoint_round_trip(tmp_path):
    model = tiny_checkpoint(tmp_path / "checkpoint.pth")
    loaded, info = zoo.load_model(str(tmp_path / "checkpoint.pth"))
    assert info["format"] == "train_seg" and info["classes"] == list("abcde") and info["crop_size"] == 32
    images = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_zoo_options():
    model = encnet.EncNet(5, "resnet50v1c", width=8, head_width=16, aux=True, stage3_encoding=False,
                          dropout2d=True, align_corners=True)
    assert model.backbone.conv1[0].out_channels == 4 and model.backbone.bn1.num_features == 8
    out = model.train()(torch.randn(2, 3, 32, 32))
    assert len(out["se"]) == 1 and isinstance(model.aux_head[1], layers.SampleDropout) and model.aux_head[1].channelwise
    assert len(encnet.EncNet(5, "resnet18", width=8, head_width=16).train()(torch.randn(2, 3, 32, 32))["se"]) == 2


def test_unknown_file_is_named(tmp_path):
    torch.save({"weights": torch.zeros(1), "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(errors.CheckpointError, match="other.pth.*weights, epoch"):
        zoo.load_model(str(tmp_path / "other.pth"))
    with pytest.raises(errors.CheckpointError, match="encnet_resnet50s_ade"):
        zoo.load_model("no_such_model")


def serve_zip(folder, member, payload):
    """A zip holding `member` (the bytes of the file `payload`) in `folder`, as the authors' zoo serves it."""
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(folder / (member[:-4] + ".zip"), "w") as archive:
        archive.write(payload, member)


def test_zoo_name_downloads_once_and_unpacks(hub, tmp_path, monkeypatch):
    model = tiny_checkpoint(tmp_path / "tiny.pth")  # any file load_model reads will do
    sha1 = hashlib.sha1((tmp_path / "tiny.pth").read_bytes()).hexdigest()
    serve_zip(tmp_path / "served", f"encnet_tiny-{sha1[:8]}.pth", tmp_path / "tiny.pth")
    monkeypatch.setattr(zoo, "RELEASED_URL", (tmp_path / "served").as_uri() + "/{file}.zip")
    monkeypatch.setitem(zoo.RELEASED_SHA1, "encnet_tiny", sha1)
    downloads = []
    real_download = torch.hub.download_url_to_file
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, **kw: (downloads.append(url),
                                                                                   real_download(url, dst, **kw)))
    for _ in range(2):
        loaded, info = zoo.load_model("encnet_tiny")
        assert info["name"] == "encnet_tiny" and info["path"] == str(hub / f"encnet_tiny-{sha1[:8]}.pth")
    assert len(downloads) == 1 and [p.name for p in hub.iterdir()] == [f"encnet_tiny-{sha1[:8]}.pth"]
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_zoo_hash_mismatch_keeps_nothing(hub, tmp_path, monkeypatch):
    payload = tmp_path / "served" / "encnet_r50_x_20200101_000000-deadbeef.pth"
    payload.parent.mkdir()
    payload.write_bytes(b"not the published file")
    sha256 = hashlib.sha256(payload.read_bytes()).hexdigest()
    monkeypatch.setattr(zoo, "MMSEG_URL", payload.parent.as_uri() + "/{config}_{stamp}.pth")
    monkeypatch.setitem(zoo.MMSEG_FILES, "mmseg_x", ("encnet_r50_x", "20200101_000000-deadbeef"))
    with pytest.raises(errors.DownloadError) as error:
        zoo.load_model("mmseg_x")
    assert payload.name in str(error.value) and "deadbeef" in str(error.value) and sha256 in str(error.value)
    # the authors' zoo: the full SHA-1 of the unpacked .pth
    serve_zip(tmp_path / "served", "encnet_y-0123abcd.pth", payload)
    monkeypatch.setattr(zoo, "RELEASED_URL", (tmp_path / "served").as_uri() + "/{file}.zip")
    monkeypatch.setitem(zoo.RELEASED_SHA1, "encnet_y", "0123abcd" + "0" * 32)
    sha1 = hashlib.sha1(payload.read_bytes()).hexdigest()
    with pytest.raises(errors.DownloadError, match=f"encnet_y-0123abcd.pth.*{sha1}.*0123abcd0000"):
        zoo.load_model("encnet_y")
    assert list(hub.iterdir()) == []


def test_zoo_download_onto_a_full_or_read_only_disk_is_one_line(tmp_path, monkeypatch, full_disk, read_only):
    # torch.hub's cache on a full disk, then on a read-only one: a WriteError naming the cause and the file,
    # nothing half-written left in the cache; the network is not blamed
    payload = tmp_path / "served" / "encnet_r50_x_20200101_000000-deadbeef.pth"
    payload.parent.mkdir()
    payload.write_bytes(os.urandom(300_000))
    monkeypatch.setattr(zoo, "MMSEG_URL", payload.parent.as_uri() + "/{config}_{stamp}.pth")
    monkeypatch.setitem(zoo.MMSEG_FILES, "mmseg_x", ("encnet_r50_x", "20200101_000000-deadbeef"))
    disk, cause, fill = full_disk
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(disk / "hub"))
    (disk / "hub" / "checkpoints").mkdir(parents=True)
    with fill(), pytest.raises(errors.WriteError) as error:
        zoo.load_model("mmseg_x")
    message = str(error.value)
    assert "\n" not in message and message.startswith(cause) and "cannot download" not in message
    assert f"{disk}/hub/checkpoints/{payload.name} (torch.hub's cache)" in message and "TORCH_HOME" in message
    assert list((disk / "hub" / "checkpoints").iterdir()) == []
    try:
        (read_only / "probe").touch()  # where mounting is not allowed the fixture's folder is writable here
    except OSError:
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(read_only / "hub"))
        with pytest.raises(errors.WriteError, match="read-only file system .* while writing .*torch.hub's cache"):
            zoo.load_model("mmseg_x")


def test_zoo_name_offline(hub, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(errors.DownloadError) as error:
        zoo.load_model("mmseg_encnet_r50-d8_ade20k_80k")
    message = str(error.value)
    assert "\n" not in message and error.value.__cause__ is None and error.value.__suppress_context__
    assert "https://download.openmmlab.com/mmsegmentation/v0.5/encnet/encnet_r50-d8_512x512_80k_ade20k/" in message
    assert str(hub / "encnet_r50-d8_512x512_80k_ade20k_20200622_042412-44b46b04.pth") in message
    with pytest.raises(errors.DownloadError, match="encoding/models/encnet_resnet50s_ade-07ac287c.zip"):
        zoo.load_model("encnet_resnet50s_ade")


def test_imagenet_weights_offline(hub, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(errors.DownloadError) as error:
        zoo.load_backbone_weights(encnet.resnet("resnet18", width=8), "imagenet", "resnet18")
    message = str(error.value)
    assert "\n" not in message and "resnet18" in message and zoo.IMAGENET_WEIGHTS["resnet18"][0] in message
    assert str(hub / "resnet18-f37072fd.pth") in message
    assert "--pretrained PATH" in message and "--pretrained none" in message


@pytest.mark.slow
def test_checkpoint_with_code_is_refused_and_nothing_of_it_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": {}, "payload": Payload()}, evil)
    result = run("eval.py", "--checkpoint", evil, check=False)
    assert result.returncode != 0 and "does not run what they carry" in result.stderr
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr  # never torch's advice
    assert not marker.exists()  # nothing of the file's code ran
    result = run("train_seg.py", *TINY, "--max-iters", 1, "--init", evil, "--out", tmp_path / "x", check=False)
    assert result.returncode != 0 and "does not run what they carry" in result.stderr and not marker.exists()


@pytest.mark.slow
def test_checkpoint_of_another_model_or_class_count_is_named(tmp_path, fcn_run, monkeypatch, capsys):
    stderr = train_seg_failure([*TINY, "--max-iters", 1, "--init", fcn_run / "checkpoint.pth", "--out",
                                tmp_path / "enc"], monkeypatch, capsys)
    assert "does not fit this model" in stderr and "enc_module" in stderr
    model = encnet.FCN(3, "resnet18", width=8, head_width=16)
    n = len(context_data.CONTEXT_CLASSES)
    with pytest.raises(errors.CheckpointError, match=rf"head.2.weight: \({n}, 16, 1, 1\) in the checkpoint, \(3, 16, 1, 1\) here"):
        zoo.load_strict(model, weights(fcn_run), "fcn/checkpoint.pth")


def test_checkpoints_that_cannot_be_read_say_what_the_file_is(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    tiny_checkpoint(tmp_path / "good.pth")
    whole = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    torch.save({"model": {}, "optimizer": {}, "iter": 1, "epoch": 0, "args": {"model": "encnet16k64d"}},
               tmp_path / "cifar.pth")
    for name, message in (("empty", r"is empty \(0 bytes\), not a checkpoint"),
                          ("truncated", r"is a damaged or truncated torch.save file"),
                          ("notes", "is not a file written by torch.save"),
                          ("cifar", r"is a train_cifar.py checkpoint \(the CIFAR-10 classifier encnet16k64d\)")):
        with pytest.raises(errors.CheckpointError, match=message) as error:
            zoo.load_model(str(tmp_path / f"{name}.pth"))
        assert "\n" not in str(error.value) and "weights_only=False" not in str(error.value)


# ============================================================================= 10. export.py: ONNX and torch.export


def onnx_and_eager(model, path, images):
    """(onnxruntime's logits, eager float32 logits, eager float64 logits) of the exported file and the model."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        eager, exact = model.float()(images), model.double()(images.double())
    model.float()
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0]), eager, exact


@pytest.mark.slow
def test_export_runs_in_onnxruntime_and_torch_export_with_the_models_logits(tmp_path, monkeypatch, capsys):
    tiny_checkpoint(tmp_path / "checkpoint.pth")
    seg_eval.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--export", str(tmp_path / "model.onnx")])
    assert "→" in capsys.readouterr().out
    model, info = zoo.load_model(str(tmp_path / "checkpoint.pth"))
    # a model as a zoo file builds it (authors' options: align_corners, lateral, residual gate, Dropout2d,
    # deep stem; tiny widths), exported by the same function
    args = dict(zoo.zoo_model_args(zoo.convert(zoo_file("released_encnet_resnet101s_pcontext", tmp_path / "z.pth")[1],
                                                        zoo.RELEASED_KEYS), "resnet101s", "released", "z.pth"),
                backbone="resnet50s", width=8, head_width=16)
    torch.manual_seed(0)
    released = encnet.model_from_args(args).eval()
    export.export(released, dict(info, classes=[str(i) for i in range(59)]), str(tmp_path / "released.onnx"))
    metadata = onnxruntime.InferenceSession(str(tmp_path / "model.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(metadata["classes"]) == list("abcde") and json.loads(metadata["mean"]) == list(transforms.MEAN)
    torch.manual_seed(1)
    for net, path, classes in ((model, tmp_path / "model.onnx", 5), (released, tmp_path / "released.onnx", 59)):
        for size in ((2, 64, 96), (1, 77, 50)):  # dynamic batch, height and width; an odd size
            images = torch.randn(size[0], 3, *size[1:])
            theirs, eager, exact = onnx_and_eager(net, path, images)
            assert theirs.shape == eager.shape == (size[0], classes, *size[1:])
            # both are float32 evaluations of one function, in kernels that sum in other orders: each is
            # within its rounding of the exact (float64) logits. onnxruntime's error is bounded like eager's
            # own (the same convolutions and reductions; measured 0.7–1.2× eager's, 4 seeds × 3 sizes, AVX2),
            # so 3× eager's measured error, plus 1e-6 of the scale
            # for a function whose eager error happens to be tiny; a real difference (align_corners, a BN in
            # train mode, a sign) moves logits by a good fraction of their scale
            own = (eager.double() - exact).abs().max()
            assert (theirs.double() - exact).abs().max() <= 3 * own + 1e-6 * exact.abs().max(), (path.name, size)
    # torch.export's program: the same kernels as eager; the metadata in its extra files
    seg_eval.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--export", str(tmp_path / "model.pt2")])
    extra = {"encnet.json": ""}
    program = torch.export.load(str(tmp_path / "model.pt2"), extra_files=extra)
    assert json.loads(json.loads(extra["encnet.json"])["palette"]) == [[i, 0, 0] for i in range(5)]
    images = torch.randn(1, 3, 45, 70)
    with torch.no_grad():
        theirs, eager, exact = program.module()(images), model(images), model.double()(images.double())
    assert (theirs.double() - exact).abs().max() <= 3 * (eager.double() - exact).abs().max() + 1e-6 * exact.abs().max()
    # an existing file is kept
    before = (tmp_path / "model.onnx").read_bytes()
    assert main_exit(["--checkpoint", tmp_path / "checkpoint.pth", "--export", tmp_path / "model.onnx"]) == 2
    assert "exists already; nothing was changed" in capsys.readouterr().err
    assert (tmp_path / "model.onnx").read_bytes() == before


def varied_checkpoint(path):
    """tiny_checkpoint with a classifier whose classes vary across a photo (the random one predicts one class
    nearly everywhere, where any procedure agrees)."""
    tiny_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    checkpoint["model"]["classifier.1.weight"] = 3 * torch.randn(5, 16, 1, 1, generator=generator)
    checkpoint["model"]["classifier.1.bias"].zero_()
    torch.save(checkpoint, path)


@pytest.mark.slow
def test_deploy_runs_the_export_as_eval_py_segments(tmp_path):
    ckpt, photo = tmp_path / "model.pth", tmp_path / "photo.jpg"
    varied_checkpoint(ckpt)
    write_jpeg(photo, 300, 260, seed=3)  # long side → base 40: 40×35 at crop 32, 2×2 windows at stride 21
    onnx_file = tmp_path / "new" / "sub" / "model.onnx"  # 3. a missing folder is made
    exported = run("eval.py", "--checkpoint", ckpt, "--export", onnx_file)
    assert exported.stderr == "", exported.stderr  # no torchvision, FutureWarning or temporary-file messages
    assert "test-time procedure in its metadata" in exported.stdout
    run("eval.py", "--checkpoint", ckpt, "--images", photo, "--label-png", "--out", tmp_path / "pred")
    by_eval = np.asarray(Image.open(tmp_path / "pred" / "photo.png"))  # the built-in data's PNGs: class indices

    model = deploy.Model(str(onnx_file))
    assert (model.crop_size, model.base_size, model.window_stride, model.model_protocol) == (32, 40, 21, "repo")
    image = np.asarray(Image.open(photo).convert("RGB"))
    assert len(protocols.repo_windows(*model.resized(model.normalise(image)).shape[1:], 32)) == 4
    classes, probabilities = model.segment(image, scores=True)
    assert np.array_equal(model.segment(image, band_bytes=4000), classes)  # banded = whole
    # the bound: PyTorch's probabilities of the same procedure (protocols.segment, as eval.py) differ from these
    # by δ; a pixel's class can only change where the top two are within 2δ of each other
    torch_model, info = zoo.load_model(str(ckpt))
    _, reference = protocols.segment(torch_model, Image.open(photo).convert("RGB"), info, scores=True)
    reference = reference[0].numpy()
    delta = np.abs(probabilities - reference).max()
    assert delta < 1e-5, delta  # float rounding (onnxruntime's kernels, NumPy's interpolation), not a procedure
    top2 = np.sort(reference, 0)[-2:]
    decided = top2[1] - top2[0] > 2 * delta + 1e-6  # + eval.py's banded interpolation's own rounding
    assert np.array_equal(classes[decided], by_eval[decided]) and decided.mean() > 0.99
    assert len(np.unique(by_eval)) >= 3
    print(f"deploy.py vs eval.py: {np.mean(classes == by_eval):.4%} of pixels equal, max probability "
          f"difference {delta:.2e}")
    # what the issue's user tried instead agrees far less: the graph on the full photo, or resized to base size
    full = model.forward(model.normalise(image)[None])[0].argmax(0)
    one_forward = deploy.resize(model.forward(model.resized(model.normalise(image))[None])[0], image.shape[:2]).argmax(0)
    assert np.mean(full == by_eval) < 0.95 and np.mean(one_forward == by_eval) < 0.95

    # the command line, where torch cannot be imported: numpy, PIL and onnxruntime only
    script = ("import sys\nclass NoTorch:\n    def find_spec(self, name, *args):\n"
              "        if name.split('.')[0] == 'torch': raise ImportError('no torch here')\n"
              "sys.meta_path.insert(0, NoTorch())\nimport deploy\ndeploy.main(sys.argv[1:])\n")
    result = subprocess.run([sys.executable, "-c", script, str(onnx_file), str(photo), "--out", str(tmp_path / "dep")],
                            cwd=HERE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    colours = np.asarray(Image.open(tmp_path / "dep" / "photo.png").convert("RGB"))
    assert np.array_equal(colours, np.asarray(model.palette, np.uint8)[classes])


def test_deploy_runs_mmsegmentations_protocol_as_eval_py(tmp_path, monkeypatch):
    # a model whose own protocol is 'mmseg' (mmsegmentation's files, its recipes' checkpoints): deploy.py runs that
    # one by default, the image resized into the metadata's box with OpenCV's bilinear, one forward whole
    ckpt, photo = tmp_path / "model.pth", tmp_path / "photo.jpg"
    varied_checkpoint(ckpt)
    write_jpeg(photo, 300, 260, seed=3)
    torch_model, info = zoo.load_model(str(ckpt))
    monkeypatch.setitem(protocols.MMSEG_TEST_BOX, info["dataset"], (96, 48))  # small for a tiny model
    export.export(torch_model, info, str(tmp_path / "m.onnx"), model_protocol="mmseg", mmseg_box=(96, 48))
    model = deploy.Model(str(tmp_path / "m.onnx"))
    assert (model.protocol, model.mmseg_box) == ("mmseg", (96, 48))
    image = np.asarray(Image.open(photo).convert("RGB"))
    assert model.mmseg_logits(image).shape[1:] == (48, 55)  # 260×300 into 96×48: factor 48/260
    classes, probabilities = model.segment(image, scores=True)
    _, reference = protocols.segment(torch_model, Image.open(photo), info, "mmseg", scores=True)
    delta = np.abs(probabilities - reference[0].numpy()).max()
    assert delta < 1e-5, delta  # float rounding only: the same procedure, OpenCV's resize bit for bit
    assert np.array_equal(model.segment(image, band_bytes=4000), classes)
    assert np.mean(model.segment(image, protocol="repo") != classes) > 0.01  # another procedure, another map
    with pytest.raises(ValueError, match="deploy.py runs repo and mmseg"):
        model.segment(image, protocol="mmseg-ms")
    model.mmseg_box = None
    with pytest.raises(ValueError, match="no mmseg_box"):
        model.segment(image, protocol="mmseg")


# ============================================================================= 11. protocols.py: the test-time procedures


def test_predicted_classes_is_argmax_ties_included():
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (2, 7, 33, 65)).float()  # 3 levels over 7 classes: most pixels tie
    scores[0, :, 0, 0] = 1.0  # every class ties: the first wins
    assert torch.equal(protocols.predicted_classes(scores), scores.argmax(1))
    assert protocols.predicted_classes(scores)[0, 0, 0] == 0


def test_sliding_window_and_multi_scale_on_a_tiny_model():
    torch.manual_seed(0)
    model = tiny(encnet.FCN, 4).eval()
    image = torch.randn(1, 3, 50, 70)
    # windows of 32 at stride 21 on a 50×70 image: overlaps averaged, each pixel covered
    logits = protocols.sliding_window_logits(model, image, 32)
    assert logits.shape == (1, 4, 50, 70)
    # an image that fits in one window is one plain forward, unpadded
    torch.testing.assert_close(protocols.sliding_window_logits(model, image, 80), model(image))
    # windows average where they overlap: with a model that ignores its input, every pixel gets the bias
    constant = torch.nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        constant.weight.zero_()
    torch.testing.assert_close(protocols.sliding_window_logits(constant, image, 32),
                               constant.bias.view(1, 4, 1, 1).expand(1, 4, 50, 70))
    probs = protocols.predict(model, image, 32, 48, scales=protocols.MULTI_SCALES, flip=True)
    assert probs.shape == (1, 4, 50, 70)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 50, 70))


PAD_VALUE = torch.tensor([-m / s for m, s in zip(transforms.MEAN, transforms.STD)]).view(1, 3, 1, 1)


class Recorder(torch.nn.Module):
    """A model that remembers every batch it was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.model(x)


def test_released_sizes_windows_and_padding_follow_the_source_arithmetic():
    # long side ceil(base·scale), short side int(x + 0.5), a square counts as wide (MultiEvalModule.forward)
    assert [protocols.released_size(50, 70, 40, s) for s in protocols.MULTI_SCALES] == \
        [(14, 20), (21, 30), (29, 40), (36, 50), (43, 60), (50, 70)]
    assert protocols.released_size(70, 50, 40, 1.75) == (70, 50)
    assert protocols.released_size(375, 500, 520, 1.25) == (488, 650)  # 375·650/500 = 487.5 rounds up
    assert protocols.released_size(33, 33, 10, 0.75) == (8, 8)  # ceil(7.5)
    # the grid starts at 0 with stride int(2/3 crop); the last windows are clipped (then padded)
    assert protocols.released_windows(60, 100, 48) == [(0, 48, 0, 48), (0, 48, 32, 80), (0, 48, 64, 100),
                                                      (32, 60, 0, 48), (32, 60, 32, 80), (32, 60, 64, 100)]
    assert protocols.released_windows(480, 480, 480) == [(0, 480, 0, 480)]
    # padding: the value a black pixel normalises to, bottom and right only
    image = torch.randn(1, 3, 5, 7)
    padded = protocols.released_pad(image, 9)
    black = transforms.normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))
    assert padded.shape == (1, 3, 9, 9) and torch.equal(padded[:, :, :5, :7], image)
    torch.testing.assert_close(padded[:, :, 5:, :], black.expand(1, 3, 4, 9))
    torch.testing.assert_close(padded[:, :, :, 7:], black.expand(1, 3, 9, 2))


def released_reference(model, image, crop, base, scales):
    """MultiEvalModule.forward written out window by window, one sample per forward."""
    _, _, h, w = image.shape
    stride = int(crop * 2 / 3)

    def pad(x):
        out = PAD_VALUE.expand(1, 3, max(x.shape[2], crop), max(x.shape[3], crop)).clone()
        out[:, :, :x.shape[2], :x.shape[3]] = x
        return out

    def module_inference(x):
        return (model(x) + model(x.flip(3)).flip(3)).exp()

    scores = 0
    for scale in scales:
        long_side = math.ceil(base * scale)
        height, width = (long_side, int(w * long_side / h + 0.5)) if h > w else (int(h * long_side / w + 0.5),
                                                                                  long_side)
        resized = F.interpolate(image, (height, width), mode="bilinear", align_corners=True)
        if long_side <= crop:
            outputs = module_inference(pad(resized))[:, :, :height, :width]
        else:
            padded = pad(resized) if min(height, width) < crop else resized
            ph, pw = padded.shape[2:]
            outputs, count = torch.zeros(1, 5, ph, pw), torch.zeros(1, 1, ph, pw)
            for i in range(math.ceil((ph - crop) / stride) + 1):
                for j in range(math.ceil((pw - crop) / stride) + 1):
                    y0, x0 = i * stride, j * stride
                    y1, x1 = min(y0 + crop, ph), min(x0 + crop, pw)
                    out = module_inference(pad(padded[:, :, y0:y1, x0:x1]))
                    outputs[:, :, y0:y1, x0:x1] += out[:, :, :y1 - y0, :x1 - x0]
                    count[:, :, y0:y1, x0:x1] += 1
            outputs = (outputs / count)[:, :, :height, :width]
        scores = scores + F.interpolate(outputs, (h, w), mode="bilinear", align_corners=True)
    return scores


def test_released_protocol_matches_a_window_by_window_computation():
    model = tiny_encnet()
    torch.manual_seed(1)
    image = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        expected = released_reference(model, image, 32, 40, protocols.MULTI_SCALES)
    got = seg_eval.predict_released(model, image, 32, 40, window_batch=8)  # windows and mirror images batched
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # batching is exact up to float rounding: one window per forward gives the same scores
    one_by_one = protocols.predict_released(model, image, 32, 40, window_batch=1)
    assert ((got - one_by_one).abs() / one_by_one.abs()).max() < 1e-5

    # an image within the crop is padded to one window too, and its mirror image goes in after it
    recorder = Recorder(model)
    protocols.predict_released(recorder, image, 32, 40, scales=(0.5,))
    mirrored, window = recorder.inputs
    assert window.shape == (1, 3, 32, 32) and torch.equal(mirrored, window.flip(-1))
    torch.testing.assert_close(window[0, :, 14:, :], PAD_VALUE[0].expand(3, 18, 32))  # resized to 14×20
    torch.testing.assert_close(window[0, :, :, 20:], PAD_VALUE[0].expand(3, 32, 12))
    # on a GPU (here: asked for) the windows of a scale go in as one batch
    recorder = Recorder(model)
    protocols.predict_released(recorder, image, 32, 40, scales=(1.75,), window_batch=8)
    assert [len(x) for x in recorder.inputs] == [6, 6]  # 2×3 windows (50×70), then their mirror images
    # Cityscapes has its own scales (test.py)
    assert protocols.make_predictor("released", 32, 40, "cityscapes").keywords["scales"] == \
        (0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25)


def test_mmseg_sizes_follow_mmcv_rescale_size():
    # ADE20K's box (2048, 512): a typical 683×512 image is left as is, a small one scaled ×2
    assert cv_resize.rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert cv_resize.rescale_size(256, 341, (2048, 512)) == (512, 682)
    assert cv_resize.rescale_size(700, 300, (2048, 512)) == (1195, 512)  # the short side fills the box
    assert cv_resize.rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)  # Cityscapes: full resolution
    assert cv_resize.rescale_size(1024, 2048, (1024, 512)) == (512, 1024)  # img_ratio 0.5
    assert protocols.MMSEG_TEST_BOX["ade20k"] == (2048, 512) and protocols.MMSEG_TEST_BOX["cityscapes"] == (2048, 1024)


def mmseg_reference(model, pixels, box, ratios, flip):
    """mmsegmentation's test: uint8 image resized into box·ratio (keep ratio) by cv2.resize itself (mmcv's
    imresize), whole-image forward, logits resized to the original size, softmax, flipped back, averaged."""
    h, w = pixels.shape[2:]
    total, views = 0, 0
    for ratio in ratios:
        long_side, short_side = int(box[0] * ratio), int(box[1] * ratio)
        factor = min(long_side / max(h, w), short_side / min(h, w))
        size = (int(h * factor + 0.5), int(w * factor + 0.5))
        resized = pixels.float() if size == (h, w) else torch.from_numpy(cv2.resize(
            pixels[0].permute(1, 2, 0).numpy(), size[::-1], interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1)[None].float()
        for mirrored in (False, True) if flip else (False,):
            x = transforms.normalize(resized.flip(3) if mirrored else resized.clone())  # normalize works in place
            probs = F.interpolate(model(x), (h, w), mode="bilinear", align_corners=False).softmax(1)
            total, views = total + (probs.flip(3) if mirrored else probs), views + 1
    return total / views


def test_mmseg_protocols_match_a_view_by_view_computation():
    model = tiny_encnet()
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 24, 40), np.uint8))
    image = transforms.normalize(pixels)
    for ratios, flip in (((1.0,), False), (protocols.MULTI_SCALES, True)):
        recorder = Recorder(model)
        got = protocols.predict_mmseg(recorder, image, (64, 32), ratios, flip)
        with torch.no_grad():
            expected = mmseg_reference(model, pixels, (64, 32), ratios, flip)
        # (rounding to pixel levels could land one level apart where a value is a hair from x.5)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert (got.argmax(1) == expected.argmax(1)).double().mean() > 0.99
        # the whole resized image is one forward (its mirror image another)
        sizes = [(32, 53)] if not flip else [(16, 27), (24, 40), (32, 53), (40, 67), (48, 80), (56, 93)]
        assert [tuple(x.shape) for x in recorder.inputs] == [(1, 3, *size) for size in sizes for _ in range(1 + flip)]
        assert not flip or torch.equal(recorder.inputs[1], recorder.inputs[0].flip(-1))
    torch.testing.assert_close(got.sum(1), torch.ones(1, 24, 40))


def test_repo_protocol_equals_its_direct_form_with_windows_batched():
    model = tiny_encnet()
    torch.manual_seed(1)
    image = torch.randn(1, 3, 50, 70)
    # windows of 32 at stride 21, the last ones shifted back to the border
    assert protocols.repo_windows(50, 70, 32) == [(0, 0), (0, 21), (0, 38), (18, 0), (18, 21), (18, 38)]
    for scales, flip in (((1.0,), False), (protocols.MULTI_SCALES, True)):
        expected = direct_repo_predict(model, image, 32, 48, scales, flip)  # one window per forward
        for window_batch in (1, 3, 8):
            got = protocols.predict(model, image, 32, 48, scales, flip, window_batch=window_batch)
            assert (got - expected).abs().max() < 1e-6


def test_bf16_autocast_stays_close_to_float32():
    model = tiny_encnet()
    torch.manual_seed(1)
    image = torch.randn(1, 3, 50, 70)
    fp32 = protocols.predict(model, image, 32, 48)
    bf16 = protocols.predict(model, image, 32, 48, amp=True)
    # measured: probabilities within 6e-4, every pixel keeps its class
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() < 1e-2
    assert (bf16.argmax(1) == fp32.argmax(1)).double().mean() >= 0.99


def test_phone_photo_class_map_in_bands_equals_the_full_resolution_argmax():
    # every protocol's prediction at the model's scale, brought to the image's size in bands of a few rows:
    # the class map of the full-resolution scores, up to pixels whose two best scores are within rounding
    model = tiny_encnet()
    torch.manual_seed(2)
    image = torch.randn(1, 3, 61, 90)
    predictors = {protocol: protocols.make_predictor(protocol, 32, 40, "ade20k")
                  for protocol in ("repo", "repo-ms", "released")}
    predictors["mmseg-ms"] = partial(protocols.mmseg_views, box=(64, 32), ratios=protocols.MULTI_SCALES, flip=True)
    for protocol, predictor in predictors.items():
        views = predictor(model, image)
        scores = protocols.full_scores(views, (61, 90))
        expected = scores.argmax(1)[0]
        for band_bytes in (1, 5 * 90 * 4 * 5, 1 << 30):  # one row, five rows, the whole image at a time
            got = protocols.class_map(views, (61, 90), band_bytes)
            differ = got != expected
            top2 = scores[0].topk(2, dim=0).values
            assert ((top2[0] - top2[1])[differ] < 1e-5 * top2[0][differ].abs().clamp_min(1)).all(), protocol
            assert differ.float().mean() < 1e-3, protocol


def photo_like(path, w=61, h=45):
    """Smooth colour fields with texture: what a tiny random model still segments into several classes."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(3)
    pixels = np.stack([128 + 100 * np.sin(x / 7), 128 + 100 * np.cos(y / 5), 128 + 90 * np.sin((x + y) / 9)], -1)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def varied_model(photo):
    """A tiny EncNet whose BatchNorm statistics are the photo's and whose classifier is sharpened: several classes."""
    model = tiny_encnet(5).train()
    image = transforms.normalize(torch.from_numpy(np.array(Image.open(photo))).permute(2, 0, 1)[None])
    with torch.no_grad():
        model(image.repeat(2, 1, 1, 1))
        model.classifier[1].weight.mul_(30)
    return model.eval()


@pytest.mark.parametrize("fmt,protocol", [("train_seg", "repo"), ("released", "released"), ("mmseg", "mmseg"),
                                          ("mmseg", None), ("train_seg", "repo-ms")])
def test_segment_equals_eval_images_pixel_for_pixel(fmt, protocol, tmp_path, monkeypatch):
    info = dict(format=fmt, dataset="ade20k", crop_size=32, base_size=40, classes=list("abcde"),
                palette=[[40 * i, 0, 0] for i in range(5)], args={"protocol": "repo"})
    monkeypatch.setattr(zoo, "load_model", lambda source: (model, dict(info)))
    monkeypatch.setitem(protocols.MMSEG_TEST_BOX, "ade20k", (64, 32))
    photo = photo_like(tmp_path / "photo.png")
    model = varied_model(photo)
    flags = {None: [], "repo-ms": ["--multi-scale"]}.get(protocol, ["--protocol", protocol])
    seg_eval.main(["--checkpoint", "zoo", "--images", str(photo), "--label-png", "--out", str(tmp_path / "ids"),
                   *flags])
    from_cli = torch.from_numpy(np.asarray(Image.open(tmp_path / "ids" / "photo.png")).astype(np.int64)) - 1  # ADE: +1
    ours = protocols.segment(model, Image.open(photo), info, protocol)
    assert ours.dtype == torch.int64 and ours.shape == (45, 61) and len(ours.unique()) > 1
    assert torch.equal(ours, from_cli)
    assert protocols.default_protocol(info) == {"train_seg": "repo", "released": "repo", "mmseg": "mmseg"}[fmt]
    if protocol != "repo":
        return
    # the other image types: the same classes
    pixels = np.asarray(Image.open(photo))
    assert torch.equal(protocols.segment(model, pixels, info, protocol), ours)
    assert torch.equal(protocols.segment(model, torch.from_numpy(pixels.copy()).permute(2, 0, 1), info, protocol), ours)
    classes, scores = protocols.segment(model, pixels, info, protocol, scores=True)
    assert torch.equal(classes, ours) and scores.shape == (1, 5, 45, 61)
    assert (scores.argmax(1)[0] == ours).float().mean() > 0.999


def test_segment_defaults_and_refusals():
    model = tiny_encnet(5)
    assert protocols.default_protocol({"format": "train_seg", "dataset": "folder", "args": {"protocol": "mmseg"}}) \
        == "repo"  # mmsegmentation has no test box for your own data
    assert protocols.default_protocol({"format": "train_seg", "args": {"protocol": "released"}}) == "released"
    with pytest.raises(ValueError, match="pass the model's info"):
        protocols.segment(model, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        protocols.segment(model, np.zeros((8, 8), np.uint8), crop_size=32, base_size=40)
    model.train()
    protocols.segment(model, np.zeros((8, 8, 3), np.uint8), crop_size=32, base_size=40)
    assert model.training  # its mode restored


# ============================================================================= 12. metric.py: pixAcc and mIoU


def test_metric_conventions_against_a_direct_computation():
    torch.manual_seed(0)
    target = torch.randint(-1, 4, (3, 7, 9))
    pred = torch.randint(0, 4, (3, 7, 9))
    pred[target == 3] = 0  # class 3 is never predicted
    metric = seg_eval.SegMetric(5)
    metric.update(pred[:2], target[:2])
    metric.update(pred[2:], target[2:])  # accumulated over the split, not averaged per image
    valid = target != -1
    pix_acc = (pred[valid] == target[valid]).sum().item() / valid.sum().item()
    ious = []
    for c in range(5):
        inter = ((pred == c) & (target == c) & valid).sum().item()
        union = (((pred == c) & valid) | (target == c)).sum().item()
        if union:  # class 4 occurs nowhere: left out of the mean
            ious.append(inter / union)
    got_acc, got_miou = metric.pixacc_miou()
    assert abs(got_acc - pix_acc) < 1e-12 and abs(got_miou - sum(ious) / len(ious)) < 1e-12
    assert metric.iou()[3] == 0 and metric.iou()[4].isnan()
    with pytest.raises(ValueError):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 5))


def test_metric_conventions_of_the_protocols(capsys, tmp_path):
    metric = seg_eval.SegMetric(4)
    metric.update(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 2, -1]))  # class 3 nowhere
    iou = [1.0, 0.5, 0.0]  # class 2: in the labels, never predicted right
    assert metric.pixacc_miou() == pytest.approx((0.75, sum(iou) / 3))  # mmseg: nanmean
    assert metric.pixacc_miou(absent_as_zero=True) == pytest.approx((0.75, sum(iou) / 4))  # released: / all
    seg_eval.report(metric, ["a", "b", "c", "d"], "pcontext", "val", "released", tmp_path)
    out = capsys.readouterr().out
    assert f"{100 * sum(iou) / 4 * 59 / 60:.2f}" in out and "pcontext val multi-scale (released protocol)" in out
    assert (tmp_path / "per_class_iou_pcontext_val_released.txt").read_text().splitlines()[-1].endswith("37.50")


# ============================================================================= 13. explain.py: what the Context Encoding Module sees

EXPLAIN_NUM_CLASSES, EXPLAIN_K = 5, 8
EXPLAIN_CLASSES = ["ground", "water", "tree", "sheep", "gull"]
EXPLAIN_PALETTE = [[150, 120, 80], [60, 100, 170], [30, 110, 40], [245, 245, 245], [148, 0, 211]]


def soft_encnet(seed=0, **kw):
    """A small float64 EncNet in eval mode whose BN statistics and Encoding parameters make soft,
    non-trivial assignments (at initialisation the codewords are ~0.03 and one s_k decides everything)."""
    torch.manual_seed(seed)
    model = encnet.EncNet(EXPLAIN_NUM_CLASSES, "resnet18", width=16, head_width=64, **{"num_codes": EXPLAIN_K, **kw}).double()
    with torch.no_grad():
        enc = model.enc_module.encoding[0]
        enc.codewords.normal_(0, 0.6)
        enc.scale.uniform_(0.02, 0.1)
    for m in model.modules():  # one forward sets the running statistics to a batch's
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        model.eval()  # the eval path with only the BNs in training mode: their statistics, no training outputs
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
        model(torch.randn(4, 3, 32, 48, dtype=torch.float64))
    return model.eval()


def random_images(seed=1, b=2, h=32, w=48):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def capture_module(model, x):
    """Independent hooks: the Encoding layer's input and output and the module's input, in one eval forward."""
    got = {}
    enc = model.enc_module.encoding[0]
    hooks = [enc.register_forward_hook(lambda m, i, o: got.update(features=i[0].clone(), encoded=o.clone())),
             model.enc_module.register_forward_pre_hook(lambda m, i: got.update(module_input=i[0].clone()))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


def test_assignments_are_eq1_of_the_encoding_layers_input():
    model, x = soft_encnet(), random_images()
    view = explain.module_view(model, x)
    got = capture_module(model, x)
    enc = model.enc_module.encoding[0]
    feats = got["features"]  # B×C×h×w, what the Encoding layer received (after the reduce conv-BN-ReLU)
    B, C, h, w = feats.shape
    X = feats.flatten(2).transpose(1, 2)  # B×N×C
    r = X[:, :, None, :] - enc.codewords.detach()[None, None]  # B×N×EXPLAIN_K×C, the residuals r_ik of Eq. 1
    a = torch.softmax(-enc.scale.detach() * r.square().sum(-1), dim=2)  # B×N×EXPLAIN_K
    expected = a.transpose(1, 2).reshape(B, EXPLAIN_K, h, w)
    assert view.assignments.shape == (B, EXPLAIN_K, h, w) and view.assignments.dtype == torch.float64
    # Both sides float64; the logits s_k‖r_ik‖² are O(1–100) here, so their rounding differs by at most ~1e-14
    # (explain expands ‖x‖² − 2x·d + ‖d‖², the reference subtracts first), and softmax does not amplify it.
    assert (view.assignments - expected).abs().max() < 1e-12
    assert torch.allclose(view.assignments.sum(1), torch.ones(B, h, w, dtype=torch.float64), atol=1e-12)
    # soft, varied assignments: the comparison above is not between two one-hot maps
    assert 0.2 < view.assignments.max(1).values.mean() < 0.95
    # and they are the weights the layer aggregated with: e_k = Σ_i a_ik (x_i − d_k) is its output
    e = (a[..., None] * r).sum(1)
    assert torch.allclose(got["encoded"], e, atol=1e-10)
    assert torch.allclose(e, torch.einsum("bkn,bnkc->bkc", view.assignments.flatten(2), r), atol=1e-10)


def test_presence_is_sigmoid_of_the_modules_se_logits():
    model, x = soft_encnet(), random_images()
    view = explain.module_view(model, x)
    with torch.no_grad():
        _, se_logits = model.enc_module(capture_module(model, x)["module_input"])
    assert view.presence.shape == (2, EXPLAIN_NUM_CLASSES)
    assert view.presence.dtype == torch.float64  # a float64 model's view stays float64
    assert (view.presence - torch.sigmoid(se_logits)).abs().max() < 1e-14  # the same float64 ops
    assert view.presence.std() > 1e-3  # not a constant
    assert view.presence.min() > 0 and view.presence.max() < 1
    no_se = explain.module_view(soft_encnet(se_loss=False), x)
    assert no_se.presence is None and no_se.gamma.shape == (2, 64)


@pytest.mark.parametrize("residual", [False, True])
def test_gamma_is_the_modules_channel_scaling(residual):
    model, x = soft_encnet(residual_gate=residual), random_images()
    view = explain.module_view(model, x)
    module_input = capture_module(model, x)["module_input"]
    with torch.no_grad():
        y, _ = model.enc_module(module_input)
    # paper: y = x ⊗ γ; released gate: y = relu(x + x ⊗ γ) = x (1 + γ) where x > 0 (x ≥ 0: conv5 ends in ReLU)
    ratio = (y / module_input.clamp_min(1e-300)).permute(0, 2, 3, 1)  # B×h×w×C
    positive = (module_input > 1e-6).permute(0, 2, 3, 1)
    expected = view.gamma.double()[:, None, None, :].expand_as(ratio) + (1 if residual else 0)
    assert positive.float().mean() > 0.2
    assert torch.allclose(ratio[positive], expected[positive], rtol=0, atol=1e-12)  # float64 x·γ / x
    assert view.residual is residual
    assert view.gamma.min() >= 0 and view.gamma.max() <= 1 and view.gamma.std() > 1e-3


def test_view_leaves_the_model_as_it_was():
    model, x = soft_encnet(), random_images()
    model.train()
    model.backbone.bn1.eval()  # a frozen BN inside a training model keeps its mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    view = explain.module_view(model, x)
    assert model.training and all(m.training for m in model.modules() if m is not model.backbone.bn1)
    assert not model.backbone.bn1.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched: eval
    assert not any(m._forward_hooks for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert torch.equal(view.logits, model(x))
    assert torch.equal(view.prediction, view.logits.argmax(1))


def synthetic_view(H=32, W=48, k=5, seed=0):
    """A hand-made view: 4×6 positions (stride 8), one certain, one undecided, the rest random."""
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(3 * torch.randn(k, H // 8, W // 8, generator=g, dtype=torch.float64), 0)
    a[:, 0, 0] = 0
    a[2, 0, 0] = 1  # certain: codeword 2
    a[:, 0, 1] = 1 / k  # undecided: ties go to codeword 0
    pred = torch.randint(0, EXPLAIN_NUM_CLASSES, (H, W), generator=g)
    return explain.ModuleView(logits=torch.randn(EXPLAIN_NUM_CLASSES, H, W), prediction=pred, assignments=a,
                              presence=torch.rand(EXPLAIN_NUM_CLASSES, generator=g), gamma=torch.rand(64, generator=g),
                              residual=False)


def test_picture_encodes_codeword_colour_and_weight():
    H, W, k = 32, 48, 5
    view = synthetic_view(H, W, k)
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    pic = explain.draw_explanation(image, view, EXPLAIN_CLASSES, EXPLAIN_PALETTE, label=np.full((H, W), 3))
    arr = np.asarray(pic)
    assert pic.mode == "RGB"
    assert pic.width == explain.PAD + max(W, explain.MIN_LEFT) + explain.PAD + explain.RIGHT_W + explain.PAD
    boxes = pic.info["panels"]
    for name in ("input", "prediction", "assignment"):
        x0, y0, x1, y1 = boxes[name]
        assert (x1 - x0, y1 - y0) == (W, H) and y1 <= pic.height
    x0, y0, x1, y1 = boxes["input"]
    assert np.array_equal(arr[y0:y1, x0:x1], image)
    x0, y0, x1, y1 = boxes["prediction"]
    assert np.array_equal(arr[y0:y1, x0:x1], np.array(EXPLAIN_PALETTE, np.uint8)[view.prediction.numpy()])

    x0, y0, x1, y1 = boxes["assignment"]
    panel = arr[y0:y1, x0:x1].astype(float)
    colours = explain.codeword_colours(k)
    a = view.assignments.numpy()
    for i in range(H // 8):
        for j in range(W // 8):
            block = panel[8 * i:8 * i + 8, 8 * j:8 * j + 8]
            assert (block == block[0, 0]).all()  # nearest upsampling: one colour per feature position
            weight, strongest = a[:, i, j].max(), a[:, i, j].argmax()
            brightness = explain.DIM + (1 - explain.DIM) * (weight - 1 / k) / (1 - 1 / k)
            assert np.abs(block[0, 0] - colours[strongest] * brightness).max() <= 0.5
    assert np.array_equal(panel[0, 0], colours[2])  # certain → the full colour
    assert np.abs(panel[0, 8] - explain.DIM * colours[0]).max() <= 0.5  # undecided → dim
    # brightness grows with the weight: among positions of one codeword, order by weight = order by value
    strongest, weight = a.argmax(0), a.max(0)
    ks, counts = np.unique(strongest, return_counts=True)
    kk = ks[counts.argmax()]
    cells = sorted(zip(*np.nonzero(strongest == kk)), key=lambda c: weight[c])
    values = [panel[8 * i, 8 * j].sum() for i, j in cells]
    assert values == sorted(values) and len(values) >= 2
    # the share bar just below: each codeword's segment is its mean weight over positions, of the width W
    bar = arr[y1 + 3 + 5, x0:x1].astype(float)
    share = a.reshape(k, -1).mean(1)
    for c in range(k):
        n = int((np.abs(bar - np.rint(colours[c])).max(1) == 0).sum())
        assert abs(n - share[c] * W) <= 1.01, (c, n, share[c] * W)
    # distinct codeword colours, also for EXPLAIN_K = 32
    c32 = explain.codeword_colours(32)
    d = np.abs(c32[:, None] - c32[None]).sum(-1)
    assert d[~np.eye(32, dtype=bool)].min() >= 20


def test_picture_of_a_real_model_matches_its_view():
    model = soft_encnet()
    x = random_images(b=1, h=64, w=320)
    view = explain.module_view(model, x)
    image = np.random.default_rng(1).integers(0, 256, (3, 64, 320), dtype=np.uint8)  # CHW is accepted too
    pic = explain.draw_explanation(image, view, EXPLAIN_CLASSES, EXPLAIN_PALETTE)  # a batch of one is accepted
    x0, y0, x1, y1 = pic.info["panels"]["assignment"]
    assert (x1 - x0, y1 - y0) == (320, 64)
    expected = explain.assignment_colours(view.assignments[0])  # 8×40
    got = np.asarray(pic)[y0 + 4:y1:8, x0 + 4:x1:8]
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert len(np.unique(expected.reshape(-1, 3), axis=0)) > 3  # a varied map, not one colour
    one = explain.one_image(explain.module_view(model, x), 0)
    assert one.assignments.shape == (EXPLAIN_K, 8, 40) and one.gamma.shape == (64,) and one.prediction.shape == (64, 320)


def test_explain_images_end_to_end():
    model = soft_encnet()
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)]
    labels = [np.full((32, 48), -1), rng.integers(0, EXPLAIN_NUM_CLASSES, (40, 64))]
    pics = explain.explain_images(model, imgs, EXPLAIN_CLASSES, EXPLAIN_PALETTE, labels)
    for img, pic in zip(imgs, pics):
        x0, y0, x1, y1 = pic.info["panels"]["input"]
        assert np.array_equal(np.asarray(pic)[y0:y1, x0:x1], img)


def test_models_without_an_encoding_layer_raise_one_line():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    fcn = encnet.FCN(EXPLAIN_NUM_CLASSES, "resnet18", width=16, head_width=64).eval()
    with pytest.raises(ValueError) as e:
        explain.module_view(fcn, x)
    assert "\n" not in str(e.value) and "FCN" in str(e.value) and "no Context Encoding Module" in str(e.value)
    k0 = encnet.EncNet(EXPLAIN_NUM_CLASSES, "resnet18", width=16, head_width=64, num_codes=0).eval()
    with pytest.raises(ValueError) as e:
        explain.module_view(k0, x)
    assert "\n" not in str(e.value) and "K = 0" in str(e.value)


def test_tensorboard_views():
    model, x = soft_encnet(), random_images()
    view = explain.module_view(model, x)
    out = explain.tensorboard_views(view, EXPLAIN_CLASSES, index=1)
    assert set(out) == {"assignment", "presence"}
    for t in out.values():
        assert t.dtype == torch.float32 and t.dim() == 3 and t.shape[0] == 3
        assert t.min() >= 0 and t.max() <= 1 and t.std() > 0.01
    assert out["assignment"].shape == (3, 32, 48)
    centres = (out["assignment"][:, 4::8, 4::8].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(centres, explain.assignment_colours(view.assignments[1]))
    assert out["presence"].shape[2] == explain.RIGHT_W + 2 * explain.PAD
    assert "presence" not in explain.tensorboard_views(explain.module_view(soft_encnet(se_loss=False), x))
    from torch.utils.tensorboard import SummaryWriter  # what it is for: add_image accepts them
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        with SummaryWriter(d) as writer:
            for name, t in out.items():
                writer.add_image(f"val/{name}/0", t, 0)


def test_an_overflowed_forward_is_drawn_not_raised():
    # a tiny model after two steps from scratch can overflow in eval mode (running statistics barely moved):
    # its NaN presences and assignments are drawn as "nan" and black, so a finished run's final logging goes on
    model, x = soft_encnet(), random_images()
    view = explain.module_view(model, x)
    nan = view._replace(assignments=torch.full_like(view.assignments, float("nan")),
                        presence=torch.full_like(view.presence, float("nan")),
                        gamma=torch.full_like(view.gamma, float("nan")))
    out = explain.tensorboard_views(nan, EXPLAIN_CLASSES)
    assert out["assignment"].max() == 0 and torch.isfinite(out["presence"]).all()
    picture = explain.draw_explanation(np.zeros((32, 48, 3), np.uint8), explain.one_image(nan, 0),
                                       EXPLAIN_CLASSES, EXPLAIN_PALETTE)
    assert picture.size[0] > 0


EXPLAIN_TINY = ["--width", "8", "--head-width", "16", "--batch-size", "4", "--log-every", "0"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Output folders of tiny train_seg.py runs on the built-in data, in-process: an EncNet (2 iterations), an
    FCN and an EncNet with K = 0 codewords (1 iteration each)."""
    runs = {}
    for name, flags in (("encnet", ["--max-iters", "2"]), ("fcn", ["--max-iters", "1", "--model", "fcn"]),
                        ("k0", ["--max-iters", "1", "--num-codes", "0"])):
        runs[name] = tmp_path_factory.mktemp(name)
        train_seg.main([*EXPLAIN_TINY, *flags, "--out", str(runs[name])])
    return runs


def exit_code_of(main, argv):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code


def write_noise_photo(path, w, h, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def panel(picture, name, W, H):
    """A panel of a draw_explanation picture, by the layout: (a) input, then prediction, then (b) assignment."""
    P, T = explain.PAD, explain.TITLE_H
    y0 = {"input": P + T, "prediction": P + T + H + 4 + T, "assignment": P + 2 * (T + H + 4) + T}[name]
    return np.asarray(picture)[y0:y0 + H, P:P + W]


def test_eval_explain_writes_a_picture_beside_each_prediction(tiny_runs, tmp_path, capsys):
    ckpt = tiny_runs["encnet"] / "checkpoint.pth"
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = {"wide": write_noise_photo(photos / "wide.png", 100, 40, 1), "tall": write_noise_photo(photos / "tall.jpg", 30, 50, 2)}
    pixels["tall"] = np.asarray(Image.open(photos / "tall.jpg").convert("RGB"))  # as decoded (JPEG)
    out = tmp_path / "pred"
    seg_eval.main(["--checkpoint", str(ckpt), "--images", str(photos), "--out", str(out), "--explain"])
    assert "(explained)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["tall.png", "tall_explain.png", "tall_overlay.jpg",
                                                    "wide.png", "wide_explain.png", "wide_overlay.jpg"]
    model, info = zoo.load_model(str(ckpt))
    for name, (W, H) in (("wide", (100, 40)), ("tall", (30, 50))):
        picture = Image.open(out / f"{name}_explain.png").convert("RGB")
        assert picture.width == explain.PAD + max(W, explain.MIN_LEFT) + explain.PAD + explain.RIGHT_W + explain.PAD
        assert np.array_equal(panel(picture, "input", W, H), pixels[name])  # drawn at the image's size
        # the prediction panel is the prediction written beside it
        assert np.array_equal(panel(picture, "prediction", W, H), np.asarray(Image.open(out / f"{name}.png")))
        # the assignment map: the model's view of the image with its long side at base size (320), upsampled
        x = (torch.from_numpy(pixels[name].copy()).permute(2, 0, 1)[None].float() / 255
             - torch.tensor(explain.MEAN)[:, None, None]) / torch.tensor(explain.STD)[:, None, None]
        size = (128, 320) if W > H else (320, 192)
        view = explain.module_view(model, F.interpolate(x, size, mode="bilinear", align_corners=False))
        assert view.assignments.shape[-2:] == (size[0] // 8, size[1] // 8)
        expected = Image.fromarray(explain.assignment_colours(view.assignments[0])).resize((W, H), Image.NEAREST)
        got = panel(picture, "assignment", W, H).astype(int)
        assert np.abs(got - np.asarray(expected, int)).max() <= 1  # float rounding of another normalisation order


def test_eval_explain_plans_its_files_like_the_other_outputs(tiny_runs, tmp_path, capsys):
    ckpt = tiny_runs["encnet"] / "checkpoint.pth"
    photos = tmp_path / "photos"
    photos.mkdir()
    write_noise_photo(photos / "a.png", 40, 20)
    out = tmp_path / "pred"
    out.mkdir()
    (out / "a_explain.png").write_bytes(b"mine")
    assert exit_code_of(seg_eval.main, ["--checkpoint", ckpt, "--images", photos, "--out", out, "--explain"]) == 1
    err = capsys.readouterr().err
    assert "1 --explain pictures exist already" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["a_explain.png"] and (out / "a_explain.png").read_bytes() == b"mine"
    seg_eval.main(["--checkpoint", str(ckpt), "--images", str(photos), "--out", str(out), "--explain", "--overwrite"])
    assert Image.open(out / "a_explain.png").mode == "RGB" and Image.open(out / "a.png").size == (40, 20)
    # an input's picture would be another input's prediction: refused before any work
    write_noise_photo(photos / "a_explain.png", 40, 20)
    assert exit_code_of(seg_eval.main, ["--checkpoint", ckpt, "--images", photos, "--out", tmp_path / "new",
                                     "--explain"]) == 1
    err = capsys.readouterr().err
    assert "would both be written to" in err and "a_explain.png" in err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("which,message", [("fcn", "FCN has no Context Encoding Module"),
                                         ("k0", "EncNet's Context Encoding Module has K = 0 codewords")])
def test_eval_explain_of_a_model_without_codewords_is_one_line(which, message, tiny_runs, tmp_path, capsys):
    write_noise_photo(tmp_path / "a.png", 40, 20)
    assert exit_code_of(seg_eval.main, ["--checkpoint", tiny_runs[which] / "checkpoint.pth", "--images", tmp_path / "a.png",
                                     "--out", tmp_path / "pred", "--explain"]) == 2
    err = capsys.readouterr().err
    assert f"--explain: {message}" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "pred").exists()


def test_eval_explain_needs_images(tmp_path, capsys):
    # refused before the checkpoint is even looked at
    assert exit_code_of(seg_eval.main, ["--checkpoint", tmp_path / "missing.pth", "--explain"]) == 2
    err = capsys.readouterr().err
    assert "--explain applies to --images" in err and len(err.strip().splitlines()) == 1, err


def test_training_logs_the_modules_views_of_the_validation_images(tiny_runs):
    events = EventAccumulator(str(tiny_runs["encnet"])).Reload()
    images = set(events.Tags()["images"])
    expected = {f"val/{name}/{i}" for name in ("assignment", "presence") for i in range(4)}
    assert expected <= images and {f"val/input_truth_prediction/{i}" for i in range(4)} <= images
    # the logged map is the final model's view of validation image 0, at the image's size
    model, _ = zoo.load_model(str(tiny_runs["encnet"] / "checkpoint.pth"))
    val_images, val_labels = context_data.context_split("val")
    x = (val_images[:1].float() / 255 - torch.tensor(explain.MEAN)[:, None, None]) / torch.tensor(explain.STD)[:, None, None]
    views = explain.tensorboard_views(explain.module_view(model, x), context_data.CONTEXT_CLASSES, label=val_labels[0])
    for name in ("assignment", "presence"):
        logged, = events.Images(f"val/{name}/0")
        assert logged.step == 2  # the final evaluation's
        got = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert("RGB"), int)
        want = views[name].permute(1, 2, 0).numpy() * 255  # add_image: ×255, truncated to uint8
        assert got.shape == want.shape and np.abs(got - want).max() <= 1.01, name
        if name == "assignment":  # at the image's size
            assert got.shape[:2] == (context_data.CONTEXT_HEIGHT, context_data.CONTEXT_WIDTH)
    for which in ("fcn", "k0"):  # no module, nothing to log; the strips are there
        images = set(EventAccumulator(str(tiny_runs[which])).Reload().Tags()["images"])
        assert "val/input_truth_prediction/0" in images and not any("assignment" in t or "presence" in t for t in images)


class RecordingWriter:
    def __init__(self):
        self.images = {}

    def add_image(self, tag, picture, step):
        self.images[tag] = (picture, step)


def test_log_explanations_at_quick_validation_and_for_other_models(tiny_runs):
    """The function both validations call (quick validation every --val-every epochs, and the final one)."""
    dataset = context_data.ContextDataset("val", "val")
    args = zoo.read_checkpoint(tiny_runs["encnet"] / "checkpoint.pth")["args"]
    args = type("Args", (), args)
    model, _ = zoo.load_model(str(tiny_runs["encnet"] / "checkpoint.pth"))
    model.train()
    writer = RecordingWriter()
    train_seg.log_explanations(model, dataset, torch.device("cpu"), args, writer, 750, count=2)
    assert model.training  # mid-training: the model goes on training
    assert set(writer.images) == {"val/assignment/0", "val/assignment/1", "val/presence/0", "val/presence/1"}
    picture, step = writer.images["val/assignment/1"]
    assert step == 750 and picture.shape == (3, context_data.CONTEXT_HEIGHT, context_data.CONTEXT_WIDTH)
    for which in ("fcn", "k0"):
        writer = RecordingWriter()
        train_seg.log_explanations(zoo.load_model(str(tiny_runs[which] / "checkpoint.pth"))[0], dataset,
                                   torch.device("cpu"), args, writer, 750)
        assert writer.images == {}


def test_save_explained_samples_stacks_one_picture_per_scene(tiny_runs, tmp_path):
    model, _ = zoo.load_model(str(tiny_runs["encnet"] / "checkpoint.pth"))
    figure = explain.save_explained_samples(model, str(tmp_path / "docs" / "explained.png"))
    saved = Image.open(tmp_path / "docs" / "explained.png")
    assert saved.size == figure.size and np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(figure))
    placed = figure.info["pictures"]
    assert [p["scene"] for p in placed] == [s[0] for s in context_data.CONTEXT_SCENES]
    images, labels = context_data.context_split("val")
    arr = np.asarray(figure)
    corners = [p["corner"][1] for p in placed]
    assert corners == sorted(corners) and len(set(corners)) == 4
    for s, p in enumerate(placed):
        assert (labels[p["index"]] == 3 + s).any()  # the panorama is of that scene
        assert p["index"] == int(((labels.flatten(1).max(1).values - 3) == s).nonzero()[0, 0])  # its first one
        x0, y0, x1, y1 = p["panels"]["input"]
        assert np.array_equal(arr[y0:y1, x0:x1], images[p["index"]].permute(1, 2, 0).numpy())
    # the pictures are those of explain_images with the true labels
    first = explain.explain_images(model, [images[placed[0]["index"]]], context_data.CONTEXT_CLASSES,
                                   context_data.CONTEXT_PALETTE, [labels[placed[0]["index"]].numpy()])[0]
    x, y = placed[0]["corner"]
    assert np.array_equal(arr[y:y + first.height, x:x + first.width], np.asarray(first))
    assert figure.height > 4 * first.height


def test_explain_figure_command(tiny_runs, tmp_path, capsys, monkeypatch):
    ckpt = tiny_runs["encnet"] / "checkpoint.pth"
    out = tmp_path / "docs" / "explained.png"
    seg_eval.main(["--checkpoint", str(ckpt), "--explain-figure", str(out)])
    assert f"→ {out}" in capsys.readouterr().out
    model, _ = zoo.load_model(str(ckpt))
    expected = explain.save_explained_samples(model, str(tmp_path / "again.png"))
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    before = out.read_bytes()
    assert exit_code_of(seg_eval.main, ["--checkpoint", tmp_path / "missing.pth", "--explain-figure", out]) == 2
    err = capsys.readouterr().err  # refused before the checkpoint is looked at
    assert "exists already" in err and len(err.strip().splitlines()) == 1 and out.read_bytes() == before
    seg_eval.main(["--checkpoint", str(ckpt), "--explain-figure", str(out), "--overwrite"])
    for argv, message in (([tmp_path / "x.jpg"], "name it *.png"), ([tmp_path / "y.png", "--images", tmp_path],
                                                                     "--images, --export, --data"),
                          ([tmp_path / "y.png", "--data", "ade20k"], "do not apply")):
        assert exit_code_of(seg_eval.main, ["--checkpoint", tmp_path / "missing.pth", "--explain-figure", *argv]) == 2
        assert message in capsys.readouterr().err
    for which, message in (("fcn", "--explain-figure: FCN has no Context Encoding Module"), ("k0", "K = 0")):
        assert exit_code_of(seg_eval.main, ["--checkpoint", tiny_runs[which] / "checkpoint.pth", "--explain-figure",
                                         tmp_path / f"{which}.png"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / f"{which}.png").exists()
    load = zoo.load_model  # a model of other data: its classes are not the panoramas'
    monkeypatch.setattr(zoo, "load_model", lambda source: (lambda m, info: (m, {**info, "dataset": "ade20k"}))(*load(source)))
    assert exit_code_of(seg_eval.main, ["--checkpoint", ckpt, "--explain-figure", tmp_path / "ade.png"]) == 2
    err = capsys.readouterr().err
    assert "trained on ade20k" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "ade.png").exists()


def test_quick_validation_logs_the_views_every_val_every_epochs(tmp_path):
    # make_ade: test_all.py's ADE20K fixture in its real layout (8 images: an epoch is 4 iterations of 2)
    from test_all import make_ade  # noqa: E402 (test_all.py has it at hand once this file is merged into it)
    make_ade(tmp_path / "data")
    train_seg.main(["--data", "ade20k", "--data-root", str(tmp_path / "data"), "--backbone", "resnet18",
                    "--pretrained", "none", *EXPLAIN_TINY, "--batch-size", "2", "--crop-size", "32", "--base-size", "40",
                    "--workers", "0", "--max-iters", "3", "--val-every", "1", "--out", str(tmp_path / "run")])
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    steps = [e.step for e in events.Images("val/assignment/0")]
    quick = [e.step for e in events.Scalars("val/mIoU")][:-1]  # the quick validations', then the final one's
    assert quick and steps == [*quick, 3] and [e.step for e in events.Images("val/presence/0")] == steps
    assert [e.step for e in events.Images("val/input_truth_prediction/0")] == [3]


# ============================================================================= 14. run.py: checkpoints, signals, loader workers, full and read-only disks


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pth"
    run_plumbing.save_checkpoint({"model": {"w": torch.ones(3)}, "iter": 1}, path)
    before = path.read_bytes()
    crash = ("import os, torch, run\n"
             "def dying_save(obj, f):\n"
             "    f.write(b'half a checkpoint')\n"
             "    f.flush()\n"
             "    os.kill(os.getpid(), 9)\n"
             "torch.save = dying_save\n"
             f"run.save_checkpoint({{'model': {{}}}}, {str(path)!r})\n")
    assert subprocess.run([sys.executable, "-c", crash], cwd=HERE).returncode == -9
    assert path.read_bytes() == before and zoo.read_checkpoint(path)["iter"] == 1
    assert (tmp_path / "checkpoint.pth.tmp").exists()  # the half-written file never replaced it


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers tell senders apart with sigwaitinfo (Linux)")
def test_loader_workers_survive_a_foreign_sigterm_and_end_on_their_parents():
    class WorkerPid(torch.utils.data.Dataset):
        def __len__(self):
            return 10_000

        def __getitem__(self, index):
            return os.getpid()

    batches = iter(torch.utils.data.DataLoader(WorkerPid(), num_workers=1,
                                               worker_init_fn=run_plumbing.loader_worker_signals))
    worker = int(next(batches))
    subprocess.run(["kill", "-TERM", str(worker)], check=True)  # sent by another process, as scancel's
    # pending in the worker once kill returns: unblocked, it would die before serving these
    assert all(int(next(batches)) == worker for _ in range(50))
    os.kill(worker, signal.SIGTERM)  # from its parent, as the loader stops a stuck worker: it ends
    deadline = time.time() + 30
    while process_state(worker) not in ("Z", "gone") and time.time() < deadline:  # Z: ended, not yet reaped
        time.sleep(0.01)
    assert process_state(worker) in ("Z", "gone")
    del batches


def process_state(pid):
    """The state letter of a Linux process (R, S, Z, ...), or 'gone'."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


# full and read-only disks: one line naming the file and what is intact, nothing half-written left

def mount_tmpfs(path, options):
    """A tmpfs mounted at `path` (made) with `options` ('size=3m', 'size=1m,ro'); False where this process may not
    mount (not root, a container without CAP_SYS_ADMIN): the tests then use their fallbacks."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def unmount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def single_error_line(stderr):
    """The message of a command that stopped with one line and no traceback."""
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr.strip()


@pytest.fixture
def full_disk(tmp_path):
    """(folder, cause, fill): a folder on a small tmpfs, and fill(), a context manager during which writing there
    fails as on a full disk (the tmpfs filled up: 'no space left on device'). Where mounting is not allowed: this
    process's file size limit at 0 bytes during fill() ('file too large', EFBIG; Python ignores SIGXFSZ)."""
    folder = tmp_path / "disk"
    mounted = mount_tmpfs(folder, "size=2m")

    @contextlib.contextmanager
    def fill():
        if mounted:
            with open(folder / "filler", "wb", buffering=0) as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
            try:
                yield
            finally:
                (folder / "filler").unlink()
        else:
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
            try:
                yield
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    yield folder, "no space left on device" if mounted else "file too large", fill
    if mounted:
        unmount(folder)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder on a read-only file system: a tmpfs mounted read-only (permission bits would not do: root ignores
    them); where mounting is not allowed, creating a file there raises EROFS (run.check_writable's probe)."""
    folder = tmp_path / "ro"
    mounted = mount_tmpfs(folder, "size=1m,ro")
    if not mounted:
        real = run_plumbing.tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.abspath(dir).startswith(str(folder)):
                raise OSError(errno.EROFS, "Read-only file system")
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(run_plumbing.tempfile, "mkstemp", mkstemp)
    yield folder
    if mounted:
        unmount(folder)


@pytest.mark.slow
def test_full_disk_while_checkpointing_is_one_line_leaves_no_temp_file_and_the_advice_works(tmp_path):
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, "size=3m")  # room for one checkpoint (1.6 MB) and not for its replacement
    out = disk / "run"
    argv = ["train_seg.py", *TINY, "--max-iters", 4, "--save-every", 1, "--out", out]
    try:
        if mounted:
            result = run(*argv, check=False)
        else:  # a file size limit below one checkpoint: the first one fails (EFBIG)
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            result = subprocess.run([sys.executable, *map(str, argv)], cwd=HERE, capture_output=True, text=True,
                                    timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, hard)))
        assert result.returncode == 1
        message = single_error_line(result.stderr)
        assert not (out / "checkpoint.pth.tmp").exists()  # the half file does not stay to fill the disk
        if not mounted:
            assert re.fullmatch(r"train_seg.py: error: file too large .* while writing the checkpoint of iteration 1 "
                                r"\(.*checkpoint.pth\); no checkpoint was written yet; .*", message), message
            return
        assert re.fullmatch(rf"train_seg.py: error: no space left on device \(the file system mounted at {disk}\) while "
                            rf"writing the checkpoint of iteration 2 \({out}/checkpoint.pth\); the checkpoint of "
                            rf"iteration 1 is intact; free space and continue with: python train_seg.py .* --resume",
                            message), message
        assert zoo.read_checkpoint(str(out / "checkpoint.pth"))["iter"] == 1
        # free space, and the command of the message continues the run to its end
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        command = shlex.split(message.split("continue with: ")[1])
        assert command[:2] == ["python", "train_seg.py"]
        resumed = run(*command[1:])
        assert "iterations from 1" in resumed.stdout and json.loads((out / "results.json").read_text())["mIoU"] >= 0
        assert zoo.read_checkpoint(str(out / "checkpoint.pth"))["iter"] == 4
    finally:
        if mounted:
            unmount(disk)


def test_full_disk_under_tensorboard_is_one_line_without_the_writer_threads_traceback(full_disk, capsys):
    folder, cause, fill = full_disk
    log = run_plumbing.EventLog(str(folder / "tb"), intact="the checkpoint of iteration 3 is intact")
    log.add_scalar("train/loss", 1.0, 1)
    log.flush()
    with fill(), pytest.raises(errors.WriteError) as error:
        for i in range(200):  # SummaryWriter writes in its thread: the error comes back at a later call
            log.add_scalar("train/loss", float(i), i)
            time.sleep(0.005)
        log.close()  # close flushes first: an error of the last records is not lost
    assert re.fullmatch(rf"{cause} .*while writing the TensorBoard events in {folder}/tb; the checkpoint of "
                        rf"iteration 3 is intact", str(error.value)), str(error.value)
    assert "Traceback" not in capsys.readouterr().err  # the writer thread's own traceback is silenced
    assert list((folder / "tb").glob("events.out.tfevents.*"))  # the log is kept: TensorBoard reads what it holds


def test_full_disk_while_writing_predictions_is_one_line_and_leaves_no_half_file(full_disk, tmp_path, monkeypatch,
                                                                                 capsys):
    folder, cause, fill = full_disk
    fake_zoo(monkeypatch)
    write_jpeg(tmp_path / "photos" / "a.jpg", 64, 48)
    with fill():
        status = main_exit(["--checkpoint", "zoo", "--images", tmp_path / "photos" / "a.jpg", "--out", folder / "pred"])
    message = single_error_line(capsys.readouterr().err)
    assert status == 1 and re.search(
        rf"error: {cause} .*while writing the prediction {folder}/pred/a.png; the predictions of the 0 images before "
        rf"it are complete; free space and run the command again with --overwrite$", message), message
    assert not (folder / "pred" / "a.png").exists()


def test_full_disk_while_writing_scores_is_one_line_and_names_them(full_disk, tmp_path, monkeypatch, capsys):
    folder, cause, fill = full_disk
    make_ade(tmp_path / "data", n=2)
    fake_zoo(monkeypatch, data_root=str(tmp_path / "data"))
    with fill():
        status = main_exit(["--checkpoint", "zoo", "--out", folder / "eval"])
    captured = capsys.readouterr()
    message = single_error_line(captured.err)
    table = folder / "eval" / "per_class_iou_ade20k_val_repo.txt"
    assert status == 1 and re.search(rf"error: {cause} .*while writing the per-class table {table}; the scores are "
                                     rf"printed above \(pixAcc .* %\)", message), message
    assert "pixAcc" in captured.out and not table.exists()


def test_full_disk_while_exporting_is_one_line_and_leaves_no_half_file(full_disk, tmp_path):
    folder, cause, fill = full_disk
    tiny_checkpoint(tmp_path / "tiny.pth")
    model, info = zoo.load_model(str(tmp_path / "tiny.pth"))
    target = folder / "exports" / "encnet.pt2"
    with fill(), pytest.raises(errors.WriteError) as error:
        export.export(model, info, str(target), example_size=(64, 64))
    assert re.fullmatch(rf"{cause} .*while writing the export {target}; nothing of it is left; free space and export "
                        rf"again", str(error.value)), str(error.value)
    assert not target.exists() and not list(target.parent.glob("*partial*"))


def test_write_errors_the_user_can_fix_and_the_others():
    # torch.save's RuntimeError raised while handling the file's OSError: its cause is the OSError's
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as e:
        assert errors.write_failure(e).startswith("no space left on device")
    assert errors.write_failure(OSError(errno.EROFS, "x"), "/") == "read-only file system (the file system mounted at /)"
    assert errors.write_failure(PermissionError(errno.EACCES, "x")) == "permission denied"
    assert errors.write_failure(RuntimeError("shape mismatch")) is None  # a bug keeps its traceback
    with pytest.raises(ValueError), errors.writing("/nonexistent/x", "x"):
        raise ValueError("a bug")


@pytest.mark.parametrize("argv", [
    ["--images", "{photo}", "--out", "{ro}/pred"],
    ["--out", "{ro}/eval"],  # an evaluation of a dataset: refused before it runs, not after
    ["--export", "{ro}/encnet.onnx"],
    ["--export", "{ro}/new/encnet.pt2"],
])
def test_eval_refuses_unwritable_outputs_before_any_work(argv, read_only, tmp_path, monkeypatch, capsys):
    make_ade(tmp_path / "data", n=2)
    loaded = fake_zoo(monkeypatch, data_root=str(tmp_path / "data"))
    write_jpeg(tmp_path / "a.jpg", 64, 48)
    argv = [a.format(ro=read_only, photo=tmp_path / "a.jpg") for a in argv]
    assert main_exit(["--checkpoint", "zoo", *argv]) == 2
    message = single_error_line(capsys.readouterr().err)
    flag = argv[-2]
    assert re.search(rf"error: {flag} {re.escape(argv[-1])} is not writable \({read_only} is on the read-only file "
                     rf"system mounted at .*\)$", message), message
    assert loaded == []  # before the model was loaded


def test_train_seg_names_a_read_only_file_system(read_only, monkeypatch, capsys):
    message = train_seg_failure([*TINY, "--out", read_only / "run"], monkeypatch, capsys)
    assert f"--out {read_only}/run is not writable ({read_only} is on the read-only file system mounted at" in message
    assert "permission" not in message


def test_check_writable_says_why_not(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.FlagError, match=rf"--out x is not writable \({tmp_path}/file is a file, not a folder\)"):
        run_plumbing.check_writable(tmp_path / "file" / "sub", "--out x")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(errors.FlagError, match="is a broken link, not a folder"):
        run_plumbing.check_writable(tmp_path / "link" / "sub", "--out x")
    run_plumbing.check_writable(tmp_path / "new" / "deeper", "--out x")  # fine: made later
    assert sorted(os.listdir(tmp_path)) == ["file", "link"]  # nothing created, the probe removed

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(run_plumbing.tempfile, "mkstemp", denied)
    with pytest.raises(errors.FlagError, match=rf"--out x is not writable \(no permission to write in {tmp_path}\)"):
        run_plumbing.check_writable(tmp_path / "new", "--out x")


def test_pt2_export_into_a_missing_folder_makes_it_and_prints_nothing(tmp_path, capfd):
    tiny_checkpoint(tmp_path / "tiny.pth")
    model, info = zoo.load_model(str(tmp_path / "tiny.pth"))
    capfd.readouterr()
    target = tmp_path / "new" / "sub" / "encnet.pt2"
    export.export(model, info, str(target), example_size=(64, 64))
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == "", captured.err  # no warning about its temporary file's name
    extra = {"encnet.json": ""}
    program = torch.export.load(str(target), extra_files=extra)
    assert json.loads(extra["encnet.json"])["window_stride"] == "21"  # int(2/3 · crop 32)
    x = torch.randn(1, 3, 40, 36)
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)
    assert os.listdir(target.parent) == ["encnet.pt2"]


def test_broken_link_among_photos_is_named_among_the_skipped(tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    write_jpeg(photos / "a.jpg", 64, 48)
    (photos / "b.jpg").symlink_to(tmp_path / "moved" / "b.jpg")
    files, skipped = seg_eval.list_images([str(photos)])
    assert files == [str(photos / "a.jpg")]
    assert skipped == f"1 broken link (b.jpg → {tmp_path}/moved/b.jpg)"
    with pytest.raises(errors.DataError, match=r"b.jpg: a broken link \(to .*moved/b.jpg, which does not exist\)"):
        seg_eval.list_images([str(photos / "b.jpg")])
    fake_zoo(monkeypatch)
    seg_eval.main(["--checkpoint", "zoo", "--images", str(photos), "--out", str(tmp_path / "pred")])
    assert f"1 images → {tmp_path}/pred (skipped 1 broken link (b.jpg → " in capsys.readouterr().out


class SystemCall:
    """A pickle that runs a shell command when it is loaded without weights_only."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_checkpoint_carrying_code_is_named_so_and_nothing_of_it_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": {}, "payload": SystemCall(f"touch {marker}")}, evil)
    with pytest.raises(errors.CheckpointError) as error:
        zoo.read_checkpoint(str(evil))
    message = str(error.value)
    assert re.fullmatch(rf"{evil} holds Python code or objects \((posix|os|nt)\.system\) besides tensors and plain "
                        rf"values: it was refused and none of it was run \(.*weights_only=True.*\)", message), message
    assert "damaged" not in message and not marker.exists()
    monkeypatch.setattr(sys, "argv", ["eval.py"])
    assert main_exit(["--checkpoint", evil, "--images", tmp_path]) == 1
    assert "holds Python code" in single_error_line(capsys.readouterr().err) and not marker.exists()


@pytest.mark.parametrize("wording,refused", ids=["torch<=2.3", "torch2.4+", "torch2.6+", "REDUCE", "BUILD", "damaged"],
                         argvalues=[
    ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but "
     "it can result in arbitrary code execution. WeightsUnpickler error: Unsupported class os.system", True),  # ≤2.3
    ("Weights only load failed. ... WeightsUnpickler error: Unsupported global: GLOBAL io.open was not an allowed "
     "global by default. Please use `torch.serialization.add_safe_globals([io.open])`", True),  # 2.4+
    ("Weights only load failed. ...\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.",
     True),  # 2.6+
    ("Weights only load failed. WeightsUnpickler error: Trying to call reduce for unrecognized function "
     "<built-in function system>", True),
    ("Weights only load failed. WeightsUnpickler error: Can only build Tensor, Parameter, OrderedDict or types "
     "allowlisted via `add_safe_globals`, but got <class 'x.Y'>", True),
    ("Weights only load failed. ... WeightsUnpickler error: Unsupported operand 255", False),  # damaged
])
def test_torchs_wordings_of_refused_code(wording, refused, tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    torch.save({"model": {}}, path)

    def load(*args, **kwargs):
        raise pickle.UnpicklingError(wording)
    monkeypatch.setattr(zoo.torch, "load", load)
    with pytest.raises(errors.CheckpointError) as error:
        zoo.read_checkpoint(str(path))
    assert ("holds Python code or objects" in str(error.value)) == refused
    assert ("damaged" in str(error.value)) == (not refused)


# ============================================================================= 15. eval.py: the command line, photos, outputs


@pytest.fixture(scope="module")
def ade_run(tmp_path_factory):
    """Two training iterations on an ADE20K fixture in its real layout → (tmp folder, checkpoint path)."""
    tmp_path = tmp_path_factory.mktemp("ade_run")
    make_ade(tmp_path / "data", n=4)
    run("train_seg.py", "--data", "ade20k", "--data-root", tmp_path / "data", "--pretrained", "none",
        "--backbone", "resnet18", *TINY, "--batch-size", 2, "--crop-size", 32, "--base-size", 40,
        "--workers", 0, "--max-iters", 2, "--out", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text()).keys() == {"pixAcc", "mIoU"}
    return tmp_path, tmp_path / "run" / "checkpoint.pth"


@pytest.mark.slow
def test_eval_cli_on_a_real_layout_checkpoint_prints_and_saves_the_table(ade_run):
    tmp_path, checkpoint = ade_run
    result = run("eval.py", "--checkpoint", checkpoint, "--out", tmp_path / "eval")  # data from the checkpoint
    assert re_search(r"ade20k val: pixAcc \d+\.\d\d % mIoU \d+\.\d\d %", result.stdout)
    assert re_search(r"wall +(\d+\.\d+|absent)", result.stdout)  # the per-class table, also saved
    assert "wall" in (tmp_path / "eval" / "per_class_iou_ade20k_val_repo.txt").read_text()


@pytest.mark.slow
def test_eval_cli_multi_scale_with_windows(ade_run):
    tmp_path, checkpoint = ade_run
    result = run("eval.py", "--checkpoint", checkpoint, "--multi-scale", "--crop-size", 24,  # windows at 1.75×
                 "--out", tmp_path / "eval_ms")
    assert "ade20k val multi-scale: pixAcc" in result.stdout


@pytest.mark.slow
def test_eval_cli_segments_images_in_colour_at_their_size(ade_run):
    tmp_path, checkpoint = ade_run
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 61, 3), np.uint8)).save(images / "a.jpg")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (130, 90, 3), np.uint8)).save(images / "b.png")
    run("eval.py", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "pred")
    palette = {tuple(c) for c in data.dataset_info("ade20k")["palette"]}
    for name, size in (("a", (61, 45)), ("b", (90, 130))):
        colour = Image.open(tmp_path / "pred" / f"{name}.png")
        assert colour.size == size and colour.mode == "RGB"
        assert {c for _, c in colour.getcolors(1 << 16)} <= palette
        assert Image.open(tmp_path / "pred" / f"{name}_overlay.jpg").size == size


@pytest.mark.slow
def test_eval_cli_label_pngs_and_a_missing_image(ade_run):
    tmp_path, checkpoint = ade_run
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 61, 3), np.uint8)).save(tmp_path / "a.jpg")
    run("eval.py", "--checkpoint", checkpoint, "--images", tmp_path / "a.jpg", "--label-png", "--out", tmp_path / "ids")
    ids = np.asarray(Image.open(tmp_path / "ids" / "a.png"))
    assert ids.shape == (45, 61) and ids.min() >= 1 and ids.max() <= 150  # ADE20K's encoding: class + 1
    result = run("eval.py", "--checkpoint", checkpoint, "--images", tmp_path / "missing.jpg", check=False)
    assert result.returncode != 0 and "missing.jpg" in result.stderr and "Traceback" not in result.stderr


def test_cli_protocols_write_separate_tables_with_progress(tmp_path, monkeypatch, capsys):
    make_ade(tmp_path / "data", n=2)
    fake_zoo(monkeypatch, data_root=str(tmp_path / "data"))
    monkeypatch.setitem(protocols.MMSEG_TEST_BOX, "ade20k", (64, 32))  # tiny box for a tiny model
    runs = {"repo": [], "repo-ms": ["--multi-scale"], "released": ["--protocol", "released"],
            "mmseg": ["--protocol", "mmseg"], "mmseg-ms": ["--protocol", "mmseg-ms"]}
    for protocol, flags in runs.items():
        seg_eval.main(["--checkpoint", "zoo", "--out", str(tmp_path / "eval"), "--log-every", "1e-9", *flags])
        out = capsys.readouterr().out
        assert (tmp_path / "eval" / f"per_class_iou_ade20k_val_{protocol}.txt").exists()
        assert "eval 1/2 images |" in out and "img/s | eta" in out and "eval 2/2 images" in out
        title = {"repo": "ade20k val:", "repo-ms": "ade20k val multi-scale:"}.get(
            protocol, f"ade20k val{' multi-scale' if protocol != 'mmseg' else ''} ({protocol} protocol):")
        assert f"{title} pixAcc" in out, out
    assert len(list((tmp_path / "eval").glob("per_class_iou_*.txt"))) == 5
    results = json.loads((tmp_path / "eval" / "results_ade20k_val_released.json").read_text())
    assert results["protocol"] == "released" and 0 <= results["mIoU"] <= 1 and results["checkpoint"] == "zoo"


def write_photo(path, w, h, orientation=None, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation  # EXIF Orientation
    image.save(path, exif=exif.tobytes())


def test_images_exif_empty_folders_and_unreadable_files(tmp_path, monkeypatch, capsys):
    fake_zoo(monkeypatch)
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "a.jpg", 40, 24, orientation=6)  # stored 40×24, shown rotated: 24×40
    write_photo(photos / "c.png", 30, 20)
    (photos / "b.jpg").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("skipped: not an image name")
    assert main_exit(["--checkpoint", "zoo", "--images", photos, "--out", tmp_path / "pred"]) != 0
    err = capsys.readouterr().err.strip()
    assert "1 of 3 images could not be read" in err and "b.jpg" in err and len(err.splitlines()) == 1
    assert Image.open(tmp_path / "pred" / "a.png").size == (24, 40)  # upright
    assert Image.open(tmp_path / "pred" / "a_overlay.jpg").size == (24, 40)
    assert Image.open(tmp_path / "pred" / "c.png").size == (30, 20)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    assert main_exit(["--checkpoint", "zoo", "--images", empty]) != 0
    assert "holds no images" in capsys.readouterr().err


def test_images_never_replace_inputs_or_each_other(tmp_path, monkeypatch, capsys):
    fake_zoo(monkeypatch)
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "alpha.png", 30, 20)
    before = (photos / "alpha.png").read_bytes()
    assert main_exit(["--checkpoint", "zoo", "--images", photos, "--out", photos]) == 1
    assert "is a folder of the input images" in capsys.readouterr().err
    assert (photos / "alpha.png").read_bytes() == before and len(list(photos.iterdir())) == 1
    # two inputs, one output name: refused before anything is written
    for names in (("x.bmp", "x.tif"), ("a/x.jpg", "b/x.jpg")):
        for name in names:
            (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
            write_photo(tmp_path / "in" / name, 20, 10)
        assert main_exit(["--checkpoint", "zoo", "--images", *[tmp_path / "in" / n for n in names],
                          "--out", tmp_path / "pred"]) == 1
        assert "would both be written to" in capsys.readouterr().err and not (tmp_path / "pred").exists()
    # an existing file is kept unless --overwrite; the skipped files are counted
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "alpha.png").write_bytes(b"mine")
    (photos / "notes.txt").write_text("")
    (photos / "old").mkdir()
    assert main_exit(["--checkpoint", "zoo", "--images", photos, "--out", tmp_path / "pred"]) == 1
    assert "1 output files exist already" in capsys.readouterr().err
    assert (tmp_path / "pred" / "alpha.png").read_bytes() == b"mine"
    seg_eval.main(["--checkpoint", "zoo", "--images", str(photos), "--out", str(tmp_path / "pred"), "--overwrite"])
    out = capsys.readouterr().out
    assert "skipped 1 files of other types (notes.txt) and 1 subfolders (old)" in out and "eta" in out
    assert Image.open(tmp_path / "pred" / "alpha.png").size == (30, 20)


def test_sixteen_bit_photos_are_scaled_and_float_images_refused(tmp_path):
    ramp = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)  # 0 … 64746
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    photo = np.asarray(seg_eval.read_photo(tmp_path / "depth.png"))
    assert photo.shape == (30, 40, 3) and np.array_equal(photo[..., 0], (ramp >> 8).astype(np.uint8))
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(errors.DataError, match="floating-point image, not a photo"):
        seg_eval.read_photo(tmp_path / "float.tif")


@pytest.mark.parametrize("argv,message", [
    (["--label-png"], "--label-png applies to --images"),
    (["--images", "x.jpg", "--data-root", "data"], "--data-root and --split choose a dataset split"),
    (["--out", "{tmp}/file.txt"], "--out .*file.txt is a file"),
    (["--window-batch", "0"], "argument --window-batch: 0: must be positive"),
    (["--base-size", "-5"], "argument --base-size: -5: must be positive"),
])
def test_eval_flags_that_cannot_work_stop_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    loaded = fake_zoo(monkeypatch)
    (tmp_path / "file.txt").write_text("mine")
    assert main_exit(["--checkpoint", "zoo", *[a.replace("{tmp}", str(tmp_path)) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and loaded == [], err
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_ctrl_c_in_eval_is_one_line(tmp_path, monkeypatch, capsys):
    make_ade(tmp_path / "data", n=2)
    fake_zoo(monkeypatch, data_root=str(tmp_path / "data"))
    monkeypatch.setattr(seg_eval, "evaluate", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(sys, "argv", ["eval.py"])  # the message names the command, as on the command line
    assert main_exit(["--checkpoint", "zoo", "--out", tmp_path / "eval"]) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "eval.py: interrupted\n"


def test_cpu_without_native_bf16_evaluates_in_float32(monkeypatch, capsys):
    monkeypatch.setattr(seg_eval, "cpu_has_fast_bf16", lambda: False)
    assert seg_eval.use_amp(True, torch.device("cpu")) is False
    err = capsys.readouterr().err
    assert "no native bf16" in err and "float32" in err
    monkeypatch.setattr(seg_eval, "cpu_has_fast_bf16", lambda: True)
    assert seg_eval.use_amp(True, torch.device("cpu")) is True and seg_eval.use_amp(False, torch.device("cpu")) is False


# ============================================================================= 16. train_seg.py: recipes, the step, the loop, multi-process runs, resume, one-line errors


@pytest.mark.slow
def test_init_from_a_zoo_file_fine_tunes_with_fresh_stage3_module(tmp_path):
    # train_seg.py --init with the authors' ADE20K file: its architecture (resnet50s, residual gate,
    # align_corners, aux head), the stage-3 Context Encoding Module it lacks starts fresh, one step trains
    zoo_file("released_encnet_resnet50s_ade", tmp_path / "released.pth")
    make_ade(tmp_path / "data", n=2)
    common = ["--data-root", tmp_path / "data", "--init", tmp_path / "released.pth", "--batch-size", 2,
              "--crop-size", 32, "--base-size", 40, "--workers", 0, "--max-iters", 1, "--log-every", 0]
    result = run("train_seg.py", "--data", "ade20k", *common, "--out", tmp_path / "tuned")
    fresh = re.search(r"--init \S+: (\d+) tensors start fresh: (.*)", result.stdout)
    assert fresh and fresh.group(2) == "stage3_encoding", result.stdout
    checkpoint = torch.load(tmp_path / "tuned" / "checkpoint.pth", weights_only=True)
    assert checkpoint["iter"] == 1
    saved = checkpoint["args"]
    assert (saved["backbone"], saved["residual_gate"], saved["align_corners"], saved["aux"]) == \
        ("resnet50s", True, True, True)
    # the file's weights are where training started: one small step away from them
    reference = convert_released(tmp_path / "released.pth")
    moved = (checkpoint["model"]["enc_module.encoding.0.codewords"] - reference["enc_module.encoding.0.codewords"])
    assert 0 < moved.abs().max() < 1e-2

    # fine-tuning on a dataset with other classes (VOC's 21): everything but the class-specific layers is kept
    make_voc(tmp_path / "voc", "VOC2012", "SegmentationClass", "Segmentation", "train", ["a", "b"], (0, 20, 255), True)
    make_voc(tmp_path / "voc", "VOC2012", "SegmentationClass", "Segmentation", "val", ["c"], (0, 20, 255), True)
    result = run("train_seg.py", "--data", "pascal_voc", *common[2:], "--data-root", tmp_path / "voc",
                 "--out", tmp_path / "voc_run")
    fresh = re.search(r"start fresh \(the file predicts 150 classes of ade20k, --data pascal_voc has 21\): (.*)",
                      result.stdout)
    assert fresh and fresh.group(1) == "aux_head.2, classifier.1, enc_module.se_classifier, stage3_encoding", \
        result.stdout
    tuned = weights(tmp_path / "voc_run")
    assert tuned["classifier.1.weight"].shape[0] == 21
    assert 0 < (tuned["conv5.0.weight"] - reference["conv5.0.weight"]).abs().max() < 1e-2  # kept, one step away


def convert_released(path):
    return zoo.convert(torch.load(path, weights_only=True), zoo.RELEASED_KEYS)


def reference_step(name, recipe, tmp_path, dtype):
    """train_seg.py's training step (train_step, the loop's) in `recipe`, from the weights and on the batch of
    testdata/{name}.train_step.pt, in `dtype`. → (reference, loss terms, {reference key: change of the tensor})."""
    ref = torch.load(TESTDATA / f"{name}.train_step.pt", weights_only=True)
    spec, _ = zoo_file(name, tmp_path / "weights.pth")  # the README's rule, salt 0, rounded to float32
    args = train_seg.get_args(["--recipe", recipe, "--init", str(tmp_path / "weights.pth"), "--dropout", "0",
                               "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    args.num_classes = ref["num_classes"]
    model = train_seg.init_model(args).to(dtype).train()
    optimizer = train_seg.build_optimizer(model, args)
    train_seg.poly_lr(optimizer, args.lr, 0, 1)  # iteration 0: the base lr
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, terms, _ = train_seg.train_step(model, optimizer, ref["images"].to(dtype), ref["labels"], args)
    rules = zoo.MMSEG_KEYS if spec["format"] == "mmseg" else zoo.RELEASED_KEYS
    ours = {}
    for key in ref["delta_norm"]:
        own = next(iter(zoo.convert({key: torch.zeros(1)}, rules)))
        sign = -1.0 if own.endswith(".scale") else 1.0  # the zoos store −s_k
        ours[key] = sign * (model.state_dict()[own].double() - before[own].double())
    return ref, terms, ours


def update_error(ref, ours, keys):
    """‖ours − reference‖ / ‖reference‖ over `keys` as one vector: whole changes where the reference has them
    (tensors of ≤ 4,096 numbers), the difference of the norms elsewhere (what it records)."""
    error = sum(((ours[k] - ref["delta_small"][k].double()) ** 2).sum().item() if k in ref["delta_small"]
                else (ours[k].norm().item() - ref["delta_norm"][k]) ** 2 for k in keys)
    return math.sqrt(error) / math.sqrt(sum(ref["delta_norm"][k] ** 2 for k in keys))


@pytest.mark.parametrize("name,recipe", [("mmseg_encnet_r50-d8_ade20k", "mmseg_encnet_r50-d8_ade20k_80k"),
                                         ("released_encnet_resnet50s_ade", "encnet_resnet50s_ade")])
def test_one_training_step_is_the_reference_codes_step(name, recipe, tmp_path):
    # testdata/*.train_step.pt: one SGD step computed by mmsegmentation 1.2.2 and by the authors' torch-encoding
    # 1.2.1 (their train.py's optimizer) themselves, in float32. Ours runs in float64, where it is exact to
    # ~1e-12 on any CPU, so every difference below is the reference's own float32 rounding.
    ref, terms, ours = reference_step(name, recipe, tmp_path, torch.float64)
    weights = {"mmseg": (1.0, 0.2, 0.4), "released": (1.0, 0.2, 0.2)}[ref["format"]]  # seg, SE, aux
    loss = sum(w * terms[k].item() for w, k in zip(weights, ("seg", "se", "aux")))
    reference_loss = sum(ref["loss_terms"].values())  # mmsegmentation's terms come weighted, the authors' summed
    assert abs(loss - reference_loss) < 1e-5 * reference_loss  # float32 means over ~10⁴ pixels: ~1e-6
    keys = list(ref["delta_norm"])
    norms = torch.tensor([ours[k].norm().item() for k in keys])
    reference_norms = torch.tensor([ref["delta_norm"][k] for k in keys])
    # the size of every tensor's change, and of the whole update: measured 4.7e-5 / 8.9e-5 and 1e-6 / 1.3e-5
    assert (norms - reference_norms).norm() <= 1e-4 * reference_norms.norm()
    assert abs(norms.norm() - reference_norms.norm()) <= 1e-4 * reference_norms.norm()
    # the head's changes element by element (measured ≤ 1e-5)
    head = [k for k in keys if not k.startswith(("backbone.", "pretrained."))]
    assert update_error(ref, ours, head) <= 1e-4
    # Element by element through the backbone, a float32 step is only as exact as float32 rounding amplified
    # by 50 layers of backward through BatchNorm in training mode: our own float32 step differs from our float64
    # one by as much (measured 5.8e-4 / 1.0e-3 of the update; the reference differs by 4.7e-4 / 6.9e-4). So the
    # bound is our float32 step's own error, with room for another CPU's kernels. Real differences, measured on
    # mmsegmentation's step: the loss over labelled instead of all pixels 3.3e-2 (its loss 1.4× off), the head
    # at 10× lr 2.1e-2 (its changes 10× off), the auxiliary loss at 0.2 instead of 0.4 (the loss terms off).
    (tmp_path / "fp32").mkdir()
    _, _, ours32 = reference_step(name, recipe, tmp_path / "fp32", torch.float32)
    own_rounding = update_error({"delta_small": {k: ours[k] for k in ref["delta_small"]},
                                 "delta_norm": ref["delta_norm"]}, ours32, keys)
    assert update_error(ref, ours, keys) <= 3 * own_rounding + 1e-5


def test_the_loop_runs_train_step_on_the_loaders_batch(tmp_path, monkeypatch):
    # train_seg.py --init FILE --max-iters 1 --dropout 0: the checkpoint is the --init weights moved by exactly
    # train_step on the batch the loader gave, so the step checked against the reference code is the loop's
    zoo_file("released_encnet_resnet50s_ade", tmp_path / "released.pth")
    make_ade(tmp_path / "data", n=2)
    argv = ["--recipe", "encnet_resnet50s_ade", "--data-root", tmp_path / "data", "--init", tmp_path / "released.pth",
            "--max-iters", 1, "--dropout", 0, "--batch-size", 2, "--crop-size", 32, "--base-size", 40,
            "--workers", 0, "--protocol", "repo", "--log-every", 0, "--out", tmp_path / "run"]
    batches, real_step = [], train_seg.train_step
    monkeypatch.setattr(train_seg, "train_step", lambda net, opt, images, labels, *rest: (
        batches.append((images.clone(), labels.clone())), real_step(net, opt, images, labels, *rest))[1])
    train_seg.main([str(a) for a in argv])
    assert len(batches) == 1
    args = train_seg.get_args([str(a) for a in argv[:-2]] + ["--out", str(tmp_path / "again")])
    args.num_classes = 150
    model = train_seg.init_model(args).train()
    optimizer = train_seg.build_optimizer(model, args)
    train_seg.poly_lr(optimizer, args.lr, 0, 1)
    real_step(model, optimizer, *batches[0], args)
    assert_same_weights(weights(tmp_path / "run"), model.state_dict())


def test_schedules_are_the_reference_codes_over_a_whole_run():
    # The authors' LR_Scheduler: lr·(1 − T/N)^0.9, T = epoch·iters_per_epoch + i, N = epochs·len(loader) with
    # drop_last, the head's groups at 10×. 37 images, batch 4, 3 epochs: 9 iterations an epoch, 27 in all.
    plan = run_plumbing.schedule(37, 4, 3)
    assert (plan.iters_per_epoch, plan.total_iters) == (9, 27)
    sampler = data.ShardedBatchSampler(37, 4)
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 9 and all(len(b) == 4 for b in batches) and len(set(sum(batches, []))) == 36
        seen.append(batches)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr_mult": 1.0}, {"params": [model.bias], "lr_mult": 10.0}],
                                lr=0.01)
    horizon = train_seg.lr_horizon(plan.total_iters, "iters")
    for epoch in range(3):
        for i in range(9):
            lr = train_seg.poly_lr(optimizer, 0.01, epoch * 9 + i, horizon)
            expected = 0.01 * (1 - (epoch * 9 + i) / 27) ** 0.9
            assert abs(lr - expected) < 1e-15 and abs(optimizer.param_groups[1]["lr"] - 10 * expected) < 1e-14
    # mmcv 1.x's PolyLrUpdaterHook (mmsegmentation 0.x, which trained the zoo's files): (base − min)·(1 − t/max)^0.9
    # + min, over max_iters. mmengine's PolyLR (mmsegmentation 1.x): applied step by step, its horizon is
    # end − begin − 1, so that the last iteration trains at exactly eta_min.
    total, base, eta = 50, 0.01, 1e-4
    mmcv = [(base - eta) * (1 - t / total) ** 0.9 + eta for t in range(total)]
    assert [train_seg.poly_lr(optimizer, base, t, train_seg.lr_horizon(total, "iters"), eta)
            for t in range(total)] == pytest.approx(mmcv, rel=1e-13)
    mmengine, lr = [], base
    horizon_1x = total - 0 - 1
    for t in range(total):  # mmengine PolyParamScheduler._get_value, stepped after every iteration
        if t > 0:
            lr = (lr - eta) * (1 - 1 / (horizon_1x - (t - 1))) ** 0.9 + eta
        mmengine.append(lr)
    ours = [train_seg.poly_lr(optimizer, base, t, train_seg.lr_horizon(total, "iters-1"), eta) for t in range(total)]
    assert ours == pytest.approx(mmengine, rel=1e-12) and ours[-1] == eta


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
    """Tiny fixtures in the layouts of the published models' datasets."""
    root = tmp_path_factory.mktemp("recipe_data")
    make_ade(root / "ade", n=4)
    for split, ids in (("train", ["a", "b", "c", "d"]), ("val", ["e", "f"])):
        make_voc(root / "pcontext", "VOC2010", "SegmentationClassContext", "SegmentationContext", split, ids,
                 (0, 1, 30, 59), False)
    make_cityscapes(root / "cityscapes")
    return {"ade20k": root / "ade", "pcontext": root / "pcontext", "cityscapes": root / "cityscapes"}


def interrupt_at(monkeypatch, iteration):
    """Ctrl-C (SIGINT to this process) when the loop begins `iteration`: the schedule, called once per
    iteration, is wrapped."""
    real = train_seg.poly_lr

    def poly_lr(optimizer, base_lr, it, *rest):
        if it == iteration:
            os.kill(os.getpid(), signal.SIGINT)
        return real(optimizer, base_lr, it, *rest)
    monkeypatch.setattr(train_seg, "poly_lr", poly_lr)


@pytest.mark.parametrize("recipe", sorted(recipes.RECIPES))
def test_each_published_recipe_trains_evaluates_and_resumes(recipe, recipe_data, tmp_path, monkeypatch, capsys):
    # --recipe NAME end to end on a fixture of its dataset, at tiny widths and sizes: the recipe's settings reach
    # the checkpoint, its lr is the reference schedule, eval.py evaluates it with the zoo's protocol, and a run
    # stopped by Ctrl-C and continued with a bare --resume ends with the uninterrupted weights
    settings = recipes.RECIPES[recipe]
    dataset = settings["data"]
    sizes = (["--crop-size", "8x16", "--scale-box", "68x8"] if dataset == "cityscapes"
             else ["--crop-size", 32, "--base-size", 40])
    argv = ["--recipe", recipe, "--data-root", recipe_data[dataset], *sizes, "--width", 8, "--head-width", 16,
            "--batch-size", 4, "--pretrained", "none", "--workers", 0, "--max-iters", 2, "--save-every", 1,
            "--log-every", 0]
    monkeypatch.setitem(protocols.MMSEG_TEST_BOX, dataset, (64, 32))  # tiny test scale for a tiny model
    train_seg.main([str(a) for a in argv + ["--out", tmp_path / "straight"]])
    checkpoint = zoo.read_checkpoint(tmp_path / "straight" / "checkpoint.pth")
    saved = checkpoint["args"]
    for key in ("backbone", "aux", "aux_weight", "residual_gate", "align_corners", "dropout2d", "lateral",
                "stage3_encoding", "loss_mean", "loss_group", "weight_decay", "head_lr_mult", "min_lr", "lr",
                "poly_horizon", "random_scale", "blur", "photometric", "cat_max_ratio", "pad", "protocol"):
        assert saved[key] == settings[key], key
    events = EventAccumulator(str(tmp_path / "straight")).Reload()
    lr, end = settings["lr"], settings["min_lr"]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(
        [(lr - end) * (1 - t / 2) ** 0.9 + end for t in range(2)], rel=1e-6)  # float32 in the event file

    interrupt_at(monkeypatch, 0)  # Ctrl-C during the first iteration: the run stops after it, at iteration 1
    with pytest.raises(SystemExit) as stopped:  # (the final evaluation's protocol may differ: it does not train)
        train_seg.main([str(a) for a in argv + ["--protocol", "repo", "--out", tmp_path / "stopped"]])
    assert stopped.value.code == 128 + signal.SIGINT
    assert zoo.read_checkpoint(tmp_path / "stopped" / "checkpoint.pth")["iter"] == 1
    monkeypatch.undo()
    train_seg.main(["--resume", "--out", str(tmp_path / "stopped")])  # everything else from the checkpoint
    assert_same_weights(checkpoint["model"], weights(tmp_path / "stopped"))

    protocol = settings["protocol"]
    monkeypatch.setitem(protocols.MMSEG_TEST_BOX, dataset, (64, 32))
    seg_eval.main(["--checkpoint", str(tmp_path / "straight" / "checkpoint.pth"), "--protocol", protocol,
                   "--out", str(tmp_path / "eval")])
    results = json.loads((tmp_path / "eval" / f"results_{dataset}_val_{protocol}.json").read_text())
    assert 0 <= results["mIoU"] <= 1 and f"({protocol} protocol)" in capsys.readouterr().out


def initial_weights(out_dir):
    """The weights the train_seg.py run in out_dir started from: its model, seeded with its --seed."""
    args = zoo.read_checkpoint(os.path.join(out_dir, "checkpoint.pth"))["args"]
    torch.manual_seed(args["seed"])
    return encnet.model_from_args(args).state_dict()


@pytest.mark.slow
def test_train_seg_end_to_end_single_process(tmp_path):
    out = tmp_path / "run"
    result = run("train_seg.py", *TINY, "--max-iters", 3, "--out", out)
    assert "final: pixAcc" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"pixAcc", "mIoU"} and 0 <= results["mIoU"] <= results["pixAcc"] <= 1
    checkpoint = zoo.read_checkpoint(out / "checkpoint.pth")
    assert {"model", "optimizer", "iter", "epoch", "args"} <= checkpoint.keys()
    assert checkpoint["iter"] == 3 and checkpoint["args"]["model"] == "encnet"
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in checkpoint["args"].values())
    table = (out / "per_class_iou.txt").read_text()
    assert table.count("\n") == len(context_data.CONTEXT_CLASSES) + 4
    assert "protocol repo, 3 iterations" in table.splitlines()[0]

    events = EventAccumulator(str(out)).Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"train/loss", "train/seg", "train/se", "train/lr", "train/images_per_s", "val/pixAcc", "val/mIoU"} <= scalars
    assert len(events.Scalars("train/loss")) == 3 and images


# Runs that several tests compare against, each trained once per session. STRAIGHT: long enough for a stop
# request to land mid-run (the loop reads it at its sync every 10 iterations); `two`: the multi-process runs'.
STRAIGHT = [*TINY, "--max-iters", 30]


def make_uneven_ade(root, n=8):
    """ADE20K layout whose images differ in how many pixels are labelled (half of them mostly 'other',
    ignored), so that processes of a distributed run hold very different counts of labelled pixels."""
    for split in ("training", "validation"):
        for i in range(n):
            values = (1, 75, 150) if i % 2 else (0, 0, 0, 0, 0, 0, 0, 1)
            write_jpeg(root / "ADEChallengeData2016" / "images" / split / f"ADE_{i}.jpg", 40, 30, i)
            write_png(root / "ADEChallengeData2016" / "annotations" / split / f"ADE_{i}.png", blocks(40, 30, values))
    return root


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The arguments of the multi-process runs: 4 iterations of batch 4 on make_uneven_ade's data, dropout on (the
    recipe's 0.1, before both classifiers): its masks are drawn per sample, so the world size changes none."""
    root = make_uneven_ade(tmp_path_factory.mktemp("uneven_ade"))
    return ["--data", "ade20k", "--data-root", root, "--backbone", "resnet18", "--pretrained", "none",
            "--crop-size", 32, "--base-size", 40, "--workers", 0, *TINY, "--max-iters", 4, "--aux"]


@pytest.fixture(scope="module")
def straight_weights(tmp_path_factory):
    """Weights of an uninterrupted single-process STRAIGHT run: every interrupted and resumed run ends here."""
    out = tmp_path_factory.mktemp("straight")
    run("train_seg.py", *STRAIGHT, "--out", out)
    return weights(out)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, two):
    """Output folder of `two` under torchrun with 2 processes × 2 images."""
    out = tmp_path_factory.mktemp("two") / "run"
    run("train_seg.py", *two, "--out", out, nproc=2)
    return out


@pytest.mark.slow
def test_two_processes_compute_the_single_process_steps(tmp_path, two, two_process_run):
    # 2 processes × 2 images = 1 process × 4 images: SyncBatchNorm, sharded batches, global pixel count
    run("train_seg.py", *two, "--out", tmp_path / "one")
    assert_same_update(weights(tmp_path / "one"), weights(two_process_run), initial_weights(two_process_run))
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two_results = json.loads((two_process_run / "results.json").read_text())
    assert abs(one["mIoU"] - two_results["mIoU"]) < 1e-3  # evaluation sharded over both processes, then reduced


@pytest.mark.slow
def test_two_torchrun_agents_on_loopback(tmp_path, two, two_process_run):
    # multi-node: two torchrun agents (one process each) meeting through the c10d rendezvous compute what
    # one agent with two processes computes
    port = free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "encnet-test",
                                "--rdzv-endpoint", f"127.0.0.1:{port}", "train_seg.py", *map(str, two),
                                "--out", str(tmp_path / "nodes")],
                               cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    logs = [a.communicate(timeout=300)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), logs
    assert_same_update(weights(two_process_run), weights(tmp_path / "nodes"), initial_weights(two_process_run))


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_weights(tmp_path, straight_weights):
    args = [*STRAIGHT, "--save-every", 2]
    # killed (SIGKILL) in the middle of an epoch, after the checkpoint of iteration 2
    killed = run(killed_at(tmp_path, "train_seg.py", 3), *args, "--out", tmp_path / "killed", check=False)
    assert killed.returncode == -9
    assert zoo.read_checkpoint(tmp_path / "killed" / "checkpoint.pth")["iter"] == 2
    run("train_seg.py", *args, "--out", tmp_path / "killed", "--resume")
    assert_same_weights(straight_weights, weights(tmp_path / "killed"))


@pytest.mark.slow
def test_kill_at_a_random_moment_leaves_a_loadable_checkpoint_and_resume_gets_the_weights(tmp_path,
                                                                                           straight_weights):
    args = [*STRAIGHT, "--save-every", 1]
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "train_seg.py", *map(str, args), "--out", str(out)], cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    # the progress line of a random iteration, printed just before its checkpoint is written: the kill lands
    # before, during or after torch.save. From iteration 2 on, so that a checkpoint exists either way.
    at = int(np.random.default_rng().integers(2, 8))
    wait_for_line(process, rf"iter {at}/30")
    process.kill()
    process.wait()
    saved = zoo.read_checkpoint(out / "checkpoint.pth")["iter"]  # complete, whatever the moment
    assert at - 1 <= saved <= at + 1, (at, saved)  # +1: this process read the line late
    run("train_seg.py", *args, "--out", out, "--resume")
    assert_same_weights(straight_weights, weights(out))


def wait_for_line(process, pattern, timeout=120):
    """Read the process's stdout until a line matches `pattern` (the event a test waits for, not a sleep)."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.time() + timeout
    while time.time() < deadline and selector.select(timeout=deadline - time.time()):
        line = process.stdout.readline()
        if not line:
            break
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r}")


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_current_iteration_and_resume_finishes_the_run(tmp_path, straight_weights):
    # as in a terminal: SIGINT to the whole process group, the loader's workers included
    args = [*STRAIGHT, "--workers", 2]
    out = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, "train_seg.py", *map(str, args), "--out", str(out)], cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_line(process, r"iter 10/30")  # training under way, and no checkpoint exists yet
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    found = re_search(r"stopped by SIGINT at iteration (\d+); checkpoint saved to \S+checkpoint.pth\. "
                      r"Continue with: python train_seg.py .*--resume", stderr)
    stopped_at = int(found.group(1))
    assert 10 <= stopped_at < 30
    assert zoo.read_checkpoint(out / "checkpoint.pth")["iter"] == stopped_at
    run("train_seg.py", *args, "--out", out, "--resume")
    assert_same_weights(straight_weights, weights(out))


@pytest.mark.slow
def test_sigterm_to_the_whole_job_stops_both_ranks_at_one_iteration(tmp_path):
    # what a scheduler does (scancel, preemption): SIGTERM to every process of the job, torchrun, both
    # ranks and their loader workers. The ranks agree on the iteration through their next sync, checkpoint
    # it together and exit; --resume ends where the uninterrupted 2-process run ends
    args = [*TINY, "--max-iters", 30, "--dropout", 0, "--workers", 1]
    run("train_seg.py", *args, "--out", tmp_path / "straight", nproc=2)
    out = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                "--master_port", str(free_port()), "train_seg.py", *map(str, args),
                                "--out", str(out)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_line(process, r"iter 10/30")
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "DataLoader worker" not in stderr, stderr[-3000:]
    stopped_at = int(re_search(r"stopped by SIGTERM at iteration (\d+); checkpoint saved", stderr).group(1))
    assert zoo.read_checkpoint(out / "checkpoint.pth")["iter"] == stopped_at < 30
    run("train_seg.py", *args, "--out", out, "--resume", nproc=2)
    assert_same_update(weights(tmp_path / "straight"), weights(out), initial_weights(out))


@pytest.mark.slow
def test_elastic_restart_resumes_by_itself(tmp_path, two, two_process_run):
    args = [*two, "--save-every", 2]
    # rank 0 SIGKILLs itself at iteration 3 on the first attempt; torchrun restarts both workers,
    # which find the checkpoint of iteration 2 and continue without --resume
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--max-restarts", "1", "--master_port", str(free_port()),
                             str(killed_at(tmp_path, "train_seg.py", 3)), *map(str, args), "--out",
                             str(tmp_path / "elastic")],
                            cwd=HERE, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from 2" in result.stdout  # the restarted job began at the checkpoint, not at 0
    assert_same_weights(weights(two_process_run), weights(tmp_path / "elastic"))


@pytest.mark.parametrize("flags,env,message", [
    (["--out", "{tmp}/file.txt/sub"], {}, "--out .* is not writable"),
    (["--data", "ade20k"], {}, "--data ade20k needs --data-root"),
    (["--data", "ade20k", "--data-root", "{tmp}/nowhere"], {}, "--data-root .*nowhere does not exist"),
    (["--data", "ade20k", "--data-root", "{tmp}"], {}, "ade20k: .*ADEChallengeData2016"),
    (["--resume", "--out", "{tmp}/empty"], {}, "--resume: no checkpoint at"),
    (["--batch-size", "5"], {"WORLD_SIZE": "2"}, "--batch-size 5 is not divisible by the 2 processes"),
    (["--crop-size", "400"], {}, rf"--crop-size 400 --base-size {context_data.CONTEXT_WIDTH}: the built-in images "
                                 rf"\({context_data.CONTEXT_HEIGHT}×{context_data.CONTEXT_WIDTH}\) are used whole"),
    (["--resume", "--init", "x.pth", "--out", "{tmp}"], {}, "--resume and --init contradict"),
    (["--epochs", "0"], {}, "--epochs 0: must be positive"),
    (["--max-iters", "0"], {}, "--max-iters 0: must be positive"),
    (["--num-codes", "-3"], {}, "--num-codes -3: must be 0 .global average pooling. or more"),
    (["--dropout", "1.5"], {}, r"--dropout 1.5: a probability in \[0, 1\)"),
    (["--loss-group", "3"], {}, "--loss-group 3: must divide --batch-size 16"),
    (["--workers", "-1"], {}, "--workers -1: must be 0"),
    (["--recipe", "encnet_resnet50s_ade", "--data", "pcontext", "--data-root", "{tmp}"], {},
     "--recipe encnet_resnet50s_ade trains on ade20k, not --data pcontext"),
    (["--random-scale", "box", "--data", "ade20k", "--data-root", "{tmp}"], {}, "--random-scale box needs --scale-box"),
    (["--recompute-stages", "3,5"], {}, "--recompute-stages 3,5: backbone stages among 1, 2, 3, 4"),
])
def test_bad_flags_get_one_clear_message(tmp_path, flags, env, message, monkeypatch, capsys):
    # in this process (main(argv), as the command line calls it): every case stops before any work
    (tmp_path / "file.txt").write_text("")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    if "--out" not in flags:
        flags += ["--out", str(tmp_path / "out")]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    stderr = train_seg_failure(flags, monkeypatch, capsys)
    assert re.search(message, stderr) and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.slow
def test_help_shows_defaults_and_the_per_dataset_recipe():
    result = run("train_seg.py", "--help")
    assert "(default: 0.9)" in result.stdout and "(default: runs/seg)" in result.stdout
    ade20k = re_search(r"\n +--data ade20k +(\S+) +(\S+) +\S+ +(\S+)", result.stdout)
    assert ade20k.groups() == ("0.01", "120", "16")  # lr, epochs, batch (paper, Sec. 3.1)


def test_default_loader_workers_are_capped_at_the_cores(tmp_path):
    args = train_seg.get_args(["--data", "ade20k", "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert 1 <= args.workers <= min(8, run_plumbing.available_cores())
    assert train_seg.get_args(["--data", "ade20k", "--data-root", str(tmp_path), "--workers", "5",
                               "--out", str(tmp_path / "run")]).workers == 5


@pytest.mark.slow
def test_resume_with_other_hyperparameters_names_them(fcn_run, monkeypatch, capsys):
    stderr = train_seg_failure([*TINY, "--max-iters", 1, "--model", "fcn", "--lr", 0.5, "--resume", "--out", fcn_run],
                               monkeypatch, capsys)
    assert "--lr 0.02 in the checkpoint, 0.5 now" in stderr


@pytest.mark.slow
def test_divergence_stops_with_the_iteration_and_loss_terms(tmp_path):
    out = tmp_path / "run"
    result = run("train_seg.py", *TINY, "--max-iters", 6, "--save-every", 1, "--lr", 1e12, "--out", out,
                 check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    found = re.search(r"non-finite (loss|gradient) at iteration (\d+)", result.stderr)
    assert found, result.stderr
    failed_at = int(found.group(2))
    if found.group(1) == "loss":
        assert "seg" in result.stderr and "se" in result.stderr
    # the last checkpoint is the one before the failing iteration, untouched and loadable
    saved = zoo.read_checkpoint(out / "checkpoint.pth") if failed_at > 0 else None
    assert saved is None or saved["iter"] == failed_at


@pytest.mark.slow
def test_amp_runs_every_step(tmp_path):
    result = run("train_seg.py", *TINY, "--max-iters", 2, "--amp", "--channels-last", "--out", tmp_path / "amp")
    # a CPU without native bf16 emulates it, many times slower: the run says so when it starts
    assert ("without native bf16" in result.stderr) == (not run_plumbing.cpu_has_fast_bf16())
    checkpoint = zoo.read_checkpoint(tmp_path / "amp" / "checkpoint.pth")
    assert checkpoint["iter"] == 2 and checkpoint["optimizer"]["state"]  # no skipped step


def ade_fixture_args(tmp_path):
    """An ADE20K fixture in its real layout and the flags of a two-iteration run on it."""
    make_ade(tmp_path / "data", n=4)
    return tmp_path / "data" / "ADEChallengeData2016", [
        "--data", "ade20k", "--data-root", tmp_path / "data", "--backbone", "resnet18", *TINY, "--batch-size", 2,
        "--crop-size", 32, "--base-size", 40, "--max-iters", 2]


def assert_one_line_error(result, *names):
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Caught" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(name in result.stderr for name in names), result.stderr


@pytest.mark.slow
def test_offline_node_gets_one_line_naming_the_weights_and_creates_nothing(tmp_path):
    # a node without internet: torchvision's ImageNet weights (the default) cannot be fetched
    _, common = ade_fixture_args(tmp_path)
    offline = tmp_path / "offline_train_seg.py"
    offline.write_text(f"""import sys, urllib.error, torch
sys.path.insert(0, {str(HERE)!r})
def no_network(url, dst, *args, **kwargs):
    raise urllib.error.URLError("[Errno -2] Name or service not known")
torch.hub.download_url_to_file = no_network
import train_seg
import zoo
train_seg.main()
""")
    result = run(offline, *common, "--workers", 0, "--out", tmp_path / "out", env={"TORCH_HOME": str(tmp_path / "hub")},
                 check=False)
    assert_one_line_error(result, "resnet18-f37072fd.pth", str(tmp_path / "hub"), "--pretrained none",
                          "--pretrained PATH")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_validation_label_is_found_before_the_first_iteration(tmp_path):
    ade, common = ade_fixture_args(tmp_path)
    write_png(ade / "annotations" / "validation" / "ADE_2.png", blocks(40, 30, (0, 1, 151)))
    result = run("train_seg.py", *common, "--pretrained", "none", "--workers", 0, "--out", tmp_path / "val", check=False)
    assert_one_line_error(result, "ADE_2.png", "151")
    assert "iter" not in result.stdout and not (tmp_path / "val" / "checkpoint.pth").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_training_label_read_in_a_loader_worker_is_one_line(tmp_path, workers):
    ade, common = ade_fixture_args(tmp_path)
    (ade / "annotations" / "training" / "ADE_1.png").write_bytes(b"not a png")
    result = run("train_seg.py", *common, "--pretrained", "none", "--workers", workers, "--no-check-train",
                 "--out", tmp_path / "run", check=False)
    assert_one_line_error(result, "ADE_1.png", "cannot read")


@pytest.mark.slow
def test_empty_validation_split_is_an_error(tmp_path):
    # not "mIoU 0.0000" and exit status 0
    ade, common = ade_fixture_args(tmp_path)
    for path in (ade / "images" / "validation").iterdir():
        path.unlink()
    result = run("train_seg.py", *common, "--pretrained", "none", "--workers", 0, "--out", tmp_path / "empty",
                 check=False)
    assert_one_line_error(result, "validation")


@pytest.mark.slow
def test_cityscapes_recipe_trains_and_writes_official_label_ids(tmp_path):
    # mmsegmentation's recipe (aux head 0.4, residual gate, Dropout2d, no stage-3 module, photometric
    # distortion, cat_max_ratio, poly to 1e-4) on a Cityscapes fixture in the download's layout, at tiny sizes
    make_cityscapes(tmp_path / "cityscapes")
    run("train_seg.py", "--data", "cityscapes", "--data-root", tmp_path / "cityscapes", "--pretrained", "none",
        "--backbone", "resnet18", *TINY, "--batch-size", 2, "--crop-size", "8x16", "--base-size", 34,
        "--workers", 0, "--max-iters", 2, "--out", tmp_path / "run")
    checkpoint = zoo.read_checkpoint(tmp_path / "run" / "checkpoint.pth")
    saved = checkpoint["args"]
    assert saved["crop_size"] == [8, 16] and saved["max_iters"] == 2 and saved["epochs"] is None
    assert (saved["aux"], saved["aux_weight"], saved["residual_gate"], saved["stage3_encoding"], saved["dropout2d"]) \
        == (True, 0.4, True, False, True)
    assert (saved["photometric"], saved["cat_max_ratio"], saved["max_rotation"], saved["min_lr"], saved["weight_decay"]) \
        == (True, 0.75, 0.0, 1e-4, 5e-4)
    assert "aux_head.2.weight" in checkpoint["model"] and not any(k.startswith("stage3") for k in checkpoint["model"])
    assert json.loads((tmp_path / "run" / "results.json").read_text()).keys() == {"pixAcc", "mIoU"}

    photo = next((tmp_path / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))
    run("eval.py", "--checkpoint", tmp_path / "run" / "checkpoint.pth", "--images", photo, "--label-png",
        "--out", tmp_path / "submission")
    ids = np.asarray(Image.open(next((tmp_path / "submission").glob("*.png"))))
    assert ids.shape == (4, 34) and set(np.unique(ids)) <= set(data.CITYSCAPES_LABEL_IDS)  # ids, not train ids


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    fake_zoo(monkeypatch, dataset="context", num_classes=len(context_data.CONTEXT_CLASSES), crop=context_data.CONTEXT_WIDTH,
             base=context_data.CONTEXT_WIDTH)
    for argv, message in ((["--checkpoint", "zoo", "--multi-scale"], "multi-scale does not apply to the built-in "
                                                                         "context data"),
                          (["--checkpoint", "zoo", "--protocol", "released"], "never learnt"),
                          (["--checkpoint", "zoo", "--protocol", "mmseg"], "no EncNet test setting for 'context'"),
                          (["--checkpoint", "broken"], "download failed"),
                          (["--checkpoint", "missing.pth"], "not a zoo name"),
                          (["--checkpoint", "zoo", "--images", tmp_path / "nothing"], "no such file or folder")):
        assert main_exit([*argv, "--out", tmp_path]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_forgotten_resume_is_refused_and_the_run_kept(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"the run of yesterday")
    (out / "events.out.tfevents.1.host").write_bytes(b"its logs")
    stderr = train_seg_failure(["--out", out], monkeypatch, capsys)
    assert "already holds a run (checkpoint.pth, events.out.tfevents.1.host); nothing was changed" in stderr
    assert "--resume" in stderr and "another --out" in stderr
    assert (out / "checkpoint.pth").read_bytes() == b"the run of yesterday" and len(list(out.iterdir())) == 2


@pytest.mark.slow
def test_resume_takes_the_settings_from_the_checkpoint_and_may_extend_the_run(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    make_ade(tmp_path / "data", n=2)
    train_seg.main([*map(str, TINY), "--data", "ade20k", "--data-root", str(tmp_path / "data"), "--pretrained", "none",
                    "--crop-size", "32", "--base-size", "40", "--workers", "0", "--batch-size", "2",
                    "--max-iters", "2", "--lr", "0.05", "--out", out])
    capsys.readouterr()
    train_seg.main(["--resume", "--max-iters", "3", "--out", out])  # --lr, --width, … from the checkpoint
    captured = capsys.readouterr()
    assert "--max-iters 2 → 3: the run is extended" in captured.err and "3 iterations from 2" in captured.out
    checkpoint = zoo.read_checkpoint(Path(out) / "checkpoint.pth")
    assert checkpoint["iter"] == 3 and checkpoint["args"]["lr"] == 0.05 and checkpoint["args"]["width"] == 8
    stderr = train_seg_failure(["--resume", "--lr", "0.1", "--out", out], monkeypatch, capsys)
    assert "belongs to a different run" in stderr and "--lr 0.05 in the checkpoint, 0.1 now" in stderr


def test_a_bug_keeps_its_traceback_while_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    # an internal ValueError (here: injected into the loss) is a bug: it propagates with its traceback
    def broken_loss(*args, **kwargs):
        raise ValueError("shape mismatch deep inside")
    monkeypatch.setattr(encnet, "seg_loss", broken_loss)
    with pytest.raises(ValueError, match="shape mismatch deep inside") as error:
        train_seg.main([*map(str, TINY), "--max-iters", "1", "--out", str(tmp_path / "bug")])
    assert "broken_loss" in "".join(traceback.format_tb(error.tb)) and "train_step" in "".join(traceback.format_tb(error.tb))
    # a bad label file is the user's to fix: one line, exit status 1
    make_ade(tmp_path / "data", n=2)
    write_png(tmp_path / "data" / "ADEChallengeData2016" / "annotations" / "training" / "ADE_1.png",
              blocks(40, 30, (200,)))
    stderr = train_seg_failure(["--data", "ade20k", "--data-root", tmp_path / "data", "--out", tmp_path / "bad"],
                               monkeypatch, capsys)
    assert "ADE_1.png: label value 200" in stderr and len(stderr.strip().splitlines()) == 1


# how a run began, what it trains with, and what its evaluation reports

ADE_RUN = [*map(str, TINY), "--data", "ade20k", "--crop-size", "32", "--base-size", "40", "--workers", "0",
           "--batch-size", "2"]


def test_resume_and_init_keep_the_record_of_how_the_weights_began(tmp_path, monkeypatch, capsys):
    # issue 33 item 4: a run from scratch, resumed bare, stays a run from scratch (the recipe's 'imagenet' does
    # not refill the checkpoint's None), and the start line says what happened; --init runs say the file
    make_ade(tmp_path / "data", n=2)
    out = tmp_path / "scratch"
    train_seg.main([*ADE_RUN, "--data-root", str(tmp_path / "data"), "--pretrained", "none", "--max-iters", "1",
                    "--out", str(out)])
    assert "\nweights: from scratch (no pretrained weights)\n" in capsys.readouterr().out
    began = zoo.read_checkpoint(out / "checkpoint.pth")["args"]
    assert began["pretrained"] is None and began["began_from"] == "scratch (no pretrained weights)"

    train_seg.main(["--resume", "--out", str(out)])  # bare: everything from the checkpoint
    printed = capsys.readouterr().out
    assert "weights: resumed from iteration 1 of a run that began from scratch (no pretrained weights)" in printed
    assert "pretrained none" in printed and "imagenet" not in printed
    train_seg.main(["--resume", "--max-iters", "2", "--out", str(out)])  # one more iteration: a new checkpoint
    assert "weights: resumed from iteration 1 of a run that began from scratch" in capsys.readouterr().out
    saved = zoo.read_checkpoint(out / "checkpoint.pth")
    assert saved["iter"] == 2 and saved["args"]["pretrained"] is None
    assert saved["args"]["began_from"] == began["began_from"]
    # how a run began is part of what it is: a resume may not rewrite it
    stderr = train_seg_failure(["--resume", "--pretrained", "imagenet", "--out", out], monkeypatch, capsys)
    assert "--pretrained None in the checkpoint, 'imagenet' now" in stderr

    source = out / "checkpoint.pth"
    train_seg.main([*ADE_RUN, "--data-root", str(tmp_path / "data"), "--max-iters", "1", "--init", str(source),
                    "--out", str(tmp_path / "tuned")])
    printed = capsys.readouterr().out
    origin = f"{source} (--init: a train_seg.py checkpoint, encnet resnet50 on ade20k)"
    assert f"\nweights: initialised from {origin}\n" in printed, printed
    assert "pretrained none (--init)" in printed and "imagenet" not in printed
    tuned = zoo.read_checkpoint(tmp_path / "tuned" / "checkpoint.pth")["args"]
    assert tuned["pretrained"] is None and tuned["began_from"] == origin and tuned["init"] == str(source)
    stderr = train_seg_failure([*ADE_RUN, "--data-root", tmp_path / "data", "--init", source, "--pretrained",
                                "imagenet", "--out", tmp_path / "both"], monkeypatch, capsys)
    assert "--init and --pretrained contradict each other" in stderr


@pytest.fixture(scope="module")
def pcontext_recipe_run(tmp_path_factory):
    """A published model's recipe (the authors' PASCAL-Context one: protocol 'released') with the backbone and
    sizes overridden by flags, trained for 2 iterations (one an epoch, --val-every 1) on a PASCAL-Context fixture
    → (output folder, data root, what it printed)."""
    root = tmp_path_factory.mktemp("pcontext")
    for split, ids in (("train", ["a", "b", "c", "d"]), ("val", ["e"])):
        make_voc(root, "VOC2010", "SegmentationClassContext", "SegmentationContext", split, ids, (0, 1, 30, 59), False)
    out = root / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_seg.main([*map(str, TINY), "--recipe", "encnet_resnet50s_pcontext", "--data-root", str(root),
                        "--backbone", "resnet18", "--crop-size", "32", "--base-size", "40", "--pretrained", "none",
                        "--workers", "0", "--batch-size", "4", "--max-iters", "2", "--val-every", "1",
                        "--out", str(out)])
    return out, root, printed.getvalue()


def test_start_line_shows_every_recipe_key_and_marks_flags_and_tensorboard_keeps_them(pcontext_recipe_run):
    # issue 33 item 10: every key of the recipe in the start line, '(flag)' where a flag overrode it; the bf16
    # question answered; the settings in TensorBoard's text tab; quick validation in % as everything else
    out, _, printed = pcontext_recipe_run
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if " process(es) on " in line)
    assert lines[start].endswith(", float32")
    assert lines[start + 1] == "weights: from scratch (no pretrained weights)"
    recipe_text = " ".join(line.strip() for line in lines[start + 2:start + 14]).split(" other settings:")[0]
    assert recipe_text.startswith("recipe (--recipe encnet_resnet50s_pcontext; '(flag)': set on the command line): ")
    for key, value in recipes.RECIPES["encnet_resnet50s_pcontext"].items():
        if key not in ("data", "backbone", "crop_size", "base_size", "pretrained", "width", "head_width",
                       "batch_size", "workers", "max_iters", "epochs"):
            assert f"{key.replace('_', '-')} {train_seg.shown(value)}," in recipe_text + ",", key
    for flagged in ("backbone resnet18 (flag)", "crop-size 32 (flag)", "base-size 40 (flag)", "pretrained none (flag)",
                    "max-iters 2 (flag)", "epochs 80 (unused: --max-iters sets the length)", "blur on,",
                    "residual-gate on,", "dropout2d on,", "stage3-encoding off,", "align-corners on,", "lateral on,",
                    "protocol released,", "lr 0.001,"):
        assert flagged in recipe_text + ",", flagged
    re_search(r"other settings: model encnet, num-codes 32, se-loss on, se-weight 0\.2, dropout 0\.1", printed)
    re_search(r"epoch 1 \| quick val pixAcc \d+\.\d\d % mIoU \d+\.\d\d %", printed)

    events = EventAccumulator(str(out), size_guidance={"tensors": 0}).Reload()
    text = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| backbone | resnet18 | flag |" in text and "| blur | on | recipe |" in text
    assert "| se-weight | 0.2 | default |" in text and "| weights began from | scratch (no pretrained weights) |" in text
    assert "recipe (--recipe encnet_resnet50s_pcontext" in text


def test_bf16_is_named_where_amp_asks_for_it(monkeypatch):
    args = Namespace(amp=True)
    monkeypatch.setattr(run_plumbing, "cpu_has_fast_bf16", lambda: False)
    assert train_seg.precision(args, torch.device("cpu")) == "bf16 autocast (--amp), emulated on this CPU: slow"
    assert train_seg.precision(args, torch.device("cuda")) == "bf16 autocast (--amp)"
    assert train_seg.precision(Namespace(amp=False), torch.device("cuda")) == "float32"


def test_final_pcontext_evaluation_gives_the_60_class_figure(pcontext_recipe_run):
    # issue 33 item 9: train_seg.py's final PASCAL-Context evaluation prints and saves mIoU·59/60, as eval.py does
    out, _, printed = pcontext_recipe_run
    results = json.loads((out / "results.json").read_text())
    assert results["mIoU60"] == pytest.approx(results["mIoU"] * 59 / 60, abs=1e-12)
    assert f"mIoU with background as a 60th class (59/60 · mIoU): {100 * results['mIoU60']:.2f} %" in printed
    assert "protocol released" in printed.split("final: ")[1]


def test_eval_defaults_to_the_checkpoints_protocol_and_says_why(pcontext_recipe_run, tmp_path, monkeypatch, capsys):
    # issue 33 item 9: a --recipe checkpoint is evaluated with its recipe's protocol unless told otherwise
    out, root, _ = pcontext_recipe_run
    seg_eval.main(["--checkpoint", str(out / "checkpoint.pth"), "--data-root", str(root), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "protocol released (the checkpoint's recipe, encnet_resnet50s_pcontext), float32\n" in printed
    assert (tmp_path / "results_pcontext_val_released.json").is_file()
    assert "pcontext val multi-scale (released protocol)" in printed
    # told otherwise, and --amp where bf16 is not native: both said
    monkeypatch.setattr(seg_eval, "cpu_has_fast_bf16", lambda: False)
    seg_eval.main(["--checkpoint", str(out / "checkpoint.pth"), "--data-root", str(root), "--protocol", "repo",
                   "--amp", "--out", str(tmp_path)])
    assert "protocol repo (--protocol), float32 (--amp: no native bf16 here)\n" in capsys.readouterr().out

    # --images with a train_seg checkpoint whose run evaluated with 'released': the same default
    path = tmp_path / "tiny.pth"
    tiny_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"].update(data="ade20k", protocol="released", recipe="encnet_resnet50s_ade")
    torch.save(checkpoint, path)
    write_jpeg(tmp_path / "photo.jpg", 40, 30)
    protocols_used = []
    real = seg_eval.protocols.segment

    def segment(*args, protocol=None, **kwargs):
        protocols_used.append(protocol)
        return real(*args, protocol=protocol, **kwargs)
    monkeypatch.setattr(seg_eval.protocols, "segment", segment)
    seg_eval.main(["--checkpoint", str(path), "--images", str(tmp_path / "photo.jpg"), "--out", str(tmp_path / "p")])
    assert "protocol released (the checkpoint's recipe, encnet_resnet50s_ade), float32" in capsys.readouterr().out
    assert protocols_used == ["released"]


# ============================================================================= 17. train_cifar.py: the CIFAR-10 experiment


def write_learnable_cifar(root, per_batch=64, test=100):
    """A CIFAR-10 fixture in the pickle layout whose classes are learnable in an epoch: each class
    has its own colour, under noise."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (10, 3))
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        labels = rng.integers(0, 10, n)
        images = colours[labels][:, :, None, None] + rng.normal(0, 40, (n, 3, 32, 32))
        batch = {b"data": np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), b"labels": labels.tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    return root


@pytest.mark.slow
def test_train_cifar_learns_and_resumes(tmp_path):
    root = write_learnable_cifar(tmp_path / "data", per_batch=16, test=50)
    # 2 epochs of 5 iterations; killed in the second epoch, after the checkpoint of its first iteration (6)
    args = ["--model", "encnet16k64d", "--data-root", root, "--epochs", 2, "--batch-size", 16, "--lr", 0.05,
            "--workers", 0, "--log-every", 0, "--save-every", 3]
    result = run("train_cifar.py", *args, "--out", tmp_path / "straight")
    top1 = json.loads((tmp_path / "straight" / "results.json").read_text())["top1"]
    assert top1 > 0.5, result.stdout  # chance is 0.1; measured 0.66-0.74 over seeds 0-2
    killed = run(killed_at(tmp_path, "train_cifar.py", 7), *args, "--out", tmp_path / "killed", check=False)
    assert killed.returncode == -9
    run("train_cifar.py", *args, "--out", tmp_path / "killed", "--resume")
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "killed"))  # EncodingDrop included
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["top1"] == top1


@pytest.mark.slow
def test_train_cifar_bad_data_gets_one_line(tmp_path):
    root = write_learnable_cifar(tmp_path / "data")
    args = ["--model", "encnet16k64d", "--data-root", root, "--epochs", 1, "--batch-size", 32, "--workers", 0]
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    result = run("train_cifar.py", *args, "--out", tmp_path / "bad", check=False)
    assert result.returncode != 0 and "test_batch" in result.stderr and "Traceback" not in result.stderr
    result = run("train_cifar.py", *args[:2], "--data-root", tmp_path / "nowhere", check=False)
    assert result.returncode != 0 and "nowhere" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_cifar_two_processes_match_one(tmp_path):
    # DDP + SyncBatchNorm + sharded sampler: 2 processes × 8 images take the step of 1 × 16. EncodingDrop
    # draws per rank, so it is off here. In float32 the two runs round differently, and a ReLU whose input
    # sits within rounding of 0 flips: the gradients differ by ~1e-3 of their norm (measured 3e-4–8e-4 over
    # the three Table-6 network types), while BatchNorm left unsynchronised gives 0.2–0.4. So the test
    # compares the whole training update w − w_init by norm.
    root = write_learnable_cifar(tmp_path / "data", per_batch=16, test=20)
    args = ["--model", "encnet16k64d", "--data-root", root, "--epochs", 1, "--batch-size", 16,
            "--no-encoding-drop", "--workers", 0, "--log-every", 0]
    run("train_cifar.py", *args, "--out", tmp_path / "one")
    run("train_cifar.py", *args, "--out", tmp_path / "two", nproc=2)
    torch.manual_seed(0)  # train_cifar.py's --seed, before it builds the model
    initial = encnet.build_cifar("encnet16k64d", encoding_drop=False).state_dict()
    one = weights(tmp_path / "one")
    assert torch.cat([(one[k] - initial[k]).flatten() for k in one if one[k].is_floating_point()]).norm() > 0.1
    # measured: 1.9e-3 of the update; 0.11 with BatchNorm left unsynchronised
    assert_same_update(one, weights(tmp_path / "two"), initial, tol=2e-2)
    top1 = [json.loads((tmp_path / run_dir / "results.json").read_text())["top1"] for run_dir in ("one", "two")]
    # the test set is sharded and the counts summed over processes; float rounding may tip one of the 20 images
    assert abs(top1[0] - top1[1]) <= 1 / 20 + 1e-9, top1


# ============================================================================= 18. hubconf.py: torch.hub

def hub_list(monkeypatch):
    """torch.hub.list on this folder: torch 2.x's list has no source='local', so its GitHub cache is this folder."""
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: HERE)
    return torch.hub.list("owner/encnet")


def keys_and_shapes(spec):
    return {k: tuple(shape) for k, shape in spec["keys"]}


@pytest.mark.parametrize("file,names", [
    ("released_encnet_resnet50s_ade", ["encnet_resnet50s_ade"]),
    ("released_encnet_resnet101s_pcontext", ["encnet_resnet101s_pcontext"]),
    ("mmseg_encnet_r50-d8_ade20k", ["mmseg_encnet_r50-d8_ade20k_80k", "mmseg_encnet_r50_d8_ade20k_160k"]),
    ("mmseg_encnet_r101-d8_cityscapes", ["mmseg_encnet_r101_d8_cityscapes_80k"])])
def test_hub_builds_each_published_architecture_without_its_file(file, names, monkeypatch):
    listed = hub_list(monkeypatch)
    assert set(zoo.zoo_names()) <= set(listed) and {"encnet", "fcn"} <= set(listed)
    assert {n.replace("-", "_") for n in zoo.zoo_names()} <= set(listed)
    spec = json.loads((TESTDATA / f"{file}.keys.json").read_text())
    state = zoo.convert({k: torch.empty(shape, device="meta") for k, shape in spec["keys"]},
                        zoo.MMSEG_KEYS if spec["format"] == "mmseg" else zoo.RELEASED_KEYS)
    from_file = zoo.zoo_model_args(state, zoo.backbone_from_state(state, file), spec["format"], file)
    for name in names:
        assert zoo.published_model_args(name.replace("_d8", "-d8")) == from_file
        with torch.device("meta"):
            model = torch.hub.load(HERE, name, source="local", pretrained=False)
        assert not model.training and model.info["args"] == from_file
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in state.items()}


def test_hub_pretrained_is_load_models_file_and_constructors(released_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    sha1 = hashlib.sha1(released_file.read_bytes()).hexdigest()
    monkeypatch.setitem(zoo.RELEASED_SHA1, "encnet_resnet50s_ade", sha1)  # the local file stands for the published
    shutil.copy(released_file, folder / f"encnet_resnet50s_ade-{sha1[:8]}.pth")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download: it is cached"))
    model = torch.hub.load(HERE, "encnet_resnet50s_ade", source="local")
    reference, info = zoo.load_model("encnet_resnet50s_ade")
    assert not model.training and model.info["path"] == info["path"] and model.info["classes"] == info["classes"]
    images = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), reference(images))
    photo = np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8)
    small = dict(crop_size=32, base_size=40)  # the protocol and dataset from model.info
    assert torch.equal(protocols.segment(model, photo, **small), protocols.segment(reference, photo, info, **small))
    with pytest.raises(TypeError, match="apply to pretrained=False"):
        torch.hub.load(HERE, "encnet_resnet50s_ade", source="local", num_classes=3)
    # a damaged file in the cache is refused by its hash, as load_model refuses it
    (folder / f"encnet_resnet50s_ade-{sha1[:8]}.pth").write_bytes(b"damaged")
    with pytest.raises(errors.DownloadError, match="is damaged or not the published one"):
        torch.hub.load(HERE, "encnet_resnet50s_ade", source="local")

    small = torch.hub.load(HERE, "encnet", 3, source="local", backbone="resnet18", width=8, head_width=16)
    assert type(small).__name__ == "EncNet" and small.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert type(torch.hub.load(HERE, "fcn", 3, source="local", backbone="resnet18", width=8)).__name__ == "FCN"
    untrained = torch.hub.load(HERE, "encnet_resnet50s_pcontext", source="local", pretrained=False, num_classes=7,
                               backbone="resnet18", width=8, head_width=16)
    assert untrained.info["classes"] == [f"class {i}" for i in range(7)] and untrained.lateral is not None


# ============================================================================= 19. bench.py: every section runs


@pytest.mark.slow
def test_bench_quick_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    run("bench.py", "--quick", "--json", out, timeout=600)  # every section
    results = json.loads(out.read_text())
    assert results["encoding"]["x_vs_six_matmuls"] > 0 and results["data"]["speedup"] > 0
    assert results["syncbn"]["sync_collectives_per_step"] == 2 and results["syncbn"]["local_collectives_per_step"] == 0
    assert results["models"]["flops_overhead_pct"] > 0
    assert results["gpu"] == {"status": "not measured: no GPU on this machine"} or torch.cuda.is_available()
    assert results["coco"]["identical_masks"] == "20/20" and results["coco"]["ours_masks_per_s"] > 0
    assert results["eval"]["multi_scale_max_prob_difference"] < 1e-5 and results["eval"]["single_scale_speedup"] > 0
    assert results["eval"]["class_map_context_speedup"] > 0
    assert results["data"]["check_items_per_s_per_core"] > 0 and results["photo"]["photo_400x300_peak_GiB"] > 0
    assert results["cpu_bf16"]["pixels_same_class_pct"] > 90 and results["export"]["onnxruntime_speedup"] > 0
    assert results["export"]["max_logit_difference_rel"] < 1e-4  # float32 kernels summing in other orders
    assert results["gpu_vs_mmseg"] == {"status": "not measured: no GPU on this machine"} or torch.cuda.is_available()
    for setting in ("mmseg512", "paper480"):  # the training step's memory, fresh processes (bench_memory.py)
        assert results["memory"][setting]["ratio_ours_vs_plain"] < 0.9, results["memory"][setting]
        parts = results["memory"][setting]["breakdown_GiB"]
        # mmsegmentation's EncHead materialises the B×N×K×C residuals; our Encoding layer does not
        assert parts["mmseg"]["heads"] > 2 * parts["ours"]["heads"]
    # --quick without --json writes no file: its numbers never replace a real run's bench_results.json
    before = set(os.listdir(HERE))
    run("bench.py", "--quick", "--only", "coco")
    assert set(os.listdir(HERE)) == before


@pytest.mark.slow
def test_bench_side_by_side_with_mmsegmentation_runs_on_cpu(tmp_path):
    # the GPU section's code at --quick sizes on the CPU: mmsegmentation 1.2.2's own EncNet from its wheel
    # (model files run as they are, mmcv/mmengine answered by bench.py's stand-ins) against ours, from the
    # same weights; torch.compile and the memory statistics only run on a GPU
    folder, why = mmseg_peer.mmseg_files()
    if folder is None:
        pytest.skip(why)
    out = tmp_path / "bench.json"
    run("bench.py", "--quick", "--device", "cpu", "--only", "gpu_vs_mmseg", "--json", out, timeout=600)
    result = json.loads(out.read_text())["gpu_vs_mmseg"]
    for setting in ("mmseg_setting",):  # --quick runs one of the two settings
        out = result[setting]
        # one function: both compute the same convolutions, BatchNorms and Encoding in float32, the
        # Encoding in other orders (materialised vs expanded); a different layer would move logits by
        # a good fraction of their scale
        assert out["same_function_max_logit_difference_rel"] < 1e-5
        for variant in ("ours_fp32", "ours_bf16+channels_last", "mmseg_fp32", "mmseg_amp_fp16"):
            assert out[variant]["images_per_s"] > 0 and out[variant]["TFLOP_per_s"] > 0
        assert abs(sum(c["pct"] for c in out["profile_ours_bf16+channels_last"]["categories"].values()) - 100) < 1e-6


@pytest.mark.slow
def test_bench_gpu_section_runs_on_cpu(tmp_path):
    # the GPU rows' code (autocast, channels_last, FLOP counting, Encoding eager vs plain) at tiny sizes,
    # on the CPU this suite has; torch.compile and the memory statistics only run on a GPU
    out = tmp_path / "bench.json"
    run("bench.py", "--quick", "--device", "cpu", "--only", "gpu", "--json", out, timeout=600)
    result = json.loads(out.read_text())["gpu"]
    for label in ("fp32", "bf16", "bf16+channels_last"):
        assert result[f"{label}_images_per_s"] > 0 and result[f"{label}_TFLOP_per_s"] > 0
    assert result["GFLOP_per_step"] > 1 and result["encoding_eager_ms"] > 0
    assert result["bf16_MFU_pct"] == "no peak on record for cpu"


# ============================================================================= 20. the project: import graph, Python 3.10


def test_import_graph_points_down_and_imports_are_at_the_top():
    # each module imports only modules of an earlier tier (or its own), so there is no circle and no arrow back up:
    # the copyable bottom, the models and data pieces, the datasets and recipes, checkpoints, the run plumbing,
    # the commands, the benches
    tiers = [{"layers", "syncbn", "errors", "cv_resize"}, {"encnet", "transforms", "coco_masks", "context_data", "deploy"},
             {"layouts", "recipes", "protocols", "export", "explain"}, {"data", "metric"}, {"zoo"}, {"run"}, {"eval"},
             {"train_seg", "train_cifar", "hubconf"}, {"measure", "mmseg_peer"}, {"bench_inference", "bench_memory"},
             {"bench"}]
    tier_of = {name: i for i, names in enumerate(tiers) for name in names}
    assert set(tier_of) | {"test_all", "conftest"} == {f[:-3] for f in os.listdir(HERE) if f.endswith(".py")}
    allowed = {"layers": set(), "syncbn": set(), "errors": set(), "cv_resize": set(), "deploy": {"cv_resize"},
               "encnet": {"layers"},
               "run": {"errors", "layers", "syncbn"}}
    for name, tier in tier_of.items():
        tree = ast.parse(Path(HERE, f"{name}.py").read_text())
        imported = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        ours = imported & set(tier_of)
        assert all(tier_of[m] < tier for m in ours), (name, ours)
        assert name not in allowed or ours <= allowed[name], (name, ours)
        inner = [node.lineno for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert inner == [], f"{name}.py imports inside functions at lines {inner}"
    # what a user who copies encnet.py needs, and what running the project never needs
    probe = ("import sys, encnet; print(sorted(m for m in sys.modules if m in %r));"
             "import data, zoo, run, eval, train_seg, train_cifar;"
             "print(sorted(m for m in ('pytest', 'pycocotools', 'onnx', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe % sorted(tier_of)], cwd=HERE, capture_output=True, text=True)
    assert result.stdout.split("\n")[:2] == ["['encnet', 'layers']", "[]"], result.stdout + result.stderr


def test_every_module_says_what_it_holds_and_stays_readable():
    # one concept per file: its docstring's first line names it, and no module but the tests grows past 650 lines
    for f in sorted(f for f in os.listdir(HERE) if f.endswith(".py")):
        text = Path(HERE, f).read_text()
        first = (ast.get_docstring(ast.parse(text)) or "").split("\n")[0]
        assert len(first) >= 20, f"{f}: {first!r}"
        assert f in ("test_all.py", "conftest.py") or text.count("\n") <= 650, f"{f}: {text.count(chr(10))} lines"


def test_the_code_is_python_3_10():
    # the README states Python ≥ 3.10: no 3.11-only syntax (the grammar of 3.10, and a real 3.10 compiler
    # where one runs here) and no 3.11-only library call this project once used (hashlib.file_digest)
    files = sorted(f for f in os.listdir(HERE) if f.endswith(".py"))
    for f in files:
        ast.parse(Path(HERE, f).read_text(), f, feature_version=(3, 10))
    assert not any(re.search(r"file_digest\(", Path(HERE, f).read_text()) for f in files if f != "test_all.py")
    candidates = [shutil.which("python3.10"), *map(str, Path.home().glob(".pyenv/versions/3.10*/bin/python"))]
    working = [c for c in candidates if c and subprocess.run([c, "-c", "pass"], capture_output=True).returncode == 0]
    if working:
        result = subprocess.run([working[0], "-c", "import sys; [compile(open(f).read(), f, 'exec') for f in "
                                 "sys.argv[1:]]", *files], cwd=HERE, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
