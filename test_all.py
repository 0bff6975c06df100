"""Tests of the whole repo, all on CPU: `python -m pytest -q test_all.py`.

Numerics are checked against direct formulas in float64, gradients with gradcheck, and
distributed code in real multi-process gloo groups against single-process runs.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import layers
import syncbn

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ----------------------------------------------------------------------------- layers.py

def encoding_materialised(x, codewords, scale):
    """Eq. 1 written out with the B×N×K×C residual tensor: the reference."""
    X = x.flatten(2).transpose(1, 2)  # B×N×C
    residuals = X[:, :, None, :] - codewords[None, None]  # B×N×K×C
    assign = torch.softmax(-scale * residuals.pow(2).sum(-1), dim=2)  # B×N×K
    return (assign[..., None] * residuals).sum(1)  # B×K×C


def encoding_inputs(B=2, C=6, H=3, W=5, K=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype, requires_grad=True)
    codewords = torch.randn(K, C, generator=g, dtype=dtype, requires_grad=True)
    scale = torch.rand(K, generator=g, dtype=dtype).add(0.2).requires_grad_()
    return x, codewords, scale


def test_encoding_matches_materialised_formula_float64():
    x, codewords, scale = encoding_inputs()
    ours = layers.encode(x, codewords, scale)
    ref = encoding_materialised(x, codewords, scale)
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
        encoding_materialised(x, enc.codewords, enc.scale).square().sum().backward()
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


# ----------------------------------------------------------------------------- syncbn.py

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


def test_syncbn_float32_large_mean_matches_float64():
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
