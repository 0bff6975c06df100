"""Synchronized Batch Normalization over torch.distributed (Zhang et al., CVPR 2018, Appendix A).

A single file that imports nothing but torch: copy it into your project.

Segmentation needs large crops, so each GPU holds few images and per-GPU BatchNorm statistics
are noisy. SyncBatchNorm normalises with the statistics of the *global* batch instead, with one
synchronisation per pass:

    forward   one all-reduce of (count, Σx, Σx²) per channel,      μ = Σx/n,  σ² = Σx²/n − μ²  (Eq. 2)
    backward  one all-reduce of (Σ∂y, Σ∂y·x̂) per channel,          ∂x = γ/σ (∂y − Σ∂y/n − x̂ Σ∂y·x̂/n)

It works on any backend (gloo on CPU, NCCL on GPU); torch.nn.SyncBatchNorm refuses CPU tensors.
Ranks may hold different numbers of samples: the count is summed, not assumed.

Precision. Σx²/n − μ² cancels catastrophically in float32 when |μ| ≫ σ. Each rank therefore
reduces its own samples about their local mean first (torch.var_mean) and the all-reduce
carries (n, n·μ_r, n·(σ_r² + μ_r²)) in float64, where the subtraction loses nothing that matters.

In eval mode, without an initialised process group, or with a single process, the module is
exactly nn.BatchNorm{1,2,3}d and makes no collective call.

The two halves are functions (global_statistics, global_backward), and SyncBatchNorm.fused_statistics lends
them to code that fuses BatchNorm into a larger step (encnet.bn_relu_conv: BatchNorm → ReLU → conv).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _channel_dims(x):  # reduce over every dim but the channels (dim 1)
    return [0] + list(range(2, x.dim()))


def _per_channel(v, x):  # C → 1×C×1×…, broadcastable against x
    return v.view([1, -1] + [1] * (x.dim() - 2))


def global_statistics(x, running_mean, running_var, momentum, group):
    """Eq. 2 over every process's samples, one all-reduce → (mean, biased variance, count) in ≥ fp32; the running
    estimates (when given) updated as nn.BatchNorm does, with the unbiased variance."""
    channels = x.shape[1]
    stat_dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in ≥ fp32, also for bf16 input
    count = x.numel() // channels
    if count > 0:
        var, mean = torch.var_mean(x.to(stat_dtype), dim=_channel_dims(x), correction=0)
    else:  # an empty local batch still takes part in the collective
        var = mean = x.new_zeros(channels, dtype=stat_dtype)
    mean, var = mean.double(), var.double()
    stats = torch.cat([mean.new_full((1,), count), count * mean, count * (var + mean * mean)])
    dist.all_reduce(stats, group=group)  # the one forward collective
    total = stats[0]
    mean = stats[1:channels + 1] / total
    var = (stats[channels + 1:] / total - mean * mean).clamp_min_(0)
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        unbiased = var * (total / (total - 1).clamp_min(1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return mean.to(stat_dtype), var.to(stat_dtype), total.to(stat_dtype)


def global_backward(grad_y, x, weight, mean, var, total, eps, group, needs=(True, True, True)):
    """The gradients of y = BatchNorm(x) with global statistics, one all-reduce → (∂x, ∂γ, ∂β), each None unless
    `needs` it. The elementwise passes use PyTorch's fused kernels: native_batch_norm_backward for the local sums,
    F.batch_norm in inference form for ∂x."""
    invstd = torch.rsqrt(var + eps)
    # local Σ∂y·x̂ (= ∂L/∂γ on this rank) and Σ∂y (= ∂L/∂β on this rank), in one fused pass
    _, sum_gy_xhat, sum_gy = torch.ops.aten.native_batch_norm_backward(
        grad_y, x, weight, None, None, mean, invstd, True, eps, [False, True, True])
    grad_x = None
    if needs[0]:
        sums = torch.cat([sum_gy, sum_gy_xhat]).to(mean.dtype)
        dist.all_reduce(sums, group=group)  # the one backward collective
        mean_gy, mean_gy_xhat = (sums / total).chunk(2)
        scale = invstd if weight is None else weight * invstd
        # ∂x = γ/σ · (∂y − mean(∂y) − x̂ · mean(∂y·x̂)): the x̂ terms as one affine batch-norm pass
        grad_x = F.batch_norm(x, mean, var, -scale * mean_gy_xhat, -scale * mean_gy, training=False, eps=eps)
        grad_x = grad_x.addcmul_(grad_y, _per_channel(scale, x).to(grad_x.dtype))
    # Parameter gradients stay local: DistributedDataParallel averages them across ranks.
    return grad_x, sum_gy_xhat if needs[1] else None, sum_gy if needs[2] else None


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x − μ)/√(σ² + ε)·γ + β with the global batch's μ, σ²; x kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        mean, var, total = global_statistics(x, running_mean, running_var, momentum, group)
        y = F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
        ctx.save_for_backward(x, weight, mean, var, total)
        ctx.eps, ctx.group = eps, group  # (no .item() anywhere: a host sync per layer would stall the GPU)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, mean, var, total = ctx.saved_tensors
        grads = global_backward(grad_y, x, weight, mean, var, total, ctx.eps, ctx.group, ctx.needs_input_grad[:3])
        return *grads, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for nn.BatchNorm1d/2d/3d that uses the global batch's statistics in training.

    Input (B, C), (B, C, L), (B, C, H, W) or (B, C, D, H, W); channels_last is kept.
    Same parameters, buffers and state_dict keys as nn.BatchNorm.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (B, C, ...) input, got shape {tuple(x.shape)}")

    def _synchronised(self):
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x):
        self._check_input_dim(x)
        use_batch_stats = self.training or self.running_mean is None
        if not (use_batch_stats and self._synchronised()):
            return super().forward(x)  # exactly nn.BatchNorm, no collective

        momentum, running_mean, running_var = self._running_update()
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var, self.eps, momentum,
                                            self.process_group)

    def _running_update(self):
        """→ (momentum, running_mean, running_var) for this training forward (the buffers None if untracked)."""
        if not (self.training and self.track_running_stats):
            return 0.0, None, None
        self.num_batches_tracked.add_(1)
        # momentum None: cumulative moving average, as nn.BatchNorm
        momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        return momentum, self.running_mean, self.running_var

    def fused_statistics(self, x):
        """For a caller that fuses this BatchNorm into its own Function (encnet.bn_relu_conv) in a training forward.
        Not synchronised → None: this module is nn.BatchNorm then, to be fused as one. Synchronised → (mean, biased
        variance, backward): what forward would normalise x with, over all processes, the running estimates updated
        as forward updates them; backward(grad_y, needs) → (∂x, ∂γ, ∂β) as forward's backward computes them."""
        if not self._synchronised():
            return None
        momentum, running_mean, running_var = self._running_update()
        mean, var, total = global_statistics(x, running_mean, running_var, momentum, self.process_group)

        def backward(grad_y, needs):
            return global_backward(grad_y, x, self.weight, mean, var, total, self.eps, self.process_group, needs)
        return mean, var, backward


def convert_sync_batchnorm(module, process_group=None):
    """Return `module` with every nn.BatchNorm*d replaced by SyncBatchNorm (weights and buffers kept)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module
