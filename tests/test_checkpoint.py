from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from resnext_cli.errors import UserError
from resnext_cli.model import checkpoint as ckpt
from tests.conftest import invoke


class _Payload:
    """Unpickling this would create a marker file: the code must never run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as handle:
        pickle.dump({"fc.weight": _Payload(str(marker))}, handle)
    torch.save({"w": _Payload(str(marker))}, tmp_path / "evil_zip.pt")
    for path in (evil, tmp_path / "evil_zip.pt"):
        with pytest.raises(UserError, match="Refused to load|could not be read"):
            ckpt.safe_torch_load(path)
        result = invoke(["predict", "x.jpg", "--checkpoint", path])
        assert result.exit_code == 2
    assert not marker.exists()


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path):
    target = tmp_path / "best.pt"
    ckpt.save_torch({"a": torch.ones(2)}, target)

    def explode(handle):
        handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="No space left"):
        ckpt.atomic_write(target, explode)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary left behind


def test_class_indices_round_trip_and_validation(tmp_path: Path):
    path = tmp_path / "class_indices.json"
    ckpt.write_class_indices(path, ["daisy", "dandelion", "roses"])
    assert path.read_text().startswith('{\n    "0": "daisy"')
    assert ckpt.read_class_indices(path) == ["daisy", "dandelion", "roses"]
    path.write_text('{"1": "a", "2": "b"}')
    with pytest.raises(UserError, match='"0", "1"'):
        ckpt.read_class_indices(path)


def test_unwritable_run_folder_is_a_clear_error(tmp_path: Path, dataset: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder cannot be created beneath a file, even by root
    result = invoke(["train", "--data", dataset, "--arch", "resnet18", "--weights", "none",
                     "--out", blocker / "run"])
    assert result.exit_code == 2 and "Cannot create" in result.stderr
    assert "Traceback" not in result.stderr
