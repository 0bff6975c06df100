"""The paper's models: dilated ResNets, FCN, EncNet (Sec. 2.1, Fig. 2–3), their loss, and the CIFAR-10 nets (Table 6).

    resnet(name)      dilated ResNet, output stride 8, torchvision's parameter names
    FCN               backbone + FCN head: the paper's baseline
    EncNet            backbone + Context Encoding Module + SE-losses on stages 3 and 4
    seg_loss          per-pixel CE + α·BCE SE-losses + auxiliary CE, one function for both models
    Upsampled, upsampled_cross_entropy   the training output's logits and their CE at full resolution, in bands
    memory_saving     the training step's memory savings on (default) or off: the same numbers, to rounding
    model_from_args   FCN or EncNet from a dict of train_seg.py's arguments (a checkpoint's 'args')
    build_cifar       the four 14-layer networks of Table 6

Needs only torch and layers.py: copy the two files. The published EncNets differ from the paper's model
in a few switches, all constructor options here whose defaults are the paper's (align_corners,
stage3_encoding, dropout2d, residual_gate, the 'resnet50s' and 'resnet50v1c' stems); zoo.py reads their files.

Memory of a training step, about half of plain autograd's for the same numbers (docs/performance.md): the loss
upsamples the logits in bands (`Upsampled`), BatchNorm → ReLU → conv keeps one tensor (`bn_relu_conv`).
"""
import contextlib
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree
import torch.utils.checkpoint

from layers import EncModule, Encoding, EncodingDrop, SampleDropout, encoded_semantics, se_targets, semantic_encoder

# ----------------------------------------------------------------------------- dilated ResNet

