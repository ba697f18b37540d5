"""Checks files in the simple format before GPU time is spent on them.

``python -m flmm_lightning.data.check <file> [<file> ...] [--image-root DIR]``

Every problem is listed as ``file:line: field: message``; then a summary a person can read (images, objects,
phrases per object, mask area percentiles, images per size). Exit status 1 when any record is bad.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flmm_lightning.data.custom_format import FormatError, Problem, check_pixels, read_records

AREA_PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


@dataclass
class FileReport:
    """What ``check_file`` found: the problems, and the figures of the good records."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    num_records: int = 0
    num_good: int = 0
    num_narrative: int = 0
    phrases_per_object: list[int] = field(default_factory=list)
    area_percent: list[float] = field(default_factory=list)
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)

    @property
    def num_bad(self) -> int:
        return len({problem.line for problem in self.problems})

    def summary(self) -> str:
        rows = [
            ("records (images)", f"{self.num_records} ({self.num_good} good, {self.num_bad} bad)"),
            ("narrative records", str(self.num_narrative)),
            ("objects", str(len(self.phrases_per_object))),
        ]
        if self.phrases_per_object:
            counts = np.asarray(self.phrases_per_object)
            rows.append(
                ("phrases per object", f"mean {counts.mean():.2f}, min {counts.min()}, max {counts.max()}")
            )
        if self.area_percent:
            values = np.percentile(np.asarray(self.area_percent), AREA_PERCENTILES)
            cells = ", ".join(f"p{p} {v:.2f}" for p, v in zip(AREA_PERCENTILES, values, strict=True))
            rows.append(("mask area (% of image)", cells))
        for (width, height), count in sorted(self.sizes.items(), key=lambda pair: (-pair[1], pair[0])):
            rows.append((f"images of {width}x{height}", str(count)))
        width = max(len(name) for name, _ in rows)
        lines = [f"{self.path}", *(f"  {name.ljust(width)}  {value}" for name, value in rows)]
        return "\n".join(lines)


def check_file(path: str | Path, image_root: str | Path | None = None, progress: bool = False) -> FileReport:
    """Checks the structure of every record, reads every image and decodes every mask."""
    path = Path(path)
    report = FileReport(path)
    try:
        records, problems = read_records(path)
    except FormatError as error:
        report.problems.append(Problem(str(path), 0, "file", str(error)))
        return report
    report.problems.extend(problems)
    root = Path(image_root) if image_root else path.parent
    for record in tqdm(records, desc=f"checking {path.name}", unit="image", disable=not progress):
        checked = check_pixels(record, root, str(path), path.stem)
        report.problems.extend(checked.problems)
        if checked.problems or checked.image_size is None:
            continue
        report.num_good += 1
        report.num_narrative += record.narrative
        report.sizes[checked.image_size] += 1
        pixels = checked.image_size[0] * checked.image_size[1]
        for obj, mask in zip(record.objects, checked.masks, strict=True):
            report.phrases_per_object.append(len(obj.phrases))
            report.area_percent.append(100.0 * float(mask.sum()) / pixels)
    report.problems.sort(key=lambda problem: problem.line)
    report.num_records = report.num_good + report.num_bad
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flmm_lightning.data.check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("files", nargs="+", type=Path, help="JSON Lines (or JSON array) files")
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="base of relative image paths (default: each file's folder)",
    )
    args = parser.parse_args(argv)
    failed = False
    for path in args.files:
        report = check_file(path, args.image_root, progress=sys.stderr.isatty())
        for problem in report.problems:
            print(problem)
        print(report.summary())
        failed = failed or bool(report.problems)
    print("FAILED: fix the records above" if failed else "OK: every record is good")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
