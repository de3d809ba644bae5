"""What a bundle says about itself, read without torch: name, version, labels.

The node needs a model's labels and identity to encode results, but with Triton the network
runs in another process: reading ``configs/metadata.json`` with :mod:`json` keeps torch and
MONAI (hundreds of MB) out of the node's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INFERENCE_CONFIG = "configs/inference.json"
METADATA = "configs/metadata.json"


class BundleError(ValueError):
    """A folder is not a MONAI bundle this node can run; the message says why."""


@dataclass(frozen=True)
class BundleInfo:
    """A bundle's identity and foreground labels (label value -> name)."""

    path: Path
    name: str
    version: str
    labels: dict[int, str]
    num_classes: int


def read_json(path: Path, bundle: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"bundle {bundle} has no {path.relative_to(bundle)}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc


def read_bundle_info(path: str | Path) -> BundleInfo:
    """Read ``configs/metadata.json`` of the bundle at ``path``."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    metadata = read_json(root / METADATA, root)
    try:
        pred = metadata["network_data_format"]["outputs"]["pred"]
        channel_def = {int(k): str(v) for k, v in pred["channel_def"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"bundle {root} has no network_data_format.outputs.pred.channel_def in {METADATA}"
        ) from exc
    labels = {k: v for k, v in sorted(channel_def.items()) if k != 0}
    if not labels:
        raise BundleError(f"bundle {root} defines no foreground label in {METADATA}")
    return BundleInfo(
        path=root,
        name=str(metadata.get("name") or root.name),
        version=str(metadata.get("version", "0")),
        labels=labels,
        num_classes=int(pred.get("num_channels", max(channel_def) + 1)),
    )
