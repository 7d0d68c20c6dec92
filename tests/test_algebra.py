"""The (N, C) algebra's statistics helpers against torch's own moments (float64)."""

import pytest
import torch

from l2bn.kernels import algebra


def _groups(sizes, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, c, generator=g, dtype=torch.float64) * (1 + i) + i
        for i, n in enumerate(sizes)
    ]


@pytest.mark.parametrize("sizes", [(3, 5), (1, 0), (0, 1), (1, 1), (4, 0, 2, 1)])
def test_combine_moments_equals_the_union(sizes):
    parts = _groups(sizes)
    counts = torch.tensor([[float(len(p))] * 3 for p in parts], dtype=torch.float64)
    means = torch.stack(
        [p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts]
    )
    m2s = torch.stack(
        [
            ((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=torch.float64)
            for p in parts
        ]
    )
    total, mean, m2 = algebra.combine_moments(counts, means, m2s)
    union = torch.cat(parts)
    assert total.tolist() == [float(len(union))] * 3
    torch.testing.assert_close(mean, union.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m2, ((union - union.mean(0)) ** 2).sum(0), rtol=1e-12, atol=1e-12)


def test_combine_moments_all_empty_is_zero():
    total, mean, m2 = algebra.combine_moments(
        torch.zeros(2, 3, dtype=torch.float64),
        torch.ones(2, 3, dtype=torch.float64),
        torch.zeros(2, 3, dtype=torch.float64),
    )
    assert total.tolist() == [0.0] * 3 and mean.tolist() == [0.0] * 3 and m2.tolist() == [0.0] * 3


def test_batch_moments_and_sample_norms():
    u = torch.randn(5, 4, 6, dtype=torch.float64) * 2 + 1
    mu, m2 = algebra.batch_moments(u.mean(2), u.var(2, unbiased=False), 6)
    flat = u.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(mu, flat.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m2, flat.var(1, unbiased=False) * 30, rtol=1e-12, atol=1e-12)
    mu0, m20 = algebra.batch_moments(u.mean(2)[:0], u.var(2)[:0], 6)
    assert mu0.tolist() == [0.0] * 4 and m20.tolist() == [0.0] * 4
    st = algebra.sample_norms(u.mean(2), u.var(2, unbiased=False), 6, 2.0, 1e-12)
    torch.testing.assert_close(st.r, u.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(st.k, 2.0 / u.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(st.mk, (u * st.k[:, None, None]).mean(2), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        st.vk, (u * st.k[:, None, None]).var(2, unbiased=False), rtol=1e-12, atol=1e-14
    )
