"""Per-object merging of phrase-token attention maps: one gather + masked reduction = the per-object loop."""

from __future__ import annotations

import pytest
import torch

from flmm_lightning.lmm.readout import merge_object_tokens, tokens_by_object


@pytest.mark.parametrize("merge", ["mean", "max"])
def test_merge_equals_the_per_object_loop(merge: str):
    generator = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 2, 6, 10, generator=generator)  # [L, H, t, N]
    token_objects = torch.tensor([1, 0, 1, 2, 0, 1])
    order, counts = tokens_by_object(token_objects, item=0)
    assert counts == [2, 3, 1]
    assert order.tolist() == [1, 4, 0, 2, 5, 3]  # grouped by object, sequence order within one

    merged = merge_object_tokens(attn, order, counts, merge)  # [n, L, H, N]
    for k in range(3):
        tokens = attn[:, :, token_objects == k]  # [L, H, t_k, N]
        expected = tokens.mean(dim=2) if merge == "mean" else tokens.amax(dim=2)
        torch.testing.assert_close(merged[k], expected, rtol=0, atol=1e-7)


def test_an_object_without_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"objects \[1\] own no tokens"):
        tokens_by_object(torch.tensor([0, 2, 2]), item=3)
