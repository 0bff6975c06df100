"""Published and saved EncNets: reading their files, downloading them by name, converting both public zoos.

    load_model             (model, info) from a train_seg.py checkpoint, a file of either zoo, or a zoo name
    read_checkpoint        torch.load(weights_only=True) with one-line errors that say what the file is
    load_strict            load_state_dict(strict=True) with an error naming what differs
    load_backbone_weights  ImageNet weights into a backbone: published ones by name, a path or a URL
    fetch                  a file downloaded once into torch.hub's cache; its published hash checked on every use
    eval_sizes             the sizes a zoo file is evaluated at, as the code that made it

How each published model was trained: recipes.py. Its export for deployment: export.py.

The published EncNets differ from the paper's model in a few switches, all constructor options of
encnet.EncNet (see zoo_model_args): the authors' zoo upsamples with align_corners=True; neither zoo has
the second Context Encoding Module on stage 3; mmsegmentation drops whole channels before its classifiers
and uses the ResNetV1c stem. Both zoos store the Encoding layer's smoothing factors negated; `convert`
flips the sign, so `layers.Encoding` keeps the paper's convention.
"""
import hashlib
import os
import pickle
import re
import shutil
import zipfile

import torch

import data
import encnet
import layouts
import protocols
import recipes
from errors import CheckpointError, DownloadError, write_failure, writing


# ----------------------------------------------------------------------------- reading files

# weights_only's refusals of what a pickle would import, call or build, in the words of torch 1.13–2.13 (matched
# case-insensitively): 'Unsupported class os.system' (to 2.3), 'Unsupported global: GLOBAL io.open was not an
# allowed global by default' (2.4+), 'Trying to load unsupported GLOBAL posix.system whose module posix is blocked'
# (2.6+), 'Trying to call reduce for unrecognized function …' (REDUCE), 'Can only build …' (BUILD), 'Can only
# create new object for …' (NEWOBJ), '… must be imported to load …'. 'Unsupported operand' is a damaged pickle.
CODE_REFUSED = re.compile(r"unsupported (?:global|class)|whose module \S+ is blocked|not an allowed global|"
                          r"reduce for unrecognized function|can only (?:build|create new object)|"
                          r"must be imported to load", re.IGNORECASE)
CODE_NAME = re.compile(r"GLOBAL (\S+)|unsupported class (\S+)|unrecognized function (\S+)", re.IGNORECASE)


def read_checkpoint(path):
    """torch.load(path, weights_only=True): tensors and plain values only, never someone else's code.

    Every failure is a CheckpointError that says what the file is: missing, empty, damaged or truncated,
    or holding Python objects that weights_only refuses (loading those could run code: not done here,
    whatever the source).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint: an interrupted copy or download?")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (b'PK'; a truncated one has lost its directory, not its first bytes),
    # torch before 1.6 a bare pickle (protocol byte 0x80)
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path} ({size:,} bytes) is not a file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if CODE_REFUSED.search(str(e)):  # weights_only's refusal (torch's own advice is what we never do)
            found = CODE_NAME.search(str(e))
            name = f" ({next(g for g in found.groups() if g).rstrip('.,:;')})" if found else ""
            raise CheckpointError(f"{path} holds Python code or objects{name} besides tensors and plain values: it "
                                  f"was refused and none of it was run (this project loads checkpoints with "
                                  f"weights_only=True and does not run what they carry)") from None
        raise CheckpointError(f"{path} ({size:,} bytes) is a damaged torch.save file") from None
    except Exception:  # the zip reader's errors on a truncated file
        raise CheckpointError(f"{path} ({size:,} bytes) is a damaged or truncated torch.save file: an interrupted "
                              f"copy or download?") from None


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
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state_dict)


# ----------------------------------------------------------------------------- downloads

def file_name(url):
    return url.rsplit("/", 1)[-1]


def hash_in_name(url):
    """The SHA-256 prefix that ends torchvision's and open-mmlab's file names: 'x-0676ba61.pth' → '0676ba61'."""
    return os.path.splitext(file_name(url))[0].rsplit("-", 1)[-1]


def file_hash(path, algorithm):
    """Hex digest of a file, read in 1 MiB pieces (works on Python 3.10, which lacks hashlib.file_digest)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def fetch(url, filename, check=None):
    """Local path of `filename`: downloaded from `url` into torch.hub's cache the first time, then reused.

    check: None or (hash algorithm, published hex digest or its first digits), e.g. ("sha256", "0676ba61"),
    checked on every use: also a copy put at the cache path by hand (what the offline message asks for).
    A download whose hash differs is deleted, never moved into place; a copied file whose hash differs is
    refused and left where it is (it is the user's). A URL ending in .zip is unpacked: `filename` is the
    archive member kept (and the one checked).
    """
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        if check is not None and not file_hash(path, check[0]).startswith(check[1]):
            raise DownloadError(f"{path} has {check[0]} {file_hash(path, check[0])}, the published {filename} has "
                                f"{check[1]}: the file is damaged or not the published one; delete it or replace it "
                                f"with the file from {url}")
        return path
    download = f"{path}.{os.getpid()}.download"  # process-private names: ranks may download at once
    unpacked = f"{path}.{os.getpid()}.unpacked"
    # a full disk, a read-only cache: one line, nothing half-written left (the finally below removes it)
    with writing(path, f"{path} (torch.hub's cache)", partial=False,
                 intact="nothing else was changed; free space there, or set TORCH_HOME to a folder with room"):
        os.makedirs(folder, exist_ok=True)
        _fetch_into(url, filename, path, check, download, unpacked)
    return path


