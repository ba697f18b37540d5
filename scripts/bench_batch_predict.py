"""Images/s of batch prediction (``predict inputs=...``) against one ``Grounder.ground`` call per image, on
the same images: ``python scripts/bench_batch_predict.py [--ckpt PATH] [--images 64] [--batch-size 8]``.

Without ``--ckpt`` the model is the demo experiment's, untrained (tiny Qwen2.5-VL and tiny SAM, built
offline): the same arithmetic as a trained one. The images are crops of the two COCO fixture photos at
sizes between 240 and 640 pixels, written once; each image gets two phrases. Both paths load the model
once before the clock starts; the per-image path decodes each image in the call (as ``ground(path)``
does), the batched path in its ``batch.num_workers`` worker processes. Prints one JSON report.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning import Callback, LightningModule, Trainer
from PIL import Image

from flmm_lightning.config.composition import CONF_DIR, register_resolvers
from flmm_lightning.inference.batch import predict_batch
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs.build import build_module, run_config

PHOTOS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "coco_sample" / "images"
PHRASES = ["the person on the left", "the ground"]


def composed(config_name: str, overrides: list[str]):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def demo_checkpoint(folder: Path) -> Path:
    """The demo experiment's model, untrained, saved as training saves a checkpoint."""
    cfg = composed("train", ["+experiment=demo", f"paths.data_dir={folder}", f"hydra.run.dir={folder}"])
    torch.manual_seed(0)
    path = folder / "demo_untrained.ckpt"
    module = build_module(cfg)
    torch.save({"state_dict": module.state_dict(), "flmm_config": run_config(cfg)}, path)
    return path


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    photos = [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.jpg"))]
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = int(rng.integers(240, 641)), int(rng.integers(240, 481))
        left = int(rng.integers(0, max(1, photo.width - min(width, photo.width))))
        top = int(rng.integers(0, max(1, photo.height - min(height, photo.height))))
        crop = photo.crop((left, top, left + min(width, photo.width), top + min(height, photo.height)))
        path = folder / f"image{index:03d}.jpg"
        crop.resize((width, height)).save(path, quality=92)
        paths.append(path)
    return paths


class Clock(Callback):
    """Wall time and this process's CPU time of a stretch of work: a loop of ``ground`` calls
    (``start``/``stop``) or the prediction loop of a batch run (as a callback). CPU time leaves out
    dataloader workers: it counts the whole work only with ``batch.num_workers=0``. CPU seconds per image do
    not depend on what else the machine runs; wall time does."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.result: dict[str, float] = {}

    def start(self) -> None:
        self._synchronize()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self, images: int) -> dict[str, float]:
        self._synchronize()
        wall, cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu
        self.result = {"images_per_s": images / wall, "cpu_s_per_image": cpu / images, "wall_s": wall}
        return self.result

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._images = 0
        self.start()

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, *args
    ) -> None:
        self._images += len(batch)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop(self._images)

    def _synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="a checkpoint (default: the untrained demo)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=2,
        help="batch.num_workers of the second batched run (the first: 0)",
    )
    parser.add_argument("--trainer", default="cpu", help="the trainer config of the batched path (cpu, gpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_batch_predict_") as temporary:
        folder = Path(temporary)
        checkpoint = args.ckpt or demo_checkpoint(folder)
        images = write_images(folder, args.images, args.seed)
        manifest = folder / "manifest.jsonl"
        manifest.write_text("".join(json.dumps({"image": p.name, "phrases": PHRASES}) + "\n" for p in images))

        device = "cuda" if args.trainer != "cpu" else "cpu"
        grounder = Grounder.from_checkpoint(checkpoint, device=device)
        for path in images[:2]:  # warm-up: first calls allocate and pick kernels
            grounder.ground(path, PHRASES)
        clock = Clock(device)
        clock.start()
        for path in images:
            grounder.ground(path, PHRASES)
        per_image = clock.stop(len(images))
        del grounder

        batched = {}
        for workers in sorted({0, args.num_workers}):
            clock = Clock(device)
            cfg = composed(
                "predict",
                [
                    f"ckpt={checkpoint}",
                    f"inputs={manifest}",
                    f"output={folder / f'out{workers}'}",
                    f"paths.output_dir={folder / 'run'}",
                    f"trainer={args.trainer}",
                    f"batch.size={args.batch_size}",
                    f"batch.num_workers={workers}",
                ],
            )
            summary = predict_batch(cfg, callbacks=[clock])
            if summary.failed or summary.processed != len(images):
                raise SystemExit(f"the batched run did not predict every image: {summary}")
            batched[workers] = clock.result

    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "checkpoint": str(args.ckpt) if args.ckpt else "demo experiment, untrained",
        "images": len(images),
        "phrases_per_image": len(PHRASES),
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "per_image": per_image,
        **{f"batched_num_workers_{workers}": result for workers, result in batched.items()},
        "speedup_images_per_s": {
            f"num_workers_{workers}": result["images_per_s"] / per_image["images_per_s"]
            for workers, result in batched.items()
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
