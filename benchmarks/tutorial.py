"""Faithful re-implementations of the classic tutorial's loops, the baselines of the benchmarks.

Kept as the tutorial has them (main-process or ImageFolder loading, fp32, contiguous layout,
`net.train()` every epoch), so that a benchmark's ratio to them means something.
"""

from __future__ import annotations

import os
import time

import torch
from PIL import Image
from torch import nn, optim
from torchvision import datasets, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def batch_predict(model: nn.Module, paths: list[str], batch_size: int) -> int:
    """The tutorial's batch_predict: decode + transform each image in the main process.

    Faithful except that it is given the file list (rather than listing `*.jpg` itself) and it
    formats its per-image line without printing it. Like the tutorial it drops the last
    `len % batch_size` images; it returns how many it predicted.
    """
    data_transform = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
         transforms.Normalize(MEAN, STD)]
    )  # fmt: skip
    model.eval()
    done = 0
    with torch.no_grad():
        for ids in range(0, len(paths) // batch_size):
            img_list = []
            for img_path in paths[ids * batch_size : (ids + 1) * batch_size]:
                img = Image.open(img_path)
                img = data_transform(img)
                img_list.append(img)
            batch_img = torch.stack(img_list, dim=0)
            output = model(batch_img).cpu()
            predict = torch.softmax(output, dim=1)
            probs, classes = torch.max(predict, dim=1)
            for idx, (pro, cla) in enumerate(zip(probs, classes)):
                _ = f"image: {img_list[idx].shape}  class: {int(cla)}  prob: {float(pro):.3}"
                done += 1
    return done


def train(net: nn.Module, data_root: str, epochs: int, freeze: bool, lr: float = 1e-3,
          batch_size: int = 16, img_size: int = 224) -> dict[str, float]:
    """The tutorial's train.py: ImageFolder, RandomResizedCrop + flip, Adam, `net.train()` each
    epoch, validation every epoch, best accuracy kept. `freeze` is its (commented-out)
    requires_grad=False loop over the pretrained backbone; the new fc always trains. Its sizes
    are 224 and 256; `img_size` scales both (for backbones trained at another size)."""
    resize = int(round(img_size * 256 / 224))
    data_transform = {
        "train": transforms.Compose([transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
        "val": transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(img_size),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
    }  # fmt: skip
    train_dataset = datasets.ImageFolder(os.path.join(data_root, "train"), data_transform["train"])
    validate_dataset = datasets.ImageFolder(os.path.join(data_root, "val"), data_transform["val"])
    nw = min([os.cpu_count() or 1, batch_size if batch_size > 1 else 0, 8])
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=batch_size, shuffle=True,
                                               num_workers=nw)
    validate_loader = torch.utils.data.DataLoader(validate_dataset, batch_size=batch_size,
                                                  shuffle=False, num_workers=nw)
    if freeze:
        for param in net.parameters():
            param.requires_grad = False
    net.fc = nn.Linear(net.fc.in_features, len(train_dataset.classes))
    loss_function = nn.CrossEntropyLoss()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = optim.Adam(params, lr=lr)
    best_acc = 0.0
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            logits = net(images)
            loss = loss_function(logits, labels)
            loss.backward()
            optimizer.step()
        net.eval()
        acc = 0.0
        with torch.no_grad():
            for val_images, val_labels in validate_loader:
                outputs = net(val_images)
                predict_y = torch.max(outputs, dim=1)[1]
                acc += torch.eq(predict_y, val_labels).sum().item()
        best_acc = max(best_acc, acc / len(validate_dataset))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images_per_s": len(train_dataset) * epochs / seconds,
            "best_val_acc": best_acc}
