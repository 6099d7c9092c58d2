"""torchrun + DistributedDataParallel on the CPU (gloo)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnext_cli.data.loaders import EpochSampler
from tests.conftest import invoke, make_dataset, same_predictions


@pytest.mark.parametrize("size", [1, 7, 17, 18])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharding_counts_every_image(size, world):
    shards = [list(EpochSampler(size, seed=3, shuffle=False, rank=r, world_size=world, pad=False))
              for r in range(world)]
    assert sorted(i for shard in shards for _, i in shard) == list(range(size))  # each exactly once
    train = [list(EpochSampler(size, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert len({len(t) for t in train}) == 1  # equal steps on every process
    assert {i for t in train for _, i in t} == set(range(size))
    for r, t in enumerate(train):
        assert len(t) == len(EpochSampler(size, seed=3, rank=r, world_size=world))


def test_shards_of_a_global_batch_are_the_single_process_batch():
    single = [i for _, i in EpochSampler(36, seed=0)]
    ranks = [[i for _, i in EpochSampler(36, seed=0, rank=r, world_size=2)] for r in range(2)]
    for step in range(36 // 8):
        assert sorted(ranks[0][step * 4:(step + 1) * 4] + ranks[1][step * 4:(step + 1) * 4]) == \
            sorted(single[step * 8:(step + 1) * 8])


def rows(path: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items() if k != "seconds"} for r in csv.DictReader(path.open())]


def test_two_gloo_processes_match_one_process(tmp_path):
    data = make_dataset(tmp_path / "ds", train_per_class=12, val_per_class=6)
    (data / "val" / "gamma" / "gamma_05.png").unlink()  # 17 val images: uneven over 2 ranks
    common = ["--data", data, "--arch", "resnet18", "--weights", "none", "--freeze", "--epochs", "3",
              "--img-size", "32", "--workers", "0", "--seed", "0", "--lr", "0.02", "--precision", "fp32",
              "--device", "cpu"]  # gloo on the CPU, whatever GPUs the machine has
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "resnext_cli", "train", *map(str, common), "--batch-size", "4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs = tmp_path / "runs"
    assert [p.name for p in runs.iterdir() if p.is_dir()] == ["exp"]  # rank 0 alone writes
    assert json.loads((runs / "latest").read_text())["run"] == "exp"  # once
    assert ddp.stdout.count("Best val accuracy") == 1  # and prints
    assert "2 processes, batch 4 per process (8 global)" in ddp.stdout
    single = invoke(["train", *common, "--batch-size", "8", "--out", tmp_path / "single"])
    assert single.exit_code == 0, single.stderr
    distributed, reference = rows(tmp_path / "runs" / "exp" / "metrics.csv"), rows(tmp_path / "single" / "metrics.csv")
    assert len(distributed) == len(reference) == 3
    for d, s in zip(distributed, reference):
        scored = d["val_acc"] * 17  # 17 images, each counted once (csv keeps 6 decimals)
        assert abs(scored - round(scored)) < 1e-4
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert d[key] == pytest.approx(s[key], abs=1e-5), key  # the stated tolerance
    # rank 0 alone calibrates best.pt at the end, as one process would
    assert ddp.stdout.count("Calibrated on 17 val images") == 1
    ddp_best = torch.load(runs / "exp" / "best.pt", weights_only=True)
    single_best = torch.load(tmp_path / "single" / "best.pt", weights_only=True)
    assert ddp_best["temperature"] == pytest.approx(single_best["temperature"], rel=1e-3)
    assert ddp_best["unknown"]["threshold"] == pytest.approx(single_best["unknown"]["threshold"], abs=1e-3)

    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "resnext_cli", "train", "--resume", "runs/exp", "--epochs", "4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming after epoch 3" in resumed.stdout
    assert len(rows(tmp_path / "runs" / "exp" / "metrics.csv")) == 4


def test_sync_bn_on_cpu_is_refused_only_under_torchrun(tmp_path, dataset):
    result = invoke(["train", "--data", dataset, "--arch", "resnet18", "--weights", "none", "--epochs", "1",
                     "--img-size", "32", "--workers", "0", "--sync-bn", "--out", tmp_path / "r"])
    assert result.exit_code == 0 and "no effect in a single process" in result.stderr


def test_cached_features_under_torchrun(tmp_path, monkeypatch):
    """Rank 0 builds the cache, the other rank reads it; the head matches a single process."""
    data = make_dataset(tmp_path / "ds", train_per_class=8, val_per_class=3)
    common = ["--data", data, "--arch", "resnet18", "--weights", "none", "--freeze", "--epochs", "2",
              "--img-size", "32", "--workers", "0", "--seed", "0", "--lr", "0.02", "--precision", "fp32",
              "--cache-features", "--no-augment", "--device", "cpu"]
    env = {**__import__("os").environ, "RESNEXT_CACHE": str(tmp_path / "cache")}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "resnext_cli", "train", *map(str, common), "--batch-size", "4", "--out", "ddp"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    monkeypatch.setenv("RESNEXT_CACHE", str(tmp_path / "cache"))
    single = invoke(["train", *common, "--batch-size", "8", "--out", tmp_path / "single"])
    assert single.exit_code == 0 and "reusing the cache" in single.stdout
    for d, s in zip(rows(tmp_path / "ddp" / "metrics.csv"), rows(tmp_path / "single" / "metrics.csv")):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert d[key] == pytest.approx(s[key], abs=1e-5), key


# ---------------------------------------------------------------- inference under torchrun


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
