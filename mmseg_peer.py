"""mmsegmentation 1.2.2's own EncNet, built from its wheel's files, for the benchmarks side by side with ours.

    mmseg_files  the wheel fetched once (pip download, SHA-256 checked) into ~/.cache/encnet, its model files unpacked
    load_mmseg   its ResNetV1c, EncHead and FCNHead imported with stand-ins for the few mmcv/mmengine names they use
    MmsegEncNet  EncNet-R50-d8 as its config builds it, with its losses; forward = whole-image inference
    mmseg_step   one iteration of mmengine's training loop for it (fp32, or fp16 AMP with a GradScaler)

Nothing of mmsegmentation is committed here; no mmcv build is needed. Used by bench.py and the tests that check
our model and step against it.
"""
import importlib
import os
import shutil
import subprocess
import sys
import types
import warnings
import zipfile
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo

# mmsegmentation's own EncNet, from its wheel: the files that build and train it, no install and no mmcv build.
MMSEG_VERSION = "1.2.2"
MMSEG_WHEEL = f"mmsegmentation-{MMSEG_VERSION}-py3-none-any.whl"
MMSEG_WHEEL_SHA256 = "dadf62bba00a65947d71b08471bc1fe2fee8e2d6eb740381eecd03991e204b47"  # PyPI's file
MMSEG_MODEL_FILES = ("models/backbones/resnet.py", "models/utils/res_layer.py", "models/utils/encoding.py",
                     "models/utils/wrappers.py", "models/decode_heads/decode_head.py", "models/decode_heads/enc_head.py",
                     "models/decode_heads/fcn_head.py", "models/losses/accuracy.py",
                     "models/losses/cross_entropy_loss.py", "models/losses/utils.py")
