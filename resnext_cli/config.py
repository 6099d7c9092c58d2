"""One dataclass per command; a YAML file and command-line flags fill it, in that order.

Every flag of a command is a field here with the same name (kebab-case on the command line,
snake_case in YAML), so a saved `config.yaml` can be fed back with `--config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
# The crop size S. Above 1024 a typo (--img-size 2240) or a tampered checkpoint is likelier than
# a wish: at 1024 px resnext50_32x4d's layer outputs already take 3.5 GB per image in fp32 (21x
# those of 224 px), 56 GB for a batch of 16 being fine-tuned; at 2048, 14 GB per image.
IMG_SIZE_MIN, IMG_SIZE_MAX = 16, 1024
INT_LIMIT = 2**63  # every integer setting fits a signed 64-bit integer (seeds, sizes, counts)
TRACKERS = ("tensorboard", "mlflow")  # train --track: experiment trackers, each an optional extra
RUN_SORTS = ("date", "name", "status", "arch", "acc", "balanced", "time")  # resnext runs --sort
BALANCES = ("auto", "none", "weights", "sampler", "logit-adjust")  # rare classes (data/balance.py)
SELECT_BY = ("auto", "acc", "balanced_acc", "macro_f1")  # the val metric that picks best.pt
PRIORS = ("uniform", "train")  # the class prior predictions assume
# what `auto` means (measured: docs/benchmarks.md, class imbalance; data/balance.py applies it)
BALANCE_AUTO = "sampler"  # --balance auto on training classes at least this far apart:
BALANCE_AUTO_RATIO = 3.0  # largest / smallest class
SELECT_AUTO_RATIO = 1.5  # --select-by auto: balanced accuracy on val classes this far apart
EXPLAIN_METHODS = ("gradcam-fine", "gradcam", "occlusion", "integrated-gradients")  # heatmaps: model/cam.py
EXPLAIN_DEFAULT = EXPLAIN_METHODS[0]  # explain, predict --explain, evaluate's heatmaps (measured: design.md)
# the unknown score's components (model/trust.py), joined with "+"; the default was measured
UNKNOWN_COMPONENTS = ("msp", "maxlogit", "energy", "knn", "cknn", "mahalanobis", "rawmaha", "style")
UNKNOWN_SCORE = "energy+2*style"
UNKNOWN_ACCEPT = 0.95  # share of new photos like the val ones accepted as known


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
    balance: str = "auto"  # auto: BALANCE_AUTO from BALANCE_AUTO_RATIO, else none
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
    select_by: str = "auto"  # auto: balanced accuracy when val is imbalanced, else accuracy
    sync_bn: bool = False  # under torchrun: batch norm statistics over all processes
    resume: str | None = None  # a run folder (or its last.pt) to continue
    report: bool = True  # report.html at the end (evaluates best.pt on the val split)
    track: str | list[str] | None = None  # "tensorboard,mlflow" (or a YAML list); None: no tracker
    track_checkpoints: bool = False  # --track mlflow: best.pt among the run's artifacts too
    unknown_score: str = UNKNOWN_SCORE  # how `unknown` is told: components joined with "+"
    unknown_threshold: float = UNKNOWN_ACCEPT  # share of new photos like the val ones accepted as known

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
        _check_choice("balance", self.balance, BALANCES)
        _check_choice("select_by", self.select_by, SELECT_BY)
        _check_range("epochs", self.epochs, low=1)
        _check_range("batch_size", self.batch_size, low=1)
        check_img_size(self.img_size)
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
        if self.seed is not None:
            _check_range("seed", self.seed, low=0)
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise UserError(
                f"--warmup-epochs ({self.warmup_epochs}) must be smaller than --epochs "
                f"({self.epochs}), or the learning rate never reaches its target."
            )
        if self.out and self.name:
            raise UserError("Give either --out DIR or --name NAME, not both.")
        if self.name == "latest":
            raise UserError("--name latest is taken: runs/latest names the latest finished run. "
                            "Choose another name.")  # fmt: skip
        check_device_string(self.device)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("decode", self.decode, DECODERS)
        tracker_names(self.track)


def tracker_names(track: str | list[str] | None) -> tuple[str, ...]:
    """`--track tensorboard,mlflow` (or a YAML list) as checked names, in the order given."""
    given = track.split(",") if isinstance(track, str) else list(track or [])
    names = tuple(dict.fromkeys(name.strip().lower() for name in given if name.strip()))
    if names == ("none",):
        return ()
    for name in names:
        _check_choice("track", name, TRACKERS, "comma-separated, e.g. --track tensorboard,mlflow")
    return names


@dataclass
class InferenceConfig:
    """Where the model comes from and how it runs; shared by predict and batch-predict."""

    checkpoint: str | None = None
    run: str | None = None  # a run by name: runs/NAME/best.pt (None: the latest finished run)
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
    prior: str | None = None  # uniform | train; None: the checkpoint's (uniform if trained balanced)
    calibration: bool = True  # the checkpoint's temperature and unknown score; off: raw softmax
    unknown_threshold: float | None = None  # share of new photos like val accepted; None: the checkpoint's

    def validate(self) -> None:
        if self.prior is not None:
            _check_choice("prior", self.prior, PRIORS)
        if self.unknown_threshold is not None:
            check_accept_share(self.unknown_threshold)
        if self.checkpoint and self.weights:
            raise UserError("Give either --checkpoint or --weights (with --arch), not both.")
        check_one_model_source(run=self.run, checkpoint=self.checkpoint, weights=self.weights)
        if self.weights and not (self.arch and self.class_indices):
            raise UserError(
                "--weights needs --arch and --class-indices too, e.g. "
                "`--weights resNet34.pth --arch resnet34 --class-indices class_indices.json`."
            )
        if self.img_size is not None:
            check_img_size(self.img_size)
        check_device_string(self.device)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("decode", self.decode, DECODERS)


@dataclass
class PredictConfig(InferenceConfig):
    images: list[str] = field(default_factory=list)
    topk: int = 5
    json: bool = False
    plot: str | None = None
    explain: bool = False  # a Grad-CAM heatmap of the predicted class beside the probabilities

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
    overwrite: bool = False  # replace an existing --output (it stays until the new one is complete)
    save_probs: bool = False  # every class's probability in each row (JSONL, Parquet)
    reject_unknown: bool = False  # `class` left empty for images whose `known` is false

    def validate(self) -> None:
        super().validate()
        if self.reject_unknown and not self.calibration:
            raise UserError("--reject-unknown needs the unknown score, which --no-calibration turns off.")
        if self.onnx and (self.checkpoint or self.weights or self.run):
            raise UserError("Give either --onnx or --checkpoint/--run/--weights, not both.")
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
        if self.output and Path(self.output).suffix.lower() not in (".csv", ".jsonl", ".parquet"):
            raise UserError(f"--output must end in .csv, .jsonl or .parquet, got {self.output!r}.")
        if self.overwrite and self.resume_output:
            raise UserError("Give either --overwrite (start over) or --resume-output (continue), not both.")
        if self.save_probs and not (self.output and Path(self.output).suffix.lower() != ".csv"):
            raise UserError(
                "--save-probs writes every class's probability into --output FILE.jsonl or "
                "FILE.parquet (a CSV row has no room for them); give such an --output."
            )


@dataclass
class EvaluateConfig(InferenceConfig):
    data: str | None = None  # DIR/<class>/*, a dataset root (its val split); None: the trained-on data
    batch_size: int = 16
    workers: int | None = None
    json: bool = False
    out: str | None = None  # None: eval/ beside the checkpoint
    heatmaps: int = 24  # the most confident mistakes explained (predicted and true class)
    unknown: str | None = None  # photos of none of the classes: how well unknowns are told apart

    def validate(self) -> None:
        super().validate()
        if self.unknown is not None and not Path(self.unknown).is_dir():
            raise UserError(f"--unknown {self.unknown} is not a folder; give a folder of photos of "
                            "none of the model's classes.")  # fmt: skip
        _check_range("batch_size", self.batch_size, low=1)
        _check_range("heatmaps", self.heatmaps, low=0)
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)


@dataclass
class ExplainConfig(InferenceConfig):
    images: list[str] = field(default_factory=list)  # image files and folders of images
    classes: list[str] = field(default_factory=list)  # --class NAME (repeatable); none: the predicted
    method: str = EXPLAIN_DEFAULT
    out: str | None = None  # None: runs/explain, runs/explain2, ...
    recursive: bool = False
    batch_size: int = 8
    workers: int | None = None
    json: bool = False

    def validate(self) -> None:
        super().validate()
        if not self.images:
            raise UserError("No image given. Usage: resnext explain IMAGE... (files or folders).")
        _check_choice("method", self.method, EXPLAIN_METHODS)
        _check_range("batch_size", self.batch_size, low=1)
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)


@dataclass
class ReportConfig:
    run_dir: str | None = None  # None: the latest finished run
    run: str | None = None  # a run by name: runs/NAME (instead of run_dir)
    data: str | None = None  # None: the data the run trained on
    batch_size: int = 16
    workers: int | None = None
    device: str = "auto"
    decode: str = "auto"
    gallery: int = 24  # most confident mistakes shown as thumbnails
    compare: str | None = None  # another run whose curves and config the report sets beside these
    unknown: str | None = None  # photos of none of the classes: how well the unknown score tells them

    def validate(self) -> None:
        if self.run_dir and self.run:
            raise UserError("Give either RUN (a run folder) or --run NAME, not both.")
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
            check_img_size(self.img_size)
        if self.workers is not None:
            _check_range("workers", self.workers, low=0)
        _check_range("seed", self.seed, low=0)
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
class RunsConfig:
    root: str = "runs"  # the folder holding run folders
    sort: str = "date"
    json: bool = False
    compare: list[str] | None = None  # two runs: their config differences and metrics side by side

    def validate(self) -> None:
        _check_choice("sort", self.sort, RUN_SORTS)
        if self.compare is not None and len(self.compare) != 2:
            raise UserError(f"--compare takes two runs (A B), got {len(self.compare)}.")


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
    run: str | None = None  # a run by name: runs/NAME/best.pt
    format: str = "onnx"
    dynamic_batch: bool = False
    opset: int = 18
    out: str | None = None
    tolerance: float = 1e-3  # the largest logit difference accepted against PyTorch
    overwrite: bool = False  # replace model, class_indices.json and preprocess.json already in --out

    def validate(self) -> None:
        check_one_model_source(run=self.run, checkpoint=self.checkpoint)
        _check_choice("format", self.format, EXPORT_FORMATS)
        _check_range("opset", self.opset, low=18)
        _check_range("tolerance", self.tolerance, low=0, inclusive=False)


def available_cores() -> int:
    """The cores this process may run on: what the worker defaults are derived from."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def check_one_model_source(**given: str | None) -> None:
    """--run NAME names a run's best.pt: it cannot be given with another source of the model."""
    if given.get("run") is None:
        return
    if given["run"] == "":
        raise UserError("--run needs a run's name, e.g. --run exp3 (runs/exp3/best.pt).")
    others = [f"--{key}" for key, value in given.items() if key != "run" and value]
    if others:
        raise UserError(f"Give either --run or {' / '.join(others)}, not both: each chooses the model.")
