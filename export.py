"""Deployment export: the eval-mode model as an ONNX file or a torch.export program, with what a runtime needs.

    export           model → .onnx (opset 18, torch.onnx's dynamo exporter) or .pt2 (torch.export), batch,
                     height and width dynamic
    export_metadata  the input's normalisation, classes, palette and the test-time procedure, as plain strings
    quiet_exporter   the exporters' messages that are not the user's concern, silenced

The ONNX route needs the optional packages onnx and onnxscript (requirements.txt's test section). deploy.py runs
the ONNX file with the test-time procedure of its metadata (NumPy and onnxruntime only).
"""
import io
import json
import logging
import os
import warnings
from contextlib import contextmanager

import torch

import errors
from errors import UserError
from transforms import MEAN, STD


def export_metadata(info, model_protocol="repo", mmseg_box=None):
    """What a runtime needs besides the graph (plain strings): the input's convention, classes, palette, sizes, and
    the test-time procedure of protocol 'repo' single-scale (protocols.repo_views), which deploy.py follows: the
    graph alone, run on the whole photo, is not what eval.py predicts. model_protocol: the protocol eval.py uses for
    this model by default (protocols.default_protocol), recorded as such. mmseg_box: (long, short) of protocol
    'mmseg' for the model's dataset (protocols.MMSEG_TEST_BOX), where it has one: its procedure too."""
    crop, base = info["crop_size"], info["base_size"]
    mmseg = {} if mmseg_box is None else {
        "mmseg_box": json.dumps(list(mmseg_box)),
        "mmseg_procedure": f"protocol 'mmseg', single scale: the uint8 image resized into the {mmseg_box[0]}x"
                           f"{mmseg_box[1]} box keeping its ratio (each side int(side * factor + 0.5)) with OpenCV's "
                           "bilinear (cv2.resize INTER_LINEAR), normalised, one forward of it whole, the logits "
                           "resized to the image's size (bilinear, align_corners=False), softmax; deploy.py runs it"}
    return {**mmseg, "encnet_input": "B×3×H×W float32, RGB in [0, 1] normalised by mean and std (ImageNet), any H, W ≥ 32",
            "encnet_output": "B×K×H×W float32 logits; the class of a pixel is the argmax over K",
            "mean": json.dumps(MEAN), "std": json.dumps(STD), "classes": json.dumps(info["classes"]),
            "palette": json.dumps(info["palette"]), "dataset": str(info["dataset"]), "source": str(info["source"]),
            "crop_size": json.dumps(crop), "base_size": json.dumps(base),
            # the test-time procedure (protocols.py, 'repo' single-scale), step by step
            "protocol": "repo",
            "model_protocol": model_protocol,  # eval.py's default for this model ('repo': the procedure here)
            "resize": "the normalised image's long side to base_size, the other side int(side * base_size / long "
                      "+ 0.5); bilinear, align_corners=False, no antialiasing (PyTorch's F.interpolate)",
            "resize_align_corners": "false",
            "window_stride": json.dumps(max(1, int(crop * 2 / 3))),
            "windows": "resized image within crop_size x crop_size: one forward of it whole, unpadded; otherwise "
                       "zero-padded at the bottom and right up to crop_size where smaller, crop_size x crop_size "
                       "windows with corners at 0, window_stride, 2 * window_stride, ..., the last row and column "
                       "shifted back to end at the border (crop_size - padded size + corner <= 0)",
            "fusion": "window logits averaged where windows overlap, cut to the resized size, resized to the "
                      "image's size (bilinear, align_corners=False), softmax over classes; the class is the argmax",
            "test_procedure": f"protocol 'repo', single scale: long side to {base}, {crop}x{crop} windows at stride "
                              f"{max(1, int(crop * 2 / 3))} (see 'resize', 'windows', 'fusion'); deploy.py runs it"}


@contextmanager
def quiet_exporter():
    """The exporters' messages that are not the user's concern, silenced: torch.onnx's 'torchvision is not installed.
    Skipping torchvision::nms' (and roi_align, roi_pool, deform_conv2d: the model has none of these operators) and
    the FutureWarning of torch's own pytree code ('isinstance(treespec, LeafSpec)' is deprecated)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export(model, info, path, example_size=(256, 256), model_protocol="repo", mmseg_box=None):
    """The eval-mode model as a graph for runtimes without this code: path ending in .onnx → ONNX (opset 18,
    torch.onnx's dynamo exporter; needs the optional packages onnx and onnxscript), .pt2 → a torch.export
    program (torch.export.load(path).module() runs it). Batch, height and width are dynamic; the metadata of
    export_metadata is the ONNX model's metadata_props, or extra_files['encnet.json'] of the .pt2. Written
    to a temporary name, then renamed: an interrupted export leaves no half file. The folder is made where
    missing; a full disk (or another error of the file system) is one line (errors.WriteError), no half file left.
    The exporters' messages that are not the user's concern are silenced (quiet_exporter)."""
    if not path.endswith((".onnx", ".pt2")):
        raise UserError(f"--export {path}: name it *.onnx (ONNX) or *.pt2 (torch.export)")
    images = torch.randn(2, 3, *example_size)
    dims = {"images": {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=32, max=8192),
                       3: torch.export.Dim("width", min=32, max=8192)}}
    # the temporary name keeps the suffix (torch.export.save warns about an archive path not named *.pt2)
    partial = f"{path}.{os.getpid()}.partial{os.path.splitext(path)[1]}"
    model = model.eval()
    try:
        with quiet_exporter():
            if path.endswith(".onnx"):
                try:
                    program = torch.onnx.export(model, (images,), dynamo=True, input_names=["images"],
                                                output_names=["logits"], dynamic_shapes=dims, verbose=False)
                except ModuleNotFoundError as e:  # torch imports the exporter's packages only when asked to export
                    raise UserError(f"--export {path}: ONNX export needs the optional packages onnx and onnxscript "
                                    f"({e.name} is missing): pip install onnx onnxscript") from None
                program.model.metadata_props.update(export_metadata(info, model_protocol, mmseg_box))
            else:
                program = torch.export.export(model, (images,), dynamic_shapes=dims)
            with errors.writing(path, f"the export {path}", "nothing of it is left; free space and export again",
                                partial=partial):
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                if path.endswith(".onnx"):
                    program.save(partial)
                else:  # in memory first: torch's archive writer ends the process (std::terminate, when it is freed)
                    buffer = io.BytesIO()  # after a failed write of its own; Python's write fails as an OSError
                    metadata = json.dumps(export_metadata(info, model_protocol, mmseg_box))
                    torch.export.save(program, buffer, extra_files={"encnet.json": metadata})
                    with open(partial, "wb") as f:
                        f.write(buffer.getbuffer())
                os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