def _fetch_into(url, filename, path, check, download, unpacked):
    """fetch's download, unpacking and check through the two temporary files, then the move into `path`."""
    try:
        try:
            torch.hub.download_url_to_file(url, download)
        except OSError as e:  # URLError, HTTPError, timeouts: all OSErrors; a full disk is not the network's
            if write_failure(e, download):
                raise
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
            digest = file_hash(unpacked, algorithm)
            if not digest.startswith(published):
                raise DownloadError(f"{filename} downloaded from {url} has {algorithm} {digest}, the published one "
                                    f"is {published}: the file is damaged or not the published one, and was deleted")
        os.replace(unpacked, path)  # atomic: the cache never holds a partial or unchecked file
    finally:
        for leftover in (download, unpacked):
            if os.path.exists(leftover):
                os.remove(leftover)


# ----------------------------------------------------------------------------- ImageNet weights of the backbones

# The published ImageNet weights of each backbone: (URL, file kept, (hash algorithm, published digest)).
# torchvision's (IMAGENET1K_V1, what the paper-era models started from) and open-mmlab's end their file
# names in the first 8 hex digits of the file's SHA-256; the authors' serve a zip whose .pth has a SHA-1.
TORCHVISION_URL = "https://download.pytorch.org/models/{file}"
RELEASED_URL = "https://s3.us-west-1.wasabisys.com/encoding/models/{file}.zip"  # backbones and zoo alike
OPENMMLAB_URL = "https://download.openmmlab.com/pretrain/third_party/{file}"


def _named(url_format, file):
    url = url_format.format(file=file)
    return url, file, ("sha256", hash_in_name(url))


def _released(name, sha1):
    stem = f"{name}-{sha1[:8]}"
    return RELEASED_URL.format(file=stem), stem + ".pth", ("sha1", sha1)


IMAGENET_WEIGHTS = {
    "resnet18": _named(TORCHVISION_URL, "resnet18-f37072fd.pth"),
    "resnet34": _named(TORCHVISION_URL, "resnet34-b627a593.pth"),
    "resnet50": _named(TORCHVISION_URL, "resnet50-0676ba61.pth"),
    "resnet101": _named(TORCHVISION_URL, "resnet101-63fe2227.pth"),
    "resnet152": _named(TORCHVISION_URL, "resnet152-394f9c45.pth"),
    # the authors' deep-stem ResNets (encoding/models/model_store.py), keys as here plus fc.*
    "resnet50s": _released("resnet50s", "a75c83cfc89a56a4e8ba71b14f1ec67e923787b3"),
    "resnet101s": _released("resnet101s", "03a0f310d6447880f1b22a83bd7d1aa7fc702c6e"),
    # open-mmlab://resnet50_v1c, resnet101_v1c: mmcv's ResNetV1c names (stem.*), converted by MMSEG_KEYS
    "resnet50v1c": _named(OPENMMLAB_URL, "resnet50_v1c-2cccc1ad.pth"),
    "resnet101v1c": _named(OPENMMLAB_URL, "resnet101_v1c-e67eebb6.pth"),
}


