"""What a bundle says about itself: name, version, labels and the file its weights are in.

The node needs a model's labels and identity to encode results, but with Triton the network
runs in another process: reading ``configs/metadata.json`` and the inference config with
:mod:`json` (or YAML) keeps torch and MONAI (hundreds of MB) out of the node's memory.

The model zoo's bundles name their labels in several ways, all of which are read:

* ``metadata.json``: ``network_data_format.outputs.pred.channel_def`` (most bundles) or
  ``...pred.label_def`` (``pediatric_abdominal_ct_segmentation``), value -> name;
* an item of the inference config (``channel_def``, ``label_def``, ``label_names``,
  ``class_names``, ``labels`` or ``labels_dict``): a list of names, a value -> name mapping
  or a name -> value mapping (``spleen_deepedit_annotation``: ``{"spleen": 1, ...}``);
* config expressions (VISTA-3D: ``labels_dict`` reads the metadata, and the evaluator's
  ``hyper_kwargs#everything_labels`` picks the 117 classes its automatic mode returns).

Only what needs evaluating (a ``$`` expression, an ``@`` reference) is handed to MONAI's
:class:`~monai.bundle.ConfigParser`: in this process when MONAI is already loaded, else in a
child process (:func:`resolve_with_monai`), so the node's own process stays without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INFERENCE_CONFIG = "configs/inference.json"
#: The inference configs MONAI's bundle workflow reads, in the order it looks for them.
INFERENCE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
METADATA = "configs/metadata.json"
#: Where metadata.json may name the labels, under ``network_data_format.outputs.pred``.
_METADATA_LABEL_KEYS = ("channel_def", "label_def")
#: Items of an inference config that may name the labels, in the order they are tried.
_CONFIG_LABEL_KEYS = (
    "channel_def",
    "label_def",
    "label_names",
    "class_names",
    "labels",
    "labels_dict",
)
#: The evaluator's list of every class VISTA-3D's automatic ("everything") mode segments.
EVERYTHING_LABELS = "evaluator#hyper_kwargs#everything_labels"
TORCHSCRIPT = "models/model.ts"
STATE_DICT = "models/model.pt"
#: The largest config or metadata file read, in bytes. The model zoo's largest (VISTA-3D's
#: metadata, with its 132 labels) is under 100 kB; a file far beyond is no config, and
#: parsing it whole would take several times its size in memory.
MAX_CONFIG_BYTES = 8 * 1024 * 1024
#: ``$@bundle_root + '/models/model.pt'``: how nearly every zoo bundle names its weights.
_UNDER_BUNDLE_ROOT = re.compile(r"""^\$\s*@bundle_root\s*\+\s*(['"])([^'"]*)\1\s*$""")


class BundleError(ValueError):
    """A folder is not a MONAI bundle this node can run; the message says why."""


@dataclass(frozen=True)
class BundleInfo:
    """A bundle's identity, its foreground labels (label value -> name) and its weights."""

    path: Path
    name: str
    version: str
    labels: dict[int, str]
    #: Channels of the network's output: classes with the background, or for an
    #: everything mode the classes prompted (one channel each, no background).
    num_classes: int
    #: Where the labels were read, in words (``dicom-node model install`` says it).
    labels_from: str = ""
    #: The label values VISTA-3D's everything mode prompts, in the evaluator's order;
    #: ``None`` for a bundle without one.
    everything: tuple[int, ...] | None = None
    #: The file the trained network is loaded from: ``models/model.ts`` where there is
    #: one, else the checkpoint the checkpoint loader names; ``None`` if it does not exist.
    weights_file: Path | None = None

    @property
    def weights_sha256(self) -> str | None:
        """The SHA-256 of :attr:`weights_file` (hex), what a result names its weights by."""
        return None if self.weights_file is None else file_sha256(self.weights_file)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (hex), computed once per version of the file (its size and
    modification time): a network's weights are hundreds of MB."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def read_text_bounded(path: Path) -> str:
    """A config file's text, refused unread when larger than :data:`MAX_CONFIG_BYTES`."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise BundleError(
            f"{path} is {size / 2**20:.0f} MiB; a bundle's config or metadata is at most "
            f"{MAX_CONFIG_BYTES // 2**20} MiB"
        )
    return path.read_text()


def read_json(path: Path, bundle: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"bundle {bundle} has no {path.relative_to(bundle)}")
    try:
        value = json.loads(read_text_bounded(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise BundleError(f"{path} is not a JSON object")
    return value


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

        config = yaml.safe_load(read_text_bounded(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise BundleError(f"{path} is not a mapping of config items")
    return config


def _needs_evaluating(value: Any) -> bool:
    """Whether a config value is (or holds) a ``$`` expression or an ``@`` reference."""
    if isinstance(value, str):
        return value.startswith(("$", "@", "%"))
    if isinstance(value, dict):
        return any(_needs_evaluating(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_needs_evaluating(v) for v in value)
    return False


def labels_in(value: Any) -> dict[int, str] | None:
    """Label value -> name from a value -> name mapping, a name -> value mapping or a list of
    names; ``None`` when ``value`` is none of them."""
    try:
        if isinstance(value, dict) and value:
            if all(isinstance(k, int) or str(k).strip().lstrip("-").isdigit() for k in value):
                return {int(k): str(v) for k, v in value.items()}
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
                return {int(v): str(k) for k, v in value.items()}
            return None
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return dict(enumerate(value))
    except (TypeError, ValueError):
        return None
    return None


def config_item(config: dict[str, Any], key: str) -> Any:
    """A config item by its ``#``-separated id (``None`` where there is none)."""
    value: Any = config
    for part in key.split("#"):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _target_name(item: Any) -> str:
    target = item.get("_target_", "") if isinstance(item, dict) else ""
    return str(target).rsplit(".", 1)[-1]


def checkpoint_loader_id(config: dict[str, Any]) -> str | None:
    """The config id of the bundle's CheckpointLoader: ``checkpointloader`` as the zoo's
    inference configs name it, or the first one among the ``handlers`` (or any other list
    of the config), as MONAI's evaluator would run it."""
    if isinstance(config.get("checkpointloader"), dict):
        return "checkpointloader"
    for key, value in config.items():
        items = value if isinstance(value, list) else []
        for i, item in enumerate(items):
            if _target_name(item) == "CheckpointLoader" and "load_path" in item:
                return f"{key}#{i}"
    return None


@dataclass(frozen=True)
class _Labels:
    labels: dict[int, str]
    source: str
    everything: tuple[int, ...] | None
    #: The checkpoint file, relative to the bundle or absolute; ``None``: models/model.pt.
    checkpoint: str | None


def _read_plain(root: Path, config: dict[str, Any], metadata: dict[str, Any]) -> _Labels | None:
    """The labels, everything list and checkpoint without evaluating anything; ``None``
    when some of it is an expression or a reference that only MONAI can resolve."""
    pred = config_item(metadata, "network_data_format#outputs#pred")
    pred = pred if isinstance(pred, dict) else {}
    found = None
    for key in _METADATA_LABEL_KEYS:
        labels = labels_in(pred.get(key))
        if labels is not None:
            found = (labels, f"{METADATA} network_data_format.outputs.pred.{key}")
            break
    if found is None:
        for key in _CONFIG_LABEL_KEYS:
            value = config.get(key)
            if value is None:
                continue
            if _needs_evaluating(value):
                return None
            labels = labels_in(value)
            if labels is not None:
                found = (labels, f"the inference config's {key} ({_form(value)})")
                break
    everything = config_item(config, EVERYTHING_LABELS)
    if _needs_evaluating(everything):
        return None
    checkpoint = None
    loader = checkpoint_loader_id(config)
    if loader is not None:
        load_path = config_item(config, f"{loader}#load_path")
        match = _UNDER_BUNDLE_ROOT.match(load_path) if isinstance(load_path, str) else None
        if match:
            checkpoint = match.group(2).lstrip("/")
        elif isinstance(load_path, str) and not _needs_evaluating(load_path):
            checkpoint = load_path
        elif load_path:
            return None
    if found is None:
        return _Labels({}, "", None, checkpoint)
    return _Labels(found[0], found[1], _everything(everything), checkpoint)


def _form(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "a list of names"
    if labels_in(value) is not None and all(isinstance(v, int) for v in value.values()):
        return "names to values"
    return "values to names"


def _everything(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise BundleError(f"{EVERYTHING_LABELS} is not a list of label values") from None


def bundle_scripts_importable(root: Path) -> None:
    """Make ``import scripts`` import this bundle's own ``scripts/`` package, as
    ``monai.bundle.run`` does with the bundle folder on ``sys.path``.

    Every bundle's package is called ``scripts``: another bundle's, imported earlier in this
    process, is forgotten first (what was built from it keeps working).
    """
    folder = str(root.resolve())
    if not (root / "scripts").is_dir():
        return
    loaded = sys.modules.get("scripts")
    where = getattr(loaded, "__file__", None) or ""
    if loaded is not None and not where.startswith(folder + os.sep):
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)


def resolve_with_monai(root: Path) -> dict[str, Any]:
    """The labels, their source, the everything list and the checkpoint as MONAI's
    :class:`~monai.bundle.ConfigParser` resolves them (``imports`` and the bundle's own
    ``scripts/`` honoured); JSON-ready. Imports MONAI."""
    from monai.bundle import ConfigParser

    config_path = find_inference_config(root)
    config = read_config(config_path, root)
    bundle_scripts_importable(root)
    parser = ConfigParser()
    parser.read_config(str(config_path))
    parser.read_meta(str(root / METADATA))
    parser["bundle_root"] = str(root.resolve())

    def parsed(key: str) -> Any:
        try:
            return parser.get_parsed_content(key)
        except Exception as exc:  # noqa: BLE001 - an unresolvable item is the bundle's fault
            raise BundleError(f"bundle {root} has an unusable {key} ({exc})") from None

    if "imports" in config:
        parsed("imports")
    metadata = read_json(root / METADATA, root)
    pred = config_item(metadata, "network_data_format#outputs#pred") or {}
    labels, source = None, ""
    for key in _METADATA_LABEL_KEYS:
        labels = labels_in(pred.get(key)) if isinstance(pred, dict) else None
        if labels is not None:
            source = f"{METADATA} network_data_format.outputs.pred.{key}"
            break
    for key in _CONFIG_LABEL_KEYS if labels is None else ():
        if key in config:
            value = parsed(key)
            labels = labels_in(value)
            if labels is not None:
                how = "an expression" if _needs_evaluating(config[key]) else _form(value)
                source = f"the inference config's {key} ({how})"
                break
    everything = parsed(EVERYTHING_LABELS) if config_item(config, EVERYTHING_LABELS) else None
    checkpoint = None
    loader = checkpoint_loader_id(config)
    if loader is not None and config_item(config, f"{loader}#load_path"):
        checkpoint = str(parsed(f"{loader}#load_path"))
    return {
        "labels": None if labels is None else {str(k): v for k, v in labels.items()},
        "labels_from": source,
        "everything": None if everything is None else [int(v) for v in everything],
        "checkpoint": checkpoint,
    }


def _resolved(root: Path) -> _Labels:
    """:func:`resolve_with_monai`, in this process when MONAI is loaded, else in a child."""
    if "monai.bundle" in sys.modules:
        data = resolve_with_monai(root)
    else:
        child = subprocess.run(
            [sys.executable, "-m", "dicom_node.pipeline.metadata", str(root)],
            capture_output=True,
            text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            check=False,
        )
        if child.returncode != 0:
            lines = child.stderr.strip().splitlines() or ["no message"]
            raise BundleError(lines[-1].removeprefix("BundleError: "))
        data = json.loads(child.stdout)
    labels = data["labels"]
    return _Labels(
        {int(k): str(v) for k, v in labels.items()} if labels else {},
        data["labels_from"],
        None if data["everything"] is None else tuple(data["everything"]),
        data["checkpoint"],
    )


def read_bundle_info(path: str | Path) -> BundleInfo:
    """Read the identity, labels and weights file of the bundle at ``path``.

    Labels come from ``metadata.json`` (``channel_def`` or ``label_def``) or, where it names
    none, from an item of the inference config (see the module's docstring). A bundle with
    an everything mode (``evaluator#hyper_kwargs#everything_labels``) returns the classes
    of that list, named as above. Raises :class:`BundleError` when none names the labels.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    metadata = read_json(root / METADATA, root)
    config = read_config(find_inference_config(root), root)
    found = _read_plain(root, config, metadata)
    if found is None:
        found = _resolved(root)
    if not found.labels:
        raise BundleError(
            f"bundle {root} names no labels: no network_data_format.outputs.pred.channel_def "
            f"or label_def in {METADATA} and no {', '.join(_CONFIG_LABEL_KEYS)} in its "
            "inference config"
        )
    names = found.labels
    source = found.source
    if found.everything is not None:
        unnamed = [v for v in found.everything if v not in names]
        if unnamed:
            raise BundleError(
                f"bundle {root}: {EVERYTHING_LABELS} has values {unnamed} that "
                f"{source} does not name"
            )
        names = {v: names[v] for v in found.everything}
        source += f", the {len(names)} classes of {EVERYTHING_LABELS}"
    labels = {k: v for k, v in sorted(names.items()) if k != 0}
    if not labels:
        raise BundleError(f"bundle {root} defines no foreground label in {METADATA}")
    pred = config_item(metadata, "network_data_format#outputs#pred")
    pred = pred if isinstance(pred, dict) else {}
    if found.everything is not None:
        num_classes = len(found.everything)
    else:
        num_classes = int(pred.get("num_channels", max(names) + 1))
    return BundleInfo(
        path=root,
        name=str(metadata.get("name") or root.name),
        version=str(metadata.get("version", "0")),
        labels=labels,
        num_classes=num_classes,
        labels_from=source,
        everything=found.everything,
        weights_file=_weights_file(root, found.checkpoint),
    )


def _weights_file(root: Path, checkpoint: str | None) -> Path | None:
    """What :meth:`~dicom_node.pipeline.bundle.Bundle.load_network` loads: the TorchScript
    network, else the checkpoint; ``None`` when that file does not exist."""
    for candidate in (root / TORCHSCRIPT, root / (checkpoint or STATE_DICT)):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _main(argv: list[str]) -> int:
    """``python -m dicom_node.pipeline.metadata BUNDLE``: :func:`resolve_with_monai` as JSON."""
    try:
        print(json.dumps(resolve_with_monai(Path(argv[0]))))
    except BundleError as exc:
        print(f"BundleError: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
