"""RVSE++: image and text encoders with GPO pooling, as in the SelHN paper.

* Image encoder: Linear(img_dim -> embed) (Xavier-uniform weights, zero bias), plus a
  residual MLP in the embedding space (Linear(embed -> embed/2), BatchNorm1d, ReLU,
  Linear(embed/2 -> embed)) added to the linear output, then GPO over the regions, then L2
  normalisation. (VSE-infinity instead adds the linear map and an MLP of the raw features in
  parallel.) The BatchNorm statistics are taken over valid regions only, never padding.
* Text encoder: word embedding (uniform -0.1..0.1 init), a one-layer bidirectional GRU with
  the two directions averaged per token, GPO over the tokens, L2 normalisation.
* GPO (generalized pooling operator, from VSE-infinity): sinusoidal positional encodings of
  the positions 0..N-1 of a set of N elements go through a bidirectional GRU (directions
  averaged) and a bias-free linear map to one score per position; a softmax at temperature
  0.1 over the N valid positions gives weights; every feature channel is sorted in descending
  order over the valid elements and pooled as the weighted sum of its k-th largest values.
  The weights depend on N alone: one-hot on the first gives max pooling, uniform gives mean.
* Backbone (optional, off in the paper's recipe): VSE-infinity fine-tunes the image backbone
  that produced the region features. Here it is a stack of per-region blocks, each a
  Linear(img_dim -> img_dim) followed by a ReLU, pretrained to reproduce the features it is
  given: identity weights and zero biases, so that on non-negative (post-ReLU) features, the
  synthetic ones and bottom-up-attention ones alike, the frozen backbone passes them through
  unchanged and a model with it computes exactly what the model without it computes.
  Fine-tuning moves it away from the identity, which changes every region feature at once:
  the situation in which users see hard negatives stall mid-training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def positional_encoding(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(length, dim) sinusoidal encodings of the positions 0..length-1."""
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim, device=device)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


def valid_mask(lengths: Tensor, length: int) -> Tensor:
    """(B, length) True at the valid positions of each set."""
    return torch.arange(length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class GPO(nn.Module):
    """Generalized pooling operator over sets of features."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        self.d_pe = d_pe
        self.temperature = temperature
        self.gru = nn.GRU(d_pe, d_hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(d_hidden, 1, bias=False)

    def weights(self, lengths: Tensor, length: int) -> Tensor:
        """(B, length) pooling weights; zero at padded positions; a function of N alone."""
        encodings = positional_encoding(length, self.d_pe, lengths.device).unsqueeze(0).expand(lengths.shape[0], -1, -1)
        packed = pack_padded_sequence(encodings, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        hidden = out.view(out.shape[0], length, 2, -1).mean(dim=2)
        scores = self.score(hidden).squeeze(2).masked_fill(~valid_mask(lengths, length), float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)

    @staticmethod
    def pool(features: Tensor, lengths: Tensor, weights: Tensor) -> Tensor:
        """Weighted sum of each channel's k-th largest valid values: (B, N, D) -> (B, D)."""
        mask = valid_mask(lengths, features.shape[1]).unsqueeze(2)
        ordered = features.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
        ordered = ordered.masked_fill(~mask, 0.0)  # padded slots sort last; their weight is 0
        return (ordered * weights.unsqueeze(2).to(ordered.dtype)).sum(dim=1)

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        return self.pool(features, lengths, self.weights(lengths, features.shape[1]))


def l2_normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class Backbone(nn.Module):
    """Per-region blocks ``relu(W x + b)`` with ``W = I``, ``b = 0`` at the start (see the module's
    docstring); block 0 meets the features first, the last block feeds the image encoder.

    :meth:`train_top` chooses how many of the blocks, counted from the top (the last ones), are
    trained; the others are frozen (``requires_grad`` off: no gradient, so no optimiser step
    and no weight decay touches them).
    """

    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"a backbone needs at least one block, got {blocks}")
        # skip_init: no random draw is spent on weights overwritten below, so a model with a backbone
        # starts its other parameters from the same draws as the model without one
        self.blocks = nn.ModuleList(nn.utils.skip_init(nn.Linear, dim, dim) for _ in range(blocks))
        for block in self.blocks:
            nn.init.eye_(block.weight)
            nn.init.zeros_(block.bias)

    def train_top(self, count: int) -> None:
        """Train the last ``count`` blocks (0: all frozen; the number of blocks or more: all)."""
        first_trained = len(self.blocks) - max(0, min(count, len(self.blocks)))
        for index, block in enumerate(self.blocks):
            block.requires_grad_(index >= first_trained)

    def trained_blocks(self) -> int:
        """How many blocks are trained now."""
        return sum(block.weight.requires_grad for block in self.blocks)

    def forward(self, regions: Tensor) -> Tensor:
        for block in self.blocks:
            regions = torch.relu(block(regions))
        return regions


class ImageEncoder(nn.Module):
    """Regions (B, K, img_dim) -> L2-normalised embeddings (B, embed), through the backbone first
    when it has one (``backbone_blocks`` > 0)."""

    def __init__(self, img_dim: int = 2048, embed: int = 1024, backbone_blocks: int = 0) -> None:
        super().__init__()
        self.backbone = Backbone(img_dim, backbone_blocks) if backbone_blocks > 0 else None
        self.fc = nn.Linear(img_dim, embed)
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)
        self.mlp = nn.Sequential(
            nn.Linear(embed, embed // 2), nn.BatchNorm1d(embed // 2), nn.ReLU(), nn.Linear(embed // 2, embed)
        )
        self.gpo = GPO()

    def features(self, regions: Tensor, lengths: Tensor) -> Tensor:
        """Pre-pooling region features (B, K, embed); BatchNorm sees valid regions only."""
        if self.backbone is not None:
            regions = self.backbone(regions)
        x = self.fc(regions)
        mask = valid_mask(lengths, regions.shape[1])
        residual = torch.zeros_like(x)
        residual[mask] = self.mlp(x[mask]).to(x.dtype)
        return x + residual

    def forward(self, regions: Tensor, lengths: Tensor) -> Tensor:
        return l2_normalize(self.gpo(self.features(regions, lengths), lengths))


class TextEncoder(nn.Module):
    """Tokens (B, T) -> L2-normalised embeddings (B, embed)."""

    def __init__(self, vocab_size: int, word_dim: int = 300, embed: int = 1024) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.gru = nn.GRU(word_dim, embed, batch_first=True, bidirectional=True)
        self.gpo = GPO()

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        words = out.view(out.shape[0], out.shape[1], 2, -1).mean(dim=2)
        return l2_normalize(self.gpo(words, lengths))


class RVSEPP(nn.Module):
    """The two encoders; ``forward`` returns (image embeddings, caption embeddings).
    ``backbone_blocks`` > 0 puts a :class:`Backbone` of that many blocks in front of the image
    encoder (``model.image.backbone``)."""

    def __init__(
        self, vocab_size: int, img_dim: int = 2048, embed: int = 1024, word_dim: int = 300, backbone_blocks: int = 0
    ) -> None:
        super().__init__()
        self.config = {"vocab_size": vocab_size, "img_dim": img_dim, "embed": embed, "word_dim": word_dim}
        if backbone_blocks:  # only then: checkpoints of models without one keep their config
            self.config["backbone_blocks"] = backbone_blocks
        self.image = ImageEncoder(img_dim, embed, backbone_blocks)
        self.text = TextEncoder(vocab_size, word_dim, embed)

    def forward(
        self, regions: Tensor, region_lengths: Tensor, tokens: Tensor, token_lengths: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.image(regions, region_lengths), self.text(tokens, token_lengths)
