"""Loading the three models from a models directory through their libraries' own builders.

SAM2 through ``sam2.build_sam.build_sam2(config, checkpoint)``, Cellpose-SAM through
``cellpose.models.CellposeModel(pretrained_model=path)``, ResNet-50 through torchvision's
``resnet50()`` and ``load_state_dict``. Nothing is ever downloaded here.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cellpose.models import CellposeModel
from hydra.errors import MissingConfigException
from sam2.build_sam import build_sam2
from torchvision.models import resnet50

from bmseg.errors import BmsegError
from bmseg.models.attention import use_sdpa_attention
from bmseg.models.cellpose_models import CellposeHSPCSegmenter, sam_encoder_as
from bmseg.models.choices import DEFAULT_ATTENTION
from bmseg.models.device import resolve_device, use_bf16
from bmseg.models.embedder import ResNetEmbedder, fold_batch_norms
from bmseg.models.layout import Manifest, check_sha256, corrupt, read_manifest, weight_path
from bmseg.models.sam2_models import Sam2Engine, Sam2MKSegmenter
from bmseg.models.settings import EmbedderSettings, HSPCSettings, MKSettings
from bmseg.timing import StageTimer

log = logging.getLogger(__name__)

LOAD_ERRORS = (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError)
"""What ``torch.load`` raises on a truncated or foreign file (besides RuntimeError)."""

TEST_WEIGHTS_WARNING = (
    "%s holds random-initialised test checkpoints (bmseg models make-test): "
    "they cannot segment real images"
)


@dataclass
class ModelSet:
    """Everything SEGMENT needs, loaded once: two segmenters, the embedder, the device.

    ``timer.take()`` returns the seconds spent per stage (sam2_encode, mk_masks, cellpose_net,
    hspc_flows_to_masks, hspc_refine, embed) since its last call.
    """

    mk: Sam2MKSegmenter
    hspc: CellposeHSPCSegmenter
    embedder: ResNetEmbedder
    device: torch.device
    timer: StageTimer
    manifest: Manifest = field(default_factory=Manifest)


def load_models(
    models_dir: Path,
    device: str = "auto",
    *,
    mk_settings: MKSettings | None = None,
    hspc_settings: HSPCSettings | None = None,
    embedder_settings: EmbedderSettings | None = None,
    attention: str = DEFAULT_ATTENTION,
    compile_networks: bool = False,
) -> ModelSet:
    """Load SAM2, Cellpose-SAM and ResNet-50 from ``models_dir`` onto ``device``.

    Every weight file is checked before the first heavy load, so a missing file fails fast
    with a one-line error naming it and ``bmseg models fetch``. ``attention`` picks Cellpose-SAM's
    attention (:data:`bmseg.models.choices.ATTENTION_KINDS`); ``compile_networks`` compiles
    the three networks with ``torch.compile`` on a GPU (:func:`compile_on_gpu`).
    """
    models_dir = Path(models_dir)
    manifest = read_manifest(models_dir)
    paths = {name: weight_path(models_dir, file) for name, file in manifest.files().items()}
    torch_device = resolve_device(device)
    if manifest.description:
        log.warning("%s: %s", models_dir, manifest.description)
    elif manifest.random_init:
        log.warning(TEST_WEIGHTS_WARNING, models_dir)
    embedder_settings = embedder_settings or EmbedderSettings()
    sam2 = load_sam2(paths["sam2"], manifest.sam2_config, torch_device, manifest.sam2_image_size)
    timer = StageTimer(torch_device)
    engine = Sam2Engine(sam2, torch_device, timer)
    cellpose_model = load_cellpose(paths["cellpose"], torch_device, attention=attention)
    resnet = load_resnet50(paths["resnet50"], torch_device)
    resnet_compiled = False
    if compile_networks:
        compile_on_gpu(sam2.image_encoder, torch_device)
        compile_on_gpu(cellpose_model.net, torch_device)
        resnet_compiled = compile_on_gpu(resnet, torch_device)
    check_sha256(manifest, paths)  # after the loads: a file that does not load says so first
    log.info("loaded models from %s onto %s", models_dir, torch_device)
    return ModelSet(
        mk=Sam2MKSegmenter(engine, mk_settings or MKSettings()),
        hspc=CellposeHSPCSegmenter(
            cellpose_model, engine, hspc_settings or HSPCSettings(), torch_device
        ),
        embedder=ResNetEmbedder(
            resnet,
            torch_device,
            timer,
            embedder_settings.crop_size,
            embedder_settings.batch_size,
            compiled=resnet_compiled,
        ),
        device=torch_device,
        timer=timer,
        manifest=manifest,
    )


def read_state_dict(path: Path, what: str) -> Mapping[str, torch.Tensor]:
    """The tensors of a checkpoint file, memory-mapped; a file that does not load is an error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, *LOAD_ERRORS) as error:
        raise corrupt(path, what, error) from error
    if not isinstance(state, Mapping):
        raise corrupt(path, what, TypeError(f"holds a {type(state).__name__}, not a state dict"))
    return state


