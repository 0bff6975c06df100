"""The paper's models: dilated ResNets, FCN, EncNet (Sec. 2.1, Fig. 2–3), their loss, and the CIFAR-10 nets (Table 6).

    resnet(name)      dilated ResNet, output stride 8, torchvision's parameter names
    FCN               backbone + FCN head: the paper's baseline
    EncNet            backbone + Context Encoding Module + SE-losses on stages 3 and 4
    seg_loss          per-pixel CE + α·BCE SE-losses + auxiliary CE, one function for both models
    model_from_args   FCN or EncNet from a dict of train_seg.py's arguments (a checkpoint's 'args')
    build_cifar       the four 14-layer networks of Table 6

Needs only torch and layers.py: copy the two files. The published EncNets differ from the paper's model
in a few switches, all constructor options here whose defaults are the paper's (align_corners,
stage3_encoding, dropout2d, residual_gate, the 'resnet50s' and 'resnet50v1c' stems); zoo.py reads their files.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Encoding, EncodingDrop, EncModule, encoded_semantics, se_targets, semantic_encoder

# ----------------------------------------------------------------------------- dilated ResNet

class BasicBlock(nn.Module):
    expansion = 1

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
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

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
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


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

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


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
    channels (nn.Dropout2d, mmsegmentation). Identity in eval mode either way."""
    return nn.Dropout2d(p) if channelwise else nn.Dropout(p)


def fcn_head(cin, width, num_classes, dropout, dropout2d=False):
    """3×3 conv → BN → ReLU → dropout → 1×1 conv classifier."""
    return nn.Sequential(conv_bn_relu(cin, width, 3), dropout_layer(dropout, dropout2d),
                         nn.Conv2d(width, num_classes, 1))


def upsample(logits, size, align_corners):  # B×K×h×w → B×K×H×W, bilinear (×8 at output stride 8)
    return F.interpolate(logits, size, mode="bilinear", align_corners=align_corners)


class FCN(nn.Module):
    """Dilated FCN (the paper's baseline): backbone → FCN head on stage 4 → bilinear ×8.

    Training forward → {'seg': B×K×H×W logits[, 'aux': logits of the stage-3 head]};
    eval forward → B×K×H×W logits at the input's resolution. align_corners and dropout2d as in EncNet.
    """

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
        logits = upsample(self.head(c4), size, self.align_corners)
        if not self.training:
            return logits
        out = {"seg": logits}
        if self.aux_head is not None:
            out["aux"] = upsample(self.aux_head(c3), size, self.align_corners)
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
    """

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
        logits = upsample(self.classifier(x), size, self.align_corners)
        if not self.training:
            return logits
        out = {"seg": logits}
        if se_logits is not None:
            out["se"] = [se_logits]
            if self.stage3_encoding is not None:
                out["se"].append(self.stage3_encoding(c3))
        if self.aux_head is not None:
            out["aux"] = upsample(self.aux_head(c3), size, self.align_corners)
        return out


def seg_loss(outputs, labels, num_classes, se_weight=0.2, aux_weight=0.2, num_pixels=None):
    """Total training loss and its terms: CE + se_weight·Σ BCE(SE) + aux_weight·CE(aux) (Sec. 2–3).

    outputs: the training-mode dict of FCN/EncNet; labels: B×H×W int64 with −1 = ignore.
    Per-pixel losses are summed per image and divided by `num_pixels`: a number or one per image (B),
    default this batch's labelled pixels (PyTorch's ignore_index mean). Recipes differ here: mmsegmentation
    divides by all pixels, ignored ones included, the released code by the labelled pixels of each GPU's
    share; a distributed run passes what makes the processes' average the global one (train_seg.loss_divisors).
    Returns (loss, {'seg': …, 'se': …, 'aux': …}) with the unweighted terms, detached.
    """
    if num_pixels is None:
        num_pixels = (labels != -1).sum().clamp_min(1)

    def pixel_ce(logits):  # B×K×H×W logits → Σ_images (Σ_pixels CE) / num_pixels
        per_image = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="none").flatten(1).sum(1)
        return (per_image / num_pixels).sum()

    terms = {"seg": pixel_ce(outputs["seg"])}
    loss = terms["seg"]
    if "se" in outputs:
        targets = se_targets(labels, num_classes)
        terms["se"] = sum(F.binary_cross_entropy_with_logits(s.float(), targets) for s in outputs["se"])
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
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)
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


CIFAR_MODELS = {  # name: (stage-1 width, gate); Table 6 parameter counts 2.7M, 2.8M, 3.5M, 16.8M
    "resnet64d": (64, None),
    "se_resnet64d": (64, "se"),
    "encnet16k64d": (64, 16),
    "encnet32k128d": (128, 32),
}


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
