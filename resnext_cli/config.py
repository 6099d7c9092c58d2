"""One dataclass per command; a YAML file and command-line flags fill it, in that order.

Every flag of a command is a field here with the same name (kebab-case on the command line,
snake_case in YAML), so a saved `config.yaml` can be fed back with `--config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from resnext_cli.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "step", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODERS = ("auto", "cpu", "gpu")  # where JPEGs are decoded; auto: on the GPU when on CUDA
# the unknown score's components (model/trust.py), joined with "+"; the default was measured
UNKNOWN_COMPONENTS = ("msp", "maxlogit", "energy", "knn", "cknn", "mahalanobis", "rawmaha")
UNKNOWN_SCORE = "energy+knn"
UNKNOWN_ACCEPT = 0.95  # share of the val photos accepted as known


@dataclass
class TrainConfig:
    data: str | None = None
    arch: str = "resnext50_32x4d"
    weights: str = "imagenet"
    freeze: bool | None = None  # None: freeze unless --weights none
    unfreeze_after: int | None = None
    backbone_lr_mult: float = 0.1
    freeze_bn: bool | None = None  # fine-tuning: BN statistics as loaded; None: after a frozen phase
    img_size: int = 224
    augment: bool = True  # RandomResizedCrop + flip; off: the val transform for training too
    cache_features: bool = True  # frozen phase: backbone features computed once, kept on disk
    feature_views: int = 4  # with cache_features: view 1 plain, views 2..K augmented, cycled
    val_split: float = 0.1
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int | None = None  # None: drawn at start and recorded in config.yaml
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 where the hardware has it, else fp32 (fp16 on old GPUs)
    channels_last: bool = True
    decode: str = "auto"
    compile: bool = False  # torch.compile the training forward (opt-in: compiling takes minutes)
    workers: int | None = None  # None: chosen for the machine
    out: str | None = None
    name: str | None = None
    patience: int | None = None
    sync_bn: bool = False  # under torchrun: batch norm statistics over all processes
    resume: str | None = None  # a run folder (or its last.pt) to continue
    report: bool = True  # report.html at the end (evaluates best.pt on the val split)
    unknown_score: str = UNKNOWN_SCORE  # how `unknown` is told: components joined with "+"
    unknown_threshold: float = UNKNOWN_ACCEPT  # share of the val photos accepted as known

    def validate(self) -> None:
        check_unknown_score(self.unknown_score)
        check_accept_share(self.unknown_threshold)
        if not self.data:
            raise UserError(
                "No dataset given. Usage: resnext train DATA (or --data DATA, or `data:` in the "
                "config file), with DATA/train/<class>/* and DATA/val/<class>/*."
            )
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_range("epochs", self.epochs, low=1)
        _check_range("batch_size", self.batch_size, low=1)
        _check_range("img_size", self.img_size, low=16)
        _check_range("lr", self.lr, low=0, inclusive=False)
        _check_range("weight_decay", self.weight_decay, low=0)
        _check_range("backbone_lr_mult", self.backbone_lr_mult, low=0)
        _check_range("warmup_epochs", self.warmup_epochs, low=0)
        _check_range("feature_views", self.feature_views, low=1)
        _check_range("label_smoothing", self.label_smoothing, low=0, high=1)
        _check_range("val_split", self.val_split, low=0, high=1, inclusive=False)
        if self.unfreeze_after is not None:
            _check_range("unfreeze_after", self.unfreeze_after, low=0)
        if self.patience is not None:
            _check_range("patience", self.patience, low=1)
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise UserError(
                f"--warmup-epochs ({self.warmup_epochs}) must be smaller than --epochs "
                f"({self.epochs}), or the learning rate never reaches its target."
            )
        if self.out and self.name:
            raise UserError("Give either --out DIR or --name NAME, not both.")
        check_device_string(self.device)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("decode", self.decode, DECODERS)


@dataclass
class InferenceConfig:
    """Where the model comes from and how it runs; shared by predict and batch-predict."""

    checkpoint: str | None = None
    weights: str | None = None  # a plain state dict, with --arch and --class-indices
    arch: str | None = None
    class_indices: str | None = None
    img_size: int | None = None  # None: the checkpoint's
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    decode: str = "auto"
    compile: bool = False  # torch.compile the model: pays off only for large batches of images
    tta: bool = False  # average the predictions for the image and its mirror image
    calibration: bool = True  # the checkpoint's temperature and unknown score; off: raw softmax
    unknown_threshold: float | None = None  # share of val photos accepted; None: the checkpoint's

    def validate(self) -> None:
        if self.unknown_threshold is not None:
            check_accept_share(self.unknown_threshold)
        if self.checkpoint and self.weights:
            raise UserError("Give either --checkpoint or --weights (with --arch), not both.")
        if self.weights and not (self.arch and self.class_indices):
            raise UserError(
                "--weights needs --arch and --class-indices too, e.g. "
                "`--weights resNet34.pth --arch resnet34 --class-indices class_indices.json`."
            )
        if self.img_size is not None:
            _check_range("img_size", self.img_size, low=16)
        check_device_string(self.device)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("decode", self.decode, DECODERS)


@dataclass
class PredictConfig(InferenceConfig):
    images: list[str] = field(default_factory=list)
    topk: int = 5
    json: bool = False
    plot: str | None = None

    def validate(self) -> None:
        super().validate()
        if not self.images:
            raise UserError("No image given. Usage: resnext predict IMG [IMG ...].")
        _check_range("topk", self.topk, low=1)


@dataclass
class BatchPredictConfig(InferenceConfig):
    data: str | None = None  # the folder of images
    batch_size: int = 8
    recursive: bool = False
    topk: int = 1
    output: str | None = None
    workers: int | None = None
    quiet: bool = False
    resume_output: bool = False
    onnx: str | None = None  # an exported model.onnx instead of a checkpoint
    reject_unknown: bool = False  # `class` left empty for images whose `known` is false

    def validate(self) -> None:
        super().validate()
        if self.reject_unknown and not self.calibration:
            raise UserError("--reject-unknown needs the unknown score, which --no-calibration turns off.")
        if self.onnx and (self.checkpoint or self.weights):
            raise UserError("Give either --onnx or --checkpoint/--weights, not both.")
        if self.onnx and self.decode == "gpu":
            raise UserError("--decode gpu does not apply to --onnx: onnxruntime reads host memory.")
        if self.resume_output and not self.output:
            raise UserError("--resume-output needs --output FILE: the file to continue.")
        if not self.data:
            raise UserError("No folder given. Usage: resnext batch-predict DIR.")
        _check_range("batch_size", self.batch_size, low=1)
        _check_range("topk", self.topk, low=1)
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)
        if self.output and Path(self.output).suffix.lower() not in (".csv", ".jsonl"):
            raise UserError(f"--output must end in .csv or .jsonl, got {self.output!r}.")


@dataclass
class EvaluateConfig(InferenceConfig):
    data: str | None = None  # DIR/<class>/*, a dataset root (its val split); None: the trained-on data
    batch_size: int = 16
    workers: int | None = None
    json: bool = False
    out: str | None = None  # None: eval/ beside the checkpoint
    unknown: str | None = None  # photos of none of the classes: how well unknowns are told apart

    def validate(self) -> None:
        super().validate()
        if self.unknown is not None and not Path(self.unknown).is_dir():
            raise UserError(f"--unknown {self.unknown} is not a folder; give a folder of photos of "
                            "none of the model's classes.")  # fmt: skip
        _check_range("batch_size", self.batch_size, low=1)
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)


@dataclass
class ReportConfig:
    run_dir: str | None = None  # None: the latest finished run
    data: str | None = None  # None: the data the run trained on
    batch_size: int = 16
    workers: int | None = None
    device: str = "auto"
    decode: str = "auto"
    gallery: int = 24  # most confident mistakes shown as thumbnails
    unknown: str | None = None  # photos of none of the classes: how well the unknown score tells them

    def validate(self) -> None:
        _check_range("batch_size", self.batch_size, low=1)
        _check_range("gallery", self.gallery, low=0)
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)
        check_device_string(self.device)
        _check_choice("decode", self.decode, DECODERS)


@dataclass
class CheckDataConfig:
    data: str | None = None
    workers: int | None = None  # None: every core (reading files is the whole job)
    json: bool = False
    min_size: int = 32  # images with a shorter side below this are reported as tiny
    imbalance_ratio: float = 5.0  # largest / smallest class size reported as imbalance

    def validate(self) -> None:
        if not self.data:
            raise UserError("No folder given. Usage: resnext check-data DATA.")
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)
        _check_range("min_size", self.min_size, low=1)
        _check_range("imbalance_ratio", self.imbalance_ratio, low=1)


@dataclass
class AuditConfig:
    data: str | None = None
    weights: str = "imagenet"  # imagenet | PATH (state dict or checkpoint) | none
    checkpoint: str | None = None  # a trained run's best.pt as the backbone (and its preprocessing)
    arch: str | None = None  # None: resnext50_32x4d, or the checkpoint's
    img_size: int | None = None  # None: 224, or the checkpoint's
    folds: int = 5
    similarity: float = 0.9  # centred cosine similarity at or above which two images are near-copies
    out: str | None = None  # None: runs/audit
    json: bool = False
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    decode: str = "auto"
    val_split: float = 0.1  # DATA without a val folder: split as train would
    seed: int = 0  # folds; and the split of a single folder
    gallery: int = 60  # findings shown with thumbnails in audit.html

    def validate(self) -> None:
        if not self.data:
            raise UserError("No dataset given. Usage: resnext audit DATA (a folder of class folders).")
        if self.checkpoint and self.weights not in ("imagenet", None):
            raise UserError("Give either --checkpoint or --weights, not both.")
        _check_range("folds", self.folds, low=2)
        _check_range("similarity", self.similarity, low=0, high=1.0001)
        _check_range("batch_size", self.batch_size, low=1)
        _check_range("gallery", self.gallery, low=0)
        _check_range("val_split", self.val_split, low=0, high=1, inclusive=False)
        if self.img_size is not None:
            _check_range("img_size", self.img_size, low=16)
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)
        check_device_string(self.device)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("decode", self.decode, DECODERS)


@dataclass
class CacheConfig:
    json: bool = False
    older_than: float | None = None  # clear: only entries unused for this many days

    def validate(self) -> None:
        if self.older_than is not None:
            _check_range("older_than", self.older_than, low=0)


@dataclass
class CalibrateConfig:
    run_dir: str | None = None  # a run folder or a checkpoint; None: the latest finished run
    data: str | None = None  # labelled photos; None: the run's val split
    unknown_score: str | None = None  # None: the checkpoint's, else UNKNOWN_SCORE
    unknown_threshold: float | None = None  # None: the checkpoint's rule, else UNKNOWN_ACCEPT
    batch_size: int = 16
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    decode: str = "auto"

    def validate(self) -> None:
        if self.unknown_score is not None:
            check_unknown_score(self.unknown_score)
        if self.unknown_threshold is not None:
            check_accept_share(self.unknown_threshold)
        _check_range("batch_size", self.batch_size, low=1)
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)
        check_device_string(self.device)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("decode", self.decode, DECODERS)


EXPORT_FORMATS = ("onnx", "torchscript")


@dataclass
class ExportConfig:
    checkpoint: str | None = None
    format: str = "onnx"
    dynamic_batch: bool = False
    opset: int = 18
    out: str | None = None
    tolerance: float = 1e-3  # the largest logit difference accepted against PyTorch

    def validate(self) -> None:
        _check_choice("format", self.format, EXPORT_FORMATS)
        _check_range("opset", self.opset, low=18)
        _check_range("tolerance", self.tolerance, low=0, inclusive=False)


def available_cores() -> int:
    """The cores this process may run on: what the worker defaults are derived from."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def check_unknown_score(name: str) -> None:
    """--unknown-score: components of UNKNOWN_COMPONENTS joined with '+', each at most once."""
    parts = [p.strip() for p in name.split("+")]
    if not all(parts) or any(p not in UNKNOWN_COMPONENTS for p in parts) or len(set(parts)) != len(parts):
        raise UserError(
            f"Invalid --unknown-score {name!r}: components joined with '+', each one of "
            f"{', '.join(UNKNOWN_COMPONENTS)} (the default is {UNKNOWN_SCORE})."
        )


