"""``models.base.attend`` (the torch path of mock and cuda) builds no mask the size of a
prompt squared: a prompt over an empty cache uses SDPA's causal mask, a longer masked
pass goes in tiles of query rows, a windowed step attends over its window alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from live_bytes import LiveBytes

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
@pytest.mark.parametrize("tile", [5, 1])
@pytest.mark.parametrize("folded", [False, True], ids=["grouped", "folded"])
def test_attention_without_a_whole_mask_is_the_masked_attention(monkeypatch, T, L, start, window, tile, folded):
    """Tiles of five rows, and of one (a row that is not the pass's last still sees only
    the keys up to its position: a one-row tile saw them all); with each kv head's group
    of query heads as one head's rows, as on a GPU (``folds_groups``), the same."""
    monkeypatch.setattr(base, "folds_groups", lambda q: folded)
    sdpa = F.scaled_dot_product_attention
    heads = []
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda q, *a, **kw: heads.append(q.shape[1]) or sdpa(q, *a, **kw)
    )
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, m, 16, generator=g) for n, m in ((4, T), (2, L), (2, L)))
    monkeypatch.setattr(base, "MASK_ELEMS", tile * 4 * L)  # scores of `tile` rows of the four heads
    masks = []
    real = base.causal_mask
    monkeypatch.setattr(base, "causal_mask", lambda *a: masks.append(a[1:3]) or real(*a))
    got = base.attend(q, k, v, start, 0.25, window)
    called = set(heads)  # (the reference's own call left out)
    want = reference(q, k, v, start, 0.25, window)
    assert (got - want).abs().max() < 1e-6
    assert all(rows * keys <= tile * L for rows, keys in masks)  # no mask past a tile
    if T == L and not window:
        assert masks == []  # SDPA's own causal mask
    if T == 1 and window:
        assert masks == [(1, window)]  # the window's keys alone (no mask built for them)
    if masks:  # folded: the two kv heads' groups as rows, equal heads; else the four query heads
        assert called == {2 if folded else 4}


def test_the_plan_holds_what_gpt_oss_attention_holds_over_a_prompt(tiny, monkeypatch):
    """A prompt's attention with sinks, its scores in tiles: what it holds at once beside
    its output stays within ``scratch_bytes``, the planner's workspace share for it."""
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.models.loader import load_model

    attn = next(
        b.attn for b in load_model(Checkpoint(tiny("gpt_oss", "alternating")[0])).model.layers if not b.attn.s.window
    )
    H, Hkv, d = attn.s.heads, attn.s.kv_heads, attn.s.head_dim
    T = 120
    monkeypatch.setattr(base, "MASK_ELEMS", H * T * 10)  # tiles of ten rows
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(H, T, d, generator=g),
        torch.randn(Hkv, T, d, generator=g),
        torch.randn(Hkv, T, d, generator=g),
    )
    with torch.no_grad(), LiveBytes() as seen:
        out = attn.core(q, k, v, 0)
    output = 2 * out.numel() * 4  # the tiles' outputs and their concatenation
    assert seen.peak <= attn.scratch_bytes(T, 4) + output, (seen.peak, attn.scratch_bytes(T, 4))
    assert seen.peak > H * T * 10 * 4  # it measured a tile of scores
