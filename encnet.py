"""Models of the paper: dilated ResNets, FCN, EncNet (Sec. 2.1, Fig. 2–3) and the CIFAR-10 nets (Table 6),
and loading of trained EncNets: this project's checkpoints and the two public model zoos.

    resnet(name)           dilated ResNet, output stride 8, torchvision's parameter names
    load_backbone_weights  ImageNet weights into a backbone, strictly (the one way to load them)
    FCN                    backbone + FCN head: the paper's baseline
    EncNet                 backbone + Context Encoding Module + SE-losses on stages 3 and 4
    seg_loss               per-pixel CE + α·BCE SE-losses + auxiliary CE, one function for both models
    model_from_args        a segmentation model from a train_seg.py checkpoint's 'args' dict
    load_model             (model, info) from a train_seg.py checkpoint, a file of either model zoo or a zoo name
    fetch                  a file downloaded once into torch.hub's cache, hash-checked
    build_cifar            the four 14-layer networks of Table 6

The published EncNets differ from the paper's model in a few switches, all constructor options
here whose defaults are the paper's: the authors' zoo upsamples with align_corners=True; neither
zoo has the second Context Encoding Module on stage 3 (stage3_encoding=False); mmsegmentation
drops whole channels before its classifiers (dropout2d=True) and uses the ResNetV1c stem
(backbones 'resnet50v1c', 'resnet101v1c'). Both zoos store the Encoding layer's smoothing factors
negated; the converters flip the sign, so `layers.Encoding` keeps the paper's convention.
"""
import hashlib
import os
import shutil
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Encoding, EncodingDrop, EncModule, se_targets

# torchvision's published ImageNet weights (IMAGENET1K_V1), the ones the paper-era models started from.
# As in all of torchvision's file names, the 8 hex digits before ".pth" begin the file's SHA-256.
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


def load_backbone_weights(backbone, source, name):
    """Load ImageNet weights into `backbone` strictly: 'imagenet' (torchvision's), a path or a URL.

    Downloads land in torch.hub's cache once (torchvision's are checked against the SHA-256 in
    their name). The released code loaded with strict=False, so a wrong file silently meant
    training from scratch. Here any missing, unexpected or mis-shaped key is an error that lists them.
    """
    if source == "imagenet":
        if name not in IMAGENET_URLS:
            raise ValueError(f"no torchvision ImageNet weights exist for {name} (deep stem); "
                             f"pass --pretrained PATH_OR_URL to the released weights")
        url = IMAGENET_URLS[name]
        try:
            path = fetch(url, file_name(url), ("sha256", hash_in_name(url)))
        except DownloadError as e:
            raise DownloadError(f"ImageNet weights of {name}: {e}. Or pass --pretrained PATH (a copy of the file) "
                                f"or --pretrained none (random initialisation)") from None
    elif "://" in source:
        path = fetch(source, file_name(source))
    elif os.path.isfile(source):
        path = source
    else:
        raise FileNotFoundError(f"--pretrained {source}: no such file (and not 'imagenet' or a URL)")
    state = {k: v for k, v in load_file(path).items() if not k.startswith("fc.")}  # the ImageNet classifier
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