def load_sam2(
    path: Path, config: str, device: torch.device, image_size: int | None = None
) -> torch.nn.Module:
    """SAM2 built from its Hydra ``config`` and checkpoint ``path`` by SAM2's own builder.

    ``image_size`` overrides the config's input resolution (the weights do not depend on it).
    """

    if not isinstance(read_state_dict(path, "SAM2").get("model"), Mapping):
        raise corrupt(path, "SAM2", KeyError("no 'model' state dict"))
    try:
        overrides = [] if image_size is None else [f"++model.image_size={int(image_size)}"]
        model = build_sam2(config, str(path), device=str(device), hydra_overrides_extra=overrides)
    except MissingConfigException as error:
        raise BmsegError(
            f"{path.parent / 'manifest.json'}: unknown SAM2 config {config!r}; "
            "use one under sam2's configs/ (e.g. configs/sam2.1/sam2.1_hiera_l.yaml)"
        ) from error
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:  # the checkpoint's tensors do not fit the config
        raise corrupt(path, f"SAM2 ({config})", error) from error
    log.info("SAM2: %s with %s", path.name, config)
    return model


def cellpose_encoder_dims(state: Mapping[str, torch.Tensor]) -> dict:
    """The SAM ViT encoder dimensions of a Cellpose-SAM state dict.

    For the official ``cpsam`` file these are ViT-L's own (1024 wide, 24 blocks, 16 heads,
    global attention in blocks 5, 11, 17, 23), so building with them is exactly Cellpose's
    construction; ``make-test`` checkpoints have the same architecture, narrower and
    shallower, and load through the very same code.
    """
    try:
        width = state["encoder.patch_embed.proj.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
        head_dim = state["encoder.blocks.0.attn.rel_pos_h"].shape[1]
        global_blocks = [
            i
            for i in range(depth)
            if state[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == 2 * 64 - 1
        ]
    except (KeyError, ValueError, IndexError) as error:
        raise ValueError(f"missing Cellpose-SAM encoder tensors ({error})") from error
    heads = width // head_dim
    return {"width": width, "depth": depth, "heads": heads, "global_blocks": global_blocks}


def compile_on_gpu(network: torch.nn.Module, device: torch.device) -> bool:
    """Compile ``network`` in place (``nn.Module.compile``: same module, same state dict) when
    ``device`` is a GPU; on the CPU compiling costs minutes for little, so it stays eager there.
    Returns whether it was compiled."""
    if device.type != "cuda":
        log.warning("torch.compile is off on the CPU: %s runs eager", type(network).__name__)
        return False
    network.compile()
    return True


def load_cellpose(path: Path, device: torch.device, *, attention: str = DEFAULT_ATTENTION):
    """Cellpose-SAM through ``CellposeModel(pretrained_model=path)``, bf16 on capable GPUs, its
    attention switched to ``attention`` (fused ``"sdpa"`` by default, or ``"stock"``)."""

    state = read_state_dict(path, "Cellpose-SAM")
    if "W2" not in state:
        raise corrupt(path, "Cellpose-SAM", KeyError("no 'W2' tensor (not a Cellpose 4 model)"))
    try:
        with sam_encoder_as(**cellpose_encoder_dims(state)):
            model = CellposeModel(
                pretrained_model=str(path), device=device, use_bfloat16=use_bf16(device)
            )
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, *LOAD_ERRORS) as error:
        raise corrupt(path, "Cellpose-SAM", error) from error
    missing = set(model.net.state_dict()) - set(state)
    if missing:
        raise corrupt(path, "Cellpose-SAM", KeyError(f"missing {sorted(missing)[:3]}"))
    switched = use_sdpa_attention(model, attention)
    log.info("Cellpose-SAM: %s (%d attention blocks %s)", path.name, switched, attention)
    return model


def load_resnet50(path: Path, device: torch.device) -> torch.nn.Module:
    """torchvision ResNet-50 with the weights in ``path``, ``fc`` replaced by the identity, its
    batch norms folded into the convolutions, in ``channels_last`` on a GPU; eval mode."""

    state = read_state_dict(path, "ResNet-50")
    net = resnet50(weights=None)
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise corrupt(path, "ResNet-50", error) from error
    net.fc = torch.nn.Identity()
    folded = fold_batch_norms(net.eval())
    log.info("ResNet-50: %s (%d batch norms folded)", path.name, folded)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return net.to(device, memory_format=layout)