class _BatchNormReLUConv(torch.autograd.Function):
    """conv(relu(BatchNorm(x))) given the batch's mean and biased variance, keeping only x (autograd: the ReLU's
    output too). Backward recomputes that by the same kernels, bit for bit, then the conv's and BatchNorm's own
    (bn_backward: SyncBatchNorm's, whose statistics span the processes; None: the local batch's)."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, mean, var, eps, bn_backward, conv_weight, stride, padding, dilation,
                groups):
        ctx.save_for_backward(x, bn_weight, bn_bias, mean, var, conv_weight)
        ctx.conv, ctx.eps, ctx.bn_backward = (stride, padding, dilation, groups), eps, bn_backward
        return F.conv2d(_bn_relu(x, bn_weight, bn_bias, mean, var, eps), conv_weight, None, *ctx.conv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, bn_weight, bn_bias, mean, var, conv_weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need = ctx.needs_input_grad
        y = _bn_relu(x, bn_weight, bn_bias, mean, var, ctx.eps)
        grad_y, grad_conv, _ = torch.ops.aten.convolution_backward(
            grad_out, y, conv_weight, None, stride, padding, dilation, False, [0] * len(stride), groups,
            [any(need[:3]), need[7], False])
        grad_x = grad_w = grad_b = None
        if grad_y is not None:
            grad_y = torch.ops.aten.threshold_backward(grad_y, y, 0)
            grad_x, grad_w, grad_b = ctx.bn_backward(grad_y, need[:3]) if ctx.bn_backward else \
                torch.ops.aten.native_batch_norm_backward(grad_y, x, bn_weight, None, None, mean,
                                                          torch.rsqrt(var + ctx.eps), True, ctx.eps, list(need[:3]))
        return grad_x, grad_w, grad_b, None, None, None, None, grad_conv, None, None, None, None


def _bn_relu(x, weight, bias, mean, var, eps):  # BatchNorm's normalisation with given statistics, ReLU
    return torch.relu_(F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps))


RECOMPUTE_MIN_ELEMENTS = 1 << 20  # smaller maps save little memory and the recompute's overhead would dominate


def bn_relu_conv(bn, relu, conv, x, recompute=True):
    """conv(relu(bn(x))) by _BatchNormReLUConv (one tensor kept, not two; statistics by BatchNorm's kernel) in training
    (nn.BatchNorm2d or syncbn.SyncBatchNorm, float32/64, no autocast, `recompute`, x of ≥ RECOMPUTE_MIN_ELEMENTS);
    else by the modules. SyncBatchNorm (found by its fused_statistics: encnet does not import syncbn) lends its
    statistics over all processes and its backward, as its own forward would use them."""
    if not (recompute and x.numel() >= RECOMPUTE_MIN_ELEMENTS and bn.training and torch.is_grad_enabled()
            and (type(bn) is nn.BatchNorm2d or hasattr(bn, "fused_statistics")) and bn.affine
            and bn.track_running_stats and type(conv) is nn.Conv2d and conv.bias is None
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and x.dim() == 4
            and x.dtype in (torch.float32, torch.float64) and x.numel() > x.shape[1]
            and not torch.is_autocast_enabled(x.device.type)):
        return conv(relu(bn(x)))
    with torch.no_grad():
        fused = bn.fused_statistics(x) if hasattr(bn, "fused_statistics") else None  # None: not synchronised
        if fused is None:  # nn.BatchNorm2d.forward in training mode
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            fused = *torch.ops.aten.batch_norm_update_stats(x, bn.running_mean, bn.running_var, factor), None
    mean, var, bn_backward = fused
    return _BatchNormReLUConv.apply(x, bn.weight, bn.bias, mean, var, bn.eps, bn_backward, conv.weight, conv.stride,
                                    conv.padding, conv.dilation, conv.groups)


class BasicBlock(nn.Module):
    expansion = 1
    recompute_bn_relu = True  # see bn_relu_conv

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = bn_relu_conv(self.bn1, self.relu, self.conv2, self.conv1(x), self.recompute_bn_relu)
        return self.relu(self.bn2(out) + identity)


class Bottleneck(nn.Module):
    expansion = 4
    recompute_bn_relu = True  # see bn_relu_conv: the step keeps conv1's and conv2's outputs, not the ReLUs'

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # stride on the 3×3 conv ("ResNet v1.5"), as torchvision, the released code and mmsegmentation
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = bn_relu_conv(self.bn1, self.relu, self.conv2, self.conv1(x), self.recompute_bn_relu)
        out = bn_relu_conv(self.bn2, self.relu, self.conv3, out, self.recompute_bn_relu)
        return self.relu(self.bn3(out) + identity)


ARCHITECTURES = {  # name: (block, blocks per stage, deep-stem width at width 64; None = torchvision's 7×7 stem)
    "resnet18": (BasicBlock, [2, 2, 2, 2], None),
    "resnet34": (BasicBlock, [3, 4, 6, 3], None),
    "resnet50": (Bottleneck, [3, 4, 6, 3], None),
    "resnet101": (Bottleneck, [3, 4, 23, 3], None),
    "resnet152": (Bottleneck, [3, 8, 36, 3], None),
    "resnet50s": (Bottleneck, [3, 4, 6, 3], 64),  # the released code's deep stem: 64, 64, 128
    "resnet101s": (Bottleneck, [3, 4, 23, 3], 64),
    "resnet152s": (Bottleneck, [3, 8, 36, 3], 64),
    "resnet50v1c": (Bottleneck, [3, 4, 6, 3], 32),  # mmsegmentation's ResNetV1c: 32, 32, 64
    "resnet101v1c": (Bottleneck, [3, 4, 23, 3], 32),
}


class ResNet(nn.Module):
    """Dilated ResNet without its classifier (Sec. 3.1, Fig. 3).

    Stages 3 and 4 keep stride 1 and dilate their 3×3 convs by 2 and 4, so the output stride is 8
    (the first block of each stage at the lower rate, 1 and 2, as in the released code and
    mmsegmentation's "-d8" models). Parameter names are torchvision's, so `state_dict()` of
    resnet50/101/152 equals torchvision's minus `fc.*`. `width` scales every stage (64 = the
    standard nets; smaller for CPU toys). stem_width: None for torchvision's 7×7 conv, else a deep
    stem of three 3×3 convs (stem_width, stem_width, 2·stem_width), the last one's BN being `bn1`.
    forward(images B×3×H×W) → [stage1, stage2, stage3, stage4] features.
    """

    def __init__(self, block, blocks, stem_width=None, width=64):
        super().__init__()
        if stem_width:
            s = stem_width
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, s, 3, 2, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True),
                nn.Conv2d(s, s, 3, 1, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True),
                nn.Conv2d(s, 2 * s, 3, 1, 1, bias=False))
            self.inplanes = 2 * s
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.inplanes = width
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, blocks[0])
        self.layer2 = self._make_layer(block, 2 * width, blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, blocks[2], dilation=2)
        self.layer4 = self._make_layer(block, 8 * width, blocks[3], dilation=4)
        self.channels = [c * block.expansion for c in (width, 2 * width, 4 * width, 8 * width)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, num_blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        first_dilation = max(1, dilation // 2)
        layers = [block(self.inplanes, planes, stride, first_dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    checkpoint_stages = ()  # stages (1–4) recomputed in backward (torch.utils.checkpoint) instead of kept
    recompute_bn_relu = True  # the deep stem's BN → ReLU → conv pairs: see bn_relu_conv

    def forward(self, x):
        if isinstance(self.conv1, nn.Sequential):  # deep stem: conv, BN, ReLU, conv, BN, ReLU, conv
            x = bn_relu_conv(*self.conv1[1:4], self.conv1[0](x), self.recompute_bn_relu)
            x = bn_relu_conv(*self.conv1[4:7], x, self.recompute_bn_relu)
        else:
            x = self.conv1(x)
        x = self.maxpool(self.relu(self.bn1(x)))
        features = []
        for number, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), 1):
            if number in self.checkpoint_stages and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False, context_fn=lambda s=stage: (
                    contextlib.nullcontext(), batchnorm_statistics_kept(s)))
            else:
                x = stage(x)
            features.append(x)
        return features


@contextlib.contextmanager
def batchnorm_statistics_kept(module):
    """Its BatchNorms update copies of their running estimates, thrown away after: a recomputed training forward
    (checkpointing) must not count the batch twice. Outputs and saved tensors are unchanged."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    kept = [(m, [getattr(m, n) for n in names]) for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    for m, buffers in kept:
        for n, t in zip(names, buffers):
            setattr(m, n, t.clone())
    try:
        yield
    finally:
        for m, buffers in kept:
            for n, t in zip(names, buffers):
                setattr(m, n, t)


def resnet(name, width=64):
    """Dilated backbone by name ('resnet18' … 'resnet152s', 'resnet50v1c', 'resnet101v1c'), random weights;
    `load_backbone_weights` fills in ImageNet ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(ARCHITECTURES)}")
    block, blocks, stem = ARCHITECTURES[name]
    return ResNet(block, blocks, None if stem is None else stem * width // 64, width)


# ----------------------------------------------------------------------------- segmentation models

def conv_bn_relu(cin, cout, kernel):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def dropout_layer(p, channelwise):
    """Dropout before a classifier: of single activations (paper, released code) or of whole
    channels (as nn.Dropout2d, mmsegmentation), masks drawn per sample (layers.SampleDropout).
    Identity in eval mode either way."""
    return SampleDropout(p, channelwise)


def fcn_head(cin, width, num_classes, dropout, dropout2d=False):
    """3×3 conv → BN → ReLU → dropout → 1×1 conv classifier."""
    return nn.Sequential(conv_bn_relu(cin, width, 3), dropout_layer(dropout, dropout2d),
                         nn.Conv2d(width, num_classes, 1))


def upsample(logits, size, align_corners):  # B×K×h×w → B×K×H×W, bilinear (×8 at output stride 8)
    return F.interpolate(logits, size, mode="bilinear", align_corners=align_corners)


def training_logits(model, logits, size):  # `Upsampled` (model.upsample_in_loss), else the upsampled tensor
    if model.upsample_in_loss:
        return Upsampled(logits, tuple(size), model.align_corners)
    return upsample(logits, size, model.align_corners)


class FCN(nn.Module):
    """Dilated FCN (the paper's baseline): backbone → FCN head on stage 4 → bilinear ×8.

    Training forward → {'seg': B×K×H×W logits[, 'aux': logits of the stage-3 head]}, each an `Upsampled`
    (see EncNet); eval forward → B×K×H×W logits at the input's resolution. align_corners and dropout2d as in
    EncNet.
    """
    upsample_in_loss = True  # see EncNet

    def __init__(self, num_classes, backbone="resnet50", dropout=0.1, aux=False, head_width=512, width=64,
                 align_corners=False, dropout2d=False):
        super().__init__()
        self.backbone = resnet(backbone, width)
        self.align_corners = align_corners
        c3, c4 = self.backbone.channels[2:]
        self.head = fcn_head(c4, head_width, num_classes, dropout, dropout2d)
        self.aux_head = fcn_head(c3, c3 // 4, num_classes, dropout, dropout2d) if aux else None

    def forward(self, images):
        size = images.shape[-2:]
        _, _, c3, c4 = self.backbone(images)
        logits = self.head(c4)
        if not self.training:
            return upsample(logits, size, self.align_corners)
        out = {"seg": training_logits(self, logits, size)}
        if self.aux_head is not None:
            out["aux"] = training_logits(self, self.aux_head(c3), size)
        return out


class StageEncoding(nn.Module):
    """The light Context Encoding Module on stage 3 (Sec. 2.1, Fig. 3): only its SE-loss is used.

    1×1 conv (reduce) → encoded semantics e (layers.EncModule's path) → FC → class-presence logits.
    """

    def __init__(self, channels, width, num_classes, num_codes):
        super().__init__()
        self.reduce = conv_bn_relu(channels, width, 1)
        self.encoding = semantic_encoder(width, num_codes)
        self.se_classifier = nn.Linear(width, num_classes)

    def forward(self, x):  # B×C×H×W → B×num_classes
        return self.se_classifier(encoded_semantics(self.encoding, self.reduce(x)))


class EncNet(nn.Module):
    """Context Encoding Network (Sec. 2.1, Fig. 2).

    stage 4 → conv5 (3×3 → head_width) [+ lateral fusion of stages 2–3] → EncModule (K codewords)
    → dropout → 1×1 conv → bilinear ×8. SE-losses on the EncModule's encoded semantics (stage 4)
    and, as in Fig. 3, on a light second module on stage 3 (`stage3_encoding`). Options: the
    released code's auxiliary FCN head on stage 3 (`aux`), its residual gate relu(x + x ⊗ γ)
    (`residual_gate`), num_codes=0 for global average pooling instead of the Encoding layer
    (Fig. 5's K = 0). For the published models: `align_corners` of the bilinear upsampling (the
    released code: True), `dropout2d` (mmsegmentation), stage3_encoding=False (both zoos).

    Training forward → {'seg': logits, 'se': [stage-4 SE logits(, stage-3 SE logits)], 'aux': …};
    eval forward → B×K×H×W logits at the input's resolution (the SE branches are skipped).
    The training logits ('seg', 'aux') come as `Upsampled` (seg_loss upsamples them band by band: 2 × 150 × 512²
    floats, 315 MB, never exist), or as tensors with `upsample_in_loss = False`.
    """
    upsample_in_loss = True

    def __init__(self, num_classes, backbone="resnet50", num_codes=32, se_loss=True, aux=False, lateral=False,
                 residual_gate=False, dropout=0.1, head_width=512, width=64, stage3_encoding=True,
                 align_corners=False, dropout2d=False):
        super().__init__()
        self.backbone = resnet(backbone, width)
        self.align_corners = align_corners
        c2, c3, c4 = self.backbone.channels[1:]
        self.conv5 = conv_bn_relu(c4, head_width, 3)
        if lateral:  # fuse stage 2 and 3 features at the same stride 8 (released code, PASCAL)
            self.lateral = nn.ModuleList([conv_bn_relu(c2, head_width, 1), conv_bn_relu(c3, head_width, 1)])
            self.fusion = conv_bn_relu(3 * head_width, head_width, 3)
        else:
            self.lateral = None
        self.enc_module = EncModule(head_width, num_classes, num_codes, se_loss, residual_gate)
        self.classifier = nn.Sequential(dropout_layer(dropout, dropout2d), nn.Conv2d(head_width, num_classes, 1))
        self.stage3_encoding = (StageEncoding(c3, head_width // 2, num_classes, num_codes)
                                if se_loss and stage3_encoding else None)
        self.aux_head = fcn_head(c3, c3 // 4, num_classes, dropout, dropout2d) if aux else None

    def forward(self, images):
        size = images.shape[-2:]
        _, c2, c3, c4 = self.backbone(images)
        x = self.conv5(c4)
        if self.lateral is not None:
            x = self.fusion(torch.cat([x, self.lateral[0](c2), self.lateral[1](c3)], 1))
        x, se_logits = self.enc_module(x)
        logits = self.classifier(x)
        if not self.training:
            return upsample(logits, size, self.align_corners)
        out = {"seg": training_logits(self, logits, size)}
        if se_logits is not None:
            out["se"] = [se_logits]
            if self.stage3_encoding is not None:
                out["se"].append(self.stage3_encoding(c3))
        if self.aux_head is not None:
            out["aux"] = training_logits(self, self.aux_head(c3), size)
        return out


# ----------------------------------------------------------------------------- full-resolution logits, in bands

@dataclasses.dataclass(eq=False)
class Upsampled:
    """B×K×H×W logits not computed: upsample(source B×K×h×w, output_size, align_corners), FCN/EncNet's training
    'seg'/'aux' (seg_loss takes their CE in bands). .shape, .size(), .dtype… without computing it; torch functions,
    methods and operators compute it (`materialize()`). A dataclass and pytree node: DDP finds its tensor."""
    source: torch.Tensor
    output_size: tuple
    align_corners: bool

    def materialize(self):
        return upsample(self.source, self.output_size, self.align_corners)

    shape = property(lambda self: torch.Size((*self.source.shape[:-2], *self.output_size)))
    ndim = property(lambda self: self.source.dim())
    dtype = property(lambda self: self.source.dtype)
    device = property(lambda self: self.source.device)
    requires_grad = property(lambda self: self.source.requires_grad)
    size = lambda self, dim=None: self.shape if dim is None else self.shape[dim]  # noqa: E731
    dim = lambda self: self.source.dim()  # noqa: E731
    __len__ = lambda self: self.shape[0]  # noqa: E731

    def __getattr__(self, name):  # any other tensor attribute: the full-resolution tensor's
        if name.startswith("__") or name in ("source", "output_size", "align_corners"):
            raise AttributeError(name)  # (copy and pickle probing an instance under construction)
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        real = lambda x: (x.materialize() if isinstance(x, Upsampled) else type(x)(map(real, x))
                          if isinstance(x, (list, tuple)) else {k: real(v) for k, v in x.items()}
                          if isinstance(x, dict) else x)
        return func(*real(args), **real(kwargs or {}))

    __hash__ = object.__hash__


for _name in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow", "neg", "abs", "matmul",
              "getitem", "iter", "eq", "ne", "lt", "le", "gt", "ge", "array"):
    setattr(Upsampled, f"__{_name}__", lambda self, *args, _n=f"__{_name}__": getattr(self.materialize(), _n)(*args))
with contextlib.suppress(ValueError):  # (ValueError: this file imported twice)
    torch.utils._pytree.register_pytree_node(Upsampled, lambda u: ([u.source], (u.output_size, u.align_corners)),
                                             lambda s, c: Upsampled(s[0], *c), serialized_type_name="encnet.Upsampled")


def interpolation_matrix(in_size, out_size, align_corners):
    """out_size × in_size float64 matrix of F.interpolate's bilinear resampling along one axis (out = A · in):
    that of the identity, the other axis keeping its size (weights exactly 1 and 0 there)."""
    eye = torch.eye(in_size, dtype=torch.float64)[None, None]
    return F.interpolate(eye, (out_size, in_size), mode="bilinear", align_corners=align_corners)[0, 0]


# Logits a band: 32 MiB on CPUs (smaller bands' many small ops stall on a busy CPU), 128 MiB on GPUs (few launches).
BAND_ELEMENTS = {"cpu": 2 ** 23}
BAND_ELEMENTS_ELSEWHERE = 2 ** 25


class _UpsampledCrossEntropy(torch.autograd.Function):
    """Per image Σ CE(upsample(logits), labels) over labelled pixels, by bands of rows of A_rows · logits · A_colsᵀ
    (interpolation_matrix, two non-zeros a row). Backward recomputes each band: softmax − one-hot, times the
    gradient and label mask, through both matrices transposed (the exact adjoint). Keeps only its inputs."""

    @staticmethod
    def forward(ctx, logits, labels, output_size, align_corners, band_elements):
        b, k, h, w = logits.shape
        height, width = output_size
        rows = interpolation_matrix(h, height, align_corners)
        step = max(1, band_elements // (b * k * width))
        ctx.bands = []  # (r0, r1, c0, c1): output rows r0:r1 read source rows c0:c1
        for r0 in range(0, height, step):
            used = rows[r0:r0 + step].ne(0).any(0).nonzero()
            ctx.bands.append((r0, min(height, r0 + step), int(used[0]), int(used[-1]) + 1))
        rows, cols_t = rows.to(logits), interpolation_matrix(w, width, align_corners).t().to(logits)
        ctx.save_for_backward(logits, labels, rows, cols_t)
        with torch.autocast(logits.device.type, enabled=False):
            return torch.cat([F.cross_entropy(rows[r0:r1, c0:c1] @ logits[:, :, c0:c1] @ cols_t, labels[:, r0:r1],
                                              ignore_index=-1, reduction="none") for r0, r1, c0, c1 in ctx.bands],
                             1).sum((1, 2))  # the bands B×K×R×W, their per-pixel CE B×R×W

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_per_image):  # B
        logits, labels, rows, cols_t = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        weight = ((labels != -1) * grad_per_image[:, None, None])[:, None]  # B×1×H×W: ∂L/∂CE of each pixel
        target = labels.clamp_min(0)[:, None]
        with torch.autocast(logits.device.type, enabled=False):
            for r0, r1, c0, c1 in ctx.bands:
                a, w = rows[r0:r1, c0:c1], weight[:, :, r0:r1]
                grad = torch.softmax(a @ logits[:, :, c0:c1] @ cols_t, 1).mul_(w)  # (softmax − one-hot)·weight
                grad.scatter_add_(1, target[:, :, r0:r1], -w)
                grad_logits[:, :, c0:c1] += a.t() @ (grad @ cols_t.t())
        return grad_logits, None, None, None, None


def float32_at_least(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def upsampled_cross_entropy(logits, labels, output_size, align_corners=False, band_elements=None):
    """F.cross_entropy(upsample(logits), labels, ignore_index=−1, reduction='none') summed per image → B, to
    rounding, in bands (BAND_ELEMENTS) without B×K×H×W tensors, for one more upsampling; float32 (or float64)."""
    if tuple(labels.shape[-2:]) != tuple(output_size) or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not fit logits of {logits.shape[0]} images upsampled to "
                         f"{tuple(output_size)}")
    band_elements = band_elements or BAND_ELEMENTS.get(logits.device.type, BAND_ELEMENTS_ELSEWHERE)
    return _UpsampledCrossEntropy.apply(float32_at_least(logits), labels, tuple(output_size), align_corners,
                                        band_elements)


def memory_saving(model, enabled=True):
    """The step's memory savings on (default) or off (the plain step) in `model` → model: `upsample_in_loss`
    (FCN/EncNet), `recompute_bn_relu` (ResNet and blocks)."""
    for m in model.modules():
        name = "upsample_in_loss" if isinstance(m, (FCN, EncNet)) else "recompute_bn_relu"
        if hasattr(m, name):
            setattr(m, name, enabled)
    return model


def seg_loss(outputs, labels, num_classes, se_weight=0.2, aux_weight=0.2, num_pixels=None):
    """Total training loss and its terms: CE + se_weight·Σ BCE(SE) + aux_weight·CE(aux) (Sec. 2–3).

    outputs: the training-mode dict of FCN/EncNet; labels: B×H×W int64 with −1 = ignore.
    Per-pixel losses are summed per image and divided by `num_pixels`: a number or one per image (B),
    default this batch's labelled pixels (PyTorch's ignore_index mean). Recipes differ here: mmsegmentation
    divides by all pixels, ignored ones included, the released code by the labelled pixels of each GPU's
    share; a distributed run passes what makes the processes' average the global one (train_seg.loss_divisors).
    In float32 (float64 stays float64); `Upsampled` logits band by band (upsampled_cross_entropy).
    Returns (loss, {'seg': …, 'se': …, 'aux': …}) with the unweighted terms, detached.
    """
    if num_pixels is None:
        num_pixels = (labels != -1).sum().clamp_min(1)

    def pixel_ce(logits):  # B×K×H×W logits → Σ_images (Σ_pixels CE) / num_pixels
        if isinstance(logits, Upsampled):  # the model's training output: the same sums, band by band
            per_image = upsampled_cross_entropy(logits.source, labels, logits.output_size, logits.align_corners)
        else:
            per_image = F.cross_entropy(float32_at_least(logits), labels, ignore_index=-1,
                                        reduction="none").flatten(1).sum(1)
        return (per_image / num_pixels).sum()

    terms = {"seg": pixel_ce(outputs["seg"])}
    loss = terms["seg"]
    if "se" in outputs:
        targets = se_targets(labels, num_classes)
        terms["se"] = sum(F.binary_cross_entropy_with_logits(float32_at_least(s), targets.to(float32_at_least(s)))
                          for s in outputs["se"])
        loss = loss + se_weight * terms["se"]
    if "aux" in outputs:
        terms["aux"] = pixel_ce(outputs["aux"])
        loss = loss + aux_weight * terms["aux"]
    return loss, {k: v.detach() for k, v in terms.items()}


# The arguments that decide a segmentation model's modules and forward (train_seg.py's flags, a
# checkpoint's 'args'), with the defaults of checkpoints written before an option existed.
ARCHITECTURE = dict(model="encnet", backbone="resnet50", width=64, head_width=512, num_codes=32, se_loss=True,
                    aux=False, lateral=False, residual_gate=False, dropout=0.1, stage3_encoding=True,
                    align_corners=False, dropout2d=False)


def model_from_args(args):
    """FCN or EncNet from a dict of train_seg.py's arguments (a checkpoint's 'args' holds them)."""
    a = {**ARCHITECTURE, **{k: args[k] for k in ARCHITECTURE if k in args}}
    common = dict(num_classes=args["num_classes"], backbone=a["backbone"], dropout=a["dropout"], aux=a["aux"],
                  head_width=a["head_width"], width=a["width"], align_corners=a["align_corners"],
                  dropout2d=a["dropout2d"])
    if a["model"] == "fcn":
        return FCN(**common)
    if a["model"] == "encnet":
        return EncNet(**common, num_codes=a["num_codes"], se_loss=a["se_loss"], lateral=a["lateral"],
                      residual_gate=a["residual_gate"], stage3_encoding=a["stage3_encoding"])
    raise ValueError(f"unknown model {a['model']!r}")


# ----------------------------------------------------------------------------- CIFAR-10 (Table 6)

class SEGate(nn.Module):
    """Squeeze-and-Excitation: global average pool → FC C→C/16 → ReLU → FC → sigmoid (B×C)."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class EncodingGate(nn.Module):
    """Context Encoding Module of the CIFAR nets (Sec. 3.5): scaling factors of a block's residual.

    1×1 conv C→C/4 → BN → ReLU → Encoding (K codewords) → concatenate the K encoders
    → L2-normalise → FC (K·C/4 → C) → sigmoid (B×C).
    """

    def __init__(self, channels, num_codes, encoding_drop=True):
        super().__init__()
        width = channels // 4
        self.reduce = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True))
        self.encoding = (EncodingDrop if encoding_drop else Encoding)(width, num_codes)
        self.fc = nn.Linear(num_codes * width, channels)

    def forward(self, x):
        encoders = self.encoding(self.reduce(x)).flatten(1)  # B×(K·C/4)
        return torch.sigmoid(self.fc(F.normalize(encoders, dim=1)))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016); an optional gate scales the residual branch
    before the identity is added, so the identity path stays untouched (Sec. 3.5)."""

    def __init__(self, cin, cout, stride, gate=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        self.gate = gate

    def forward(self, x):
        out = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        residual = self.conv2(F.relu(self.bn2(self.conv1(out))))
        if self.gate is not None:
            residual = residual * self.gate(residual)[:, :, None, None]
        return residual + identity


class CifarNet(nn.Module):
    """14-layer pre-activation ResNet: 3×3 conv → 3 stages × 2 blocks (d, 2d, 4d channels,
    downsampling at stages 2 and 3) → BN-ReLU → global average pool → 10-way FC."""

    def __init__(self, width, make_gate=None, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(2):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(cin, cout, stride, make_gate(cout) if make_gate else None))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # MSRA initialisation (He et al. 2015), as in the paper
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images):  # B×3×32×32 → B×10
        x = F.relu(self.bn(self.blocks(self.conv1(images))))
        return self.fc(x.mean((2, 3)))


CIFAR_MODELS = {  # name: (stage-1 width, gate); Table 6's parameter counts 2.7M, 2.8M, 3.5M, 16.8M
    "resnet64d": (64, None), "se_resnet64d": (64, "se"), "encnet16k64d": (64, 16), "encnet32k128d": (128, 32)}


def build_cifar(name, encoding_drop=True):
    """One of Table 6's networks; the EncNets use EncodingDrop unless encoding_drop=False."""
    if name not in CIFAR_MODELS:
        raise ValueError(f"unknown CIFAR model {name!r}; choose from {sorted(CIFAR_MODELS)}")
    width, gate = CIFAR_MODELS[name]
    if gate == "se":
        return CifarNet(width, SEGate)
    if gate is None:
        return CifarNet(width)
    return CifarNet(width, lambda channels: EncodingGate(channels, gate, encoding_drop))
