"""Architectures: a registry over torchvision's ResNet builders, weight loading and freezing.

The models are torchvision's own, so state dicts keep torchvision's layout and official `.pth`
files load strictly. Only the classifier (`fc`) is ever replaced.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.hub
import torch.nn as nn
from torchvision.models import ResNet, get_model_builder, get_model_weights

from resnext_cli.data.transforms import Preprocessing
from resnext_cli.errors import UserError
from resnext_cli.model.archs import ARCHS, check_arch
from resnext_cli.model.checkpoint import CHECKPOINT_FORMAT, safe_torch_load


def build_model(arch: str, num_classes: int) -> ResNet:
    """torchvision's network with random weights and a classifier for `num_classes`."""
    check_arch(arch)
    model = get_model_builder(arch)(weights=None)
    if num_classes != model.fc.out_features:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def arch_parameter_counts() -> dict[str, int]:
    """Parameter counts with the 1000-class ImageNet head, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {name: count_parameters(build_model(name, 1000)) for name in ARCHS}


def weights_preprocessing(arch: str, weights: str, img_size: int) -> Preprocessing:
    """Eval preprocessing that travels with the weights: torchvision's own resize/crop ratio and
    statistics for `--weights imagenet` (232/224 for the IMAGENET1K_V2 weights, 256/224 for V1),
    scaled to `img_size`; the classic 256/224 and ImageNet statistics for a file or `none`."""
    if weights != "imagenet":
        return Preprocessing.classic(img_size)
    preset = get_model_weights(arch).DEFAULT.transforms()
    ratio = preset.resize_size[0] / preset.crop_size[0]
    return Preprocessing(img_size, int(round(img_size * ratio)), tuple(preset.mean), tuple(preset.std))


def load_weights(model: ResNet, arch: str, weights: str, log: Callable[[str], None]) -> None:
    """Load `imagenet`, a state-dict/checkpoint PATH, or nothing (`none`) into `model`."""
    if weights == "none":
        log("Weights: random initialisation (--weights none).")
        return
    if weights == "imagenet":
        state, source = imagenet_state_dict(arch), f"torchvision ImageNet weights for {arch}"
    else:
        state, source = read_state_dict(weights), weights
    apply_state_dict(model, state, source, log)


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's weights API, downloading once into the torch hub cache."""
    url = get_model_weights(arch).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        if cached.is_file():
            raise UserError(
                f"The cached ImageNet weights {cached} could not be read ({exc}). Delete the file "
                "to download it again, or pass --weights PATH or --weights none."
            ) from None
        raise UserError(
            f"Could not download the ImageNet weights for {arch} from {url} ({exc}). If this "
            f"machine is offline, fetch that file elsewhere and place it at {cached}; or pass "
            "--weights PATH (a torchvision state dict or a resnext checkpoint), or --weights none "
            "to start from random weights."
        ) from None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A torchvision-style state dict, or the model inside a checkpoint written by this tool."""
    obj = safe_torch_load(path, what="weights file")
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} does not hold a state dict (a mapping of parameter names).")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path} is not a state dict: entries {_names(bad)} are not tensors.")
    return obj


def apply_state_dict(
    model: ResNet,
    state: dict[str, torch.Tensor],
    source: str,
    log: Callable[[str], None],
    assign: bool = False,
) -> None:
    """Strict load except for a classifier of another shape, which is replaced and reported.

    `assign` adopts the loaded tensors instead of copying into the model's: for a model built
    on the meta device, which skips random initialisation that would be overwritten anyway.
    """
    state = {_strip_prefix(k): v.float() if v.is_floating_point() else v for k, v in state.items()}
    own = model.state_dict()
    head_keys = [k for k in ("fc.weight", "fc.bias") if k in state and k in own]
    replaced = any(state[k].shape != own[k].shape for k in head_keys)
    if replaced:
        old = state["fc.weight"].shape[0] if "fc.weight" in state else "?"
        for k in head_keys:
            del state[k]
    missing = sorted(set(own) - set(state) - set(head_keys))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if wrong_shape:
        problems.append(f"keys of the wrong shape {_names(wrong_shape)}")
    if problems:
        raise UserError(misfit_message(source, guess_arch(own)[0], guess_arch(state), problems))
    if replaced:
        log(
            f"Replaced the classifier of {source}: {old} outputs -> {model.fc.out_features} "
            "classes (new head, random init)."
        )
    model.load_state_dict(state, strict=False, assign=assign)
    log(f"Weights: loaded {len(state)} tensors from {source}.")


def misfit_message(source: str, in_use: str | None, file_arch: tuple[str | None, int, int],
                   problems: list[str]) -> str:  # fmt: skip
    """One paragraph: the architecture in use, the one the file looks like, what to pass."""
    guess, alike, total = file_arch
    if guess is not None and alike == total:
        return (
            f"The weights in {source} are for {guess} (all {total} of their backbone tensors match "
            f"its layer names and shapes), but the architecture in use is {in_use}. Pass --arch "
            f"{guess}, or weights made for {in_use}."
        )
    closest = f"; the closest is {guess}, with {alike} of {total} tensors alike" if guess else ""
    return (
        f"The weights in {source} do not fit {in_use}, the architecture in use ({'; '.join(problems)}), "
        f"and look like none of the {len(ARCHS)} architectures resnext knows{closest}. Check that "
        "the file is a ResNet/ResNeXt state dict in torchvision's layout (`resnext archs` lists "
        "the architectures)."
    )


def guess_arch(state: dict[str, torch.Tensor]) -> tuple[str | None, int, int]:
    """The architecture a state dict looks made for, from its names and shapes (the classifier
    and BatchNorm's counters aside, which any head or torchvision version may change): the one
    with the most tensors alike, how many are, and how many it has. resnet50, resnext50_32x4d
    and wide_resnet50_2 share their names; only the shapes tell them apart."""
    shapes = {k: tuple(v.shape) for k, v in state.items() if _backbone_key(k)}
    best: tuple[str | None, int, int] = (None, 0, len(shapes))
    for arch in ARCHS:
        own = _backbone_shapes(arch)
        alike = sum(own.get(k) == shape for k, shape in shapes.items())
        if alike == len(shapes) == len(own):
            return arch, alike, alike
        if alike > best[1]:
            best = (arch, alike, max(len(own), len(shapes)))
    return best


@functools.lru_cache(maxsize=None)
def _backbone_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # no memory, no init: names and shapes only
        state = build_model(arch, 1000).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if _backbone_key(k)}


def _backbone_key(key: str) -> bool:
    return not key.startswith("fc.") and not key.endswith("num_batches_tracked")


def set_backbone_trainable(model: ResNet, trainable: bool) -> None:
    for name, param in model.named_parameters():
        if not name.startswith("fc."):
            param.requires_grad_(trainable)


def set_train_mode(model: ResNet, backbone_frozen: bool, freeze_bn: bool = False) -> None:
    """Train mode for what trains: a frozen backbone stays in eval mode so its BN stats stay put;
    with `freeze_bn` a fine-tuning backbone keeps its BatchNorm layers in eval mode (running
    statistics as loaded, used for normalising) while every weight, BN's included, trains."""
    if backbone_frozen:
        model.eval()
        model.fc.train()
        return
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def backbone_features(model: ResNet, images: torch.Tensor) -> torch.Tensor:
    """The pooled features that feed `fc`, through torchvision's own layers."""
    return _pooled(model, _second_stage(model, images))


def _second_stage(model: ResNet, images: torch.Tensor) -> torch.Tensor:
    """The stem and the first two stages: where the channel spread is read."""
    return model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(images))))))


