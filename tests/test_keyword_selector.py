"""The keyword selector head and its token loss."""

from __future__ import annotations

import pytest
import torch

from flmm_lightning.heads import keyword_selector_loss
from flmm_lightning.lmm.keyword_selector import KeywordSelector


def test_one_logit_per_token_each_on_its_own_state():
    torch.manual_seed(0)
    selector = KeywordSelector(hidden_size=32, width=8)
    hidden = torch.randn(2, 5, 32)  # [B, T, D]
    logits = selector(hidden)
    assert logits.shape == (2, 5) and selector(hidden[0]).shape == (5,)
    torch.testing.assert_close(selector(hidden[1]), logits[1])
    # Changing one token (padding, say) leaves every other token's logit as it was.
    changed = hidden.clone()
    changed[0, 3] = 100.0
    after = selector(changed)
    torch.testing.assert_close(after[:, [0, 1, 2, 4]], logits[:, [0, 1, 2, 4]])
    assert after[0, 3] != logits[0, 3]
    # The LMM's bfloat16 states are read in the head's float32.
    assert selector(hidden.bfloat16()).dtype == torch.float32


def test_learns_which_tokens_name_things_whatever_their_scale():
    """Labels that are a linear read-out of the states, whose norms differ a thousandfold between tokens (as
    residual-stream states of an LLM do): the head fits them."""
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(64, generator=generator)
    direction -= direction.mean()
    states = torch.randn(4, 20, 64, generator=generator)  # [B, T, D]
    scale = 10 ** (3 * torch.rand(4, 20, 1, generator=generator))  # [B, T, 1], 1 to 1000
    hidden = states * scale
    labels = states @ direction > 0  # [B, T]
    valid = torch.ones_like(labels)
    valid[:, 15:] = False  # padding, labelled at random
    torch.manual_seed(0)
    selector = KeywordSelector(hidden_size=64, width=16)
    optimizer = torch.optim.AdamW(selector.parameters(), lr=1e-2)
    for _ in range(100):
        loss = keyword_selector_loss(selector(hidden), labels, valid)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predicted = selector(hidden).sigmoid() >= 0.3
    assert torch.equal(predicted[valid], labels[valid])


def test_loss_is_the_mean_bce_over_valid_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=generator, requires_grad=True)  # [B, T]
    labels = torch.rand(3, 6, generator=generator) < 0.4
    valid = torch.rand(3, 6, generator=generator) < 0.7
    loss = keyword_selector_loss(logits, labels, valid)
    probabilities = torch.sigmoid(logits[valid]).double()
    targets = labels[valid].double()
    expected = -(targets * probabilities.log() + (1 - targets) * (1 - probabilities).log()).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert (logits.grad[~valid] == 0).all() and (logits.grad[valid] != 0).all()
    # Whatever stands at invalid tokens does not matter.
    noise = torch.randn(3, 6, generator=generator) * ~valid
    changed = keyword_selector_loss(logits.detach() + noise, labels ^ ~valid, valid)
    assert float(changed) == pytest.approx(float(loss.detach()))


def test_loss_without_valid_tokens_is_zero_and_attached():
    logits = torch.randn(2, 4, requires_grad=True)
    labels = torch.zeros(2, 4, dtype=torch.bool)
    loss = keyword_selector_loss(logits, labels, torch.zeros_like(labels))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
