"""The architectures resnext knows, by name: torch-free, so flags are checked before torch loads.

torchvision's builder and weights enum share each architecture's name; `networks.py` builds them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from resnext_cli.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    family: str
    description: str
    # where class-activation heatmaps are taken (`model/cam.py`): the last stage, whose output
    # the classifier pools; its cell (i, j) is centred on input pixel (stride * i, stride * j)
    cam_layer: str = "layer4"
    cam_stride: int = 32
    # the stage before it, twice as fine: `gradcam-fine` sharpens the last stage's map with it
    cam_fine_layer: str = "layer3"
    cam_fine_stride: int = 16


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("resnet18", "ResNet", "basic blocks, 18 layers"),
        ArchSpec("resnet34", "ResNet", "basic blocks, 34 layers"),
        ArchSpec("resnet50", "ResNet", "bottleneck blocks, 50 layers"),
        ArchSpec("resnet101", "ResNet", "bottleneck blocks, 101 layers"),
        ArchSpec("resnet152", "ResNet", "bottleneck blocks, 152 layers"),
        ArchSpec("resnext50_32x4d", "ResNeXt", "32 groups of width 4, 50 layers"),
        ArchSpec("resnext101_32x8d", "ResNeXt", "32 groups of width 8, 101 layers"),
        ArchSpec("resnext101_64x4d", "ResNeXt", "64 groups of width 4, 101 layers"),
        ArchSpec("wide_resnet50_2", "Wide ResNet", "bottleneck twice as wide, 50 layers"),
        ArchSpec("wide_resnet101_2", "Wide ResNet", "bottleneck twice as wide, 101 layers"),
    )
}


def check_arch(name: str) -> None:
    """An unknown name is an error that suggests the closest known one: a name it begins (or
    that begins it) first, so `resnext50` suggests resnext50_32x4d rather than resnet50."""
    if name in ARCHS:
        return
    prefixed = [a for a in ARCHS if a.startswith(name) or name.startswith(a)]
    close = prefixed[:1] or difflib.get_close_matches(name, list(ARCHS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(
        f"Invalid arch {name!r}.{hint} Choose one of: {', '.join(ARCHS)} (`resnext archs` lists them)."
    )
