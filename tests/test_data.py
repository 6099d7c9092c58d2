from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from resnext_cli.data import folders, images, loaders, transforms
from resnext_cli.errors import UserError
from tests.conftest import make_dataset


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "png"), ("LA", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpeg"),
     ("I;16", "png"), ("1", "bmp"), ("RGB", "webp")],
)
def test_every_mode_decodes_to_rgb(tmp_path: Path, mode: str, fmt: str):
    img = Image.new("RGB", (30, 20), (200, 100, 50)).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        img = Image.new("I;16", (30, 20), 40000)
    path = tmp_path / f"x.{fmt}"
    img.save(path)
    out = images.load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path):
    path = tmp_path / "deep.png"
    Image.new("I;16", (8, 8), 32768).save(path)  # half of the 16-bit range
    value = images.load_rgb(path).getpixel((0, 0))[0]
    assert 120 <= value <= 135


def test_transparent_pixels_become_white(tmp_path: Path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert images.load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = images.load_rgb(path)
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 5))  # after rotation the blue half is on top
    assert b > 200 and r < 60


def test_draft_decoding_shrinks_large_jpegs(tmp_path: Path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (10, 120, 30)).save(path)
    small = images.load_rgb(path, min_size=146)
    assert small.size == (250, 188)  # 1/8 scale: the smallest that keeps the short side >= 146
    assert min(images.load_rgb(path, min_size=400).size) >= 400
    assert images.load_rgb(path).size == (2000, 1500)


def test_extensions_are_case_insensitive():
    for name in ("a.jpg", "b.JPG", "c.Jpeg", "d.PNG", "e.webp", "f.TIFF", "g.bmp"):
        assert folders.is_image_name(name), name
    for name in ("notes.txt", "model.pt", "noext"):
        assert not folders.is_image_name(name)


def test_layout_with_train_and_valid(tmp_path: Path):
    root = make_dataset(tmp_path / "ds", train_per_class=3, val_per_class=2)
    (root / "val").rename(root / "valid")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "README.txt").write_text("x")
    (root / "train" / "alpha" / "notes.txt").write_text("not an image")
    layout = folders.discover_dataset(root, 0.1, 0)
    assert layout.classes == ["alpha", "beta", "gamma"]
    assert len(layout.train) == 9 and len(layout.val) == 6
    assert all(label == layout.classes.index(Path(p).parent.name) for p, label in layout.val)
    joined = " ".join(layout.warnings)
    assert ".ipynb_checkpoints" in joined and "README.txt" in joined


def test_val_classes_are_matched_by_name(tmp_path: Path):
    root = make_dataset(tmp_path / "ds", train_per_class=2, val_per_class=2)
    (root / "val" / "alpha").rename(root / "val" / "zzz")
    with pytest.raises(UserError, match="zzz"):
        folders.discover_dataset(root, 0.1, 0)


def test_missing_val_class_is_a_warning(tmp_path: Path):
    root = make_dataset(tmp_path / "ds", train_per_class=2, val_per_class=2)
    for f in (root / "val" / "beta").iterdir():
        f.unlink()
    (root / "val" / "beta").rmdir()
    layout = folders.discover_dataset(root, 0.1, 0)
    assert any("beta" in w for w in layout.warnings)
    assert {label for _, label in layout.val} == {0, 2}


def test_single_folder_is_split_stratified_and_seeded(tmp_path: Path):
    root = make_dataset(tmp_path / "flat", train_per_class=10, split_folders=False)
    a = folders.discover_dataset(root, 0.2, seed=1)
    b = folders.discover_dataset(root, 0.2, seed=1)
    c = folders.discover_dataset(root, 0.2, seed=2)
    assert a.val == b.val and a.val != c.val
    per_class = [sum(1 for _, label in a.val if label == k) for k in range(3)]
    assert per_class == [2, 2, 2]
    assert not set(p for p, _ in a.val) & set(p for p, _ in a.train)
    assert len(a.train) + len(a.val) == 30 and a.split["val"] == [p for p, _ in a.val]


@pytest.mark.parametrize(
    "setup,message",
    [
        ("missing", "does not exist"),
        ("one_class", "at least 2 class folders"),
        ("empty_class", "no images"),
        ("file", "is a file"),
    ],
)
def test_bad_layouts(tmp_path: Path, setup: str, message: str):
    root = tmp_path / "ds"
    if setup == "one_class":
        make_dataset(root, 2, 2, classes={"only": (1, 2, 3)})
    elif setup == "empty_class":
        make_dataset(root, 2, 2)
        (root / "train" / "empty").mkdir()
    elif setup == "file":
        root.write_text("x")
    with pytest.raises(UserError, match=message):
        folders.discover_dataset(root, 0.1, 0)


def test_unreadable_files_become_failures_not_exceptions(tmp_path: Path):
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20)).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (200, 200), (5, 5, 5)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    samples = [(str(p), 0) for p in (good, tmp_path / "bad.jpg", tmp_path / "empty.png", truncated)]
    ds = loaders.ImageListDataset(samples, transforms.eval_transform(16), None)
    batch = loaders.collate_skipping_failures([ds[i] for i in range(len(ds))])
    assert batch.indices == [0] and batch.images.shape == (1, 3, 16, 16)
    assert [i for i, _ in batch.failures] == [1, 2, 3]
    assert all(reason for _, reason in batch.failures)


def test_list_images_sorted_any_case(tmp_path: Path):
    for name in ("b.JPG", "a.png", "c.jpeg", "skip.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.Png").write_bytes(b"")
    flat = [Path(p).name for p in folders.list_images(tmp_path, recursive=False)]
    assert flat == ["a.png", "b.JPG", "c.jpeg"]
    assert len(folders.list_images(tmp_path, recursive=True)) == 4


def test_normalisation_matches_torchvision():
    import torch
    from torchvision import transforms as T

    img = Image.new("RGB", (40, 30), (10, 200, 90))
    img.paste((250, 3, 60), (5, 5, 20, 20))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(), T.Normalize(mean, std)])(img)
    ours = transforms.normalize_batch(transforms.eval_transform(32)(img).unsqueeze(0), mean, std)[0]
    assert transforms.eval_transform(32)(img).dtype == torch.uint8
    assert torch.allclose(ours, reference, atol=1e-5)
