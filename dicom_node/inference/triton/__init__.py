"""The Triton backend: a client for running servers (:mod:`.client`), the server the node
starts itself from the nvidia-pytriton wheel (:mod:`.server`), the shared-memory transports
(:mod:`.shm`, :mod:`.cuda_shm`, :mod:`.placement`), the rotation over several servers
(:mod:`.rotation`), the model repository written for a bundle (:mod:`.repository`) and the
code those models run (:mod:`.models`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.config import InferenceSettings, ModelSettings

__all__ = ["create_backends"]


def create_backends(
    settings: InferenceSettings, models: Sequence[ModelSettings], data_dir: Path
) -> dict[str, Any]:
    """The ``"triton"`` backend (:func:`.managed.create_backends`), imported when used: the
    models Triton runs import this package too, and need none of the client's imports."""
    from dicom_node.inference.triton.managed import create_backends as create

    return dict(create(settings, models, data_dir))
