"""Read what inference needs from a MONAI bundle.

A MONAI bundle's ``configs/inference.json`` describes a file-based workflow (LoadImaged from
NIfTI, a DataLoader, SaveImaged...). The node already holds the volume in memory, so instead of
running that workflow we read the parts that define the model's contract with
:class:`monai.bundle.ConfigParser` (so ``@`` references and ``$`` expressions resolve as MONAI
resolves them): the network, the preprocessing parameters, the sliding-window inferer and the
label names of ``configs/metadata.json``. Any preprocessing transform that the in-memory pipeline
cannot reproduce is refused, rather than silently skipped, because a model fed differently
preprocessed images gives plausible-looking wrong masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from dicom_node.pipeline.metadata import (
    INFERENCE_CONFIG,
    METADATA,
    BundleError,
    read_bundle_info,
    read_json,
)

__all__ = ["INFERENCE_CONFIG", "METADATA", "Bundle", "BundleError", "Preprocessing", "load_bundle"]

TORCHSCRIPT = "models/model.ts"
STATE_DICT = "models/model.pt"

#: Dictionary transforms that are no-ops on an in-memory, channel-first float tensor.
_PASS_THROUGH = {"LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "AddChanneld"}


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing of a bundle, as the parameters of MONAI's array transforms.

    ``axcodes`` is ``None`` when the bundle has no ``Orientationd`` and ``pixdim`` is ``None``
    when it has no ``Spacingd``: the image then keeps its orientation or spacing.
    """

    axcodes: str | None
    pixdim: tuple[float, ...] | None
    spacing_mode: str
    a_min: float
    a_max: float
    b_min: float | None
    b_max: float | None
    clip: bool
    #: The steps in the bundle's order: ``"orientation"``, ``"spacing"``, ``"intensity"``.
    order: tuple[str, ...] = ("orientation", "spacing", "intensity")


