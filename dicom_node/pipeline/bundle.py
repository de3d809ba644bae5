"""Read a MONAI bundle as MONAI's own bundle workflow reads it.

A bundle's inference config (``configs/inference.json`` or ``.yaml``) describes a file-based
workflow: LoadImaged from NIfTI, a DataLoader, an evaluator, SaveImaged. The node already holds
the volume in memory, so it runs the parts that define the model's contract, built by
:class:`monai.bundle.ConfigParser` exactly as ``monai.bundle.run`` builds them (``imports``,
the bundle's own ``scripts/`` package, ``@`` references and ``$`` expressions): the network,
its weights from where ``checkpointloader#load_path`` points, ``preprocessing``,
``inferer`` and ``postprocessing`` (see :mod:`dicom_node.pipeline.workflow`).

Where the bundle's chain is one the node's fast path reproduces exactly (Orientation,
Spacing and ScaleIntensityRange before the network; argmax, optionally the largest connected
component, and a nearest-neighbour inverse after it), :attr:`Bundle.preprocessing` and
:attr:`Bundle.fast_postprocessing` describe it and :class:`SegmentationPipeline` takes the fast
path; any other chain runs as MONAI's transforms. What cannot apply to a single CT series
(several images concatenated, several input keys) is refused when the bundle is loaded,
with the reason.

A bundle whose evaluator lists the classes of an everything mode (VISTA-3D's
``hyper_kwargs#everything_labels``) runs in that mode: its network is served prompted with
those classes (:class:`EverythingNetwork`) and its labels are those classes.

Why one module of this size: it reads a bundle as MONAI reads it, the config, the
weights, the labels and each refusal with its reason; the rules depend on one another.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import monai
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

from dicom_node.pipeline.metadata import (
    INFERENCE_CONFIG,
    METADATA,
    BundleError,
    bundle_scripts_importable,
    checkpoint_loader_id,
    config_item,
    file_sha256,
    find_inference_config,
    read_bundle_info,
    read_config,
)
from dicom_node.pipeline.weights import (
    STATE_DICT,
    TORCHSCRIPT,
    channels_last_on_cpu,
    load_state_dict,
    load_torchscript,
)

__all__ = [
    "INFERENCE_CONFIG",
    "METADATA",
    "Bundle",
    "BundleError",
    "EverythingNetwork",
    "FastPostprocessing",
    "Preprocessing",
    "load_bundle",
]

#: Dictionary transforms that are no-ops on an in-memory, channel-first float tensor.
_PASS_THROUGH = {"LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "AddChanneld"}
#: Postprocessing transforms that write files: the node encodes DICOM instead.
WRITERS = {"SaveImaged", "SaveImage"}
#: Transforms that combine several images (phases, modalities) into one input: a CT series
#: is one image.
_SEVERAL_IMAGES = ("ConcatItemsd", "ConcatImages", "ConcatItems")


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


@dataclass(frozen=True)
class FastPostprocessing:
    """A postprocessing the fast path computes exactly: argmax (after an optional softmax,
    which does not change it), the largest connected component of each label when
    ``keep_largest``, then the inverse of the preprocessing with nearest-neighbour
    interpolation."""

    keep_largest: bool


@dataclass
class Bundle:
    """A parsed MONAI bundle folder."""

    path: Path
    name: str
    version: str
    labels: dict[int, str]
    num_classes: int
    #: The sliding window, when the inferer is a ``SlidingWindowInferer`` (else ``None``).
    roi_size: tuple[int, int, int] | None
    sw_batch_size: int
    overlap: float
    blend_mode: str
    #: Set when the fast path reproduces the bundle's preprocessing, else ``None``.
    preprocessing: Preprocessing | None
    #: The config's ``network_def``: an item (``_target_``) or a ``$`` expression.
    network_def: dict[str, Any] | str
    parser: ConfigParser = field(repr=False)
    #: Set when the fast path reproduces the bundle's postprocessing, else ``None``.
    fast_postprocessing: FastPostprocessing | None = None
    #: The data key of the image in the bundle's transforms (``image_key``).
    image_key: str = "image"
    #: The bundle's evaluator runs the network under autocast (``evaluator#amp``).
    amp: bool = False
    #: Where ``checkpointloader#load_path`` points (``models/model.pt`` without one).
    weights: Path | None = None
    #: The label values VISTA-3D's everything mode prompts (the evaluator's
    #: ``hyper_kwargs#everything_labels``); ``None`` for a bundle without one.
    everything: tuple[int, ...] | None = None
    #: Where the labels were read, in words.
    labels_from: str = ""
    #: The file :meth:`load_network` loads (TorchScript, else the checkpoint), if any.
    weights_file: Path | None = None

    @property
    def weights_sha256(self) -> str | None:
        """The SHA-256 of :attr:`weights_file` (hex), what a result names its weights by."""
        return None if self.weights_file is None else file_sha256(self.weights_file)

    @property
    def fast_path(self) -> bool:
        """Whether :class:`SegmentationPipeline`'s fast path gives the bundle's own result."""
        return (
            self.preprocessing is not None
            and self.fast_postprocessing is not None
            and self.roi_size is not None
        )

    def build_network(self) -> torch.nn.Module:
        """A freshly initialised network from ``network_def`` (for training or state dicts)."""
        try:
            return self.parser.get_parsed_content("network_def", instantiate=True)
        except Exception as exc:  # noqa: BLE001 - any config error is the bundle's fault
            cause = _innermost(exc)
            if isinstance(cause, FileNotFoundError) and cause.filename:
                # e.g. the DiNTS bundles' architecture, a search result in a file of its own
                raise BundleError(
                    f"bundle {self.path} cannot build its network_def: it reads "
                    f"{cause.filename}, which is not there"
                ) from exc
            raise BundleError(
                f"bundle {self.path} has a network_def that MONAI {monai.__version__} cannot "
                f"build ({_root_cause(exc)}){self._made_for()}"
            ) from exc

    def _made_for(self) -> str:
        """Which MONAI the bundle says it was made for, when another one runs here."""
        wanted = self.parser.get("_meta_#monai_version")
        if wanted and str(wanted) != monai.__version__:
            return f"; the bundle was made for MONAI {wanted}"
        return ""

    def load_network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The trained network on ``device``, in eval mode, as a function of a patch batch.

        For a bundle with an everything mode, that is the network prompted with every class
        of the mode (:class:`EverythingNetwork`).

        ``models/model.ts`` (TorchScript) is preferred: it needs no Python definition of the
        architecture and is what Triton's PyTorch backend serves. Otherwise the weights
        where ``checkpointloader#load_path`` points (``models/model.pt`` by default) are
        loaded into ``network_def``, as MONAI's ``CheckpointLoader`` loads them: a
        checkpoint whose ``model`` item is the state dict, or the state dict itself.
        """
        pt = self.weights or self.path / STATE_DICT
        net = load_torchscript(self.path, device)
        if net is not None:
            return net
        if pt.is_file():
            net = self.build_network()
            state = load_state_dict(pt, self.path, device)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]  # a CheckpointSaver checkpoint
            try:
                # Whatever the file holds: load_state_dict refuses a non-mapping (TypeError).
                net.load_state_dict(cast("Mapping[str, Any]", state))
            except (RuntimeError, TypeError) as exc:
                raise BundleError(
                    f"bundle {self.path}: the weights in {pt.name} do not fit its network_def "
                    f"({str(exc).splitlines()[0]})"
                ) from None
            net = net.to(device)
        else:
            where = pt.relative_to(self.path) if pt.is_relative_to(self.path) else pt
            raise BundleError(
                f"bundle {self.path} has no trained weights: neither {TORCHSCRIPT} nor "
                f"{where} (checkpointloader#load_path) is there"
            )
        net = channels_last_on_cpu(net.eval(), torch.device(device))
        if self.everything is not None:
            return EverythingNetwork(net, self.everything)
        return net


