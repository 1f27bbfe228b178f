"""``models.base.attend`` (the torch path of mock and cuda) builds no mask the size of a
prompt squared: a prompt over an empty cache uses SDPA's causal mask, a longer masked
pass goes in tiles of query rows, a windowed step attends over its window alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moespeq_cli.models import base


def reference(q, k, v, start, scale, window=None):
    T, L = q.shape[1], k.shape[1]
    qpos = torch.arange(start, start + T)[:, None]
    kpos = torch.arange(L)[None, :]
    mask = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]
    return out.transpose(0, 1).reshape(T, -1)


@pytest.mark.parametrize(
    "T,L,start,window",
    [(40, 40, 0, None), (40, 40, 0, 7), (12, 52, 40, None), (12, 52, 40, 9), (1, 52, 51, 9), (1, 52, 51, None)],
    ids=["prompt", "windowed-prompt", "block", "windowed-block", "windowed-step", "step"],
)
def test_attention_without_a_whole_mask_is_the_masked_attention(monkeypatch, T, L, start, window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, m, 16, generator=g) for n, m in ((4, T), (2, L), (2, L)))
    monkeypatch.setattr(base, "MASK_ELEMS", 5 * L)  # tiles of five rows
    masks = []
    real = base.causal_mask
    monkeypatch.setattr(base, "causal_mask", lambda *a: masks.append(a[1:3]) or real(*a))
    got = base.attend(q, k, v, start, 0.25, window)
    want = reference(q, k, v, start, 0.25, window)
    assert (got - want).abs().max() < 1e-6
    assert all(rows * keys <= 5 * L for rows, keys in masks)  # no mask past a tile
    if T == L and not window:
        assert masks == []  # SDPA's own causal mask
    if T == 1 and window:
        assert masks == [(1, window)]  # the window's keys alone (no mask built for them)
