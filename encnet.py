"""Models of the paper: dilated ResNets, FCN, EncNet (Sec. 2.1, Fig. 2–3) and the CIFAR-10 nets (Table 6).

    resnet(name)      dilated ResNet, output stride 8, torchvision's parameter names
    FCN               backbone + FCN head: the paper's baseline
    EncNet            backbone + Context Encoding Module + SE-losses on stages 3 and 4
    seg_loss          per-pixel CE + α·BCE SE-losses + auxiliary CE, one function for both models
    build_model       a segmentation model from a checkpoint's 'args' dict
    build_cifar       the four 14-layer networks of Table 6
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Encoding, EncodingDrop, EncModule, se_targets

# torchvision's published ImageNet weights (IMAGENET1K_V1), the ones the paper-era models started from.
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet152": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
}


# ----------------------------------------------------------------------------- dilated ResNet

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        # stride on the 3×3 conv ("ResNet v1.5"), as torchvision and the released code
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


ARCHITECTURES = {  # name: (block, blocks per stage, deep stem)
    "resnet18": (BasicBlock, [2, 2, 2, 2], False),
    "resnet34": (BasicBlock, [3, 4, 6, 3], False),
    "resnet50": (Bottleneck, [3, 4, 6, 3], False),
    "resnet101": (Bottleneck, [3, 4, 23, 3], False),
    "resnet152": (Bottleneck, [3, 8, 36, 3], False),
    "resnet50s": (Bottleneck, [3, 4, 6, 3], True),
    "resnet101s": (Bottleneck, [3, 4, 23, 3], True),
    "resnet152s": (Bottleneck, [3, 8, 36, 3], True),
}


class ResNet(nn.Module):
    """Dilated ResNet without its classifier (Sec. 3.1, Fig. 3).

    Stages 3 and 4 keep stride 1 and dilate their 3×3 convs by 2 and 4, so the output stride is 8
    (the first block of each stage at the lower rate, 1 and 2, as in the released code).
    Parameter names are torchvision's, so `state_dict()` of resnet50/101/152 equals torchvision's
    minus `fc.*`. `width` scales every stage (64 = the standard nets; smaller for CPU toys).
    forward(images B×3×H×W) → [stage1, stage2, stage3, stage4] features.
    """

    def __init__(self, block, blocks, deep_stem=False, dilated=True, width=64, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.norm_layer = norm_layer
        if deep_stem:  # the released "resnet50s": three 3×3 convs instead of one 7×7
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, width, 3, 2, 1, bias=False), norm_layer(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, 1, 1, bias=False), norm_layer(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, 2 * width, 3, 1, 1, bias=False))
            self.inplanes = 2 * width
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.inplanes = width
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, blocks[0])
        self.layer2 = self._make_layer(block, 2 * width, blocks[1], stride=2)
        if dilated:
            self.layer3 = self._make_layer(block, 4 * width, blocks[2], dilation=2)
            self.layer4 = self._make_layer(block, 8 * width, blocks[3], dilation=4)
        else:
            self.layer3 = self._make_layer(block, 4 * width, blocks[2], stride=2)
            self.layer4 = self._make_layer(block, 8 * width, blocks[3], stride=2)
        self.channels = [c * block.expansion for c in (width, 2 * width, 4 * width, 8 * width)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, num_blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                self.norm_layer(planes * block.expansion))
        first_dilation = max(1, dilation // 2)
        layers = [block(self.inplanes, planes, stride, first_dilation, downsample, self.norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation, None, self.norm_layer) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def load_backbone_weights(backbone, source, name):
    """Load ImageNet weights strictly: 'imagenet' (torchvision's, via torch.hub's cache), a path or a URL.

    The released code loaded with strict=False, so a wrong file silently meant training from
    scratch. Here any missing, unexpected or mis-shaped key is an error that lists them.
    """
    if source == "imagenet":
        if name not in IMAGENET_URLS:
            raise ValueError(f"no torchvision ImageNet weights exist for {name} (deep stem); "
                             f"pass --pretrained PATH_OR_URL to the released weights")
        source = IMAGENET_URLS[name]
    if "://" in source:
        state = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
    elif os.path.isfile(source):
        state = torch.load(source, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"--pretrained {source}: no such file (and not 'imagenet' or a URL)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier
    load_strict(backbone, state, source)


def load_strict(module, state_dict, source):
    """module.load_state_dict(state_dict, strict=True), with an error that names what differs:
    missing and unexpected keys (and the modules they belong to) and mismatched shapes."""
    own = module.state_dict()
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    mis_shaped = [f"{k}: {tuple(state_dict[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
                  for k in sorted(own.keys() & state_dict.keys()) if state_dict[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        lines = [f"{source} does not fit this model ({type(module).__name__}):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                modules = ", ".join(dict.fromkeys(k.split(".")[0] for k in keys))
                lines.append(f"  {len(keys)} {title} keys in {modules}: {', '.join(keys[:6])}"
                             + (", …" if len(keys) > 6 else ""))
        lines += [f"  shape mismatch {m}" for m in mis_shaped[:6]]
        raise ValueError("\n".join(lines))
    module.load_state_dict(state_dict)


def resnet(name, pretrained=None, dilated=True, width=64, norm_layer=nn.BatchNorm2d):
    """Backbone by name ('resnet18' … 'resnet152s'); pretrained: None, 'imagenet', a path or a URL."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(ARCHITECTURES)}")
    block, blocks, deep_stem = ARCHITECTURES[name]
    backbone = ResNet(block, blocks, deep_stem, dilated, width, norm_layer)
    if pretrained:
        load_backbone_weights(backbone, pretrained, name)
    return backbone


