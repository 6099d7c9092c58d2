"""The architectures resnext knows, by name: torch-free, so flags are checked before torch loads.

torchvision's builder and weights enum share each architecture's name; `models.py` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    name: str
    family: str
    description: str


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
