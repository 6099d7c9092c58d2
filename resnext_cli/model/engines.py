"""Model -> class probabilities: loading a trained model for inference (a resnext checkpoint, a
plain state dict with class_indices.json, or an exported ONNX file) and running it on batches.

predict, batch-predict, evaluate, report and export all load their model here.
"""

from __future__ import annotations

import importlib
import io
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

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
from resnext_cli.model.trust import BatchOutput, Calibration

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
    calibration: Calibration = field(default_factory=Calibration)  # temperature, unknown detector
    forward: Callable[[torch.Tensor], Any] | None = None  # (logits, features); None: the model's

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
        """Class probabilities (on the CPU, calibrated) for a batch's inputs (`batches.get_batch`)."""
        return self.predict(inputs).probs

    def predict(self, inputs: torch.Tensor) -> BatchOutput:
        """Probabilities and unknown verdicts for a batch's inputs."""
        with torch.inference_mode():
            views = [(adjust_for_prior(logits, self.prior), features) for logits, features in self.views(inputs)]
            return finite_output(self.calibration.apply(views), self.source)

    def views(self, inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, features) in fp32 on the device, for the images and, with TTA, their mirrors."""
        forward = self.forward or partial(networks.logits_and_features, self.model)
        batches = [inputs, inputs.flip(-1)] if self.tta else [inputs]
        with torch.inference_mode(), autocast(self.device, self.precision):
            return [tuple(t.float() for t in forward(batch)) for batch in batches]  # type: ignore[misc]


def finite_output(output: BatchOutput, source: str) -> BatchOutput:
    """A batch's output whose probabilities are numbers (`finite_probabilities`)."""
    finite_probabilities(output.probs, source)
    return output


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



def load_inference_model(cfg: InferenceConfig, announce: bool = True) -> InferenceModel:
    """A resnext checkpoint (given, or the newest runs/*/best.pt), or the tutorial's artefacts:
    a plain state dict with --arch and --class-indices."""
    device = select_device(cfg.device)
    precision = precision_for(cfg.precision, device)
    calibration = Calibration()
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
        calibration = Calibration.from_checkpoint(checkpoint, source)
    model.eval()
    prepare_model(model, device, cfg.channels_last)
    forward = torch.compile(partial(networks.logits_and_features, model)) if cfg.compile else None
    calibration = chosen_calibration(calibration, cfg, source, announce)
    return InferenceModel(model, arch, classes, preprocessing, source, device, precision,
                          cfg.channels_last, trained_on, decode_on_device(cfg.decode, device),
                          cfg.tta, digests, prior, calibration.to(device), forward)  # fmt: skip


def chosen_calibration(calibration: Calibration, cfg: InferenceConfig, source: str, announce: bool) -> Calibration:
    """The model's calibration as the flags ask (--no-calibration, --unknown-threshold); a
    threshold for a model without an unknown score is said, not silently ignored."""
    if announce and cfg.calibration and cfg.unknown_threshold is not None and calibration.unknown is None:
        ui.warn(f"{source} has no unknown score, so --unknown-threshold has no effect; "
                "`resnext calibrate` fits one.")  # fmt: skip
    return calibration.choose(cfg.calibration, cfg.unknown_threshold)


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
    calibration: Calibration = field(default_factory=Calibration)

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
        return self.predict(inputs).probs

    def predict(self, inputs: torch.Tensor) -> BatchOutput:
        """The same probabilities and unknown verdicts as the checkpoint's, from the exported
        model's logits and features and the calibration exported beside it."""
        batches = [inputs, inputs.flip(-1)] if self.tta else [inputs]
        views = []
        for batch in batches:
            outputs = run_onnx_outputs(self.session, batch.contiguous().numpy())
            logits = adjust_for_prior(outputs[0].float(), self.prior)
            views.append((logits, outputs[1].float() if len(outputs) > 1 else None))
        return finite_output(self.calibration.apply(views), self.source)


