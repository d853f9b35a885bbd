"""The run's log: one row per epoch, printed as a line and kept as log.csv and log.json."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

COLUMNS = ("epoch", "phase", "lr", "task_loss", "denoise_loss", "val_top1", "images_per_s", "seconds")


def line(row: Mapping[str, Any], epochs: int) -> str:
    denoise = "-" if row["denoise_loss"] is None else f"{row['denoise_loss']:.4f}"
    return (
        f"epoch {row['epoch']}/{epochs} [{row['phase']}] lr {row['lr']:.2e}  task loss {row['task_loss']:.4f}  "
        f"denoising loss {denoise}  val top-1 {100 * row['val_top1']:.2f} %  "
        f"{row['images_per_s']:.0f} img/s  {row['seconds']:.1f} s"
    )


def write(output: Path, rows: Sequence[Mapping[str, Any]], final: Optional[Mapping[str, Any]] = None) -> None:
    """Rewrite log.csv (the epochs) and log.json (the epochs and, at the end, the fused model's
    check) from all rows so far: a resumed run's log is whole, whichever directory it writes to."""
    with open(output / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    doc: dict[str, Any] = {"epochs": list(rows)}
    if final is not None:
        doc["final"] = dict(final)
    (output / "log.json").write_text(json.dumps(doc, indent=2) + "\n")
