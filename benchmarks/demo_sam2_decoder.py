"""Trial: fine-tune the demo SAM2's mask decoder on synthetic MKs; score SEGMENT's MK finds.

SEGMENT's own MK segmenter is scored before and after.

The demo models (`bmseg models make-demo`) keep make-test's random SAM2, so SEGMENT finds no MK
with them. This asks whether training only SAM2's mask decoder and prompt encoder (the image
encoder stays random and frozen) on synthetic slides is cheap enough for the demo build:

1. make-test's models folder (SAM2.1 hiera-tiny at 256 px input, random, seeded), loaded by
   bmseg's own loader (:func:`bmseg.models.loading.load_models`);
2. training windows from `bmseg.synthetic.SyntheticLayout` (both modalities, RGB as SEGMENT
   shows them), each of the side SEGMENT's MK windows have at this input size (512 px), around
   a planted MK; truth from :func:`bmseg.synthetic.truth_labels`. The frozen encoder's features
   of each window (through :meth:`Sam2Engine.encode`, as SEGMENT encodes) are computed once;
3. a plain AdamW loop over batches of point prompts at random pixels inside an MK (target:
   that MK's mask); ``--negative-share`` adds prompts off every MK (tissue, background, HSPCs;
   target: no mask, IoU 0), which in the trial kept the predicted IoU from telling the two
   apart. Loss: BCE + dice of the best of SAM2's three low-res masks (SAM's multimask rule),
   plus the MSE of all three predicted IoUs against the masks' actual low-res IoUs;
4. the weights saved in SAM2's checkpoint format into the models folder (manifest rewritten),
   reloaded by ``load_models``; SEGMENT's :class:`Sam2MKSegmenter` (grid prompts, predicted-IoU
   and stability filters, NMS, nesting) run at its default :class:`MKSettings` on held-out
   1024 px tiles (unseen layouts, each tile centred on a planted MK), before and after: MK
   precision / recall / F1 by centroid (one-to-one within ``--radius-px``; MKs and finds that
   touch the tile's edge left out on both sides). Also the decoder's own figures on held-out
   MK windows (:func:`prompted_iou`): the IoU of its masks for a point inside an MK, and how
   many pass SEGMENT's thresholds.

    python benchmarks/demo_sam2_decoder.py                 # defaults: about 7 CPU-minutes
    python benchmarks/demo_sam2_decoder.py --steps 400 --json out.json

One torch thread (``OMP_NUM_THREADS=1``); training wall and CPU seconds are printed.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sam2.utils.amg import calculate_stability_score

from bmseg.contract import MODALITIES
from bmseg.models.layout import read_manifest, write_manifest
from bmseg.models.loading import load_models
from bmseg.models.making import make_test_models
from bmseg.models.sam2_models import (
    EDGE_TOLERANCE_PX,
    Sam2Engine,
    Sam2MKSegmenter,
    Window,
    WindowFeatures,
    window_side,
)
from bmseg.models.settings import MKSettings
from bmseg.models.training import centroid_matches
from bmseg.pixels import to_rgb8
from bmseg.slide import Rect
from bmseg.synthetic import MOSAIC_TILE, PIXEL_SIZE_UM, SyntheticLayout, truth_labels

LAYOUT_PX = 8000
"""Side of the synthetic layouts (about 25 MKs each at `bmseg synth`'s sparse density)."""
HELD_OUT_LAYOUTS = 2
"""Held-out layouts per modality (seeds no training layout has)."""


@dataclasses.dataclass
class TrainingWindow:
    """One SAM2 window around a planted MK: its cached features and truth."""

    features: WindowFeatures
    labels: np.ndarray  # (side, side) uint8: 0 off every MK, k for the window's k-th MK
    masks: torch.Tensor  # (K, h, w) float: share of each low-res pixel inside MK k

    @property
    def mks(self) -> int:
        return len(self.masks)

    def random_point(self, number: int, rng: np.random.Generator) -> np.ndarray:
        """x, y (window px, continuous) of a uniformly drawn pixel of label ``number``."""
        ys, xs = np.nonzero(self.labels == number)
        pick = rng.integers(len(xs))
        return np.array([xs[pick], ys[pick]]) + rng.random(2)


def layout_seeds(seed: int, count: int, held_out: bool) -> dict[str, list[int]]:
    """Distinct layout seeds per modality; held-out ones never meet the training ones."""
    base = 50_000 + 1000 * seed + (500 if held_out else 0)
    return {m: [base + 100 * i + k for k in range(count)] for i, m in enumerate(MODALITIES)}


def mk_window_rects(layout: SyntheticLayout, side: int, rng: np.random.Generator) -> list[Rect]:
    """One ``side`` px window per planted MK, the MK inside it at a random place (clear of
    SAM2's edge tolerance where it fits), within the layout."""
    rects = []
    for cell in layout.cells:
        if cell.cell_type != "MK":
            continue
        x0, y0, x1, y1 = cell.box
        pad = EDGE_TOLERANCE_PX
        low = np.array([x1 + pad - side, y1 + pad - side])
        high = np.array([x0 - pad, y0 - pad])
        high = np.maximum(high, low)
        corner = rng.uniform(low, high + 1).astype(int)
        corner = np.clip(corner, 0, [layout.width - side, layout.height - side])
        rects.append(Rect(int(corner[0]), int(corner[1]), side, side))
    return rects


def training_windows(
    engine: Sam2Engine, seeds: dict[str, list[int]], side: int, rng: np.random.Generator
) -> list[TrainingWindow]:
    """Every MK window of the layouts, encoded once by the frozen image encoder."""
    low = engine.image_size // 4  # SAM2's low-res mask grid
    factor = side // low
    windows = []
    for modality, modality_seeds in seeds.items():
        for layout_seed in modality_seeds:
            layout = SyntheticLayout(LAYOUT_PX, LAYOUT_PX, layout_seed, modality)
            rects = mk_window_rects(layout, side, rng)
            images = [to_rgb8(layout.render(r), modality) for r in rects]
            window = Window(0, 0, side, side, side)
            features = engine.encode(images, [[window]] * len(images))
            for rect, (feature,) in zip(rects, features, strict=True):
                labels = truth_labels(layout, rect, "MK")
                numbers = [n for n in np.unique(labels) if n]
                masks = np.stack([labels == n for n in numbers]).astype(np.float32)
                coarse = masks.reshape(len(numbers), low, factor, low, factor).mean((2, 4))
                renumbered = np.searchsorted(np.array([0, *numbers]), labels).astype(np.uint8)
                windows.append(
                    TrainingWindow(
                        WindowFeatures(
                            feature.image_embed.clone(),
                            [level.clone() for level in feature.high_res],
                            feature.window,
                        ),
                        renumbered,
                        torch.from_numpy(coarse),
                    )
                )
    return windows


def sample_batch(
    windows: list[TrainingWindow], size: int, negative_share: float, rng: np.random.Generator
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Window indices, point prompts (window px, (B, 2)) and low-res targets (B, h, w)."""
    picks, points, targets = [], [], []
    for _ in range(size):
        w = int(rng.integers(len(windows)))
        window = windows[w]
        number = 0 if rng.random() < negative_share else 1 + int(rng.integers(window.mks))
        target = window.masks[number - 1] if number else torch.zeros_like(window.masks[0])
        picks.append(w)
        points.append(window.random_point(number, rng))
        targets.append(target)
    return picks, torch.tensor(np.array(points), dtype=torch.float32), torch.stack(targets)


def decode_with_grad(
    model: torch.nn.Module, features: list[WindowFeatures], points: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM2's prompt encoder and mask decoder on one positive point per window, as
    :meth:`Sam2Engine.decode` calls them, but with gradients and one window per prompt."""
    scale = model.image_size / features[0].window.side
    coords = (points * scale)[:, None, :]
    labels = torch.ones((len(points), 1), dtype=torch.int)
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    low_res, iou_pred, _, _ = model.sam_mask_decoder(
        image_embeddings=torch.cat([f.image_embed for f in features]),
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
        repeat_image=False,
        high_res_features=[torch.cat([f.high_res[level] for f in features]) for level in range(2)],
    )
    return low_res.float(), iou_pred.float()


def low_res_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, M) IoU of each mask (logits > 0) with the binarised target; 0 where both are empty."""
    predicted = logits > 0
    truth = (targets > 0.5)[:, None]
    union = (predicted | truth).flatten(2).sum(-1)
    return (predicted & truth).flatten(2).sum(-1) / union.clamp(min=1)


def losses(
    logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask loss of the best of the three masks per prompt (BCE + dice) and IoU MSE."""
    expanded = targets[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, expanded, reduction="none").flatten(2)
    probability = logits.sigmoid().flatten(2)
    flat = expanded.flatten(2)
    dice = 1 - (2 * (probability * flat).sum(-1) + 1) / (probability.sum(-1) + flat.sum(-1) + 1)
    per_mask = bce.mean(-1) + dice
    mask_loss = per_mask.min(dim=1).values.mean()
    iou_loss = F.mse_loss(iou_pred, low_res_iou(logits.detach(), targets))
    return mask_loss, iou_loss


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The mask decoder and prompt encoder, less the decoder's two high-resolution projections
    (``conv_s0``, ``conv_s1``), which SAM2 applies when it encodes, so they sit in the cache."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    frozen = {
        id(p)
        for conv in ("conv_s0", "conv_s1")
        for p in getattr(model.sam_mask_decoder, conv).parameters()
    }
    parameters = [
        p
        for module in (model.sam_mask_decoder, model.sam_prompt_encoder)
        for p in module.parameters()
        if id(p) not in frozen
    ]
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def train_decoder(
    model: torch.nn.Module, windows: list[TrainingWindow], args: argparse.Namespace
) -> dict:
    """The optimiser loop: AdamW, linear warm-up over a tenth of the steps, then cosine decay."""
    rng = np.random.default_rng(args.seed)
    parameters = trainable(model)
    optimiser = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    wall, cpu = time.perf_counter(), time.process_time()
    history = []
    with torch.enable_grad():
        for step in range(args.steps):
            picks, points, targets = sample_batch(windows, args.batch, args.negative_share, rng)
            logits, iou_pred = decode_with_grad(model, [windows[i].features for i in picks], points)
            mask_loss, iou_loss = losses(logits, iou_pred, targets)
            optimiser.zero_grad()
            (mask_loss + args.iou_weight * iou_loss).backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimiser.step()
            schedule.step()
            history.append((mask_loss.item(), iou_loss.item()))
            if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
                recent = np.mean(history[-20:], axis=0)
                print(
                    f"  step {step + 1:>4}/{args.steps}: mask loss {recent[0]:.3f}, "
                    f"IoU loss {recent[1]:.4f}, {time.perf_counter() - wall:.0f} s",
                    flush=True,
                )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return {
        "steps": args.steps,
        "prompts_seen": args.steps * args.batch,
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "loss_first_20": [round(float(v), 4) for v in np.mean(history[:20], axis=0)],
        "loss_last_20": [round(float(v), 4) for v in np.mean(history[-20:], axis=0)],
    }


