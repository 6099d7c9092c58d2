"""Device choice, in one place for every command."""

from __future__ import annotations

from typing import TYPE_CHECKING

from resnext_cli.errors import UserError

if TYPE_CHECKING:
    import torch


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; an explicit choice must exist."""
    import torch

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
