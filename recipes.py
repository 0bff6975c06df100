"""Every training recipe, as a table of hyperparameters with its sources.

    PAPER_RECIPE     the paper's (Sec. 3.1): what `train_seg.py --data NAME` trains with, per dataset below
    RELEASED_RECIPE  the authors' code at the revision that trained their four published models
    MMSEG_RECIPE     mmsegmentation's EncNet configs, which trained its six published models
    DATASET_RECIPES  --data NAME: the paper's recipe per dataset, mmsegmentation's for Cityscapes, a CPU-sized
                     one for the built-in data
    RECIPES          --recipe NAME: one per published model (zoo.py's names), what produced that file

A recipe is a complete dict of train_seg.py's flags (dashes as underscores): a flag left unset takes the
recipe's value, a flag given wins. `python train_seg.py --help` prints the table; docs/recipes.md says where each
value comes from and what "one training step equals the reference code's step" means.
"""
from context_data import CONTEXT_WIDTH

# Sec. 3.1: SGD with momentum 0.9 and weight decay 1e-4, poly lr (1 − it/N)^0.9, batch 16, crop 480 after
# random scaling 0.5–2 of the long side (base 520), flips and rotation ±10°, dilated ResNet-50 at output stride 8
# with ImageNet weights, SE-loss weight 0.2, the second Context Encoding Module on stage 3 (Fig. 3).
PAPER_RECIPE = dict(
    batch_size=16, crop_size=480, base_size=520, random_scale="long", scale_box=None, blur=False,
    max_rotation=10.0, cat_max_ratio=None, photometric=False, pad="black",
    backbone="resnet50", pretrained="imagenet", width=64, head_width=512,
    weight_decay=1e-4, head_lr_mult=1.0, min_lr=0.0, poly_horizon="iters", max_iters=None,
    aux=False, aux_weight=0.2, lateral=False, residual_gate=False, stage3_encoding=True, align_corners=False,
    dropout2d=False, loss_mean="labelled", loss_group=0,
    protocol="repo", workers=8)

# The authors' train.py at the revision that published the zoo's four files and their numbers (PyTorch-Encoding
# v0.5.0, f891919: experiments/segmentation/{train,option}.py, encoding/datasets/base.py _sync_transform,
# encoding/nn/customize.py SegmentationLosses, encoding/parallel.py DataParallelCriterion, encoding/utils/
# lr_scheduler.py), run as its docs say: `train.py --dataset X --model EncNet --aux --se-loss [--backbone
# resnet101]` on 4 GPUs. Later revisions changed defaults (final ac74841: ADE20K lr 0.004 for 180 epochs, the
# long side drawn, no blur, Dropout instead of Dropout2d); those are flags here.
RELEASED_RECIPE = dict(
    batch_size=16, crop_size=480, base_size=520,      # train.py's defaults
    random_scale="short", scale_box=None, blur=True,  # flip; short side random integer in [0.5, 2] × base,
    max_rotation=0.0, cat_max_ratio=None, photometric=False, pad="black",  # long side int(); zero padding;
    # random crop; Gaussian blur (p ½, radius U(0, 1)); no rotation in this revision
    weight_decay=1e-4, head_lr_mult=10.0,             # SGD momentum 0.9; `head` and `auxlayer` at 10 × lr
    min_lr=0.0, poly_horizon="iters", max_iters=None,  # poly per iteration, lr·(1 − T/N)^0.9, no warm-up
    aux=True, aux_weight=0.2, residual_gate=True, stage3_encoding=False, align_corners=True, dropout2d=True,
    lateral=False, loss_mean="labelled", loss_group=4,  # per GPU (4 images): CE over its labelled pixels
    # + 0.2 aux CE + 0.2 SE BCE, averaged over the GPUs (DataParallelCriterion)
    protocol="released", pretrained="imagenet", width=64, head_width=512, workers=8)

# mmsegmentation 1.2.2: configs/encnet/encnet_r{50,101}-d8_4xb4-{80k,160k}_ade20k-512x512.py and
# encnet_r{50,101}-d8_4xb2-80k_cityscapes-512x1024.py with their _base_ files (models/encnet_r50-d8.py,
# datasets/{ade20k,cityscapes}.py, schedules/schedule_{80k,160k}.py, default_runtime.py).
MMSEG_RECIPE = dict(
    batch_size=16, crop_size=512, base_size=683,      # 4 GPUs × 4; base: the long side of eval.py's windows
    random_scale="box", scale_box=[2048, 512], blur=False,  # RandomResize
    max_rotation=0.0, cat_max_ratio=0.75, photometric=True, pad="mean",
    # (ratio 0.5–2, keep ratio), RandomCrop (cat_max_ratio 0.75), RandomFlip, PhotoMetricDistortion, pad after
    # normalisation with 0 (labels 255)
    lr=0.01, weight_decay=5e-4, head_lr_mult=1.0,    # SGD momentum 0.9, weight decay on every tensor
    min_lr=1e-4, poly_horizon="iters", epochs=None,  # poly power 0.9 to 1e-4 by iteration, over max_iters:
    # mmcv 1.x's PolyLrUpdaterHook, which trained the zoo's files (mmseg 0.5); 1.x's PolyLR ends one earlier
    # (--poly-horizon iters-1)
    aux=True, aux_weight=0.4, residual_gate=True, stage3_encoding=False, align_corners=False, dropout2d=True,
    lateral=False, loss_mean="all", loss_group=0,    # CE avg_non_ignore=False: Σ labelled / all pixels
    protocol="mmseg", pretrained="imagenet", width=64, head_width=512, workers=8)
