"""Device, numeric precision and memory layout: decided in one place for every command."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from resnext_cli.config import PRECISIONS
from resnext_cli.data.batches import JPEG_DECODER_EXTRA, jpeg_decoder
from resnext_cli.errors import UserError


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; an explicit choice must exist."""
    cuda_ok = torch.cuda.is_available()
    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda_ok else "mps" if mps_ok else "cpu")
    if name.startswith("cuda"):
        if not cuda_ok:
            raise UserError(
                f"--device {name} was asked for, but PyTorch sees no CUDA GPU here "
                f"(torch {torch.__version__}). Use --device cpu, or install a CUDA build of torch."
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
        return torch.device(name)
    if name == "mps" and not mps_ok:
        raise UserError("--device mps was asked for, but MPS is not available here.")
    return torch.device(name)


def pin_memory_for(device: torch.device) -> bool:
    """Page-locked host batches only help copies to a CUDA device."""
    return device.type == "cuda"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512_BF16 or AMX). Elsewhere oneDNN
    emulates it, and a training step measured 14-32x slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(requested: str, device_type: str, cuda_bf16: bool = False) -> str:
    """`auto`: bf16 on CPUs with native bf16 (measured ~2x over fp32 for resnet18 and
    resnext50, train and predict), bf16 or else fp16 on CUDA, fp32 everywhere else."""
    if requested not in PRECISIONS:
        raise UserError(f"Invalid --precision {requested!r}: use {', '.join(PRECISIONS)}.")
    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if cuda_bf16 else "fp16"
        if device_type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise UserError(
            f"--precision fp16 needs a CUDA device (this run is on {device_type}); use bf16 or "
            "fp32 there."
        )
    return requested


def precision_for(requested: str, device: torch.device) -> str:
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return resolve_precision(requested, device.type, cuda_bf16)


def autocast(device: torch.device, precision: str) -> Any:
    """Mixed precision for the forward pass; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_grad_scaler(device_type: str, precision: str) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
    return device_type == "cuda" and precision == "fp16"


def make_grad_scaler(device: torch.device, precision: str) -> Any:
    return torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device.type, precision))


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool) -> None:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)


def decode_on_device(requested: str, device: torch.device) -> bool:
    """--decode: `auto` decodes JPEGs on the GPU when the model runs on CUDA and a decoder is
    installed (torchcodec, or torchvision's while it has one), with Pillow elsewhere; `gpu`
    without either is an error, not a silent fallback."""
    if requested == "gpu" and device.type != "cuda":
        raise UserError(
            f"--decode gpu needs a CUDA device, but this run is on {device}. Use --decode cpu "
            "(Pillow in worker processes) or --decode auto."
        )
    wanted = requested == "gpu" or (requested == "auto" and device.type == "cuda")
    if wanted and jpeg_decoder() is None:
        if requested == "gpu":
            raise UserError(f"--decode gpu needs torchcodec: {JPEG_DECODER_EXTRA}; or use --decode cpu.")
        return False
    return wanted
