"""The documentation's pictures, from a trained run and the browser test's screenshots (``make figures``).

    python scripts/figures.py --run outputs/demo/latest --screens outputs/figures/screens --out docs/assets

writes into ``--out``:

- ``pipeline.png``: one validation phrase through the model: the photo, the frozen LMM's attention of the
  phrase over the image (mean over layers and heads), the U-Net's coarse mask, SAM's fine mask beside the
  ground truth;
- ``examples.png``: the run's own validation overlays (``<run>/overlays/<split>/*_pred_vs_gt.png``:
  prediction | ground truth), a few per split;
- ``app_chat.png``, ``app_look_inside.png``: the web app's chat and look-inside tabs as the browser test
  leaves them (``FLMM_SCREENSHOT_DIR=<screens> pytest tests/test_app.py -k person``).

Every file is a palette PNG well under 1 MB, so that the pictures can live in git beside the pages.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from flmm_lightning.data.refcoco import RefCocoDataset  # noqa: E402
from flmm_lightning.heads.unet import crop_to_content  # noqa: E402
from flmm_lightning.inference.grounder import Grounder  # noqa: E402
from flmm_lightning.outputs.overlays import heat_colors, mask_outline, object_color  # noqa: E402

# The most any committed picture may weigh: the README loads them all on its first screen.
MAX_BYTES = 1_000_000
# Width of the pictures in the README and the pages (pixels): larger screenshots are scaled down to it.
PAGE_WIDTH = 1000
SCREENSHOTS = {"app_chat_turn.png": "app_chat.png", "app_token_heatmap.png": "app_look_inside.png"}


def save_small(image: Image.Image, path: Path, colors: int = 128) -> Path:
    """``image`` as a palette PNG of ``colors`` colours, refused when it would still be 1 MB or more."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    size = path.stat().st_size
    if size >= MAX_BYTES:
        path.unlink()
        raise ValueError(f"{path}: {size} bytes, above the {MAX_BYTES}-byte limit for a committed picture")
    return path


def to_width(image: Image.Image, width: int = PAGE_WIDTH) -> Image.Image:
    if image.width <= width:
        return image
    return image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else (pred & target).sum().item() / union


def tint(image: np.ndarray, mask: np.ndarray, color: Sequence[int], alpha: float = 0.5) -> np.ndarray:
    """float RGB ``[H, W, 3]`` with ``mask`` tinted and outlined in ``color``."""
    tinted = image.copy()
    tinted[mask] = (1 - alpha) * tinted[mask] + alpha * np.asarray(color, dtype=np.float32)
    tinted[mask_outline(mask)] = color
    return tinted


