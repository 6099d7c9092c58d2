"""Model -> class probabilities: loading a trained model for inference (a resnext checkpoint, a
plain state dict with class_indices.json, or an exported ONNX file) and running it on batches.

predict, batch-predict, evaluate, report and export all load their model here.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnext_cli import ui
from resnext_cli.config import InferenceConfig
from resnext_cli.data import balance
from resnext_cli.data.batches import InputSpec
from resnext_cli.data.loaders import ImageListDataset, image_dataset, inference_workers
from resnext_cli.data.transforms import Preprocessing, read_preprocess_json
from resnext_cli.errors import EXIT_FAILED, UserError
from resnext_cli.model import checkpoint as ckpt
from resnext_cli.model import networks
from resnext_cli.model.device import (
    autocast,
    decode_on_device,
    pin_memory_for,
    precision_for,
    prepare_model,
    select_device,
)

EXPORT_EXTRA = "pip install 'resnext-cli[export]'  (onnx, onnxruntime, onnxscript)"


@dataclass
class InferenceModel:
    """A PyTorch model in eval mode with what it needs to read images and name classes."""

    model: torch.nn.Module
    arch: str
    classes: list[str]
    preprocessing: Preprocessing
    source: str  # the checkpoint or weights file, as shown to the user
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    trained_on: str | None = None  # the data folder the checkpoint's run trained on
    decode_on_device: bool = False
    tta: bool = False  # average over the image and its mirror image
    train_digests: torch.Tensor | None = None  # its training files (checkpoint.TRAIN_DIGESTS)
    prior: Prior | None = None  # the class prior predictions assume; None: the logits as they are

    def describe(self) -> str:
        layout = ", channels-last" if self.channels_last else ""
        decode = ", GPU decode" if self.decode_on_device else ""
        tta = ", mirror TTA" if self.tta else ""
        prior = f", {self.prior.describe()}" if self.prior and self.prior.offsets is not None else ""
        return f"{self.source} on {self.device} ({self.precision}{layout}{decode}{tta}{prior})"

    @property
    def spec(self) -> InputSpec:
        return InputSpec(self.device, self.channels_last, self.preprocessing, self.decode_on_device)

    @property
    def pin_memory(self) -> bool:
        return pin_memory_for(self.device)

    def dataset(self, samples: list[tuple[str, int]]) -> ImageListDataset:
        return image_dataset(samples, self.preprocessing, on_device=self.decode_on_device)

    def decode_workers(self, paths: list[str], requested: int | None) -> int:
        return inference_workers(paths, requested, self.device.type, self.preprocessing.decode_min_size)

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities (on the CPU) for a batch's inputs (`batches.get_batch`)."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            probs = to_probabilities(self.model(inputs), self.prior)
            if self.tta:
                probs = (probs + to_probabilities(self.model(inputs.flip(-1)), self.prior)) / 2
        return finite_probabilities(probs.cpu(), self.source)


def finite_probabilities(probs: torch.Tensor, source: str) -> torch.Tensor:
    """Probabilities that are numbers. A model whose outputs are nan/inf (the weights of a run
    that diverged, a damaged file) is an error (exit 1), never `"prob": NaN` in a result, which
    is not even valid JSON. One pass over a batch x classes tensor already on the CPU."""
    if not bool(torch.isfinite(probs).all()):
        raise UserError(
            f"The model {source} gives probabilities that are not numbers (nan or inf): its weights "
            "are not finite (saved by a training run that diverged?) or the file is damaged. Use "
            "another checkpoint, or train again with a lower --lr.",
            EXIT_FAILED,
        )
    return probs


@dataclass
class Prior:
    """The class prior predictions assume (`--prior`), and the offsets that turn the model's
    logits into logits for it (None: they already are)."""

    name: str  # "uniform" | "train"
    offsets: torch.Tensor | None
    class_counts: list[int] | None  # training images per class, where the model records them
    balance: str = "none"  # the --balance the model was trained with

    def describe(self) -> str:
        return "every class equally likely (prior uniform)" if self.name == "uniform" else \
            "classes as frequent as in training (prior train)"  # fmt: skip


def resolve_prior(
    counts: list[int] | None, trained_with: str, requested: str | None, source: str
) -> Prior:
    """`--prior` (default: the one the model was trained for, `balance.default_prior`) applied to
    a model trained with `--balance trained_with` on `counts` images per class."""
    name = requested or balance.default_prior(trained_with)
    if counts is None:
        if name != balance.fitted_prior(trained_with):
            raise UserError(
                f"--prior {name} needs the training images per class, which {source} does not "
                "record (a checkpoint from before resnext stored `class_counts`, or plain "
                "weights). Leave out --prior, or retrain to get a checkpoint that has them."
            )
        return Prior(name, None, None, trained_with)
    return Prior(name, balance.prior_offsets(counts, trained_with, name), list(counts), trained_with)


def adjust_for_prior(logits: torch.Tensor, prior: Prior | None) -> torch.Tensor:
    """Logit adjustment (Menon et al., ICLR 2021): the log class priors subtracted (or added
    back), so that the arg max answers for the prior asked; the first step after the model."""
    if prior is None or prior.offsets is None:
        return logits
    return logits + prior.offsets.to(logits.device)


def to_probabilities(logits: torch.Tensor, prior: Prior | None) -> torch.Tensor:
    """Logits -> prior adjustment -> softmax: every prediction goes through here."""
    return torch.softmax(adjust_for_prior(logits.float(), prior), dim=1)


def load_inference_model(cfg: InferenceConfig, announce: bool = True) -> InferenceModel:
    """A resnext checkpoint (given, or the newest runs/*/best.pt), or the tutorial's artefacts:
    a plain state dict with --arch and --class-indices."""
    device = select_device(cfg.device)
    precision = precision_for(cfg.precision, device)
    if cfg.weights:
        assert cfg.arch and cfg.class_indices
        classes = ckpt.read_class_indices(cfg.class_indices)
        state = networks.read_state_dict(cfg.weights)
        _check_class_count(state, classes, cfg.weights, cfg.class_indices)
        model = _weights_only_model(cfg.arch, len(classes), state, cfg.weights)
        source, arch, trained_on, digests = cfg.weights, cfg.arch, None, None
        preprocessing = Preprocessing.classic(cfg.img_size or 224)
        prior = resolve_prior(None, "none", cfg.prior, cfg.weights)
    else:
        path = Path(cfg.checkpoint) if cfg.checkpoint else chosen_checkpoint(cfg.run, announce)
        checkpoint = ckpt.load_checkpoint(path)
        classes = list(checkpoint["classes"])
        if cfg.class_indices:
            named = ckpt.read_class_indices(cfg.class_indices)
            _check_class_count(checkpoint["model"], named, str(path), cfg.class_indices)
            classes = named
        if cfg.arch and cfg.arch != checkpoint["arch"]:
            raise UserError(f"--arch {cfg.arch} disagrees with {path}, a {checkpoint['arch']}.")
        arch, source = checkpoint["arch"], str(path)
        model = _weights_only_model(arch, len(classes), checkpoint["model"], source)
        preprocessing = ckpt.checkpoint_preprocessing(checkpoint, cfg.img_size)
        config = checkpoint["config"] if isinstance(checkpoint["config"], dict) else {}
        trained_on = config.get("data")
        digests = ckpt.train_digests(checkpoint)
        prior = resolve_prior(checkpoint.get("class_counts"), str(config.get("balance", "none")),
                              cfg.prior, source)  # fmt: skip
    model.eval()
    prepare_model(model, device, cfg.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    return InferenceModel(model, arch, classes, preprocessing, source, device, precision,
                          cfg.channels_last, trained_on, decode_on_device(cfg.decode, device),
                          cfg.tta, train_digests=digests, prior=prior)  # fmt: skip


def _weights_only_model(
    arch: str, num_classes: int, state: dict[str, torch.Tensor], source: str
) -> torch.nn.Module:
    """Built on the meta device and given the file's tensors: no random init to throw away
    (0.2 s for resnet18, more for the large models, at every predict)."""
    with torch.device("meta"):
        model = networks.build_model(arch, num_classes)
    if "fc.weight" not in state:
        raise UserError(f"{source} has no classifier (fc.*): it cannot predict classes.")
    networks.apply_state_dict(model, state, source, log=lambda _: None, assign=True)
    if model.fc.weight.is_meta:  # the file's classifier did not fit, and was not loaded
        raise UserError(
            f"{source}'s classifier has shape {tuple(state['fc.weight'].shape)}, but {arch} with "
            f"{num_classes} classes needs {tuple(model.fc.weight.shape)}: it cannot predict these "
            "classes."
        )
    return model


def chosen_checkpoint(run: str | None, announce: bool = True) -> Path:
    """best.pt of `--run NAME`, or of the latest finished run; which run, and why, said on stderr."""
    run_dir, how = ckpt.choose_run(run)
    path = run_dir / "best.pt"
    if announce:
        ui.note(f"Using {path}: {how}, {ckpt.describe_run(run_dir)}. Pass --run NAME or "
                "--checkpoint to choose another.")  # fmt: skip
    return path


def _check_class_count(
    state: dict[str, torch.Tensor], classes: list[str], weights: str, class_file: str
) -> None:
    outputs = state["fc.weight"].shape[0] if "fc.weight" in state else None
    if outputs is not None and outputs != len(classes):
        raise UserError(
            f"{weights} has a classifier with {outputs} outputs but {class_file} names "
            f"{len(classes)} classes. Use the class_indices.json written with these weights."
        )


def top_k(probs: torch.Tensor, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    values, indices = torch.topk(probs, min(k, len(classes)), dim=1)
    return [
        [(classes[i], float(v)) for v, i in zip(row_v.tolist(), row_i.tolist())]
        for row_v, row_i in zip(values, indices)
    ]


# ---------------------------------------------------------------- ONNX


@dataclass
class OnnxModel:
    """An exported model on onnxruntime, with the class map and preprocessing written beside it."""

    session: Any
    classes: list[str]
    preprocessing: Preprocessing
    source: str
    tta: bool = False
    prior: Prior | None = None

    pin_memory = False  # onnxruntime reads host memory

    def describe(self) -> str:
        prior = f", {self.prior.describe()}" if self.prior and self.prior.offsets is not None else ""
        return f"{self.source} on onnxruntime (CPU, fp32{', mirror TTA' if self.tta else ''}{prior})"

    @property
    def spec(self) -> InputSpec:
        return InputSpec(torch.device("cpu"), False, self.preprocessing)

    def dataset(self, samples: list[tuple[str, int]]) -> ImageListDataset:
        return image_dataset(samples, self.preprocessing)

    def decode_workers(self, paths: list[str], requested: int | None) -> int:
        return inference_workers(paths, requested, "cpu", self.preprocessing.decode_min_size)

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        probs = to_probabilities(run_onnx(self.session, inputs.numpy()), self.prior)
        if self.tta:
            mirrored = run_onnx(self.session, inputs.flip(-1).contiguous().numpy())
            probs = (probs + to_probabilities(mirrored, self.prior)) / 2
        return finite_probabilities(probs, self.source)


def load_onnx_model(
    path: str, class_indices: str | None, tta: bool = False, prior: str | None = None
) -> OnnxModel:
    require_onnx("onnxruntime")
    model_file = Path(path)
    if not model_file.is_file():
        raise UserError(f"The ONNX model {path} does not exist.")
    preprocessing = read_preprocess_json(model_file.parent / "preprocess.json")
    exported = json.loads((model_file.parent / "preprocess.json").read_text(encoding="utf-8"))
    counts, trained_with = exported.get("class_counts"), str(exported.get("balance") or "none")
    classes = ckpt.read_class_indices(class_indices or model_file.parent / "class_indices.json")
    session = onnx_session(model_file)
    outputs = session.get_outputs()[0].shape[-1]
    if isinstance(outputs, int) and outputs != len(classes):
        raise UserError(f"{path} has {outputs} outputs but the class file names {len(classes)}.")
    resolved = resolve_prior(counts, trained_with, prior, str(model_file))
    return OnnxModel(session, classes, preprocessing, str(model_file), tta, resolved)


def require_onnx(*modules: str) -> None:
    """The ONNX packages are an optional extra: say what to install instead of a traceback."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX support needs {', '.join(missing)}: {EXPORT_EXTRA}.")


def onnx_session(path: str | Path) -> Any:
    import onnxruntime as ort  # an optional extra: imported only when asked for

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UserError(f"onnxruntime could not load {path}: {exc}") from None


def run_onnx(session: Any, inputs: np.ndarray) -> torch.Tensor:
    """Logits for a float32 NCHW batch; a model with a fixed batch size gets it in chunks."""
    spec = session.get_inputs()[0]
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) else None
    if fixed is None:
        return torch.from_numpy(session.run(None, {spec.name: inputs})[0])
    outputs = []
    for start in range(0, len(inputs), fixed):
        chunk = inputs[start : start + fixed]
        padded = np.concatenate([chunk, np.zeros((fixed - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        outputs.append(session.run(None, {spec.name: padded})[0][: len(chunk)])
    return torch.from_numpy(np.concatenate(outputs))