# Cityscapes: 4 GPUs × 2 images, 2048×1024 images scaled by 0.5–2 (RandomResize), crops of 512×1024
MMSEG_CITYSCAPES = dict(MMSEG_RECIPE, data="cityscapes", max_iters=80000, batch_size=8, crop_size=[512, 1024],
                        base_size=2048, scale_box=[2048, 1024])

DATASET_RECIPES = {
    "ade20k": dict(PAPER_RECIPE, data="ade20k", lr=0.01, epochs=120),
    "pcontext": dict(PAPER_RECIPE, data="pcontext", lr=0.001, epochs=50),
    "pascal_voc": dict(PAPER_RECIPE, data="pascal_voc", lr=0.001, epochs=50),
    "pascal_aug": dict(PAPER_RECIPE, data="pascal_aug", lr=0.001, epochs=50),
    # COCO pretraining for VOC (Sec. 3.3): base lr 0.01 per the paper; it does not give the epochs.
    "coco": dict(PAPER_RECIPE, data="coco", lr=0.01, epochs=30),
    # the paper has no Cityscapes recipe: mmsegmentation's EncNet-R50 one with torchvision's ResNet-50
    # (--recipe mmseg_encnet_r50-d8_cityscapes_80k takes its ResNetV1c and open-mmlab's weights)
    "cityscapes": dict(MMSEG_CITYSCAPES, backbone="resnet50"),
    # the built-in data on a CPU in minutes: images used whole, a small ResNet-18 from scratch
    "context": dict(PAPER_RECIPE, data="context", lr=0.02, epochs=3, crop_size=CONTEXT_WIDTH,
                    base_size=CONTEXT_WIDTH, head_lr_mult=10.0, backbone="resnet18", pretrained=None, width=16,
                    head_width=64, workers=0),
    # your own data (data.FolderDataset): the paper's recipe at ADE20K's lr; 50 epochs (PASCAL's) as a start.
    # A small dataset (hundreds of images) has few iterations per epoch: see train_seg.py --help, --data
    "folder": dict(PAPER_RECIPE, data="folder", lr=0.01, epochs=50),
}

RECIPES = {
    "encnet_resnet50s_pcontext": dict(RELEASED_RECIPE, data="pcontext", backbone="resnet50s", lateral=True,
                                      lr=0.001, epochs=80),
    "encnet_resnet101s_pcontext": dict(RELEASED_RECIPE, data="pcontext", backbone="resnet101s", lateral=True,
                                       lr=0.001, epochs=80),
    "encnet_resnet50s_ade": dict(RELEASED_RECIPE, data="ade20k", backbone="resnet50s", lr=0.01, epochs=120),
    # evaluated at base 640 / crop 576 (get_encnet_resnet101_ade, committed with the file); the training sizes
    # are not recorded: these, so that it trains at the scale it is tested at (the 2018 ADE20K log: 608 / 576)
    "encnet_resnet101s_ade": dict(RELEASED_RECIPE, data="ade20k", backbone="resnet101s", lr=0.01, epochs=120,
                                  base_size=640, crop_size=576),
    "mmseg_encnet_r50-d8_ade20k_80k": dict(MMSEG_RECIPE, data="ade20k", backbone="resnet50v1c", max_iters=80000),
    "mmseg_encnet_r101-d8_ade20k_80k": dict(MMSEG_RECIPE, data="ade20k", backbone="resnet101v1c", max_iters=80000),
    "mmseg_encnet_r50-d8_ade20k_160k": dict(MMSEG_RECIPE, data="ade20k", backbone="resnet50v1c", max_iters=160000),
    "mmseg_encnet_r101-d8_ade20k_160k": dict(MMSEG_RECIPE, data="ade20k", backbone="resnet101v1c",
                                             max_iters=160000),
    "mmseg_encnet_r50-d8_cityscapes_80k": dict(MMSEG_CITYSCAPES, backbone="resnet50v1c"),
    "mmseg_encnet_r101-d8_cityscapes_80k": dict(MMSEG_CITYSCAPES, backbone="resnet101v1c"),
}

# The columns of the table that --help prints and a run's first line shows.
TABLE_KEYS = ("lr", "epochs", "max_iters", "batch_size", "crop_size", "base_size", "backbone", "pretrained")


def show(value):
    return "x".join(map(str, value)) if isinstance(value, list) else str(value)


def recipe_table():
    """DATASET_RECIPES and RECIPES as text, one row each, for --help."""
    width = max(map(len, [*DATASET_RECIPES, *RECIPES])) + 10
    rows = [f"  {'':<{width}}" + "".join(f"{k:>14}" for k in TABLE_KEYS)]
    for flag, recipes in (("--data", DATASET_RECIPES), ("--recipe", RECIPES)):
        rows += [f"  {f'{flag} {name}':<{width}}" + "".join(f"{show(recipe.get(k)):>14}" for k in TABLE_KEYS)
                 for name, recipe in recipes.items()]
    return ("defaults of the flags left unset, per dataset (the paper's recipe; loader workers capped at the CPU "
            "cores) and per published model (--recipe; sources in recipes.py):\n" + "\n".join(rows))
