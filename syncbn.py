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
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _channel_dims(x):  # reduce over every dim but the channels (dim 1)
    return [0] + list(range(2, x.dim()))


def _per_channel(v, x):  # C → 1×C×1×…, broadcastable against x
    return v.view([1, -1] + [1] * (x.dim() - 2))


class _SyncBatchNormFunction(torch.autograd.Function):
    """The elementwise passes use PyTorch's fused batch-norm kernels (on any device): F.batch_norm
    in inference form applies given statistics, native_batch_norm_backward computes the local sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
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

        if running_mean is not None:  # as nn.BatchNorm: unbiased variance in the running estimate
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * (total / (total - 1).clamp_min(1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

        mean, var = mean.to(stat_dtype), var.to(stat_dtype)
        y = F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)  # (x − μ)/√(σ² + ε)·γ + β
        ctx.save_for_backward(x, weight, mean, var, total.to(stat_dtype))
        ctx.eps, ctx.group = eps, group  # (no .item() anywhere: a host sync per layer would stall the GPU)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, mean, var, total = ctx.saved_tensors
        invstd = torch.rsqrt(var + ctx.eps)
        # local Σ∂y·x̂ (= ∂L/∂γ on this rank) and Σ∂y (= ∂L/∂β on this rank), in one fused pass
        _, sum_gy_xhat, sum_gy = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True])

        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_gy, sum_gy_xhat]).to(mean.dtype)
            dist.all_reduce(sums, group=ctx.group)  # the one backward collective
            mean_gy, mean_gy_xhat = (sums / total).chunk(2)
            scale = invstd if weight is None else weight * invstd
            # ∂x = γ/σ · (∂y − mean(∂y) − x̂ · mean(∂y·x̂)): the x̂ terms as one affine batch-norm pass
            grad_x = F.batch_norm(x, mean, var, -scale * mean_gy_xhat, -scale * mean_gy, training=False, eps=ctx.eps)
            grad_x = grad_x.addcmul_(grad_y, _per_channel(scale, x).to(grad_x.dtype))
        # Parameter gradients stay local: DistributedDataParallel averages them across ranks.
        grad_weight = sum_gy_xhat if ctx.needs_input_grad[1] else None
        grad_bias = sum_gy if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


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

        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / self.num_batches_tracked.item()
        track = self.training and self.track_running_stats
        return _SyncBatchNormFunction.apply(
            x, self.weight, self.bias,
            self.running_mean if track else None, self.running_var if track else None,
            self.eps, momentum, self.process_group)


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
