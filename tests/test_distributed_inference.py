"""Inference under torchrun (issue 28): batch-predict and evaluate on 2 gloo processes on the CPU
give one process's rows and files. Split from tests/test_distributed.py (training) so that
`pytest -n 2 --dist loadfile` can run the two halves on different workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import invoke, same_predictions


def torchrun(args: list, cwd: Path, script: list[str] | None = None, **env: str) -> subprocess.CompletedProcess:
    """2 gloo processes on the CPU, as `torchrun --standalone --nproc_per_node 2 -m resnext_cli`."""
    program = script or ["-m", "resnext_cli"]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program,
         *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )  # fmt: skip


@pytest.fixture(scope="module")
def predict_folder(tmp_path_factory) -> Path:
    """19 images (uneven over 2 processes and batches of 4) with an unreadable one in the middle."""
    from tests.test_predict import image_folder

    folder = image_folder(tmp_path_factory.mktemp("bp") / "imgs", [f"img_{i:02d}.png" for i in range(18)])
    (folder / "img_07b.jpg").write_bytes(b"not a jpeg")
    return folder


def single_process(args: list, cwd: Path):
    """The reference: one process, with one thread like each torchrun process (torchrun sets
    OMP_NUM_THREADS=1), so that the arithmetic is the same."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return invoke(args, cwd=cwd)
    finally:
        torch.set_num_threads(threads)


def output_rows(path: Path) -> list:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return path.read_bytes().split(b"\n")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])  # JSONL: in the next test
def test_batch_predict_on_two_gloo_processes_writes_the_rows_of_one(tmp_path, trained_run, predict_folder, suffix):
    """Issue 28: the images are dealt out a batch at a time, each process writes its part, rank 0
    merges them in listing order: the very rows of one process (same batches, same bits)."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    extra = ["--save-probs"] if suffix == ".parquet" else ["--topk", "2"]
    common = ["batch-predict", predict_folder, "--checkpoint", trained_run / "best.pt", "--workers", "0",
              "--batch-size", "4", "--precision", "fp32", "--device", "cpu", *extra]
    ddp = torchrun([*common, "--output", f"two{suffix}"], cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = single_process([*common, "--output", tmp_path / f"one{suffix}"], cwd=tmp_path)
    assert one.exit_code == 0, one.stderr
    assert output_rows(tmp_path / f"two{suffix}") == output_rows(tmp_path / f"one{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"one{suffix}", f"two{suffix}"])  # parts gone
    assert ddp.stdout.count("image: ") == 18 and ddp.stdout.count("Predicted 18 image(s), 1 unreadable") == 1
    assert "19 images in" in ddp.stderr and "over 2 processes" in ddp.stderr


def test_a_rank_that_dies_leaves_its_part_and_a_resume_redoes_only_what_is_missing(
    tmp_path, trained_run, predict_folder
):
    """Issue 28: rank 1 is SIGKILLed after its first batch; torchrun stops rank 0. The parts stay,
    FILE does not appear; `--resume-output` predicts only the missing images, and the merged file
    is the one process's, without a duplicate or a gap."""
    common = ["batch-predict", predict_folder, "--checkpoint", trained_run / "best.pt", "--workers", "0",
              "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--output", "preds.jsonl"]
    script = [str(Path(__file__).with_name("rank_dies.py"))]
    died = torchrun(common, cwd=tmp_path, script=script, DIE_RANK="1", DIE_AFTER="1")
    assert died.returncode != 0
    assert not (tmp_path / "preds.jsonl").exists()
    part1 = (tmp_path / "preds.jsonl.part-1-of-2").read_text().splitlines()
    assert [json.loads(line)["path"].rsplit("/", 1)[1] for line in part1] == [f"img_{i:02d}.png" for i in (4, 5, 6, 7)]
    part0 = (tmp_path / "preds.jsonl.part-0-of-2").read_text().splitlines()
    done = len(part0) + len(part1)

    resumed = torchrun([*common, "--resume-output"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done} image(s) already there, {19 - done} to go" in resumed.stderr
    assert resumed.stdout.count("image: ") + resumed.stderr.count("unreadable img_07b") == 19 - done
    one = single_process([*common[:-1], tmp_path / "one.jsonl"], cwd=tmp_path)
    assert one.exit_code == 0, one.stderr
    assert same_predictions((tmp_path / "preds.jsonl").read_text(), (tmp_path / "one.jsonl").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "preds.jsonl"]  # no part, no lock


def test_evaluate_on_two_gloo_processes_gathers_the_confusion_matrix(tmp_path, trained_run, dataset):
    """Issue 28: evaluate under torchrun scores a share per process and rank 0 writes the eval
    folder: the same files as one process."""
    common = ["evaluate", dataset, "--checkpoint", trained_run / "best.pt", "--workers", "0", "--batch-size", "4",
              "--precision", "fp32", "--device", "cpu"]
    ddp = torchrun([*common, "--out", "two"], cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("Accuracy") == 1
    one = single_process([*common, "--out", tmp_path / "one"], cwd=tmp_path)
    assert one.exit_code == 0, one.stderr
    for name in ("metrics.json", "confusion_matrix.csv", "per_class.csv", "misclassified.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