class EverythingNetwork(torch.nn.Module):
    """VISTA-3D prompted with every class of its everything mode: logits of a patch batch.

    Why: VISTA-3D takes prompts beside the image. Its evaluator
    (``scripts/evaluator.py``), given no prompt, prompts the classes of
    ``hyper_kwargs#everything_labels`` (``class_vector``, one row per class) and its
    inferer (``scripts/inferer.py``) hands them, with ``transpose=True``, to every call of
    the network from the sliding window. Without point prompts the network uses nothing
    else (the patch's coordinates serve the point head only), so the network of that mode is
    this function of the patches alone, which Triton can serve and batch like any other:
    ``(N, 1, *roi)`` -> ``(N, classes, *roi)``, channel ``i`` the logits of
    ``everything[i]``. The workflow calls the bundle's inferer as the evaluator does and
    hands it this (:meth:`dicom_node.pipeline.workflow.BundleWorkflow.infer`).
    """

    def __init__(self, network: torch.nn.Module, everything: tuple[int, ...]) -> None:
        super().__init__()
        last = getattr(getattr(network, "point_head", None), "last_supported", None)
        if last is not None and max(everything) > int(last):
            raise BundleError(
                f"the everything mode prompts class {max(everything)}, and the network "
                f"supports classes up to {last}"
            )
        self.network = network
        self.register_buffer(
            "class_vector", torch.as_tensor(everything, dtype=torch.long)[:, None], False
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # One patch at a time: VISTA-3D's prompted forward takes a batch of one image.
        return torch.cat(
            [
                self.network(patch[None], class_vector=self.class_vector, transpose=True)
                for patch in patches
            ]
        )


def _innermost(exc: BaseException) -> BaseException:
    """The exception that says why: ConfigParser wraps it."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's type and first line."""
    exc = _innermost(exc)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _target_name(item: Any) -> str:
    target = item.get("_target_", "") if isinstance(item, dict) else ""
    return str(target).rsplit(".", 1)[-1]


def _transforms(config: dict[str, Any], section: str) -> list[Any]:
    """The transforms of ``section`` as the config writes them: its list, or the lists an
    expression joins (``"$@preprocessing_transforms + @deepedit_transforms"``)."""
    compose = config.get(section)
    transforms = compose.get("transforms") if isinstance(compose, dict) else None
    if isinstance(transforms, list):
        return transforms
    if isinstance(transforms, str) and transforms.startswith("$"):
        joined: list[Any] = []
        for ref in re.findall(r"@([\w#]+)", transforms):
            value = config_item(config, ref)
            joined += value if isinstance(value, list) else []
        return joined
    return []


def _items_of(value: Any, at: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every config item with a ``_target_`` in ``value``, with its id."""
    found: list[tuple[str, dict[str, Any]]] = []
    children: Any = ()
    if isinstance(value, dict):
        if "_target_" in value:
            found.append((at, value))
        children = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    for key, child in children:
        found += _items_of(child, f"{at}#{key}" if at else str(key))
    return found


def _parse_preprocessing(parser: ConfigParser, path: Path) -> Preprocessing | None:
    """The fast path's parameters of the bundle's preprocessing, or ``None`` when it uses a
    transform the fast path does not reproduce (the bundle's transforms then run)."""
    transforms = parser.get("preprocessing#transforms")
    if not isinstance(transforms, list):
        return None
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
        if name in _PASS_THROUGH and set(item) <= {"_target_", "keys"}:
            continue
        if name == "Orientationd" and set(item) <= {"_target_", "keys", "axcodes"}:
            values["axcodes"] = str(arg(i, "axcodes"))
            order.append("orientation")
        elif name == "Spacingd" and set(item) <= {"_target_", "keys", "pixdim", "mode"}:
            pixdim = arg(i, "pixdim")
            pixdim = pixdim if isinstance(pixdim, (list, tuple)) else [pixdim] * 3
            values["pixdim"] = tuple(float(v) for v in pixdim)
            values["spacing_mode"] = str(arg(i, "mode", "bilinear"))
            order.append("spacing")
        elif name == "ScaleIntensityRanged" and set(item) <= {
            "_target_",
            "keys",
            "a_min",
            "a_max",
            "b_min",
            "b_max",
            "clip",
        }:
            for key in ("a_min", "a_max", "b_min", "b_max"):
                values[key] = arg(i, key)
            values["clip"] = bool(arg(i, "clip", False))
            order.append("intensity")
        else:
            return None
    if values["a_min"] is None or values["a_max"] is None or len(set(order)) != len(order):
        return None
    for key in ("a_min", "a_max"):
        values[key] = float(values[key])
    # MONAI's ScaleIntensityRange leaves the range unscaled when b_min/b_max are None.
    for key in ("b_min", "b_max"):
        values[key] = None if values[key] is None else float(values[key])
    return Preprocessing(**values, order=tuple(order))


def _parse_postprocessing(
    parser: ConfigParser, labels: dict[int, str]
) -> FastPostprocessing | None:
    """The fast path's description of the bundle's postprocessing, or ``None``.

    Recognised: [Activationsd(softmax)], AsDiscreted(argmax), [KeepLargestConnectedComponentd
    of every foreground label], Invertd(nearest_interp) and writers, in that order. A
    softmax followed by a bilinear Invertd and then argmax is not the same: it runs as
    MONAI's transforms.
    """
    transforms = parser.get("postprocessing#transforms")
    if not isinstance(transforms, list):
        return None

    def arg(index: int, key: str, default: Any = None) -> Any:
        if key not in transforms[index]:
            return default
        return parser.get_parsed_content(f"postprocessing#transforms#{index}#{key}")

    steps = []
    keep_largest = False
    for i, item in enumerate(transforms):
        name = _target_name(item)
        keys = set(item) - {"_target_", "keys"}
        if name in WRITERS or (name == "EnsureTyped" and not keys):
            continue
        if name == "Activationsd" and keys <= {"softmax"} and arg(i, "softmax", False):
            steps.append("softmax")
        elif name == "AsDiscreted" and keys == {"argmax"} and arg(i, "argmax") is True:
            steps.append("argmax")
        elif name == "KeepLargestConnectedComponentd" and keys <= {"applied_labels"}:
            applied = arg(i, "applied_labels")
            applied = [applied] if isinstance(applied, int) else applied
            if applied is not None and sorted(int(v) for v in applied) != sorted(labels):
                return None
            keep_largest = True
            steps.append("largest")
        elif (
            name == "Invertd"
            and keys
            <= {
                "transform",
                "orig_keys",
                "nearest_interp",
                "to_tensor",
            }
            and arg(i, "nearest_interp", True) is True
        ):
            steps.append("invert")
        else:
            return None
    expected = [s for s in ("softmax", "argmax", "largest", "invert") if s in steps]
    if steps != expected or "argmax" not in steps or "invert" not in steps:
        return None
    return FastPostprocessing(keep_largest=keep_largest)


def _check_single_image(transforms: list[Any], path: Path) -> None:
    """Refuse a bundle whose preprocessing needs more than the one image of a series."""
    for item in transforms:
        name = _target_name(item)
        if name in _SEVERAL_IMAGES:
            raise BundleError(
                f"bundle {path} combines several images ({name}): a CT series is one image"
            )
        if name == "LoadImaged":
            keys = item.get("keys")
            keys = [keys] if isinstance(keys, str) else keys
            if isinstance(keys, list) and len(keys) > 1:
                raise BundleError(
                    f"bundle {path} loads {len(keys)} images ({', '.join(map(str, keys))}) "
                    "per case: a CT series is one image"
                )


def _keys(transform: Any) -> list[str]:
    keys = getattr(transform, "keys", ())
    return [str(k) for k in keys] if isinstance(keys, (list, tuple)) else []


def flat_transforms(compose: Any) -> list[Any]:
    """The transforms of a (nested) Compose, in order."""
    if isinstance(compose, Compose):
        return list(compose.flatten().transforms)
    if isinstance(compose, (list, tuple)):
        return list(compose)
    return [compose]


def _parse(parser: ConfigParser, key: str, path: Path, default: Any = None) -> Any:
    try:
        return parser.get_parsed_content(key, default=default)
    except Exception as exc:  # noqa: BLE001 - an unresolvable item is the bundle's fault
        raise BundleError(f"bundle {path} has an unusable {key} ({_root_cause(exc)})") from exc


def load_bundle(path: str | Path) -> Bundle:
    """Parse the MONAI bundle folder at ``path``.

    Raises :class:`BundleError`, whose message says in one sentence what is wrong, when the
    folder lacks a config, labels or ``network_def``, when its ``imports`` or
    ``preprocessing``, ``inferer`` or ``postprocessing`` cannot be built, or when it needs more
    than one image. Weights are loaded later by :meth:`Bundle.load_network`.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    config_path = find_inference_config(root)
    config = read_config(config_path, root)
    info = read_bundle_info(root)

    # A bundle's own code lives in its scripts/ package, imported as "scripts" by
    # monai.bundle.run with the bundle folder on sys.path.
    bundle_scripts_importable(root)
    parser = ConfigParser()
    parser.read_config(str(config_path))
    parser.read_meta(str(root / METADATA))
    parser["bundle_root"] = str(root.resolve())
    if "imports" in config:
        _parse(parser, "imports", root)

    # The node loads the series itself (workflow.loaded_image): a file reader a bundle names
    # (ITKReader...) needs a package the node does not use, and is never called.
    for at, item in _items_of(config):
        if _target_name(item) == "LoadImaged" and "reader" in item:
            parser[f"{at}#reader"] = None

    network_def = config.get("network_def")
    an_item = isinstance(network_def, dict) and "_target_" in network_def
    if not an_item and not (isinstance(network_def, str) and network_def.startswith("$")):
        raise BundleError(f"bundle {root} has no network_def in {config_path.name}")
    assert isinstance(network_def, (dict, str))  # an item or an expression, as just checked
    image_key = str(_parse(parser, "image_key", root, default="image"))
    _check_single_image(_transforms(config, "preprocessing"), root)
    for section in ("preprocessing", "inferer", "postprocessing"):
        if section not in config:
            raise BundleError(f"bundle {root} has no {section} in {config_path.name}")
        _parse(parser, section, root)  # every transform and the inferer can be built
    # and as built, where the config joins lists by expressions or the bundle's code adds any
    built = flat_transforms(_parse(parser, "preprocessing", root))
    _check_single_image([{"_target_": type(t).__name__, "keys": _keys(t)} for t in built], root)

    roi_size = None
    sw_batch_size, overlap, blend_mode = 1, 0.25, "constant"
    if _target_name(config["inferer"]) == "SlidingWindowInferer":
        inferer = _parse(parser, "inferer", root)
        roi = inferer.roi_size
        roi_size = tuple(int(v) for v in (roi if isinstance(roi, (list, tuple)) else [roi] * 3))
        if len(roi_size) != 3:
            raise BundleError(f"bundle {root} has a {len(roi_size)}-D roi_size; 3-D is needed")
        sw_batch_size = int(inferer.sw_batch_size)
        overlap = float(
            inferer.overlap
            if not isinstance(inferer.overlap, (list, tuple))
            else inferer.overlap[0]
        )
        blend_mode = str(getattr(inferer.mode, "value", inferer.mode))

    weights = None
    loader = checkpoint_loader_id(config)
    if loader is not None:
        load_path = _parse(parser, f"{loader}#load_path", root)
        if load_path:
            weights = Path(str(load_path))
            weights = weights if weights.is_absolute() else root / weights
    amp = (
        bool(_parse(parser, "evaluator#amp", root, default=False))
        if isinstance(config.get("evaluator"), dict)
        else False
    )
    fast_post = _parse_postprocessing(parser, info.labels)
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
        fast_postprocessing=fast_post,
        image_key=image_key,
        amp=amp,
        weights=weights,
        everything=info.everything,
        labels_from=info.labels_from,
        weights_file=info.weights_file,
    )
