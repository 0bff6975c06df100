"""torch.hub entry points: every published EncNet by name, and the EncNet / FCN constructors.

    model = torch.hub.load("REPO", "encnet_resnet50s_ade")                  # downloaded, hash-checked, eval mode
    model = torch.hub.load("REPO", "encnet_resnet50s_ade", pretrained=False)   # the same architecture, untrained
    model = torch.hub.load("REPO", "encnet", num_classes=5, backbone="resnet50", backbone_weights="imagenet")
    classes = protocols.segment(model, Image.open("photo.jpg"))             # model.info: its sizes and protocol

REPO: a GitHub "owner/name" or, with source="local", this folder. The names are zoo.zoo_names(); those with a
'-' (mmsegmentation's, e.g. mmseg_encnet_r50-d8_ade20k_80k) are also entry points with '_' in its place
(mmseg_encnet_r50_d8_ade20k_80k), the form a Python identifier can take: torch.hub.load accepts either.

NAME(pretrained=True): the published file, downloaded once into torch.hub's cache and its published hash checked
on every use, as zoo.load_model(NAME) does; the model in eval mode, and `model.info` the info load_model returns
(dataset, classes, palette, crop and base size, format: what protocols.segment and eval.py use).
NAME(pretrained=False, **overrides): the same architecture (zoo.published_model_args) with fresh weights, in
eval mode, `model.info` without a file; overrides change the model's arguments, e.g. num_classes=5.
"""
import layouts as _layouts
import encnet as _encnet
import zoo as _zoo

dependencies = ["torch", "numpy", "PIL"]


def _published(name):
    def entry(pretrained=True, **overrides):
        if pretrained:
            if overrides:
                raise TypeError(f"{name}(pretrained=True) builds the published file's architecture; "
                                f"{', '.join(overrides)} apply to pretrained=False")
            model, info = _zoo.load_model(name)
        else:
            info = _zoo.published_info(name)
            unknown = sorted(set(overrides) - set(info["args"]))
            if unknown:
                raise TypeError(f"{name}(pretrained=False): unknown model arguments {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(info['args']))}")
            info["args"] = dict(info["args"], **overrides)
            if info["args"]["num_classes"] != info["num_classes"]:  # other classes: the published ones no longer apply
                info.update(num_classes=info["args"]["num_classes"], dataset=None,
                            classes=[f"class {i}" for i in range(info["args"]["num_classes"])],
                            palette=_layouts.distinct_palette(info["args"]["num_classes"]))
            model = _encnet.model_from_args(info["args"]).eval()
        model.info = info
        return model

    entry.__name__ = entry.__qualname__ = name.replace("-", "_")
    entry.__doc__ = (f"The published EncNet {name} (zoo.load_model({name!r})): pretrained=True downloads and "
                     f"hash-checks its file; pretrained=False builds the same architecture untrained (keyword "
                     f"arguments override its model arguments). Eval mode; model.info as load_model's info.")
    return entry


for _name in _zoo.zoo_names():
    globals()[_name.replace("-", "_")] = globals()[_name] = _published(_name)


def _with_backbone_weights(model, backbone, backbone_weights):
    if backbone_weights is not None:
        _zoo.load_backbone_weights(model.backbone, backbone_weights, backbone)
    return model


def encnet(num_classes, backbone="resnet50", backbone_weights=None, **kwargs):
    """encnet.EncNet(num_classes, backbone, **kwargs), in training mode. backbone_weights: 'imagenet' (the
    backbone's published ImageNet weights, zoo.IMAGENET_WEIGHTS, hash-checked), a path or a URL; None: random."""
    return _with_backbone_weights(_encnet.EncNet(num_classes, backbone, **kwargs), backbone, backbone_weights)


def fcn(num_classes, backbone="resnet50", backbone_weights=None, **kwargs):
    """encnet.FCN(num_classes, backbone, **kwargs), the paper's baseline, in training mode; backbone_weights as
    encnet's."""
    return _with_backbone_weights(_encnet.FCN(num_classes, backbone, **kwargs), backbone, backbone_weights)