# ----------------------------------------------------------------------------- segmentation models

def conv_bn_relu(cin, cout, kernel, norm_layer=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         norm_layer(cout), nn.ReLU(inplace=True))


def fcn_head(cin, width, num_classes, dropout, norm_layer):
    """3×3 conv → BN → ReLU → dropout → 1×1 conv classifier."""
    return nn.Sequential(conv_bn_relu(cin, width, 3, norm_layer), nn.Dropout(dropout),
                         nn.Conv2d(width, num_classes, 1))


def upsample(logits, size):  # B×K×h×w → B×K×H×W, bilinear (×8 at output stride 8)
    return F.interpolate(logits, size, mode="bilinear", align_corners=False)


class FCN(nn.Module):
    """Dilated FCN (the paper's baseline): backbone → FCN head on stage 4 → bilinear ×8.

    Training forward → {'seg': B×K×H×W logits[, 'aux': logits of the stage-3 head]};
    eval forward → B×K×H×W logits at the input's resolution.
    """

    def __init__(self, num_classes, backbone="resnet50", pretrained=None, dropout=0.1, aux=False,
                 head_width=512, width=64, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.backbone = resnet(backbone, pretrained, width=width, norm_layer=norm_layer)
        c3, c4 = self.backbone.channels[2:]
        self.head = fcn_head(c4, head_width, num_classes, dropout, norm_layer)
        self.aux_head = fcn_head(c3, c3 // 4, num_classes, dropout, norm_layer) if aux else None

    def forward(self, images):
        size = images.shape[-2:]
        _, _, c3, c4 = self.backbone(images)
        logits = upsample(self.head(c4), size)
        if not self.training:
            return logits
        out = {"seg": logits}
        if self.aux_head is not None:
            out["aux"] = upsample(self.aux_head(c3), size)
        return out


class StageEncoding(nn.Module):
    """The light Context Encoding Module on stage 3 (Sec. 2.1, Fig. 3): only its SE-loss is used.

    1×1 conv (reduce) → Encoding → BN + ReLU → mean over codewords → FC → class-presence logits.
    """

    def __init__(self, channels, width, num_classes, num_codes, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.reduce = conv_bn_relu(channels, width, 1, norm_layer)
        norm_1d = nn.BatchNorm1d if norm_layer is nn.BatchNorm2d else norm_layer
        self.encoding = nn.Sequential(Encoding(width, num_codes), norm_1d(num_codes),
                                      nn.ReLU(inplace=True)) if num_codes > 0 else None
        self.se_classifier = nn.Linear(width, num_classes)

    def forward(self, x):  # B×C×H×W → B×num_classes
        features = self.reduce(x)
        if self.encoding is None:
            return self.se_classifier(features.mean((2, 3)))
        return self.se_classifier(self.encoding(features).mean(1))


class EncNet(nn.Module):
    """Context Encoding Network (Sec. 2.1, Fig. 2).

    stage 4 → conv5 (3×3 → head_width) [+ lateral fusion of stages 2–3] → EncModule (K codewords)
    → dropout → 1×1 conv → bilinear ×8. SE-losses on the EncModule's encoded semantics (stage 4)
    and, as in Fig. 3, on a light second module on stage 3. Options: the released code's
    auxiliary FCN head on stage 3 (`aux`), its residual gate relu(x + x ⊗ γ) (`residual_gate`),
    num_codes=0 for global average pooling instead of the Encoding layer (Fig. 5's K = 0).

    Training forward → {'seg': logits, 'se': [stage-4 SE logits, stage-3 SE logits], 'aux': …};
    eval forward → B×K×H×W logits at the input's resolution (the SE branches are skipped).
    """

    def __init__(self, num_classes, backbone="resnet50", pretrained=None, num_codes=32, se_loss=True,
                 aux=False, lateral=False, residual_gate=False, dropout=0.1, head_width=512, width=64,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.backbone = resnet(backbone, pretrained, width=width, norm_layer=norm_layer)
        c2, c3, c4 = self.backbone.channels[1:]
        self.conv5 = conv_bn_relu(c4, head_width, 3, norm_layer)
        if lateral:  # fuse stage 2 and 3 features at the same stride 8 (released code, PASCAL)
            self.lateral = nn.ModuleList([conv_bn_relu(c2, head_width, 1, norm_layer),
                                          conv_bn_relu(c3, head_width, 1, norm_layer)])
            self.fusion = conv_bn_relu(3 * head_width, head_width, 3, norm_layer)
        else:
            self.lateral = None
        self.enc_module = EncModule(head_width, num_classes, num_codes, se_loss, residual_gate, norm_layer)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Conv2d(head_width, num_classes, 1))
        self.stage3_encoding = (StageEncoding(c3, head_width // 2, num_classes, num_codes, norm_layer)
                                if se_loss else None)
        self.aux_head = fcn_head(c3, c3 // 4, num_classes, dropout, norm_layer) if aux else None

    def forward(self, images):
        size = images.shape[-2:]
        _, c2, c3, c4 = self.backbone(images)
        x = self.conv5(c4)
        if self.lateral is not None:
            x = self.fusion(torch.cat([x, self.lateral[0](c2), self.lateral[1](c3)], 1))
        x, se_logits = self.enc_module(x)
        logits = upsample(self.classifier(x), size)
        if not self.training:
            return logits
        out = {"seg": logits}
        if se_logits is not None:
            out["se"] = [se_logits, self.stage3_encoding(c3)]
        if self.aux_head is not None:
            out["aux"] = upsample(self.aux_head(c3), size)
        return out


def seg_loss(outputs, labels, num_classes, se_weight=0.2, aux_weight=0.2, num_pixels=None):
    """Total training loss and its terms: CE + se_weight·Σ BCE(SE) + aux_weight·CE(aux) (Sec. 2–3).

    outputs: the training-mode dict of FCN/EncNet; labels: B×H×W int64 with −1 = ignore.
    Per-pixel losses are summed and divided by `num_pixels` (default: this batch's labelled
    pixels; a distributed run passes the global count / world size so that its mean equals
    the single-process one even when ranks hold different numbers of labelled pixels).
    Returns (loss, {'seg': …, 'se': …, 'aux': …}) with the unweighted terms, detached.
    """
    if num_pixels is None:
        num_pixels = (labels != -1).sum().clamp_min(1)

    def pixel_ce(logits):
        return F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum") / num_pixels

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


def build_model(args):
    """FCN or EncNet from a dict of train_seg.py's arguments (a checkpoint's 'args' holds them)."""
    common = dict(num_classes=args["num_classes"], backbone=args["backbone"], dropout=args["dropout"],
                  aux=args["aux"], head_width=args["head_width"], width=args["width"])
    if args["model"] == "fcn":
        return FCN(**common)
    if args["model"] == "encnet":
        return EncNet(**common, num_codes=args["num_codes"], se_loss=args["se_loss"],
                      lateral=args["lateral"], residual_gate=args["residual_gate"])
    raise ValueError(f"unknown model {args['model']!r}")


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
