"""Class-activation maps: where in its input crop a model found the evidence for a class.

The maps come from captum (the optional `[explain]` extra), never from hooks of our own:
Grad-CAM on the architecture's last stage (`archs.ArchSpec.cam_layer`), the same sharpened by
the stage before (`gradcam-fine`, the default), occlusion, or integrated gradients. Whatever precision and memory layout the model predicts in, the maps are
computed in fp32 with autocast off: bf16 keeps 8 bits of mantissa, too few for gradients and
their weighted sums, and fp32 gives the same map on every machine. Channels-last needs nothing:
the methods index tensors logically, whatever their strides. The model is left as it was:
captum removes its hooks when an attribution ends (in a `finally`), and the train/eval modes
and `requires_grad` flags changed here are restored the same way.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torchvision.transforms.functional as F

from resnext_cli.config import EXPLAIN_METHODS
from resnext_cli.errors import UserError
from resnext_cli.model.archs import ARCHS

EXPLAIN_EXTRA = "pip install 'resnext-cli[explain]'  (captum)"
IG_STEPS = 32  # integrated gradients: points on the path from the baseline (grey) to the image
OCCLUSION_WINDOW, OCCLUSION_STEP = 1 / 8, 1 / 16  # occlusion's grey square and its step, of the crop
PERTURBED_BATCH = 64  # images per forward pass for occlusion and integrated gradients


@dataclass(frozen=True)
class ActivationMaps:
    """Maps on a grid of cells over the model's input crop: cell (i, j) is centred at input
    position (offset + stride * j, offset + stride * i), in pixel-edge coordinates (input pixel
    u spans u..u+1). Grad-CAM's cells are the last stage's, centred on the pixels its receptive
    fields are centred on (stride 32, offset 0.5 for every ResNet: the grid is aligned with the
    top-left corner, not centred in 32-pixel blocks); `gradcam-fine`'s are the stage before's
    (stride 16, offset 0.5 likewise); the other methods give one cell per pixel."""

    maps: torch.Tensor  # N x h x w, float32 on the CPU, >= 0: evidence for the class
    stride: float
    offset: float


def require_captum() -> Any:
    """captum.attr, or an error that says what to install."""
    try:
        return importlib.import_module("captum.attr")
    except ImportError:
        raise UserError(f"Heatmaps need captum, an optional extra: {EXPLAIN_EXTRA}.") from None


def activation_maps(
    model: torch.nn.Module, arch: str, inputs: torch.Tensor, targets: torch.Tensor,
    method: str = "gradcam",
) -> ActivationMaps:  # fmt: skip
    """One map per row of `inputs` (standardised crops, as `batches.get_batch` makes them) for
    the class index in the same row of `targets`."""
    attr = require_captum()
    if method not in EXPLAIN_METHODS:
        raise ValueError(f"unknown heatmap method {method!r}")
    net = getattr(model, "_orig_mod", model)  # torch.compile'd: the hooks go on the real modules
    with contextlib.ExitStack() as stack:
        for context in (torch.inference_mode(False), torch.enable_grad(), _frozen_in_eval(net),
                        torch.autocast(inputs.device.type, enabled=False), warnings.catch_warnings()):
            stack.enter_context(context)  # fmt: skip
        warnings.simplefilter("ignore", UserWarning)  # captum's notes on what it made require grad
        x = inputs.detach().float().clone()  # an ordinary tensor even if made in inference mode
        target = targets.to(x.device)
        if method.startswith("gradcam"):
            spec = ARCHS[arch]
            maps = _gradcam(attr, net, spec.cam_layer, x, target)
            if method == "gradcam":
                return ActivationMaps(_on_cpu(maps), float(spec.cam_stride), 0.5)
            fine = _gradcam(attr, net, spec.cam_fine_layer, x, target)
            return ActivationMaps(_on_cpu(_sharpened(maps, fine)), float(spec.cam_fine_stride), 0.5)
        if method == "occlusion":
            maps = _occlusion(attr, net, x, target)
        else:
            maps = _integrated_gradients(attr, net, x, target)
    return ActivationMaps(_on_cpu(maps), 1.0, 0.5)


def _gradcam(attr: Any, net: torch.nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """captum's Grad-CAM of one stage, ReLU'd: N x h x w."""
    grad_cam = attr.LayerGradCam(net, net.get_submodule(layer))
    return grad_cam.attribute(x, target=target, relu_attributions=True)[:, 0]


def _sharpened(coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """The last stage's map (what the classifier pools: class-specific, 32-px cells) times the
    map of the stage before (16-px cells), each scaled to a maximum of 1, on the finer grid.
    Both grids start at the crop's top-left pixel, so fine cell i lies at coarse position i / 2
    (interpolated bilinearly, constant beyond the last centre). Where the product holds no
    evidence at all but the last stage does, the last stage's map (resampled) is the answer."""
    h, w = fine.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32) / 2).clamp(max=coarse.shape[-2] - 1)
    xs = (torch.arange(w, dtype=torch.float32) / 2).clamp(max=coarse.shape[-1] - 1)
    gy = 2 * ys / max(coarse.shape[-2] - 1, 1) - 1
    gx = 2 * xs / max(coarse.shape[-1] - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).to(coarse)
    grid = grid[None].expand(len(coarse), -1, -1, -1)
    upsampled = torch.nn.functional.grid_sample(coarse[:, None], grid, mode="bilinear",
                                                align_corners=True)[:, 0]  # fmt: skip
    product = _unit_max(upsampled) * _unit_max(fine)
    silent = product.flatten(1).amax(1) <= 0
    return torch.where(silent[:, None, None], upsampled, product)