def _pooled(model: ResNet, middle: torch.Tensor) -> torch.Tensor:
    """The last two stages and the average pool, from the second stage's output."""
    return model.avgpool(model.layer4(model.layer3(middle))).flatten(1)


def channel_spread(activations: torch.Tensor) -> torch.Tensor:
    """Each channel's standard deviation over the image (N, C, H, W -> N, C), in fp32: the
    diagonal of the centred Gram matrix, a statistic of texture and style (Gatys et al. 2016)
    that the unknown score's `style` component compares with the training images'."""
    return activations.float().flatten(2).std(2, correction=0)


def pooled_and_spread(model: ResNet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In one pass, the pooled features that feed `fc` and the channel spread of the second
    stage (`layer2`): what the unknown score (`model.trust`) reads."""
    middle = _second_stage(model, images)
    return _pooled(model, middle), channel_spread(middle)


def logits_and_features(model: ResNet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and its features: the pooled features (the first fc.in_features
    columns) followed by the second stage's channel spread (the last model.layer2 width)."""
    pooled, spread = pooled_and_spread(model, images)
    return model.fc(pooled), torch.cat([pooled.float(), spread], 1)


class WithFeatures(nn.Module):
    """A model whose forward returns (logits, features): what `resnext export` exports."""

    def __init__(self, model: ResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_features(self.model, images)


def _strip_prefix(key: str) -> str:
    # DataParallel / DistributedDataParallel / torch.compile wrap names
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
