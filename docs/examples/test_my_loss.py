"""A complete property-test file for your own ITM loss, with selhn.testing.

Copy it into your repository's tests/, replace ``my_loss`` with your loss, and run pytest.
Needs hypothesis and pytest: ``pip install ".[testing]" pytest`` in selhn's source tree.
"""

import torch
from hypothesis import given, settings

from selhn.testing import (
    assert_finite_gradients,
    assert_no_vanishing,
    assert_selection_rule,
    collapsed_embedding_pairs,
    embedding_pairs,
)


def my_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """Your loss over (B, D) L2-normalised embeddings; here a SelHN written by hand."""
    scores = img_emb @ txt_emb.T
    size = scores.shape[0]
    if size == 1:  # no negatives: a zero per anchor that keeps the graph
        return scores.diagonal().expand(2, 1) * 0
    eye = torch.eye(size, dtype=torch.bool)
    positive = scores.diagonal()
    losses = []
    for view in (scores, scores.T):  # rows: image anchors; columns: caption anchors
        negatives = view.masked_fill(eye, float("-inf"))
        hardest = negatives.max(dim=1).values
        hinges = torch.relu(0.2 - positive.unsqueeze(1) + negatives)
        hard = torch.relu(0.2 - positive + hardest)
        vanishing = (positive - hardest).detach().abs() < 0.01
        losses.append(torch.where(vanishing, hinges.sum(dim=1) / (size - 1), hard))
    return torch.stack(losses)


def my_loss_per_anchor_over_scores(scores: torch.Tensor) -> torch.Tensor:
    """The same loss over a score matrix, per anchor, for the selection-rule check."""
    eye = torch.eye(scores.shape[0], dtype=scores.dtype)
    # a score matrix S = V T^T with V = I and T = S^T reproduces S exactly
    return my_loss(eye, scores.T)


def test_gradients_are_finite():
    assert_finite_gradients(lambda img, txt: my_loss(img, txt).mean(), max_examples=30)


def test_it_keeps_learning_where_hard_negatives_vanish():
    # the per-anchor losses (2, B): each direction is checked on its own
    assert_no_vanishing(my_loss, max_examples=10)


def test_it_follows_the_selhn_selection_rule():
    assert_selection_rule(my_loss_per_anchor_over_scores, margin=0.2, epsilon=0.01, max_examples=30)


@settings(max_examples=20, deadline=None)  # the first torch call can be slow
@given(pair=collapsed_embedding_pairs())
def test_collapsed_batches_read_the_margin(pair):
    img, txt = pair
    # at a full collapse every hinge equals the margin: the per-anchor loss is 0.2
    torch.testing.assert_close(
        my_loss(img, txt), torch.full((2, img.shape[0]), 0.2, dtype=img.dtype), atol=0.05, rtol=0
    )


@settings(max_examples=20, deadline=None)  # the first torch call can be slow
@given(pair=embedding_pairs(dtype=torch.float32))
def test_shape(pair):
    img, txt = pair
    assert my_loss(img, txt).shape == (2, img.shape[0])
