"""The names the model flags take: devices, flows methods and fine-tuning splits.

A module of plain constants, imported by the settings, the device resolver, the flows
post-processing and the command line alike, so none of them imports another for a name.
"""

from __future__ import annotations

DEVICE_CHOICES = ("auto", "cpu", "cuda")
"""What ``--device`` takes: a GPU when there is one, the CPU, or a GPU or an error."""

FLOWS_METHODS = ("bmseg", "cellpose")
"""Methods :func:`bmseg.flows.flows_to_masks` can use: ours and Cellpose 4's own post-processing."""
DEFAULT_FLOWS_METHOD = "bmseg"
ATTENTION_KINDS = ("stock", "sdpa")
"""Cellpose-SAM's attention (``--attention``): segment_anything's own, or the same function
through fused ``scaled_dot_product_attention`` (:mod:`bmseg.models.attention`)."""
DEFAULT_ATTENTION = "sdpa"
FINETUNE_SPLITS = ("tile", "slide")
"""How ``bmseg finetune`` holds out validation data: whole tiles or whole slides."""
