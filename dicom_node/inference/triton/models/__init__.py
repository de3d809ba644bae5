"""The Python-backend models Triton runs for the node: ``segmentation`` (the pipeline around
the network) and ``network`` (the bundle's network on batches of patches).

A model repository's ``model.py`` files only import these classes (see
:func:`dicom_node.inference.triton.repository.model_py`), so every model, hand-written or generated,
runs the code of the installed node.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["bundle_env_name", "bundle_path_from_config", "instance_device"]


def bundle_env_name(triton_model: str) -> str:
    """The variable that tells a Triton model which bundle to load (its ``model.py`` reads
    it, the node sets it): ``DICOM_NODE_BUNDLE_`` and the model's name in upper case, any
    character other than an ASCII letter, digit or underscore as ``_``."""
    return "DICOM_NODE_BUNDLE_" + re.sub(r"[^A-Z0-9_]", "_", triton_model.upper())


def bundle_path_from_config(model_config: Mapping, model_dir: str | Path) -> Path:
    """The MONAI bundle a Triton model serves.

    Several models share one server, so each may be pointed at a bundle of its own; the
    first of these that is set wins:

    * :func:`bundle_env_name` of the model (``DICOM_NODE_BUNDLE_LIVER_SEG``);
    * for a network model, the variable of the segmentation model that calls it, named by
      its ``segmentation_model`` parameter (``liver_unet`` follows ``liver_seg``): the two
      must run the same bundle, and the node only sets the segmentation model's variable;
    * the model config's ``bundle`` parameter, relative to the repository root (the folder
      that holds the model's folder), default ``../bundles/spleen_ct_demo``.
    """
    parameters = model_config.get("parameters", {})
    name = str(model_config.get("name") or Path(model_dir).name)
    caller = parameters.get("segmentation_model", {}).get("string_value")
    for variable in [bundle_env_name(m) for m in (name, caller) if m]:
        if os.environ.get(variable):
            return Path(os.environ[variable]).resolve()
    value = parameters.get("bundle", {}).get("string_value") or "../bundles/spleen_ct_demo"
    return (Path(model_dir).resolve().parent / value).resolve()


def instance_device(args: Mapping[str, str]) -> str:
    """The torch device of a model instance: its GPU for KIND_GPU instances, else the CPU.

    ``DICOM_NODE_DEVICE=cpu`` keeps even a GPU instance on the CPU.
    """
    if os.environ.get("DICOM_NODE_DEVICE") == "cpu":
        return "cpu"
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"
