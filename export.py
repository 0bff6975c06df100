"""Deployment export: the eval-mode model as an ONNX file or a torch.export program, with what a runtime needs.

    export           model → .onnx (opset 18, torch.onnx's dynamo exporter) or .pt2 (torch.export), batch,
                     height and width dynamic
    export_metadata  the input's normalisation, classes, palette and the test-time procedure, as plain strings

The ONNX route needs the optional packages onnx and onnxscript (requirements.txt's test section).
"""
import json
import os

import torch

from errors import UserError
from transforms import MEAN, STD


def export_metadata(info):
    """What a runtime needs besides the graph: the input's convention, classes, palette, sizes (plain strings)."""
    return {"encnet_input": "B×3×H×W float32, RGB in [0, 1] normalised by mean and std (ImageNet), any H, W ≥ 32",
            "encnet_output": "B×K×H×W float32 logits; the class of a pixel is the argmax over K",
            "mean": json.dumps(MEAN), "std": json.dumps(STD), "classes": json.dumps(info["classes"]),
            "palette": json.dumps(info["palette"]), "dataset": str(info["dataset"]), "source": str(info["source"]),
            "crop_size": json.dumps(info["crop_size"]), "base_size": json.dumps(info["base_size"])}


def export(model, info, path, example_size=(256, 256)):
    """The eval-mode model as a graph for runtimes without this code: path ending in .onnx → ONNX (opset 18,
    torch.onnx's dynamo exporter; needs the optional packages onnx and onnxscript), .pt2 → a torch.export
    program (torch.export.load(path).module() runs it). Batch, height and width are dynamic; the metadata of
    export_metadata is the ONNX model's metadata_props, or extra_files['encnet.json'] of the .pt2. Written
    to a temporary name, then renamed: an interrupted export leaves no half file."""
    images = torch.randn(2, 3, *example_size)
    dims = {"images": {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=32, max=8192),
                       3: torch.export.Dim("width", min=32, max=8192)}}
    partial = f"{path}.{os.getpid()}.partial"
    model = model.eval()
    try:
        if path.endswith(".onnx"):
            try:
                program = torch.onnx.export(model, (images,), dynamo=True, input_names=["images"],
                                            output_names=["logits"], dynamic_shapes=dims, verbose=False)
            except ModuleNotFoundError as e:  # torch imports the exporter's packages only when asked to export
                raise UserError(f"--export {path}: ONNX export needs the optional packages onnx and onnxscript "
                                f"({e.name} is missing): pip install onnx onnxscript") from None
            program.model.metadata_props.update(export_metadata(info))
            program.save(partial)
        elif path.endswith(".pt2"):
            program = torch.export.export(model, (images,), dynamic_shapes=dims)
            torch.export.save(program, partial, extra_files={"encnet.json": json.dumps(export_metadata(info))})
        else:
            raise UserError(f"--export {path}: name it *.onnx (ONNX) or *.pt2 (torch.export)")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
