"""Quick start: train a tiny CNN with BN and with L2BN on scikit-learn-free synthetic data.

Run: .venv/bin/python examples/quickstart.py
"""

import torch
from torch import nn

import l2bn


def make_model(norm: str) -> nn.Module:
    norm_layer = l2bn.get_norm_layer(norm)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        norm_layer(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        norm_layer(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


def data(n: int, g: torch.Generator):
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 12, 12, generator=g) * 0.5
    for k in range(4):  # class k: a bright bar at row/col 3k, with random per-sample brightness
        idx = y == k
        x[idx, 0, 3 * k, :] += torch.rand(int(idx.sum()), 1, generator=g) * 4 + 0.5
    return x, y


def main() -> None:
    g = torch.Generator().manual_seed(0)
    xtr, ytr = data(2000, g)
    xte, yte = data(1000, g)
    for norm in ("bn", "l2bn"):
        torch.manual_seed(0)
        model = make_model(norm)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _epoch in range(3):
            model.train()
            for i in range(0, len(xtr), 64):
                loss = nn.functional.cross_entropy(model(xtr[i : i + 64]), ytr[i : i + 64])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item() * 100
        print(f"{norm:5s} test accuracy {acc:5.1f}%")


if __name__ == "__main__":
    main()