@dataclass
class Bundle:
    """A parsed MONAI bundle folder (``configs/inference.json``, ``configs/metadata.json``,
    ``models/model.ts``)."""

    path: Path
    name: str
    version: str
    labels: dict[int, str]
    num_classes: int
    roi_size: tuple[int, int, int]
    sw_batch_size: int
    overlap: float
    blend_mode: str
    preprocessing: Preprocessing
    network_def: dict[str, Any]
    parser: ConfigParser = field(repr=False)

    def build_network(self) -> torch.nn.Module:
        """A freshly initialised network from ``network_def`` (for training or state dicts)."""
        try:
            return self.parser.get_parsed_content("network_def", instantiate=True)
        except Exception as exc:  # noqa: BLE001 - any config error is the bundle's fault
            raise BundleError(f"bundle {self.path} has an unusable network_def: {exc}") from exc

    def load_network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The trained network on ``device``, in eval mode.

        ``models/model.ts`` (TorchScript) is preferred: it needs no Python definition of the
        architecture and is what Triton's PyTorch backend serves. Bundles from the MONAI model
        zoo that only ship ``models/model.pt`` are loaded into ``network_def`` instead.
        """
        ts, pt = self.path / TORCHSCRIPT, self.path / STATE_DICT
        if ts.is_file():
            net = torch.jit.load(str(ts), map_location=device)
        elif pt.is_file():
            net = self.build_network()
            state = torch.load(pt, map_location=device, weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]  # a CheckpointSaver checkpoint
            net.load_state_dict(state)
            net = net.to(device)
        else:
            raise BundleError(
                f"bundle {self.path} has no trained weights: {TORCHSCRIPT} is missing"
            )
        return net.eval()


def _target_name(item: Any) -> str:
    target = item.get("_target_", "") if isinstance(item, dict) else ""
    return str(target).rsplit(".", 1)[-1]


def _parse_preprocessing(parser: ConfigParser, path: Path) -> Preprocessing:
    transforms = parser.get("preprocessing#transforms")
    if not isinstance(transforms, list):
        raise BundleError(
            f"bundle {path} has no preprocessing transforms list in {INFERENCE_CONFIG}"
        )
    values: dict[str, Any] = {
        "axcodes": None,
        "pixdim": None,
        "spacing_mode": "bilinear",
        "a_min": None,
        "a_max": None,
        "b_min": None,
        "b_max": None,
        "clip": False,
    }

    def arg(index: int, key: str, default: Any = None) -> Any:
        if key not in transforms[index]:
            return default
        return parser.get_parsed_content(f"preprocessing#transforms#{index}#{key}")

    order = []
    for i, item in enumerate(transforms):
        name = _target_name(item)
        if name in _PASS_THROUGH:
            continue
        if name == "Orientationd":
            values["axcodes"] = str(arg(i, "axcodes"))
            order.append("orientation")
        elif name == "Spacingd":
            pixdim = arg(i, "pixdim")
            pixdim = pixdim if isinstance(pixdim, (list, tuple)) else [pixdim] * 3
            values["pixdim"] = tuple(float(v) for v in pixdim)
            values["spacing_mode"] = str(arg(i, "mode", "bilinear"))
            order.append("spacing")
        elif name == "ScaleIntensityRanged":
            for key in ("a_min", "a_max", "b_min", "b_max"):
                values[key] = arg(i, key)
            values["clip"] = bool(arg(i, "clip", False))
            order.append("intensity")
        else:
            raise BundleError(
                f"bundle {path} uses preprocessing transform {name or item!r}, which this "
                "node does not support"
            )
    if values["a_min"] is None or values["a_max"] is None:
        raise BundleError(f"bundle {path} has no ScaleIntensityRanged in its preprocessing")
    for key in ("a_min", "a_max"):
        values[key] = float(values[key])
    # MONAI's ScaleIntensityRange leaves the range unscaled when b_min/b_max are None.
    for key in ("b_min", "b_max"):
        values[key] = None if values[key] is None else float(values[key])
    if len(set(order)) != len(order):
        raise BundleError(f"bundle {path} repeats a preprocessing transform")
    return Preprocessing(**values, order=tuple(order))


def load_bundle(path: str | Path) -> Bundle:
    """Parse the MONAI bundle folder at ``path``.

    Raises :class:`BundleError` when the folder lacks a config, the inferer is not a
    ``SlidingWindowInferer``, the network or label definition is missing, or the preprocessing
    uses a transform the pipeline cannot reproduce. Weights are loaded later by
    :meth:`Bundle.load_network`.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    config = read_json(root / INFERENCE_CONFIG, root)
    info = read_bundle_info(root)

    parser = ConfigParser()
    parser.read_config(root / INFERENCE_CONFIG)
    parser.read_meta(root / METADATA)
    parser["bundle_root"] = str(root)

    network_def = config.get("network_def")
    if not isinstance(network_def, dict) or "_target_" not in network_def:
        raise BundleError(f"bundle {root} has no network_def in {INFERENCE_CONFIG}")

    inferer = config.get("inferer")
    if _target_name(inferer) != "SlidingWindowInferer":
        raise BundleError(
            f"bundle {root} uses inferer {_target_name(inferer) or 'none'}; "
            "only SlidingWindowInferer is supported"
        )
    try:
        roi = parser.get_parsed_content("inferer#roi_size")
        sw_batch_size = int(parser.get_parsed_content("inferer#sw_batch_size", default=1))
        overlap = float(parser.get_parsed_content("inferer#overlap", default=0.25))
        blend_mode = str(parser.get_parsed_content("inferer#mode", default="constant"))
    except Exception as exc:  # noqa: BLE001 - an unresolvable reference is the bundle's fault
        raise BundleError(f"bundle {root} has an unusable inferer: {exc}") from exc
    roi_size = tuple(int(v) for v in (roi if isinstance(roi, (list, tuple)) else [roi] * 3))
    if len(roi_size) != 3:
        raise BundleError(f"bundle {root} has a {len(roi_size)}-D roi_size; a 3-D one is needed")

    return Bundle(
        path=root,
        name=info.name,
        version=info.version,
        labels=info.labels,
        num_classes=info.num_classes,
        roi_size=roi_size,  # type: ignore[arg-type]
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        blend_mode=blend_mode,
        preprocessing=_parse_preprocessing(parser, root),
        network_def=network_def,
        parser=parser,
    )