@torch.no_grad()
def pipeline_figure(grounder: Grounder, data_root: Path, out: Path, candidates: int = 8) -> Path:
    """One object of the synthetic RefCOCO-format validation split through the model, stage by stage: of the
    objects of the first ``candidates`` images, the one whose fine mask matches its ground truth best (the
    figure explains the stages; ``examples_figure`` shows typical results)."""
    dataset = RefCocoDataset(data_root, "refcoco_synthetic", "unc", "val", "images", text_mode="first")
    best = None
    for index in range(min(candidates, len(dataset))):
        sample = dataset[index]
        batch = move_data_to_device(grounder.collate([grounder.encode.encode(sample)]), grounder.device)
        prediction = grounder.model(batch)[0]
        for k in range(sample.num_objects):
            iou = mask_iou((prediction.fine_logits[k] > 0).cpu(), sample.masks[k].cpu())
            if best is None or iou > best[0]:
                best = (iou, sample, prediction, k)
    if best is None:
        raise ValueError(f"{data_root}: no validation object in the synthetic RefCOCO-format split")
    _, sample, prediction, k = best
    features = prediction.features
    height, width = sample.image.height, sample.image.width

    # [C, h, w] -> [h', w'] on the image's cells (processor padding cut) -> [H, W] in [0, 1]
    attention = crop_to_content(features.attention_maps[k].mean(0), features.padded_hw, features.content_box)
    attention = F.interpolate(attention[None, None].float(), (height, width), mode="bilinear")[0, 0]
    attention = (attention / attention.max().clamp_min(1e-12)).cpu().numpy()
    coarse = prediction.coarse_logits[None, k : k + 1].float()
    coarse = F.interpolate(coarse, (height, width), mode="bilinear")
    coarse_mask = (coarse[0, 0] > 0).cpu()
    fine_mask = (prediction.fine_logits[k] > 0).cpu()
    truth = sample.masks[k].cpu()

    photo = np.asarray(sample.image.convert("RGB"), dtype=np.float32)
    color = object_color(0)
    panels = [
        (f"photo + phrase\n\u201c{sample.phrases[k].strip()}\u201d", photo),
        ("frozen LMM: the phrase's\nattention over the image", 0.45 * photo + 0.55 * heat_colors(attention)),
        (
            f"U-Net: coarse mask\nIoU {mask_iou(coarse_mask, truth):.0%}",
            tint(photo, coarse_mask.numpy(), color),
        ),
        (f"SAM: fine mask\nIoU {mask_iou(fine_mask, truth):.0%}", tint(photo, fine_mask.numpy(), color)),
        ("ground truth", tint(photo, truth.numpy(), color)),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.9), dpi=110)
    for axis, (title, picture) in zip(axes, panels, strict=True):
        axis.imshow(picture.clip(0, 255).astype(np.uint8))
        axis.set_title(title, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    for left, right in zip(axes[:-2], axes[1:-1], strict=True):
        figure.patches.append(
            matplotlib.patches.FancyArrowPatch(
                posA=(left.get_position().x1, 0.45),
                posB=(right.get_position().x0, 0.45),
                transform=figure.transFigure,
                arrowstyle="-|>",
                mutation_scale=14,
                color="0.2",
            )
        )
    path = out / "pipeline.png"
    buffer = out / ".pipeline_rgb.png"
    figure.savefig(buffer, bbox_inches="tight")
    plt.close(figure)
    with Image.open(buffer) as rendered:
        save_small(rendered, path)
    buffer.unlink()
    return path


def examples_figure(run_dir: Path, out: Path, per_split: int = 3) -> Path:
    """The run's first ``per_split`` validation overlays of each split, one row each, titled with the
    split."""
    rows = []
    for split_dir in sorted((run_dir / "overlays").iterdir()):
        files = sorted(split_dir.glob("*_pred_vs_gt.png"))[:per_split]
        if not files:
            continue
        tiles = [Image.open(file).convert("RGB") for file in files]
        height = max(tile.height for tile in tiles)
        row = Image.new(
            "RGB", (sum(tile.width for tile in tiles) + 12 * (len(tiles) - 1), height + 20), "white"
        )
        caption = f"{split_dir.name}: prediction | ground truth"
        ImageDraw.Draw(row).text((2, 0), caption, fill=(0, 0, 0), font=ImageFont.load_default(size=15))
        left = 0
        for tile in tiles:
            row.paste(tile, (left, 20))
            left += tile.width + 12
        rows.append(row)
    if not rows:
        raise FileNotFoundError(
            f"no {run_dir}/overlays/<split>/*_pred_vs_gt.png: is {run_dir} a finished run?"
        )
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 8 for r in rows)), "white")
    top = 0
    for row in rows:
        grid.paste(row, (0, top))
        top += row.height + 8
    return save_small(to_width(grid), out / "examples.png")


def screenshot_figures(screens: Path, out: Path) -> list[Path]:
    """The browser test's screenshots, scaled to the page width."""
    written = []
    for source, target in SCREENSHOTS.items():
        if not (screens / source).is_file():
            test = "FLMM_SCREENSHOT_DIR={screens} pytest tests/test_app.py -k a_person_uploads"
            raise FileNotFoundError(f"{screens / source}: run {test.format(screens=screens)} first")
        with Image.open(screens / source) as shot:
            written.append(save_small(to_width(shot), out / target, colors=64))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("outputs/demo/latest"), help="a finished demo run")
    parser.add_argument(
        "--data-root", type=Path, default=Path("data/synthetic"), help="the synthetic dataset"
    )
    parser.add_argument(
        "--screens", type=Path, help="the browser test's screenshots (skipped when not given)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/assets"))
    parser.add_argument(
        "--candidates", type=int, default=8, help="validation images the pipeline object is from"
    )
    args = parser.parse_args(argv)
    checkpoint = args.run / "checkpoints" / "last.ckpt"
    grounder = Grounder.from_checkpoint(checkpoint, device="cpu")
    written = [
        pipeline_figure(grounder, args.data_root, args.out, args.candidates),
        examples_figure(args.run, args.out),
    ]
    if args.screens is not None:
        written += screenshot_figures(args.screens, args.out)
    for path in written:
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