def check_img_size(size: int, what: str = "--img-size") -> None:
    """The crop size, between IMG_SIZE_MIN and IMG_SIZE_MAX (see there why)."""
    if not IMG_SIZE_MIN <= size <= IMG_SIZE_MAX:
        raise UserError(
            f"Invalid {what} {size}: it must be between {IMG_SIZE_MIN} and {IMG_SIZE_MAX} pixels "
            f"(the crop the network sees; 224 is what ImageNet weights were trained at)."
        )


def check_unknown_score(name: str) -> None:
    """--unknown-score: components of UNKNOWN_COMPONENTS joined with '+', each at most once and
    each optionally weighted by a whole number (`2*style` counts twice in the mean)."""
    parts = _weighted_parts(name)
    names = [p[2].strip() for p in parts]
    weights_ok = all(not star or (w.strip().isdigit() and 1 <= int(w) <= 9) for w, star, _ in parts)
    if not weights_ok or any(n not in UNKNOWN_COMPONENTS for n in names) or len(set(names)) != len(names):
        raise UserError(
            f"Invalid --unknown-score {name!r}: components joined with '+', each one of "
            f"{', '.join(UNKNOWN_COMPONENTS)}, optionally weighted 1-9 as in `2*style` (the default "
            f"is {UNKNOWN_SCORE})."
        )


