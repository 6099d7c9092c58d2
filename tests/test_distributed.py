"""torchrun + DistributedDataParallel on the CPU (gloo): training. Inference under torchrun is in
tests/test_distributed_inference.py (a file apart, so that pytest -n 2 gives each half to a worker)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnext_cli.data.loaders import EpochSampler
from tests.conftest import invoke, make_dataset


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