# Outside the repository (nothing of mmsegmentation is committed here): $ENCNET_CACHE, else ~/.cache/encnet. A machine
# without internet finds the wheel there, in wheels/, when it is copied along.
CACHE = os.environ.get("ENCNET_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "encnet")


def mmseg_files(cache=CACHE):
    """→ (folder holding mmseg/models/… of mmsegmentation 1.2.2, None), or (None, one line saying why not).

    The wheel is fetched once with `pip download --no-deps` into CACHE/wheels and its SHA-256 checked; the files
    listed in MMSEG_MODEL_FILES are unpacked beside it (atomically: a folder is complete or absent)."""
    folder = os.path.join(cache, f"mmsegmentation-{MMSEG_VERSION}")
    if all(os.path.isfile(os.path.join(folder, "mmseg", name)) for name in MMSEG_MODEL_FILES):
        return folder, None
    wheel = os.path.join(cache, "wheels", MMSEG_WHEEL)
    if not os.path.isfile(wheel):
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--retries", "0",
                   "--timeout", "20", "--dest", os.path.dirname(wheel), f"mmsegmentation=={MMSEG_VERSION}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            why = (done.stderr.strip().splitlines() or [f"pip exited with {done.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            why = "pip download took over 5 minutes"
        if not os.path.isfile(wheel):
            return None, f"not measured: the mmsegmentation {MMSEG_VERSION} wheel cannot be downloaded ({why})"
    digest = zoo.file_hash(wheel, "sha256")
    if digest != MMSEG_WHEEL_SHA256:
        return None, (f"not measured: {wheel} has sha256 {digest}, PyPI's {MMSEG_WHEEL} has {MMSEG_WHEEL_SHA256}; "
                      f"delete it to download it again")
    partial = f"{folder}.{os.getpid()}.partial"
    with zipfile.ZipFile(wheel) as archive:
        for name in MMSEG_MODEL_FILES:
            archive.extract(f"mmseg/{name}", partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder, None


# Stand-ins for the few names mmsegmentation's model files take from mmcv and mmengine, as the EncNet config
# uses them (configs/_base_/models/encnet_r50-d8.py: Conv2d, SyncBN, ReLU; no plugins, DCN or pixel sampler).

class BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """BatchNorm of inputs of any rank: what mmengine's revert_sync_batchnorm turns the config's SyncBN into on
    one GPU (its _BatchNormXd), for the B×C×H×W maps and the Encoding's B×K×C alike."""

    def _check_input_dim(self, input):
        pass


def build_norm_layer(cfg, num_features, postfix=""):
    """mmcv.cnn.build_norm_layer for BN and SyncBN → (name, layer), named 'bn{postfix}' as mmcv abbreviates it."""
    if cfg["type"] not in ("BN", "BN1d", "BN2d", "SyncBN"):
        raise NotImplementedError(f"stand-in build_norm_layer: {cfg['type']}")
    layer = BatchNormXd(num_features, eps=cfg.get("eps", 1e-5), momentum=cfg.get("momentum", 0.1))
    layer.requires_grad_(cfg.get("requires_grad", True))
    return f"bn{postfix}", layer


def build_conv_layer(cfg, *args, **kwargs):
    """mmcv.cnn.build_conv_layer for conv_cfg None (nn.Conv2d)."""
    if cfg is not None and cfg.get("type", "Conv2d") != "Conv2d":
        raise NotImplementedError(f"stand-in build_conv_layer: {cfg['type']}")
    return nn.Conv2d(*args, **kwargs)


class ConvModule(nn.Module):
    """mmcv.cnn.ConvModule as the EncNet config uses it: conv → norm → ReLU, submodules named as in mmsegmentation's
    checkpoints (conv, bn, activate); the conv has a bias only without a norm (bias='auto')."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias="auto", conv_cfg=None, norm_cfg=None, act_cfg=dict(type="ReLU"), inplace=True):
        super().__init__()
        bias = norm_cfg is None if bias == "auto" else bias
        self.conv = build_conv_layer(conv_cfg, in_channels, out_channels, kernel_size, stride, padding, dilation,
                                     groups, bias=bias)
        self.norm_name = None
        if norm_cfg is not None:
            self.norm_name, norm = build_norm_layer(norm_cfg, out_channels)
            self.add_module(self.norm_name, norm)
        if act_cfg is not None and act_cfg["type"] != "ReLU":
            raise NotImplementedError(f"stand-in ConvModule: activation {act_cfg['type']}")
        self.activate = nn.ReLU(inplace=inplace) if act_cfg is not None else None

    def forward(self, x):
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return x if self.activate is None else self.activate(x)


class BaseModule(nn.Module):
    """mmengine.model.BaseModule without its init_weights machinery: the benchmark copies one set of weights into
    both models, and initialisation does not change speed."""

    def __init__(self, init_cfg=None):
        super().__init__()
        self.init_cfg = init_cfg


class Sequential(nn.Sequential):
    """mmengine.model.Sequential (an nn.Sequential that takes init_cfg)."""

    def __init__(self, *modules, init_cfg=None):
        super().__init__(*modules)


def not_in_stand_in(*args, **kwargs):
    raise NotImplementedError("not needed by the EncNet config, so not given by bench.py's stand-ins")


def load_mmseg(folder):
    """mmsegmentation's ResNetV1c, EncHead and FCNHead classes (and its CrossEntropyLoss), imported from the files
    in `folder` as they are. Their imports from mmcv, mmengine and the rest of mmseg are answered by the stand-ins
    above; mmseg's package __init__ files (which import everything, mmcv's compiled ops included) never run.
    sys.modules is left as it was: the classes keep what they imported."""
    root = os.path.join(folder, "mmseg")

    def module(name, path=None, **names):
        m = types.ModuleType(name)
        m.__dict__.update(names)
        if path is not None:  # a package whose submodules are read from the wheel's files
            m.__path__ = [os.path.join(root, path)]
        return m

    losses = {}  # filled once cross_entropy_loss.py is imported; build_loss reads it at model construction

    def build_loss(cfg):
        cfg = dict(cfg)
        return losses[cfg.pop("type")](**cfg)

    stand_ins = [
        module("mmcv"),
        module("mmcv.cnn", ConvModule=ConvModule, build_conv_layer=build_conv_layer, build_norm_layer=build_norm_layer,
               build_plugin_layer=not_in_stand_in),
        module("mmengine"), module("mmengine.model", BaseModule=BaseModule, Sequential=Sequential),
        module("mmengine.utils"), module("mmengine.utils.dl_utils"),
        module("mmengine.utils.dl_utils.parrots_wrapper", _BatchNorm=nn.modules.batchnorm._BatchNorm),
        module("mmengine.fileio", load=not_in_stand_in),
        module("mmseg", ""), module("mmseg.registry", MODELS=SimpleNamespace(register_module=lambda: lambda c: c)),
        module("mmseg.utils", ConfigType=dict, SampleList=list),
        module("mmseg.structures", build_pixel_sampler=not_in_stand_in),
        module("mmseg.models", "models"), module("mmseg.models.builder", build_loss=build_loss),
        module("mmseg.models.backbones", "models/backbones"), module("mmseg.models.decode_heads", "models/decode_heads"),
        module("mmseg.models.losses", "models/losses"), module("mmseg.models.utils", "models/utils")]
    before = dict(sys.modules)
    sys.modules.update({m.__name__: m for m in stand_ins})
    try:
        package = {m.__name__: m for m in stand_ins}
        for name, attribute in (("utils.res_layer", "ResLayer"), ("utils.encoding", "Encoding"),
                                ("utils.wrappers", "resize"), ("losses.accuracy", "accuracy")):
            setattr(package[f"mmseg.models.{name.split('.')[0]}"], attribute,
                    getattr(importlib.import_module(f"mmseg.models.{name}"), attribute))
        losses["CrossEntropyLoss"] = importlib.import_module("mmseg.models.losses.cross_entropy_loss").CrossEntropyLoss
        return SimpleNamespace(
            ResNetV1c=importlib.import_module("mmseg.models.backbones.resnet").ResNetV1c,
            EncHead=importlib.import_module("mmseg.models.decode_heads.enc_head").EncHead,
            FCNHead=importlib.import_module("mmseg.models.decode_heads.fcn_head").FCNHead)
    finally:
        for name in set(sys.modules) - set(before):
            del sys.modules[name]
        sys.modules.update(before)


class MmsegEncNet(nn.Module):
    """mmsegmentation 1.2.2's EncNet-R50-d8 (configs/_base_/models/encnet_r50-d8.py, 150 classes as in its ADE20K
    configs) built from its own classes: ResNetV1c, EncHead (its materialised Encoding layer), FCNHead auxiliary
    head, its CrossEntropyLoss losses. width/head_width scale it down for CPU tests (64/512: the config).

    loss(images, samples) is EncoderDecoder.loss followed by BaseModel.parse_losses → (loss, log_vars);
    forward(images) is its whole-image inference (test_cfg mode='whole'): logits at the input's size."""

    def __init__(self, mm, num_classes=150, width=64, head_width=512):
        super().__init__()
        norm = dict(type="SyncBN", requires_grad=True)
        channels = [width * 4 << i for i in range(4)]  # 256, 512, 1024, 2048
        ce = dict(type="CrossEntropyLoss", use_sigmoid=False)
        with warnings.catch_warnings():  # CrossEntropyLoss warns about its avg_non_ignore=False default
            warnings.simplefilter("ignore", UserWarning)
            self.backbone = mm.ResNetV1c(depth=50, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                                         strides=(1, 2, 1, 1), norm_cfg=norm, norm_eval=False, style="pytorch",
                                         contract_dilation=True, stem_channels=width, base_channels=width)
            self.decode_head = mm.EncHead(
                in_channels=channels[1:], in_index=(1, 2, 3), channels=head_width, num_codes=32, use_se_loss=True,
                add_lateral=False, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm, align_corners=False,
                loss_decode=dict(ce, loss_weight=1.0),
                loss_se_decode=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.2))
            self.auxiliary_head = mm.FCNHead(
                in_channels=channels[2], in_index=2, channels=channels[2] // 4, num_convs=1, concat_input=False,
                dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm, align_corners=False,
                loss_decode=dict(ce, loss_weight=0.4))

    def loss(self, images, samples):
        """images B×3×H×W normalised; samples: one object per image with .gt_sem_seg.data 1×H×W (255 = ignore)."""
        features = self.backbone(images)
        losses = {f"decode.{k}": v for k, v in self.decode_head.loss(features, samples, {}).items()}
        losses.update({f"aux.{k}": v for k, v in self.auxiliary_head.loss(features, samples, {}).items()})
        log_vars = {k: v.mean() for k, v in losses.items()}
        loss = sum(v for k, v in log_vars.items() if "loss" in k)
        return loss, {"loss": loss, **log_vars}

    def forward(self, images):
        logits = self.decode_head.forward(self.backbone(images))[0]
        return F.interpolate(logits, images.shape[2:], mode="bilinear", align_corners=False)


def mmseg_step(model, optimizer, images, samples, lr, scaler=None):
    """One iteration of mmengine's loop (IterBasedTrainLoop) for this model: PolyLR sets the lr; BaseModel.train_step
    runs the forward and loss in OptimWrapper.optim_context (AmpOptimWrapper: fp16 autocast), then update_params:
    backward, step, zero_grad (AmpOptimWrapper: GradScaler's scale(loss).backward, step, update); then
    RuntimeInfoHook.after_train_iter hands every log variable to the MessageHub, which reads it with .item()."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(images.device.type, torch.float16, enabled=scaler is not None):
        loss, log_vars = model.loss(images, samples)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad()
    return {k: v.item() for k, v in log_vars.items()}