def _weighted_parts(name: str) -> list[tuple[str, str, str]]:
    """`energy+2*style` -> [("", "", "energy"), ("2", "*", "style")]."""
    return [p.strip().rpartition("*") for p in name.split("+")]


def score_components(name: str) -> tuple[str, ...]:
    """A score's components, a weighted one repeated: `energy+2*style` -> (energy, style, style)."""
    return tuple(c.strip() for weight, _, c in _weighted_parts(name)
                 for _ in range(int(weight) if weight.strip() else 1))  # fmt: skip


def check_accept_share(value: float) -> None:
    """--unknown-threshold: the share of new photos like the val ones accepted as known, in (0, 1]."""
    if not 0 < value <= 1:
        raise UserError(
            f"Invalid --unknown-threshold {value}: it is the share of new photos like the val ones "
            "accepted as known, greater than 0 and at most 1 (e.g. 0.95: 95% of them, the default)."
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
    except UnicodeDecodeError:
        raise UserError(f"Config file {path} is not a text file (not UTF-8): give a YAML file of "
                        "option: value lines, like a run's config.yaml.") from None  # fmt: skip
    except OSError as exc:
        raise UserError(f"Config file {path} could not be read: {exc.strerror or exc}.") from None
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
        problem = _number_problem(value)
        if problem:
            where = f"--{key.replace('_', '-')}" if source == "the command line" else f"{key!r} in {source}"
            raise UserError(f"Invalid {where}: {value!r} {problem}.")


def _number_problem(value: Any) -> str:
    """Numbers every setting must be: finite (nan and inf pass every range check, since they
    compare false or beyond it, then poison training), and ints within 64 bits."""
    if isinstance(value, float) and not math.isfinite(value):
        return "is not a finite number (nan and inf are refused)"
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
        return "is too large: integers must lie within +-2**63"
    return ""


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
