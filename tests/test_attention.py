"""bmseg.models.attention: fused attention for Cellpose-SAM's ViT equals the stock module.

Random weights, float32 on the CPU. segment_anything initialises the relative position
embeddings to zero, which would leave the bias untested, so the tests fill them with noise.
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block

from bmseg.models.attention import (
    ATTENTION_KINDS,
    SdpaAttention,
    set_attention,
    use_sdpa_attention,
)


def randomise_rel_pos(network: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero relative position embeddings in every attention module."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "rel_pos" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize(("window_size", "grid"), [(0, (12, 12)), (0, (8, 10)), (4, (10, 10))])
def test_block_output_equals_stock(window_size: int, grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    block = Block(
        dim=48,
        num_heads=3,
        use_rel_pos=True,
        window_size=window_size,
        input_size=(14, 14),  # ≠ grid: the stock module interpolates its embeddings
    ).eval()
    randomise_rel_pos(block)
    x = torch.randn(2, *grid, 48)
    with torch.no_grad():
        stock = block(x)
        assert set_attention(block, "sdpa") == 1
        assert type(block.attn) is SdpaAttention
        fused = block(x)
        assert set_attention(block, "sdpa") == 0
        assert set_attention(block, "stock") == 1
        again = block(x)

    assert stock.abs().max() > 0.1
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, stock)


def test_sdpa_is_what_runs(monkeypatch) -> None:
    """The switched module really goes through scaled_dot_product_attention."""
    import bmseg.models.attention as attention

    calls = []
    stock_sdpa = attention.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return stock_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    module = Attention(32, num_heads=2, use_rel_pos=True, input_size=(6, 6))
    set_attention(module, "sdpa")
    module(torch.randn(1, 6, 6, 32))
    assert calls == [True]


def test_whole_cellpose_sam_network_equals_stock() -> None:
    """The make-test Cellpose-SAM (CPSAM with bmseg's small test encoder) on a 256² block."""
    from cellpose.vit import CPSAM

    from bmseg.models.cellpose_models import sam_encoder_as
    from bmseg.models.making import TEST_CELLPOSE_ENCODER

    torch.manual_seed(1)
    with sam_encoder_as(**TEST_CELLPOSE_ENCODER):
        network = CPSAM().eval()
    randomise_rel_pos(network)
    image = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        stock, _ = network(image)
        assert use_sdpa_attention(network) == TEST_CELLPOSE_ENCODER["depth"]
        fused, _ = network(image)

    torch.testing.assert_close(fused, stock, rtol=1e-4, atol=1e-4)


def test_use_sdpa_attention_takes_a_cellpose_model_and_rejects_unknown_kinds() -> None:
    class CellposeModelLike:
        net = torch.nn.Sequential(Attention(16, num_heads=2), Attention(16, num_heads=2))

    model = CellposeModelLike()
    assert use_sdpa_attention(model) == 2
    assert all(type(module) is SdpaAttention for module in model.net)
    assert set(ATTENTION_KINDS) == {"stock", "sdpa"}
    with pytest.raises(ValueError, match="unknown attention"):
        set_attention(model.net, "flash")


def test_sam2_image_encoder_already_uses_sdpa_everywhere(monkeypatch) -> None:
    """SAM2's Hiera trunk has no relative position bias and calls scaled_dot_product_attention
    in every block, so it needs no replacement (this guards that against a SAM2 upgrade)."""
    from sam2.modeling.backbones import hieradet

    calls = []
    stock_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return stock_sdpa(*args, **kwargs)

    monkeypatch.setattr(hieradet.F, "scaled_dot_product_attention", counting)
    trunk = hieradet.Hiera(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        trunk(torch.randn(1, 3, 64, 64))
    assert len(calls) == len(trunk.blocks) == 4
    assert not any("rel_pos" in name for name, _ in trunk.named_parameters())


def test_segment_loads_cellpose_sam_with_fused_attention(test_models_dir) -> None:
    """SEGMENT's loader hands out Cellpose-SAM with every attention block fused."""
    from bmseg.models.layout import read_manifest
    from bmseg.models.loading import load_cellpose

    manifest = read_manifest(test_models_dir)
    model = load_cellpose(test_models_dir / manifest.cellpose_checkpoint, torch.device("cpu"))
    blocks = [m for m in model.net.modules() if isinstance(m, Attention)]
    assert blocks and all(isinstance(m, SdpaAttention) for m in blocks)


def test_attention_kind_is_selectable_at_load(test_models_dir) -> None:
    from bmseg.models.layout import read_manifest
    from bmseg.models.loading import load_cellpose

    manifest = read_manifest(test_models_dir)
    path = test_models_dir / manifest.cellpose_checkpoint
    model = load_cellpose(path, torch.device("cpu"), attention="stock")
    blocks = [m for m in model.net.modules() if isinstance(m, Attention)]
    assert blocks and all(type(m) is Attention for m in blocks)


def test_compile_only_on_a_gpu(monkeypatch) -> None:
    """torch.compile is a setting that stays off on the CPU; on a GPU the module compiles in
    place, keeping its state dict keys (no ``_orig_mod.`` prefix for checkpoints)."""
    from bmseg.models.loading import compile_on_gpu

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(self))
    network = torch.nn.Linear(3, 3)
    keys = set(network.state_dict())
    assert not compile_on_gpu(network, torch.device("cpu"))
    assert compiled == []
    assert compile_on_gpu(network, torch.device("cuda"))
    assert compiled == [network] and set(network.state_dict()) == keys
