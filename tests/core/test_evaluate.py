"""``qpass.core.evaluate``: the per-window scores every frontend's ``window_nll`` computes (the NLL, and the
divergence from a reference run that the W8A8 ``auto`` fallback scores its trials by)."""

import pytest
import torch

from qpass.core.evaluate import Divergence, window_nll


def test_divergence_is_the_kl_from_the_reference_run_batch_by_batch():
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 300, (5, 9), generator=g)
    table = torch.randn(300, 300, generator=g) * 3
    noisy = table + torch.randn(300, 300, generator=g) * 0.3

    def kl(p_table, q_table, ids):  # the full divergence per window, float64
        p, q = p_table[ids][:, :-1].double().log_softmax(-1), q_table[ids][:, :-1].double().log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean(1)

    reference = Divergence()
    nll = window_nll(lambda ids: table[ids], windows, 2, score=reference.record)
    assert torch.allclose(nll, window_nll(lambda ids: table[ids], windows, 2))  # the reference's run gives its NLL
    assert torch.equal(
        window_nll(lambda ids: table[ids], windows, 2, score=reference), torch.zeros(5, dtype=torch.float64)
    )
    measured = window_nll(lambda ids: noisy[ids], windows, 2, score=reference)
    full = kl(table, noisy, windows)
    assert (measured <= full + 1e-6).all() and torch.allclose(measured, full, rtol=0.05)  # 64 of 300 tokens kept
    exact = Divergence()
    exact.TOP = 300
    window_nll(lambda ids: table[ids], windows, 2, score=exact.record)
    assert torch.allclose(window_nll(lambda ids: noisy[ids], windows, 2, score=exact), full, rtol=1e-4)
    with pytest.raises(ValueError, match="no reference run"):
        window_nll(lambda ids: noisy[ids], windows, 2, score=Divergence())