def load_file(path):
    """torch.load with weights_only=True: tensors and plain values only, never someone else's code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusal, or a damaged file
        raise ValueError(f"{path}: refused to load, it is not a plain checkpoint of tensors and values "
                         f"(loaded with weights_only=True): {str(e).splitlines()[0]}") from None


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

    1×1 conv (reduce) → Encoding → BN + ReLU → mean over codewords → FC → class-presence logits.
    """

    def __init__(self, channels, width, num_classes, num_codes):
        super().__init__()
        self.reduce = conv_bn_relu(channels, width, 1)
        self.encoding = nn.Sequential(Encoding(width, num_codes), nn.BatchNorm1d(num_codes),
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


# ----------------------------------------------------------------------------- downloads

class DownloadError(Exception):
    """A download failed, or its hash differs from the published one. The message is one line."""


def file_name(url):
    return url.rsplit("/", 1)[-1]


def hash_in_name(url):
    """The SHA-256 prefix that ends torchvision's and mmsegmentation's file names: 'x-0676ba61.pth' → '0676ba61'."""
    return os.path.splitext(file_name(url))[0].rsplit("-", 1)[-1]


def fetch(url, filename, check=None):
    """Local path of `filename`: downloaded from `url` into torch.hub's cache the first time, then reused.

    check: None or (hash algorithm, published hex digest or its first digits), e.g. ("sha256", "0676ba61").
    A download whose hash differs is deleted, never moved into place. A URL ending in .zip is
    unpacked: `filename` is the archive member kept (and the one checked). Offline, a copy of the
    file put at the returned path by hand is used as it is; the DownloadError says where.
    """
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    download = f"{path}.{os.getpid()}.download"  # process-private names: ranks may download at once
    unpacked = f"{path}.{os.getpid()}.unpacked"
    try:
        try:
            torch.hub.download_url_to_file(url, download)
        except OSError as e:  # URLError, HTTPError, timeouts: all OSErrors
            unzipped = " (unzipped)" if url.endswith(".zip") else ""
            raise DownloadError(f"cannot download {url} ({getattr(e, 'reason', e)}); a copy of {filename}{unzipped} "
                                f"put at {path} is used instead") from None
        if url.endswith(".zip"):
            try:
                with zipfile.ZipFile(download) as archive, archive.open(filename) as src, \
                        open(unpacked, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (zipfile.BadZipFile, KeyError):
                raise DownloadError(f"{url} is not a zip archive holding {filename}") from None
            os.remove(download)
        else:
            os.replace(download, unpacked)
        if check is not None:
            algorithm, published = check
            with open(unpacked, "rb") as f:
                digest = hashlib.file_digest(f, algorithm).hexdigest()
            if not digest.startswith(published):
                raise DownloadError(f"{filename} downloaded from {url} has {algorithm} {digest}, the published one "
                                    f"is {published}: the file is damaged or not the published one, and was deleted")
        os.replace(unpacked, path)  # atomic: the cache never holds a partial or unchecked file
    finally:
        for leftover in (download, unpacked):
            if os.path.exists(leftover):
                os.remove(leftover)
    return path


# ----------------------------------------------------------------------------- model zoos

# The authors' zoo: name → SHA-1 of the .pth. The URL serves a zip `{name}-{sha1[:8]}.zip` holding
# `{name}-{sha1[:8]}.pth`; the released code checks the full SHA-1, so does `download`.
RELEASED_URL = "https://s3.us-west-1.wasabisys.com/encoding/models/{file}.zip"
RELEASED_SHA1 = {
    "encnet_resnet50s_pcontext": "4de91d5922d4d3264f678b663f874da72e82db00",
    "encnet_resnet101s_pcontext": "9f27ea13d514d7010e59988341bcbd4140fcc33d",
    "encnet_resnet50s_ade": "07ac287cd77e53ea583f37454e17d30ce1509a4a",
    "encnet_resnet101s_ade": "3f54fa3b67bac7619cd9b3673f5c8227cf8f4718",
}

# mmsegmentation's EncNets (ResNetV1c "-d8", 512×512 crops on ADE20K, 512×1024 on Cityscapes):
# name → (config, date and hash); the file name ends in the first 8 hex digits of its SHA-256.
MMSEG_URL = "https://download.openmmlab.com/mmsegmentation/v0.5/encnet/{config}/{config}_{stamp}.pth"
MMSEG_FILES = {
    "mmseg_encnet_r50-d8_ade20k_80k": ("encnet_r50-d8_512x512_80k_ade20k", "20200622_042412-44b46b04"),
    "mmseg_encnet_r101-d8_ade20k_80k": ("encnet_r101-d8_512x512_80k_ade20k", "20200622_101128-dd35e237"),
    "mmseg_encnet_r50-d8_ade20k_160k": ("encnet_r50-d8_512x512_160k_ade20k", "20200622_101059-b2db95e0"),
    "mmseg_encnet_r101-d8_ade20k_160k": ("encnet_r101-d8_512x512_160k_ade20k", "20200622_073348-7989641f"),
    "mmseg_encnet_r50-d8_cityscapes_80k": ("encnet_r50-d8_512x1024_80k_cityscapes", "20200622_003554-fc5c5624"),
    "mmseg_encnet_r101-d8_cityscapes_80k": ("encnet_r101-d8_512x1024_80k_cityscapes", "20200622_003555-1de64bec"),
}


def download(name):
    """Local path of the zoo checkpoint `name`, downloaded and hash-checked the first time."""
    if name in RELEASED_SHA1:
        sha1 = RELEASED_SHA1[name]
        stem = f"{name}-{sha1[:8]}"
        return fetch(RELEASED_URL.format(file=stem), stem + ".pth", ("sha1", sha1))
    config, stamp = MMSEG_FILES[name]
    url = MMSEG_URL.format(config=config, stamp=stamp)
    return fetch(url, file_name(url), ("sha256", hash_in_name(url)))


# Key prefixes of each zoo → this repo's names (first match wins). A key no rule covers keeps
# its name, so that load_strict reports it as unexpected: nothing in a file is skipped silently.
RELEASED_KEYS = [
    ("pretrained.", "backbone."),  # resnet50s/101s: torchvision's names, deep stem conv1.{0,1,3,4,6} + bn1
    ("head.conv5.", "conv5."),  # 3×3 conv 2048→512, BN
    ("head.connect.", "lateral."),  # PASCAL: 1×1 convs of stages 2 and 3, BN ...
    ("head.fusion.", "fusion."),  # ... and the 3×3 conv over the concatenation
    # their EncModule.encoding is one Sequential: conv, BN, ReLU, Encoding, BN1d, ReLU, Mean
    ("head.encmodule.encoding.0.", "enc_module.reduce.0."),
    ("head.encmodule.encoding.1.", "enc_module.reduce.1."),
    ("head.encmodule.encoding.3.", "enc_module.encoding.0."),  # codewords, scale (= −s_k)
    ("head.encmodule.encoding.4.", "enc_module.encoding.1."),
    ("head.encmodule.fc.0.", "enc_module.attention."),  # fc = Linear, Sigmoid: γ
    ("head.encmodule.selayer.", "enc_module.se_classifier."),
    ("head.conv6.1.", "classifier.1."),  # conv6 = Dropout, 1×1 conv
    ("auxlayer.conv5.0.", "aux_head.0.0."),  # conv5 = conv, BN, ReLU, Dropout, 1×1 conv
    ("auxlayer.conv5.1.", "aux_head.0.1."),
    ("auxlayer.conv5.4.", "aux_head.2."),
]
MMSEG_KEYS = [
    ("backbone.stem.0.", "backbone.conv1.0."),  # ResNetV1c stem: conv, BN, ReLU ×3 ...
    ("backbone.stem.1.", "backbone.conv1.1."),
    ("backbone.stem.3.", "backbone.conv1.3."),
    ("backbone.stem.4.", "backbone.conv1.4."),
    ("backbone.stem.6.", "backbone.conv1.6."),
    ("backbone.stem.7.", "backbone.bn1."),  # ... whose last BN is ResNet's bn1 here
    ("backbone.layer", "backbone.layer"),  # the four stages: torchvision's names
    ("decode_head.bottleneck.conv.", "conv5.0."),
    ("decode_head.bottleneck.bn.", "conv5.1."),
    ("decode_head.lateral_convs.0.conv.", "lateral.0.0."),  # add_lateral=True (no published config uses it)
    ("decode_head.lateral_convs.0.bn.", "lateral.0.1."),
    ("decode_head.lateral_convs.1.conv.", "lateral.1.0."),
    ("decode_head.lateral_convs.1.bn.", "lateral.1.1."),
    ("decode_head.fusion.conv.", "fusion.0."),
    ("decode_head.fusion.bn.", "fusion.1."),
    ("decode_head.enc_module.encoding_project.conv.", "enc_module.reduce.0."),
    ("decode_head.enc_module.encoding_project.bn.", "enc_module.reduce.1."),
    ("decode_head.enc_module.encoding.0.", "enc_module.encoding.0."),  # codewords, scale (= −s_k)
    ("decode_head.enc_module.encoding.1.", "enc_module.encoding.1."),  # BN over the K encoders
    ("decode_head.enc_module.fc.0.", "enc_module.attention."),
    ("decode_head.se_layer.", "enc_module.se_classifier."),
    ("decode_head.conv_seg.", "classifier.1."),
    ("auxiliary_head.convs.0.conv.", "aux_head.0.0."),
    ("auxiliary_head.convs.0.bn.", "aux_head.0.1."),
    ("auxiliary_head.conv_seg.", "aux_head.2."),
]


def convert(state, rules):
    """A zoo state_dict in this repo's names: prefixes renamed by `rules`, the smoothing factors negated
    (both zoos store −s_k, weights ∝ exp(scale·‖x − d‖²); `layers.Encoding` holds the paper's s_k)."""
    out = {}
    for key, value in state.items():
        old, new = next(((old, new) for old, new in rules if key.startswith(old)), ("", ""))
        out[new + key[len(old):]] = value
    if "enc_module.encoding.0.scale" in out:
        out["enc_module.encoding.0.scale"] = -out["enc_module.encoding.0.scale"]
    return out


def backbone_from_state(state, source):
    """The backbone name whose blocks per stage and stem width fit a converted state_dict (width 64)."""
    blocks = [len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5)]
    stem = state["backbone.conv1.0.weight"].shape[0] if "backbone.conv1.0.weight" in state else None
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    for name, (block, arch_blocks, arch_stem) in ARCHITECTURES.items():
        if (arch_blocks, arch_stem, block is Bottleneck) == (blocks, stem, bottleneck):
            return name
    raise ValueError(f"{source}: no backbone here has {blocks} blocks per stage and a stem of width {stem}")


def zoo_model_args(state, backbone, fmt, source):
    """The arguments (as model_from_args takes them) of the EncNet whose modules fit a converted zoo
    state_dict, read from its shapes: class count, head width, codewords, lateral fusion, SE classifier
    and auxiliary head; the zoo's conventions for the rest."""
    missing = [k for k in ("conv5.0.weight", "enc_module.encoding.0.codewords", "classifier.1.weight")
               if k not in state]
    if missing:
        raise ValueError(f"{source}: not a complete EncNet, it lacks (in this repo's names) {', '.join(missing)}")
    # both zoos: the residual gate relu(x + x ⊗ γ), no second Context Encoding Module on stage 3
    return dict(ARCHITECTURE, num_classes=state["classifier.1.weight"].shape[0], backbone=backbone,
                num_codes=state["enc_module.encoding.0.codewords"].shape[0],
                se_loss="enc_module.se_classifier.weight" in state, aux="aux_head.2.weight" in state,
                lateral="lateral.0.0.weight" in state, head_width=state["conv5.0.weight"].shape[0],
                residual_gate=True, stage3_encoding=False, align_corners=fmt == "released", dropout2d=fmt == "mmseg")


def checkpoint_format(checkpoint, source):
    """'train_seg', 'mmseg' or 'released', told by the keys; ValueError naming them otherwise."""
    keys = [str(k) for k in checkpoint] if isinstance(checkpoint, dict) else []
    if {"model", "args"} <= set(keys):
        return "train_seg"
    inner = checkpoint.get("state_dict") if keys else None
    if isinstance(inner, dict) and any(str(k).startswith("decode_head.") for k in inner):
        return "mmseg"
    if any(k.startswith("pretrained.") for k in keys) and any(k.startswith("head.") for k in keys):
        return "released"
    found = ", ".join(keys[:8]) + (", …" if len(keys) > 8 else "") if keys else type(checkpoint).__name__
    raise ValueError(f"{source}: not a train_seg.py checkpoint, nor an EncNet of the authors' zoo "
                     f"(pretrained.*, head.*) or of mmsegmentation (state_dict: decode_head.*); it holds: {found}")


# Class count → dataset of the published models (the released code and mmsegmentation drop
# ADE20K's "other" and PASCAL-Context's background; VOC counts its background as a class).
DATASET_OF = {150: "ade20k", 59: "pcontext", 19: "cityscapes", 21: "pascal_voc"}


def eval_sizes(fmt, dataset, backbone):
    """(crop_size, base_size) with which eval.py infers as the code that made the weights.

    Authors' zoo: its table, crop 480 / base 520 (ADE20K ResNet-101: 576 / 640), sliding windows as here.
    mmsegmentation: one whole-image forward at its test scale. It resizes the short side of ADE20K
    (and VOC) images to 512, a long side of 683 for their common 4:3 shape; Cityscapes keeps its
    2048×1024 images. crop_size = base_size makes eval.py's window the whole image. (Its training
    crops were 512×512 and 512×1024.)
    """
    if fmt == "released":
        return (576, 640) if (dataset, backbone) == ("ade20k", "resnet101s") else (480, 520)
    return (2048, 2048) if dataset == "cityscapes" else (683, 683)


def class_names(dataset, num_classes, meta):
    """(classes, palette): the file's own (mmsegmentation's meta) where it has them, else the dataset's
    from classes.json, else numbered classes with distinct colours."""
    own = meta.get("dataset_meta", meta)  # mmsegmentation ≥ 1.0 nests them, the 2020 files do not
    classes, palette = own.get("classes", own.get("CLASSES")), own.get("palette", own.get("PALETTE"))
    if classes is None or palette is None:
        import data  # here, not at the top: only loading a zoo file needs the class lists
        try:
            info = data.dataset_info(dataset)
            classes, palette = info["classes"], info["palette"]
        except ValueError:
            classes = [f"class {i}" for i in range(num_classes)]
            palette = [[37 * i % 256, 97 * i % 256, 157 * i % 256] for i in range(num_classes)]
    return [str(c) for c in classes], [[int(v) for v in c] for c in palette]


def load_model(source):
    """(model, info) from a train_seg.py checkpoint, a file of the authors' or mmsegmentation's zoo,
    or a zoo name (see RELEASED_SHA1, MMSEG_FILES; downloaded once into torch.hub's cache).

    The model is built to fit the file, loaded strictly and returned in eval mode: `model(images)`
    on ImageNet-normalised RGB (B×3×H×W) gives the full-resolution logits of the code that made
    the file.
    info: format ('train_seg', 'released', 'mmseg'), name, source, path, dataset, num_classes,
    classes, palette, crop_size and base_size for eval.py, backbone, 'args' (the model's arguments as
    model_from_args takes them; a train_seg.py checkpoint's are all its run's), and for train_seg 'data_root'.
    """
    is_zoo_name = source in RELEASED_SHA1 or source in MMSEG_FILES
    path = download(source) if is_zoo_name else source
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: no such file, and not a zoo name "
                                f"({', '.join(list(RELEASED_SHA1) + list(MMSEG_FILES))})")
    checkpoint = load_file(path)
    fmt = checkpoint_format(checkpoint, path)
    if fmt == "train_seg":  # its 'optimizer', 'iter', 'epoch' are training state, not the model's
        args = checkpoint["args"]
        model, state = model_from_args(args), checkpoint["model"]
        info = dict(dataset=args["data"], num_classes=args["num_classes"], classes=checkpoint["classes"],
                    palette=checkpoint["palette"], base_size=args["base_size"],
                    # windows of the training crop; after non-square crops, the whole image (see train_seg.eval_crop)
                    crop_size=args["crop_size"] if isinstance(args["crop_size"], int) else args["base_size"],
                    backbone=args["backbone"], data_root=args.get("data_root"), args=args)
    else:
        if fmt == "mmseg":  # 'meta' also describes the run (config, versions); 'optimizer' is training state
            state, meta = convert(checkpoint["state_dict"], MMSEG_KEYS), checkpoint.get("meta") or {}
        else:
            state, meta = convert(checkpoint, RELEASED_KEYS), {}
        backbone = backbone_from_state(state, path)
        args = zoo_model_args(state, backbone, fmt, path)
        model, num_classes = model_from_args(args), args["num_classes"]
        dataset = DATASET_OF.get(num_classes)
        classes, palette = class_names(dataset, num_classes, meta)
        crop_size, base_size = eval_sizes(fmt, dataset, backbone)
        info = dict(dataset=dataset, num_classes=num_classes, classes=classes, palette=palette,
                    crop_size=crop_size, base_size=base_size, backbone=backbone, args=args)
    load_strict(model, state, path)
    name = source if is_zoo_name else os.path.splitext(os.path.basename(path))[0]
    return model.eval(), {"format": fmt, "name": name, "source": source, "path": path, **info}


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
