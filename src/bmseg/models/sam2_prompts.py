"""SAM2's prompt encoder for the prompts SEGMENT gives it, in a few operators.

SEGMENT decodes ~24 batches of prompts per tile, each prompt one positive point (MKs) or a
box's two corners (HSPC refinement), never a mask. SAM2's ``PromptEncoder`` embeds a batch of
them in 49 operators (a ``torch.where`` per point label, the padding point concatenated,
coordinates normalised column by column), each a kernel launch or view on a GPU:
:class:`PromptTokens` computes the same sparse and dense embeddings in 14, from the encoder's
own parameters (tested against the stock encoder).
"""

from __future__ import annotations

import math

import torch


class PromptTokens:
    """Sparse and dense prompt embeddings of a SAM2 ``PromptEncoder`` for N prompts of the same
    K point labels each, with SAM2's padding point (as its ``forward(points, boxes=None,
    masks=None)`` gives them), from the encoder's parameters as they are at the call."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.encoder = encoder
        self._affine: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dense_pe: torch.Tensor | None = None

    def dense_pe(self) -> torch.Tensor:
        """The encoder's dense positional encoding (``get_dense_pe``): the same for every
        window, so made once (19 operators a decode call otherwise)."""
        if self._dense_pe is None:
            self._dense_pe = self.encoder.get_dense_pe()
        return self._dense_pe

    def _normalising(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Offset and scale taking model-input px to SAM2's [−1, 1] at pixel centres (SAM2:
        (coords + 0.5) / (width, height), then 2x − 1), made once on the device."""
        if self._affine is None or self._affine[0].device != like.device:
            height, width = self.encoder.input_image_size
            scale = torch.tensor([2.0 / width, 2.0 / height], device=like.device)
            self._affine = (scale * 0.5 - 1.0, scale)
        return self._affine

    def __call__(
        self, coords: torch.Tensor, labels: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``coords`` (N, K, 2) x, y in model-input px, ``labels`` K of SAM2's point labels
        (1: positive point, 2 / 3: a box's top-left / bottom-right corner): sparse (N, K + 1,
        C) and dense (N, C, h, w) embeddings."""
        encoder = self.encoder
        gaussian = encoder.pe_layer.positional_encoding_gaussian_matrix
        offset, scale = self._normalising(coords)
        unit = torch.addcmul(offset, coords.float(), scale)
        angles = (unit @ gaussian).mul_(2 * math.pi)
        tokens = torch.cat([angles.sin(), angles.cos()], dim=-1)
        weights = torch.cat([encoder.point_embeddings[label].weight for label in labels])
        points = tokens + weights  # float32 under autocast too: the weights are
        padding = encoder.not_a_point_embed.weight.expand(len(coords), 1, -1)
        sparse = torch.cat([points, padding.to(points.dtype)], dim=1)
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = dense.expand(len(coords), -1, *encoder.image_embedding_size)
        return sparse, dense
