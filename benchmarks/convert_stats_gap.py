"""After l2bn.convert of a BN-trained torchvision ResNet-18: how far evaluation is from training
mode on the same batch, for kept, reset and recalibrated running statistics (docs/ecosystem.md).

    python benchmarks/convert_stats_gap.py      # needs Debian's dataset-fashion-mnist
"""

import copy
import gzip
import warnings

import numpy as np
import torch
import torchvision
from torch.optim.swa_utils import update_bn as torch_update_bn

import l2bn

warnings.simplefilter("ignore")
torch.manual_seed(0)
with gzip.open("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz") as f:
    raw = f.read()[16:]
imgs = (
    torch.tensor(np.frombuffer(raw, np.uint8)[: 64 * 28 * 28 * 12].reshape(-1, 1, 28, 28)).float()
    / 255
)
imgs = (torch.nn.functional.interpolate(imgs, size=64).repeat(1, 3, 1, 1) - 0.3) / 0.35
batches = list(imgs.split(64))
model = torchvision.models.resnet18(num_classes=10)
torch_update_bn(batches[:8], model)  # BN statistics of x, averaged over 8 batches
test = batches[10]


def gap(m):
    """max|eval - train| / max|train| on the test batch (train mode with momentum 0)."""
    m = copy.deepcopy(m)
    with torch.no_grad():
        y_eval = m.eval()(test)
        for mod in m.modules():
            if hasattr(mod, "momentum"):
                mod.momentum = 0.0
        y_train = m.train()(test)
    return float((y_eval - y_train).abs().max() / y_train.abs().max())


print("| statistics after convert | unit_rms=False | unit_rms=True |\n|---|---|---|")
print(f"| BN model itself (reference) | {gap(model):.3g} | {gap(model):.3g} |")
for mode in (
    "keep",
    "reset",
    "reset + update_bn on the 8 batches",
    "reset + update_bn on the evaluated batch",
):
    row = []
    for rms in (False, True):
        m = l2bn.convert(copy.deepcopy(model), unit_rms=rms, running_stats=mode.split(" ")[0])
        if "8 batches" in mode:
            l2bn.update_bn(batches[:8], m)
        if "evaluated" in mode:
            l2bn.update_bn([test], m)
        row.append(f"{gap(m):.3g} (bn1.running_var[0] {float(m.bn1.running_var[0]):.3g})")
    print(f"| {mode} | {row[0]} | {row[1]} |")