def backbone_state(checkpoint, source):
    """An ImageNet checkpoint → the backbone's state_dict in this repo's names, without the classifier fc.*.

    Accepts a plain state_dict (torchvision's, the authors') or mmcv's {'state_dict': ...}; mmcv's
    ResNetV1c names (stem.0 … stem.7) are renamed as in mmsegmentation's EncNets."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise CheckpointError(f"{source}: not a state_dict of tensors (ImageNet weights of a ResNet)")
    state = {k.removeprefix("backbone."): v for k, v in checkpoint.items()}
    if any(k.startswith("stem.") for k in state):  # mmcv's ResNetV1c
        state = {k.removeprefix("backbone."): v for k, v in convert({f"backbone.{k}": v for k, v in state.items()},
                                                                      MMSEG_KEYS).items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_backbone_weights(backbone, source, name):
    """Load ImageNet weights into `backbone` (the dilated ResNet `name`) strictly.

    source: 'imagenet' (the published weights of that backbone, IMAGENET_WEIGHTS: downloaded once into
    torch.hub's cache and hash-checked), a path, or a URL. The released code loaded with strict=False, so a
    wrong file silently meant training from scratch; here any missing, unexpected or mis-shaped key is an
    error that lists them.
    """
    if source == "imagenet":
        if name not in IMAGENET_WEIGHTS:
            raise CheckpointError(f"no published ImageNet weights are known for {name}; pass --pretrained PATH_OR_URL "
                                  f"or --pretrained none")
        url, filename, check = IMAGENET_WEIGHTS[name]
        try:
            path = fetch(url, filename, check)
        except DownloadError as e:
            raise DownloadError(f"ImageNet weights of {name}: {e}. Or pass --pretrained PATH (a copy of the file) "
                                f"or --pretrained none (random initialisation)") from None
    elif "://" in source:
        path = fetch(source, file_name(source))
    elif os.path.isfile(source):
        path = source
    else:
        raise CheckpointError(f"--pretrained {source}: no such file (and not 'imagenet' or a URL)")
    load_strict(backbone, backbone_state(read_checkpoint(path), source), source)


# ----------------------------------------------------------------------------- the model zoos

# The authors' zoo: name → SHA-1 of the .pth. The URL serves a zip `{name}-{sha1[:8]}.zip` holding
# `{name}-{sha1[:8]}.pth` (at RELEASED_URL); the released code checks the full SHA-1, so does `download`.
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


def zoo_names():
    return [*RELEASED_SHA1, *MMSEG_FILES]


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
    for name, (block, arch_blocks, arch_stem) in encnet.ARCHITECTURES.items():
        if (arch_blocks, arch_stem, block is encnet.Bottleneck) == (blocks, stem, bottleneck):
            return name
    raise CheckpointError(f"{source}: no backbone here has {blocks} blocks per stage and a stem of width {stem}")


def zoo_model_args(state, backbone, fmt, source):
    """The arguments (as encnet.model_from_args takes them) of the EncNet whose modules fit a converted zoo
    state_dict, read from its shapes: class count, head width, codewords, lateral fusion, SE classifier
    and auxiliary head; the zoo's conventions for the rest."""
    missing = [k for k in ("conv5.0.weight", "enc_module.encoding.0.codewords", "classifier.1.weight")
               if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not a complete EncNet, it lacks (in this repo's names) {', '.join(missing)}")
    return dict(encnet.ARCHITECTURE, num_classes=state["classifier.1.weight"].shape[0], backbone=backbone,
                num_codes=state["enc_module.encoding.0.codewords"].shape[0],
                se_loss="enc_module.se_classifier.weight" in state, aux="aux_head.2.weight" in state,
                lateral="lateral.0.0.weight" in state, head_width=state["conv5.0.weight"].shape[0],
                **zoo_conventions(fmt))


def zoo_conventions(fmt):
    """What a zoo's files do not show in their shapes: both zoos' residual gate relu(x + x ⊗ γ), no second
    Context Encoding Module on stage 3; the authors' align_corners=True, mmsegmentation's Dropout2d."""
    return dict(residual_gate=True, stage3_encoding=False, align_corners=fmt == "released", dropout2d=fmt == "mmseg")


def published_model_args(name):
    """The model arguments (as encnet.model_from_args takes them) of the published model `name`, without its
    file: its recipe's backbone, head width, lateral fusion and auxiliary head (recipes.RECIPES), its dataset's
    class count, 32 codewords and the SE head, and the zoo's conventions: what load_model reads from the file."""
    if name not in recipes.RECIPES:
        raise CheckpointError(f"{name}: not a published model ({', '.join(zoo_names())})")
    recipe = recipes.RECIPES[name]
    fmt = "released" if name in RELEASED_SHA1 else "mmseg"
    return dict(encnet.ARCHITECTURE, num_classes=data.dataset_info(recipe["data"])["num_classes"],
                backbone=recipe["backbone"], num_codes=32, se_loss=True, aux=recipe["aux"], lateral=recipe["lateral"],
                head_width=recipe["head_width"], width=recipe["width"], **zoo_conventions(fmt))


def published_info(name):
    """load_model's `info` of the published model `name` without its file (no 'path'): for a model built
    by published_model_args, e.g. torch.hub's pretrained=False."""
    args = published_model_args(name)
    fmt, dataset = ("released" if name in RELEASED_SHA1 else "mmseg"), recipes.RECIPES[name]["data"]
    classes = data.dataset_info(dataset)
    crop_size, base_size = eval_sizes(fmt, dataset, args["backbone"])
    return {"format": fmt, "name": name, "source": name, "path": None, "dataset": dataset,
            "num_classes": args["num_classes"], "classes": classes["classes"], "palette": classes["palette"],
            "crop_size": crop_size, "base_size": base_size, "backbone": args["backbone"], "args": args}


def checkpoint_format(checkpoint, source):
    """'train_seg', 'mmseg' or 'released', told by the keys; CheckpointError naming what the file is otherwise."""
    keys = [str(k) for k in checkpoint] if isinstance(checkpoint, dict) else []
    if {"model", "args"} <= set(keys):
        args = checkpoint["args"] if isinstance(checkpoint["args"], dict) else {}
        if args.get("model") in encnet.CIFAR_MODELS:
            raise CheckpointError(f"{source} is a train_cifar.py checkpoint (the CIFAR-10 classifier {args['model']}), "
                                  f"not a segmentation model; it continues with train_cifar.py --resume")
        if "num_classes" not in args:
            raise CheckpointError(f"{source}: a training checkpoint whose 'args' lack num_classes: not written by "
                                  f"train_seg.py")
        return "train_seg"
    inner = checkpoint.get("state_dict") if keys else None
    if isinstance(inner, dict) and any(str(k).startswith("decode_head.") for k in inner):
        return "mmseg"
    if any(k.startswith("pretrained.") for k in keys) and any(k.startswith("head.") for k in keys):
        return "released"
    found = ", ".join(keys[:8]) + (", …" if len(keys) > 8 else "") if keys else type(checkpoint).__name__
    raise CheckpointError(f"{source}: not a train_seg.py checkpoint, nor an EncNet of the authors' zoo "
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
        if dataset is not None:
            info = data.dataset_info(dataset)
            classes, palette = info["classes"], info["palette"]
        else:
            classes, palette = [f"class {i}" for i in range(num_classes)], layouts.distinct_palette(num_classes)
    return [str(c) for c in classes], [[int(v) for v in c] for c in palette]


def load_model(source):
    """(model, info) from a train_seg.py checkpoint, a file of the authors' or mmsegmentation's zoo,
    or a zoo name (see RELEASED_SHA1, MMSEG_FILES; downloaded once into torch.hub's cache).

    The model is built to fit the file, loaded strictly and returned in eval mode: `model(images)`
    on ImageNet-normalised RGB (B×3×H×W) gives the full-resolution logits of the code that made
    the file.
    info: format ('train_seg', 'released', 'mmseg'), name, source, path, dataset, num_classes,
    classes, palette, crop_size and base_size for eval.py, backbone, 'args' (the model's arguments as
    encnet.model_from_args takes them; a train_seg.py checkpoint's are all its run's), and for train_seg
    'data_root'.
    """
    is_zoo_name = source in zoo_names()
    path = download(source) if is_zoo_name else source
    if not os.path.isfile(path):
        raise CheckpointError(f"{source}: no such file, and not a zoo name ({', '.join(zoo_names())})")
    checkpoint = read_checkpoint(path)
    fmt = checkpoint_format(checkpoint, path)
    if fmt == "train_seg":  # its 'optimizer', 'iter', 'epoch' are training state, not the model's
        args = checkpoint["args"]
        model, state = encnet.model_from_args(args), checkpoint["model"]
        info = dict(dataset=args["data"], num_classes=args["num_classes"], classes=checkpoint["classes"],
                    palette=checkpoint["palette"], base_size=args["base_size"],
                    crop_size=protocols.eval_crop(args["crop_size"], args["base_size"]),
                    backbone=args["backbone"], data_root=args.get("data_root"), args=args)
    else:
        if fmt == "mmseg":  # 'meta' also describes the run (config, versions); 'optimizer' is training state
            state, meta = convert(checkpoint["state_dict"], MMSEG_KEYS), checkpoint.get("meta") or {}
        else:
            state, meta = convert(checkpoint, RELEASED_KEYS), {}
        backbone = backbone_from_state(state, path)
        args = zoo_model_args(state, backbone, fmt, path)
        model, num_classes = encnet.model_from_args(args), args["num_classes"]
        dataset = DATASET_OF.get(num_classes)
        classes, palette = class_names(dataset, num_classes, meta)
        crop_size, base_size = eval_sizes(fmt, dataset, backbone)
        info = dict(dataset=dataset, num_classes=num_classes, classes=classes, palette=palette,
                    crop_size=crop_size, base_size=base_size, backbone=backbone, args=args)
    load_strict(model, state, path)
    name = source if is_zoo_name else os.path.splitext(os.path.basename(path))[0]
    return model.eval(), {"format": fmt, "name": name, "source": source, "path": path, **info}