def load_onnx_model(path: str, class_indices: str | None, tta: bool = False,
                    cfg: InferenceConfig | None = None, prior: str | None = None) -> OnnxModel:  # fmt: skip
    """model.onnx with preprocess.json, class_indices.json and (exports since calibration
    existed) calibration.json + unknown.npz beside it; `cfg` for --no-calibration and
    --unknown-threshold; `prior` for --prior (default: the one the model was trained for)."""
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
    calibration = read_calibration_files(model_file.parent)
    if calibration.unknown is not None and calibration.unknown.needs_features and len(session.get_outputs()) < 2:
        raise UserError(f"{path} has no features output, which the unknown score in "
                        f"{model_file.parent / CALIBRATION_JSON} needs; export the model again.")  # fmt: skip
    if cfg is not None:
        calibration = chosen_calibration(calibration, cfg, str(model_file), announce=True)
    return OnnxModel(session, classes, preprocessing, str(model_file), tta, resolved, calibration)


CALIBRATION_JSON = "calibration.json"  # beside an exported model: temperature, unknown rule
UNKNOWN_ARRAYS = "unknown.npz"  # and the unknown score's arrays (training-set statistics)


def write_calibration_files(folder: Path, calibration: Calibration, write_json: Callable[[Path, str], None],
                            write_bytes: Callable[[Path, bytes], None]) -> list[str]:  # fmt: skip
    """calibration.json (and unknown.npz when there is an unknown score) for an exported model:
    JSON and numpy arrays, so any runtime can read them. Returns the names written."""
    record: dict[str, Any] = {"temperature": calibration.temperature, "unknown": None}
    written = [CALIBRATION_JSON]
    if calibration.unknown is not None:
        state = calibration.unknown.to_state()
        arrays = {name: tensor.cpu().numpy() for name, tensor in state.pop("stats").items()}
        arrays["quantiles"] = state.pop("quantiles").numpy()
        record["unknown"] = {**state, "arrays": UNKNOWN_ARRAYS}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes(folder / UNKNOWN_ARRAYS, buffer.getvalue())
        written.append(UNKNOWN_ARRAYS)
    write_json(folder / CALIBRATION_JSON, json.dumps(record, indent=2) + "\n")
    return written


def read_calibration_files(folder: Path) -> Calibration:
    """What `write_calibration_files` wrote; an export from before it existed means T=1 and no
    unknown score."""
    path = folder / CALIBRATION_JSON
    if not path.is_file():
        return Calibration()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        state = record.get("unknown")
        if state is not None:
            with np.load(folder / state["arrays"], allow_pickle=False) as arrays:
                tensors = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
            state = {**state, "quantiles": tensors.pop("quantiles"), "stats": tensors}
        return Calibration.from_checkpoint({"temperature": record["temperature"], "unknown": state},
                                           str(path))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} (written by `resnext export` beside the model) could not be read: "
                        f"{exc}. Export the model again.") from None


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
    """Logits for a float32 NCHW batch."""
    return run_onnx_outputs(session, inputs)[0]


def run_onnx_outputs(session: Any, inputs: np.ndarray) -> list[torch.Tensor]:
    """Every output (logits, and features in exports that have them) for a float32 NCHW batch;
    a model with a fixed batch size gets it in chunks."""
    spec = session.get_inputs()[0]
    fixed = spec.shape[0] if isinstance(spec.shape[0], int) else None
    if fixed is None:
        return [torch.from_numpy(out) for out in session.run(None, {spec.name: inputs})]
    chunks = []
    for start in range(0, len(inputs), fixed):
        chunk = inputs[start : start + fixed]
        padded = np.concatenate([chunk, np.zeros((fixed - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        chunks.append([out[: len(chunk)] for out in session.run(None, {spec.name: padded})])
    return [torch.from_numpy(np.concatenate(parts)) for parts in zip(*chunks)]