def check_accept_share(value: float) -> None:
    """--unknown-threshold: the share of the val photos accepted as known, in (0, 1]."""
    if not 0 < value <= 1:
        raise UserError(
            f"Invalid --unknown-threshold {value}: it is the share of the val photos accepted as "
            "known, greater than 0 and at most 1 (e.g. 0.95: 95% of them, the default)."
        )


def check_device_string(device: str) -> None:
    if device in ("auto", "cpu", "cuda", "mps") or (
        device.startswith("cuda:") and device[5:].isdigit()
    ):
        return
    raise UserError(f"Invalid --device {device!r}: use auto, cpu, cuda, cuda:N or mps.")


C = TypeVar("C")


def build_config(cls: type[C], config_file: str | None, overrides: dict[str, Any]) -> C:
    """Defaults, then the YAML file, then the flags actually given on the command line."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(read_yaml_config(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    check_fields(cls, values, source=config_file or "the command line")
    config = cls(**values)
    config.validate()  # type: ignore[attr-defined]
    return config


def read_yaml_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Config file {path} does not exist (or is not a file).")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"Config file {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"Config file {path} must be a mapping of option: value.")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def check_fields(cls: type, values: dict[str, Any], source: str) -> None:
    """Unknown keys and wrongly typed values are errors that name the key."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"Unknown config key {key!r} in {source}.{hint} Valid keys: {', '.join(known)}."
            )
        if not _matches_type(value, hints[key]):
            raise UserError(
                f"Config key {key!r} in {source} has value {value!r}, which is not "
                f"{_type_name(hints[key])}."
            )


def _matches_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches_type(v, item) for v in value)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    name = getattr(base, "__name__", str(base))
    return f"a {name}" + (" (or null)" if type(None) in typing.get_args(hint) else "")


def _check_choice(key: str, value: str, choices: tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        did_you_mean = f" Did you mean {close[0]!r}?" if close else ""
        where = f" ({hint})" if hint else ""
        raise UserError(
            f"Invalid {key.replace('_', '-')} {value!r}.{did_you_mean} "
            f"Choose one of: {', '.join(choices)}{where}."
        )


def _check_range(
    key: str, value: float, low: float, high: float | None = None, inclusive: bool = True
) -> None:
    too_low = value < low if inclusive else value <= low
    too_high = high is not None and value >= high
    if too_low or too_high:
        bound = f"at least {low}" if inclusive else f"greater than {low}"
        if high is not None:
            bound += f" and less than {high}"
        raise UserError(f"Invalid --{key.replace('_', '-')} {value}: it must be {bound}.")


def to_plain_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