def _unit_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its maximum (an all-zero map stays zero)."""
    top = maps.flatten(1).amax(1).clamp(min=torch.finfo(maps.dtype).tiny)
    return maps / top[:, None, None]


def _occlusion(attr: Any, net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How much the class's logit drops when a grey square (the mean colour: 0 once standardised)
    hides each part of the crop; model-agnostic, one forward pass per position."""
    size = x.shape[-1]
    window, step = max(1, round(size * OCCLUSION_WINDOW)), max(1, round(size * OCCLUSION_STEP))
    drops = attr.Occlusion(net).attribute(
        x, target=target, sliding_window_shapes=(x.shape[1], window, window),
        strides=(x.shape[1], step, step), baselines=0.0,
        perturbations_per_eval=max(1, PERTURBED_BATCH // len(x)),
    )  # fmt: skip
    return drops[:, 0].clamp(min=0)


def _integrated_gradients(
    attr: Any, net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-pixel evidence along the path from a grey image to the crop, summed over the colour
    channels, its positive part blurred (sigma: 1/32 of the crop) into a map one can read."""
    ig = attr.IntegratedGradients(net).attribute(
        x, target=target, baselines=0.0, n_steps=IG_STEPS,
        internal_batch_size=max(len(x), PERTURBED_BATCH),
    )  # fmt: skip
    evidence = ig.sum(dim=1, keepdim=True).clamp(min=0)
    sigma = max(0.5, x.shape[-1] / 32)
    kernel = 2 * math.ceil(2 * sigma) + 1
    return F.gaussian_blur(evidence, [kernel, kernel], [sigma, sigma])[:, 0]


@contextlib.contextmanager
def _frozen_in_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm with its running statistics, as predict runs it) and no parameter
    gradients while the maps are made: nothing is written to `.grad`, and Grad-CAM's backward
    pass runs from the logits to the target layer only. Every module's mode and every
    parameter's flag are put back as they were, also when the attribution fails."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            param.requires_grad_(flag)


def _on_cpu(maps: torch.Tensor) -> torch.Tensor:
    return maps.detach().float().cpu().contiguous()
