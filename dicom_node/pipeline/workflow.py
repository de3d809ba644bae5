"""A bundle's own preprocessing, inferer and postprocessing, run on an in-memory volume.

This is what ``monai.bundle.run`` does with the bundle's inference config, minus the files:
the transforms, the inferer and the network are the very objects
:class:`monai.bundle.ConfigParser` builds from the config, applied in the config's order.
Two things differ, and only in where the data comes from and goes to:

* ``LoadImaged`` is replaced by :func:`loaded_image`, which gives the series as MONAI's
  readers give a NIfTI file of it: an (x, y, z) float32 MetaTensor with its RAS affine and
  no channel, so that ``EnsureChannelFirstd``, ``Orientationd``, ``Spacingd``,
  ``CropForegroundd``, ``Invertd``... see what they would see;
* writers (``SaveImaged``) are left out: the node encodes DICOM.

A bundle with an everything mode (VISTA-3D) has its inferer called as its evaluator calls it
when given no prompt: with the mode's classes as ``class_vector`` and no points; the
prediction's ``label_prompt`` is set for its postprocessing (``VistaPostTransformd``), and
the image's applied operations are made id-free (``reset_ops_id``) as the evaluator does, so
that ``Invertd`` may invert them with a copy of the preprocessing.

The data lives on the pipeline's device from the start, so a GPU runs the transforms too;
the evaluator's ``amp`` is honoured on a GPU as MONAI's evaluator honours it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, reset_ops_id

from dicom_node.pipeline.bundle import WRITERS, Bundle
from dicom_node.pipeline.bundle import flat_transforms as _flat
from dicom_node.pipeline.postprocess import run_postprocessing
from dicom_node.pipeline.transforms import from_metatensor, to_metatensor

Predictor = Callable[[torch.Tensor], torch.Tensor]


def loaded_image(
    hu: np.ndarray | torch.Tensor, affine: np.ndarray, device: str | torch.device = "cpu"
) -> MetaTensor:
    """The series as ``LoadImaged`` loads a NIfTI file of it: (x, y, z), RAS, no channel."""
    channel_first = to_metatensor(hu, affine, device)
    meta = dict(channel_first.meta)
    meta.pop("affine", None)  # given as the affine itself
    meta["original_channel_dim"] = "no_channel"
    meta["spatial_shape"] = np.asarray(channel_first.shape[1:])
    meta.setdefault("filename_or_obj", "")
    return MetaTensor(channel_first.as_tensor()[0], affine=channel_first.affine, meta=meta)


class BundleWorkflow:
    """The bundle's transforms and inferer around a network, on ``device``."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu") -> None:
        parser = bundle.parser
        self.bundle = bundle
        self.device = torch.device(device)
        self.image_key = bundle.image_key
        self.pred_key = "pred"
        # The objects Invertd refers to (@preprocessing) are these: the same instances must
        # be applied, since each records its own identity in the data's applied operations.
        self._preprocessing = parser.get_parsed_content("preprocessing")
        steps = [t for t in _flat(self._preprocessing) if not isinstance(t, LoadImaged)]
        self._pre = Compose(steps)
        post = parser.get_parsed_content("postprocessing")
        self._post = Compose([t for t in _flat(post) if type(t).__name__ not in WRITERS])
        self._inferer = parser.get_parsed_content("inferer")

    def preprocess(self, hu: np.ndarray | torch.Tensor, affine: np.ndarray) -> dict[str, Any]:
        """The data dictionary after the bundle's preprocessing."""
        with torch.inference_mode():
            return self._pre({self.image_key: loaded_image(hu, affine, self.device)})

    def infer(self, data: dict[str, Any], network: Predictor) -> dict[str, Any]:
        """The bundle's inferer on the preprocessed image: adds the prediction to ``data``.

        For an everything mode, ``network`` is the prompted network
        (:class:`~dicom_node.pipeline.bundle.EverythingNetwork` or a predictor that serves
        it): a function of the patches alone."""
        image = data[self.image_key]
        autocast = self.bundle.amp and self.device.type == "cuda"
        amp = torch.autocast("cuda") if autocast else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            if self.bundle.everything is None:
                pred = self._inferer(image[None], network)
            else:
                prompt = torch.as_tensor(self.bundle.everything, device=image.device)[:, None]
                pred = self._inferer(
                    inputs=image[None],
                    network=_PatchesOnly(network, self.bundle.everything),
                    point_coords=None,
                    point_labels=None,
                    class_vector=prompt,
                    labels=None,
                    label_set=None,
                )
                data[self.image_key] = reset_ops_id(image)
                data["label_prompt"] = prompt
        pred = pred[0]
        if autocast:
            pred = pred.float()
        data[self.pred_key] = pred
        return data

    def postprocess(self, data: dict[str, Any]) -> np.ndarray:
        """The bundle's postprocessing: the label map on the input grid, (slices, rows,
        columns) uint8.

        Its transforms run as MONAI's, but for an ``Invertd`` whose result is a label map
        (the argmax that follows it, or a label map it inverts): that is computed by
        :func:`~dicom_node.pipeline.postprocess.run_postprocessing`, the same labels from
        the model grid rather than every class resampled at the series' size.
        """
        with torch.inference_mode():
            data = run_postprocessing(self._post.transforms, data)
        pred = torch.as_tensor(data[self.pred_key])
        if pred.ndim == 4:
            if pred.shape[0] != 1:
                raise ValueError(
                    f"the bundle's postprocessing gives {pred.shape[0]} channels, not a label map"
                )
        else:
            pred = pred[None]
        labels = from_metatensor(pred)
        if labels.is_floating_point():
            labels = labels.round()
        # Contiguous where the labels are (a GPU permutes in a moment): the encoders and
        # Triton's output want a C-ordered map, and a strided host copy is slow.
        return labels.to(torch.uint8).contiguous().cpu().numpy()


class _PatchesOnly:
    """``network`` as the everything mode's inferer calls it: with the window's coordinates
    and the prompts, which the prompted network already holds (see
    :class:`~dicom_node.pipeline.bundle.EverythingNetwork`).

    VISTA-3D's inferer first asks the network's point head for the last class it supports
    and drops a class prompt beyond it. The prompted network checked, when it was loaded,
    that it supports every class of the mode, so this answers with the largest of them:
    the inferer keeps the prompt, as it does with the network itself.
    """

    def __init__(self, network: Predictor, everything: tuple[int, ...]) -> None:
        self.network = network
        self.point_head = SimpleNamespace(last_supported=max(everything))

    def __call__(self, patches: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.network(patches)
