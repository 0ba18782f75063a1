"""Helpers for Lightning loggers: images go to W&B when a WandbLogger is present (PNG files stay on disk)."""

from __future__ import annotations

from pathlib import Path


def log_images(loggers, key: str, images, captions: list[str] | None = None) -> None:
    """Log PNG paths or arrays to every logger that can show images (W&B); the others keep the files."""
    images = [str(i) if isinstance(i, Path) else i for i in images]
    if not images:
        return
    for lg in loggers or []:
        if type(lg).__name__ == "WandbLogger":
            lg.log_image(key=key, images=images, caption=captions or [Path(i).stem if isinstance(i, str) else str(n)
                                                                       for n, i in enumerate(images)])
