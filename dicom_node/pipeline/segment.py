"""Segment a CT volume with a MONAI bundle: preprocessing, sliding window, postprocessing.

This is the one place where pre- and postprocessing live. Triton's model runs it around a
predictor that calls the network through BLS; the in-process backend runs it around the
bundle's TorchScript network. Every stage works on torch tensors on the pipeline's device, so a
volume is copied to the device once and the label map back once. (MONAI's
KeepLargestConnectedComponent stays on a GPU only when cuCIM is installed; otherwise MONAI itself
labels the components on the host.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import KeepLargestConnectedComponent, LabelToContour

from dicom_node.pipeline.bundle import Bundle
from dicom_node.pipeline.transforms import image_transforms, resample_to_input, to_metatensor

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SegmentationResult:
    """A label map on the input grid.

    ``labels`` and ``contours`` are uint8 (slices, rows, columns) arrays on the grid of the
    array given to :meth:`SegmentationPipeline.run`; values are the bundle's label values.
    ``contours`` marks the in-plane boundary of each label on each slice (what an RTSTRUCT
    contour outlines). ``timings`` holds seconds for ``"pre"``, ``"inference"`` and ``"post"``.
    """

    labels: np.ndarray
    contours: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


class SegmentationPipeline:
    """The inference of one bundle on one device.

    ``predictor`` (see :meth:`run`) maps a patch batch ``(N, 1, *roi_size)`` float32 on the
    device to logits ``(N, num_classes, *roi_size)``; without one the bundle's own network
    runs in-process, loaded on first use.
    """

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu") -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        self._preprocess = image_transforms(bundle.preprocessing)
        self._keep_largest = KeepLargestConnectedComponent(
            applied_labels=sorted(bundle.labels), is_onehot=False, independent=True
        )
        self._network: torch.nn.Module | None = None

    @property
    def network(self) -> torch.nn.Module:
        """The bundle's network on the pipeline's device (loaded once)."""
        if self._network is None:
            self._network = self.bundle.load_network(self.device)
        return self._network

    def preprocess(self, hu: np.ndarray | torch.Tensor, affine: np.ndarray) -> MetaTensor:
        """The bundle's preprocessing of a (slices, rows, columns) HU array with an LPS affine."""
        with torch.inference_mode():
            return self._preprocess(to_metatensor(hu, affine, self.device))

    def infer(self, image: torch.Tensor, predictor: Predictor | None = None) -> torch.Tensor:
        """Logits (num_classes, x, y, z) of a preprocessed image (1, x, y, z)."""
        if predictor is None:
            predictor = self.network
        # A plain tensor: predictors get plain patches (cheap to hand to DLPack), not MetaTensors.
        data = image.as_tensor() if isinstance(image, MetaTensor) else image
        with torch.inference_mode():
            logits = sliding_window_inference(
                data[None],
                roi_size=self.bundle.roi_size,
                sw_batch_size=self.bundle.sw_batch_size,
                predictor=predictor,
                overlap=self.bundle.overlap,
                mode=self.bundle.blend_mode,
            )
        return torch.as_tensor(logits)[0]

    def postprocess(self, logits: torch.Tensor, image: MetaTensor) -> SegmentationResult:
        """Labels and contours on the input grid from the logits of :meth:`infer`.

        argmax, the largest connected component of each label, nearest-neighbour resampling
        back to the input grid, then the in-plane contour of every label on every slice.
        """
        with torch.inference_mode():
            label = torch.argmax(logits, dim=0, keepdim=True).to(torch.uint8)
            label = self._keep_largest(label)
            labels = resample_to_input(torch.as_tensor(label), image).to(torch.uint8)
            contours = self._contours(labels)
            return SegmentationResult(labels=labels.cpu().numpy(), contours=contours.cpu().numpy())

    def _contours(self, labels: torch.Tensor) -> torch.Tensor:
        # Slices as channels of a 2-D image: LabelToContour then outlines each slice on its
        # own, which is what a planar RTSTRUCT contour needs (a 3-D contour would mark the
        # whole top and bottom slice of an organ).
        contours = torch.zeros_like(labels)
        to_contour = LabelToContour()
        for value in self.bundle.labels:
            mask = (labels == value).to(torch.float32)
            if mask.any():
                edge = torch.as_tensor(to_contour(mask)) > 0
                contours[edge] = value
        return contours

    def run(
        self,
        hu: np.ndarray | torch.Tensor,
        affine: np.ndarray,
        predictor: Predictor | None = None,
    ) -> SegmentationResult:
        """Segment ``hu`` (slices, rows, columns) whose ``affine`` maps voxels to LPS mm."""
        if predictor is None:
            _ = self.network  # load before timing, so "inference" times the inference
        start = time.perf_counter()
        image = self.preprocess(hu, affine)
        pre = self._lap(start)
        logits = self.infer(image, predictor)
        inference = self._lap(start + pre)
        result = self.postprocess(logits, image)
        post = self._lap(start + pre + inference)
        result.timings = {"pre": pre, "inference": inference, "post": post}
        return result

    def _lap(self, since: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously
        return time.perf_counter() - since