def prompted_iou(
    model: torch.nn.Module, windows: list[TrainingWindow], settings: MKSettings, seed: int
) -> dict:
    """The decoder on held-out MK windows, one point inside each MK and one off every MK.

    For MK prompts: mean IoU of the best of the three masks, and of the mask SAM2 ranks first
    (highest predicted IoU), with the shares of those first masks passing SEGMENT's
    predicted-IoU and stability thresholds (stability on the 64² low-res logits, a proxy of
    SEGMENT's check on the upsampled ones); for off-MK prompts: the share with any mask over
    the predicted-IoU threshold (each such mask is a candidate false MK).
    """
    rng = np.random.default_rng([seed, 1])
    best, first, first_pred, passes_iou, passes_stability = [], [], [], [], []
    negative, negative_pred = [], []
    with torch.no_grad():
        for window in windows:
            points = [window.random_point(n, rng) for n in [*range(1, window.mks + 1), 0]]
            targets = torch.cat([window.masks, torch.zeros_like(window.masks[:1])])
            logits, iou_pred = decode_with_grad(
                model, [window.features] * len(points), torch.tensor(np.array(points)).float()
            )
            iou = low_res_iou(logits, targets)[:-1]
            rows = torch.arange(len(points) - 1)
            choice = iou_pred[:-1].argmax(1)
            stability = calculate_stability_score(
                logits[rows, choice], settings.mask_threshold, settings.stability_score_offset
            )
            best += iou.max(1).values.tolist()
            first += iou[rows, choice].tolist()
            first_pred += iou_pred[rows, choice].tolist()
            negative_pred.append(float(iou_pred[-1].max()))
            passes_iou += (iou_pred[rows, choice] > settings.pred_iou_thresh).tolist()
            passes_stability += (stability >= settings.stability_score_thresh).tolist()
            negative.append(bool((iou_pred[-1] > settings.pred_iou_thresh).any()))
    return {
        "mks": len(best),
        "best_mask_iou": round(float(np.mean(best)), 3),
        "first_mask_iou": round(float(np.mean(first)), 3),
        "first_predicted_iou": round(float(np.mean(first_pred)), 3),
        "first_passes_pred_iou": round(float(np.mean(passes_iou)), 3),
        "first_passes_stability_lowres": round(float(np.mean(passes_stability)), 3),
        "off_mk_max_predicted_iou": round(float(np.mean(negative_pred)), 3),
        "off_mk_passes_pred_iou": round(float(np.mean(negative)), 3),
    }


