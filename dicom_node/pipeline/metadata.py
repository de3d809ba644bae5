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
#: The inference configs MONAI's bundle workflow reads, in the order it looks for them.
INFERENCE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
METADATA = "configs/metadata.json"
#: Keys of an inference config that may name the labels when metadata.json does not.
_CONFIG_LABEL_KEYS = ("channel_def", "label_names", "class_names", "labels")


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


def find_inference_config(root: Path) -> Path:
    """The bundle's inference config: JSON or YAML, as MONAI reads either."""
    for name in INFERENCE_CONFIGS:
        if (root / name).is_file():
            return root / name
    raise BundleError(f"bundle {root} has no configs/inference.json (nor .yaml)")


def read_config(path: Path, bundle: Path) -> dict[str, Any]:
    """A JSON or YAML config as a dict (no ``@`` or ``$`` resolved)."""
    if path.suffix == ".json":
        return read_json(path, bundle)
    try:
        import yaml

        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BundleError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise BundleError(f"{path} is not a mapping of config items")
    return config


def _labels_from(value: Any) -> dict[int, str] | None:
    """Label value -> name from a ``channel_def``-like dict or a list of names."""
    try:
        if isinstance(value, dict):
            return {int(k): str(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return dict(enumerate(value))
    except (TypeError, ValueError):
        return None
    return None


def read_bundle_info(path: str | Path) -> BundleInfo:
    """Read the identity and labels of the bundle at ``path``.

    Labels come from ``configs/metadata.json`` (``network_data_format.outputs.pred.
    channel_def``) or, where a bundle has none there, from a ``channel_def``,
    ``label_names``, ``class_names`` or ``labels`` item of its inference config.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    metadata = read_json(root / METADATA, root)
    pred = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    pred = pred if isinstance(pred, dict) else {}
    channel_def = _labels_from(pred.get("channel_def"))
    if channel_def is None:
        config = read_config(find_inference_config(root), root)
        for key in _CONFIG_LABEL_KEYS:
            channel_def = _labels_from(config.get(key))
            if channel_def is not None:
                break
    if channel_def is None:
        raise BundleError(
            f"bundle {root} names no labels: no network_data_format.outputs.pred.channel_def "
            f"in {METADATA} and no {' or '.join(_CONFIG_LABEL_KEYS)} in its inference config"
        )
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
