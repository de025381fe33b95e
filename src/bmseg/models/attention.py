"""Attention that fits the hardware for Cellpose-SAM's ViT: fused ``scaled_dot_product_attention``.

Cellpose-SAM (``cellpose.vit.CPSAM``) runs segment_anything's ``ImageEncoderViT``, whose
``Attention`` forms the whole (tokens × tokens) score matrix, adds the decomposed relative
position bias, applies softmax and multiplies by the values as separate operations: several
full-size intermediates per block, written and read back (on a 256² block with 8 px tokens,
1 024 tokens × 16 heads). :class:`SdpaAttention` computes the same function with
``torch.nn.functional.scaled_dot_product_attention``, the bias passed as its additive mask, so
that scaling, bias, softmax and the value product run in one fused kernel where the device has
one (the memory-efficient kernels on CUDA take an additive bias; on the CPU it is the
reference path). Same parameters, same state dict: :func:`set_attention` switches every
attention module of a network between ``"stock"`` and ``"sdpa"`` in place.

SAM2's image encoder (Hiera) has no relative position bias and already calls
``scaled_dot_product_attention`` in every block, so there is nothing to replace there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

from bmseg.models.choices import ATTENTION_KINDS, DEFAULT_ATTENTION


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The additive score bias (B, heads, H·W, H·W) of SAM's decomposed relative positions
    (MViTv2) for queries ``q`` (B, heads, H·W, C) attending to keys on the same H × W grid:
    the query's dot product with the embedding of the row offset plus that of the column
    offset, as segment_anything's ``add_decomposed_rel_pos`` adds it to the scores."""
    height, width = size
    batch, heads, _, channels = q.shape
    rows = get_rel_pos(height, height, rel_pos_h).to(q.dtype)  # (H, H, C)
    cols = get_rel_pos(width, width, rel_pos_w).to(q.dtype)  # (W, W, C)
    grid_q = q.reshape(batch, heads, height, width, channels)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rows)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, cols)
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    return bias.reshape(batch, heads, height * width, height * width)


class SdpaAttention(Attention):
    """segment_anything's ``Attention`` (same parameters) computed by
    ``scaled_dot_product_attention`` with the relative position bias as its additive mask.
    Its default scale, head_dim ** -0.5, is the stock module's ``scale``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, H·W, C)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


_CLASSES = {"stock": Attention, "sdpa": SdpaAttention}


def set_attention(network: torch.nn.Module, kind: str = DEFAULT_ATTENTION) -> int:
    """Switch, in place, every segment_anything ``Attention`` in ``network`` to ``kind``
    ("stock" or "sdpa"); parameters and state dict are untouched. Returns how many modules
    were switched to it (0 when the network has none or all were already ``kind``)."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown attention {kind!r}; use one of {ATTENTION_KINDS}")
    target = _CLASSES[kind]
    switched = 0
    for module in network.modules():
        if isinstance(module, Attention) and type(module) is not target:
            module.__class__ = target
            switched += 1
    return switched


def use_sdpa_attention(cellpose_model: object, kind: str = DEFAULT_ATTENTION) -> int:
    """:func:`set_attention` on a ``cellpose.models.CellposeModel`` (its ``net``) or on a
    network itself: the one call a loader makes after building Cellpose-SAM."""
    network = getattr(cellpose_model, "net", cellpose_model)
    return set_attention(network, kind)