def interior_centroids(labels: np.ndarray) -> np.ndarray:
    """(N, 2) x, y centroids of the labels that do not touch the image's edge.

    A tile cuts the MKs at its edge: their parts are neither whole truth nor a fair find, so
    both sides leave out what touches the edge (SEGMENT's margins and ownership do the same).
    """
    flat = labels.ravel()
    count = np.bincount(flat)
    ys, xs = np.divmod(np.arange(flat.size), labels.shape[1])
    x = np.bincount(flat, weights=xs) / np.maximum(count, 1)
    y = np.bincount(flat, weights=ys) / np.maximum(count, 1)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    keep = count > 0
    keep[0] = False
    keep[np.unique(edge)] = False
    return np.column_stack([x, y])[keep]


def held_out_tiles(seeds: dict[str, list[int]], per_modality: int) -> list[tuple]:
    """``(modality, rgb tile, truth MK labels)`` of 1024 px tiles, each centred on a planted MK
    (so SAM2's middle window holds it whole), none overlapping another (SEGMENT's MK decoding
    costs ~1 s per window on one CPU thread: tiles without an MK would add little)."""
    tiles = []
    for modality, modality_seeds in seeds.items():
        chosen: list[Rect] = []
        for layout_seed in modality_seeds:
            layout = SyntheticLayout(LAYOUT_PX, LAYOUT_PX, layout_seed, modality)
            for cell in layout.cells:
                if cell.cell_type != "MK" or len(chosen) == per_modality:
                    continue
                centre = cell.outline.mean(axis=0).astype(int)
                x, y = np.clip(centre - MOSAIC_TILE // 2, 0, LAYOUT_PX - MOSAIC_TILE)
                rect = Rect(int(x), int(y), MOSAIC_TILE, MOSAIC_TILE)
                if any(rect.intersection(other).w * rect.intersection(other).h for other in chosen):
                    continue
                chosen.append(rect)
                rgb = to_rgb8(layout.render(rect), modality)
                tiles.append((modality, rgb, truth_labels(layout, rect, "MK")))
    return tiles


def score_segment(segmenter: Sam2MKSegmenter, tiles: list[tuple], radius_px: float) -> dict:
    """SEGMENT's MK segmenter on each tile; precision, recall, F1 by centroid per modality,
    over the whole MKs and the finds clear of the tile's edge."""
    counts: dict[str, np.ndarray] = {m: np.zeros(3, int) for m in [*MODALITIES, "pooled"]}
    wall = time.perf_counter()
    for modality, rgb, truth in tiles:
        (found,) = segmenter.segment([rgb], PIXEL_SIZE_UM)
        truth_xy, found_xy = interior_centroids(truth), interior_centroids(found.labels)
        tally = np.array(
            [centroid_matches(truth_xy, found_xy, radius_px), len(found_xy), len(truth_xy)]
        )
        counts[modality] += tally
        counts["pooled"] += tally
    figures = {"seconds": round(time.perf_counter() - wall, 1)}
    for name, (matched, found, planted) in counts.items():
        precision = matched / found if found else 0.0
        recall = matched / planted if planted else 0.0
        f1 = 2 * precision * recall / (precision + recall) if matched else 0.0
        figures[name] = {
            "planted": int(planted),
            "found": int(found),
            "matched": int(matched),
            "precision": round(precision, 3),
            "recall": round(recall, 3),
            "f1": round(f1, 3),
        }
    return figures


def save_sam2(model: torch.nn.Module, models: Path) -> None:
    """The fine-tuned SAM2 in SAM2's checkpoint format over the folder's file; manifest (and
    its sha256) rewritten."""
    manifest = read_manifest(models)
    torch.save({"model": model.state_dict()}, models / manifest.sam2_checkpoint)
    write_manifest(manifest, models)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="weights, layouts, prompts (0)")
    parser.add_argument(
        "--train-layouts",
        type=int,
        default=2,
        help=f"{LAYOUT_PX}² training layouts per modality (2)",
    )
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps (200)")
    parser.add_argument("--batch", type=int, default=32, help="prompts per step (32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    parser.add_argument(
        "--iou-weight", type=float, default=1.0, help="weight of the IoU MSE in the loss (1)"
    )
    parser.add_argument(
        "--negative-share", type=float, default=0.0, help="share of prompts off every MK (0)"
    )
    parser.add_argument(
        "--eval-tiles", type=int, default=8, help="held-out 1024 px tiles per modality (8)"
    )
    parser.add_argument(
        "--radius-px",
        type=float,
        default=40.0,
        help="centroid match radius, px (40 ≈ 6.9 µm, under the smallest "
        "planted MK's radius of ~52 px)",
    )
    parser.add_argument(
        "--skip-before",
        action="store_true",
        help="do not score SEGMENT with the random weights (for variants of one seed: the "
        "random SAM2 is the same)",
    )
    parser.add_argument(
        "--save", type=Path, help="also copy the fine-tuned models folder here (must not exist)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    figures: dict = {
        "settings": vars(args) | {"json": None, "save": None},
        "load_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="bmseg-sam2-decoder-") as tmp:
        models = Path(tmp) / "models"
        make_test_models(models, seed=args.seed)
        segmenter = load_models(models, "cpu").mk
        engine = segmenter.engine
        side = window_side(
            (MOSAIC_TILE, MOSAIC_TILE), engine.image_size, segmenter.settings.max_downsample
        )
        rng = np.random.default_rng(args.seed)
        wall = time.perf_counter()
        train = training_windows(
            engine, layout_seeds(args.seed, args.train_layouts, False), side, rng
        )
        held_out_seeds = layout_seeds(args.seed, HELD_OUT_LAYOUTS, True)
        check = training_windows(engine, held_out_seeds, side, rng)
        figures["data"] = {
            "window_px": side,
            "training_windows": len(train),
            "training_mks": sum(w.mks for w in train),
            "held_out_windows": len(check),
            "encode_s": round(time.perf_counter() - wall, 1),
        }
        print("data:", json.dumps(figures["data"]), flush=True)
        tiles = held_out_tiles(held_out_seeds, args.eval_tiles)
        model = engine.model
        figures["before"] = {
            "decoder": prompted_iou(model, check, segmenter.settings, args.seed),
            "segment": None
            if args.skip_before
            else score_segment(segmenter, tiles, args.radius_px),
        }
        print("before:", json.dumps(figures["before"]), flush=True)
        figures["training"] = train_decoder(model, train, args)
        print("training:", json.dumps(figures["training"]), flush=True)
        figures["after_decoder"] = prompted_iou(model, check, segmenter.settings, args.seed)
        save_sam2(model, models)
        if args.save:
            shutil.copytree(models, args.save)
        reloaded = load_models(models, "cpu").mk  # the checkpoint as SEGMENT loads it
        figures["after"] = {
            "decoder": figures.pop("after_decoder"),
            "segment": score_segment(reloaded, tiles, args.radius_px),
        }
        print("after:", json.dumps(figures["after"]), flush=True)
    figures["total_wall_s"] = round(time.perf_counter() - started_wall, 1)
    figures["total_cpu_s"] = round(time.process_time() - started_cpu, 1)
    figures["load_after"] = os.getloadavg()
    print(json.dumps(figures, indent=2))
    if args.json:
        from bmseg.storage import write_json

        write_json(figures, args.json)
    before = figures["before"]["segment"]["pooled"]["f1"]
    after = figures["after"]["segment"]["pooled"]["f1"]
    print(
        f"MK F1 by centroid (SEGMENT's MK segmenter, held-out tiles): {before:.3f} before, "
        f"{after:.3f} after {figures['training']['wall_s']:.0f} s of training"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
