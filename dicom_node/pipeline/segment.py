"""Segment a CT volume with a MONAI bundle: preprocessing, inference, postprocessing.

This is the one place where pre- and postprocessing live. Triton's model runs it around a
predictor that calls the network through BLS; the in-process backend runs it around the
bundle's network. Every stage works on torch tensors on the pipeline's device, so a volume is
copied to the device once and the label map back once.

Two paths, chosen per bundle (``path="auto"``):

* ``"bundle"``: the bundle's own transforms and inferer, as MONAI's bundle workflow runs them
  (:mod:`dicom_node.pipeline.workflow`); any chain a bundle may hold;
* ``"fast"``: for the preprocessing most CT bundles use (Orientation, Spacing,
  ScaleIntensityRange), the volume resampled where it lies (:mod:`.preprocess`), and after
  the network :mod:`dicom_node.pipeline.postprocess`: for argmax, largest component and a
  nearest inverse (:attr:`Bundle.fast_path`) the same label map on the organs' bounding
  box only; for any other chain of MONAI's post transforms (the zoo's softmax, trilinear
  ``Invertd`` and argmax), the bundle's own transforms with each ``Invertd`` that ends in a
  label map computed from the model grid (:func:`.postprocess.run_postprocessing`).
  ``"auto"`` takes it wherever the bundle's preprocessing is that chain.

When the bundle's network runs in-process (no predictor given), it sees the sliding window's
patch batches a few patches at a time (:class:`PatchByPatch`; on a CPU two at a time): the
inferer gets the same logits, with a fraction of the network's activations alive at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd
from monai.utils import fall_back_tuple

from dicom_node.common.heap import release_free_memory
from dicom_node.pipeline.bundle import WRITERS, Bundle
from dicom_node.pipeline.patches import PatchByPatch, Predictor, default_patches_at_once
from dicom_node.pipeline.postprocess import (
    contours_of,
    postprocess_fast,
    postprocess_monai,
    run_postprocessing,
)
from dicom_node.pipeline.preprocess import Preprocess
from dicom_node.pipeline.result import HandOver, SegmentationResult
from dicom_node.pipeline.transforms import from_metatensor
from dicom_node.pipeline.workflow import BundleWorkflow

PostprocessMode = Literal["fast", "monai"]
Path_ = Literal["auto", "fast", "bundle"]
_POSTPROCESS = {"fast": postprocess_fast, "monai": postprocess_monai}


class SegmentationPipeline:
    """The inference of one bundle on one device.

    ``predictor`` (see :meth:`run`) maps a patch batch ``(N, 1, *roi_size)`` float32 on the
    device to logits ``(N, num_classes, *roi_size)``; without one the bundle's own network
    runs in-process, loaded on first use.

    ``path`` is ``"auto"`` (the fast path where it gives the bundle's own result), ``"fast"``
    or ``"bundle"`` (see the module's docstring). On the fast path ``postprocess_mode`` picks
    the implementation of :meth:`postprocess`: ``"fast"`` (the default) or ``"monai"``,
    MONAI's transforms chained, which give the same arrays slower.

    ``patches_at_once`` bounds how many patches of a sliding-window batch the in-process
    network sees at once (:class:`PatchByPatch`); ``None`` leaves the batch whole. By default
    two on a CPU, the whole batch on a GPU (:func:`default_patches_at_once`). A ``predictor``
    passed to :meth:`run` or :meth:`infer` is called as the inferer calls it, unchanged.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        postprocess_mode: PostprocessMode = "fast",
        path: Path_ = "auto",
        patches_at_once: int | None | Literal["auto"] = "auto",
    ) -> None:
        if postprocess_mode not in _POSTPROCESS:
            raise ValueError(
                f"postprocess_mode must be one of {sorted(_POSTPROCESS)}, not {postprocess_mode!r}"
            )
        if path not in ("auto", "fast", "bundle"):
            raise ValueError(f"path must be 'auto', 'fast' or 'bundle', not {path!r}")
        self.bundle = bundle
        self.device = torch.device(device)
        if patches_at_once == "auto":
            patches_at_once = default_patches_at_once(self.device)
        if patches_at_once is not None and patches_at_once < 1:
            raise ValueError(f"patches_at_once must be at least 1, not {patches_at_once}")
        self.patches_at_once: int | None = patches_at_once
        self.postprocess_mode = postprocess_mode
        fast_pre = bundle.preprocessing is not None and bundle.roi_size is not None
        if fast_pre and bundle.fast_postprocessing is None and not _inverts_preprocessing(bundle):
            fast_pre = False  # an Invertd of something else than the preprocessing
        self.path = ("fast" if fast_pre else "bundle") if path == "auto" else path
        #: The bundle's own post transforms, where the fast path runs them (its chain is not
        #: the one :func:`postprocess_fast` computes).
        self._post_transforms: list[Any] | None = None
        if self.path == "fast":
            if bundle.preprocessing is None or bundle.roi_size is None:
                raise ValueError(f"bundle {bundle.path} has no chain the fast path reproduces")
            self._preprocess = Preprocess(bundle.preprocessing, bundle.image_key)
            fast = bundle.fast_postprocessing
            self._keep_largest = True if fast is None else fast.keep_largest
            if fast is None:
                post = bundle.parser.get_parsed_content("postprocessing")
                steps = post.flatten().transforms if hasattr(post, "flatten") else list(post)
                self._post_transforms = [t for t in steps if type(t).__name__ not in WRITERS]
        else:
            self._workflow = BundleWorkflow(bundle, self.device)
        self._network: torch.nn.Module | None = None

    @property
    def network(self) -> torch.nn.Module:
        """The bundle's network on the pipeline's device (loaded once)."""
        if self._network is None:
            self._network = self.bundle.load_network(self.device)
        return self._network

    def in_process_predictor(self) -> Predictor:
        """The bundle's network as the inferer calls it in-process: ``patches_at_once``
        patches at a time (see :class:`PatchByPatch`), or the network itself."""
        if self.patches_at_once is None:
            return self.network
        return PatchByPatch(self.network, self.patches_at_once)

    def preprocess(
        self, hu: np.ndarray | torch.Tensor | HandOver, affine: np.ndarray
    ) -> MetaTensor:
        """The bundle's preprocessing of a (slices, rows, columns) HU array with an LPS affine
        (fast path). A :class:`HandOver` is given up as it is read."""
        consume = isinstance(hu, HandOver)
        with torch.inference_mode():
            return self._preprocess(_volume(hu), affine, self.device, consume=consume)

    def infer(self, image: torch.Tensor, predictor: Predictor | None = None) -> torch.Tensor:
        """Logits (num_classes, x, y, z) of a preprocessed image (1, x, y, z).

        Without ``predictor``, the bundle's network (:meth:`in_process_predictor`). A
        served network on a CPU gets the windows in batches that leave none alone
        (:func:`served_batch`)."""
        served = predictor is not None
        if predictor is None:
            predictor = self.in_process_predictor()
        # A plain tensor: predictors get plain patches (cheap to hand to DLPack), not MetaTensors.
        data = image.as_tensor() if isinstance(image, MetaTensor) else image
        batch = self.bundle.sw_batch_size
        if served and self.device.type == "cpu":
            assert self.bundle.roi_size is not None
            windows = window_count(data.shape[1:], self.bundle.roi_size, self.bundle.overlap)
            batch = served_batch(windows, batch)
        with torch.inference_mode():
            logits = sliding_window_inference(
                data[None],
                # MONAI annotates roi_size without None, which falls back to the image's size
                # (as a None component does); the fast path always has a window.
                roi_size=cast("Sequence[int]", self.bundle.roi_size),
                sw_batch_size=batch,
                predictor=predictor,
                overlap=self.bundle.overlap,
                mode=self.bundle.blend_mode,
            )
        return torch.as_tensor(logits)[0]

    def postprocess(
        self, logits: torch.Tensor, image: MetaTensor, contours: bool = True
    ) -> SegmentationResult:
        """Labels (and contours) on the input grid from the logits of :meth:`infer`.

        The bundle's postprocessing: argmax, the largest connected component of each label,
        nearest-neighbour resampling back to the input grid (:func:`postprocess_fast`), or
        the bundle's own transforms (:func:`run_postprocessing`); then, with
        ``contours``, the in-plane contour of every label on every slice.
        """
        values = sorted(self.bundle.labels)
        if self._post_transforms is None:
            postprocess = _POSTPROCESS[self.postprocess_mode]
            labels, outlines = postprocess(logits, image, values, contours, self._keep_largest)
            return SegmentationResult(labels=labels, contours=outlines)
        key = self.bundle.image_key
        meta = {k: v for k, v in image.meta.items() if k != "affine"}
        data = {key: image, "pred": MetaTensor(logits, affine=image.affine, meta=meta)}
        data = run_postprocessing(
            self._post_transforms,
            data,
            inverse=self._preprocess.inverse,
            exact=self.postprocess_mode == "fast",
        )
        pred = torch.as_tensor(data["pred"])
        if pred.ndim != 4 or pred.shape[0] != 1:
            raise ValueError(
                f"the bundle's postprocessing gives {tuple(pred.shape)}, not a label map"
            )
        label_map = from_metatensor(pred)
        if label_map.is_floating_point():
            label_map = label_map.round()
        label_map = label_map.to(torch.uint8).contiguous()
        outlines = contours_of(label_map, values) if contours else None
        return SegmentationResult(labels=label_map.cpu().numpy(), contours=outlines)

    def run(
        self,
        hu: np.ndarray | torch.Tensor | HandOver,
        affine: np.ndarray,
        predictor: Predictor | None = None,
        contours: bool = True,
    ) -> SegmentationResult:
        """Segment ``hu`` (slices, rows, columns) whose ``affine`` maps voxels to LPS mm.

        ``contours=False`` leaves out the contour map, which the encoders do not need. A
        :class:`HandOver` is held only until preprocessed: its memory can go before the
        network's activations arrive.
        """
        if predictor is None:
            _ = self.network  # load before timing, so "inference" times the inference
        start = time.perf_counter()
        if self.path == "bundle":
            network = predictor or self.in_process_predictor()
            return self._run_bundle(hu, affine, network, contours, start)
        image = self.preprocess(hu, affine)
        pre = self._lap(start)
        logits = self.infer(image, predictor)
        inference = self._lap(start + pre)
        # What the network's activations freed is kept by glibc in the heaps of the threads
        # that ran it; the label map at the source's size comes next, on top of it.
        release_free_memory()
        with _one_thread_on(self.device):
            result = self.postprocess(logits, image, contours)
        post = self._lap(start + pre + inference)
        result.timings = {"pre": pre, "inference": inference, "post": post}
        return result

    def _run_bundle(
        self,
        hu: np.ndarray | torch.Tensor | HandOver,
        affine: np.ndarray,
        network: Predictor,
        contours: bool,
        start: float,
    ) -> SegmentationResult:
        workflow = self._workflow
        data = workflow.preprocess(_volume(hu), affine)
        pre = self._lap(start)
        data = workflow.infer(data, network)
        inference = self._lap(start + pre)
        labels = workflow.postprocess(data)
        outlines = None
        if contours:
            outlines = contours_of(torch.from_numpy(labels), sorted(self.bundle.labels))
        post = self._lap(start + pre + inference)
        return SegmentationResult(
            labels=labels,
            contours=outlines,
            timings={"pre": pre, "inference": inference, "post": post},
        )

    def _lap(self, since: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously
        return time.perf_counter() - since


def window_count(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's ``sliding_window_inference`` cuts an image of
    ``image_size`` into: its padding to ``roi_size``, its scan interval (MONAI's
    ``_get_scan_interval``) and its ``dense_patch_slices``."""
    roi = fall_back_tuple(roi_size, image_size)
    padded = [max(int(i), int(r)) for i, r in zip(image_size, roi, strict=True)]
    interval = [
        r if r == p else max(int(r * (1 - overlap)), 1) for r, p in zip(roi, padded, strict=True)
    ]
    return len(dense_patch_slices(padded, roi, interval))


def served_batch(windows: int, batch: int) -> int:
    """The sliding window's batch for a served network on a CPU: ``batch`` (the bundle's
    ``sw_batch_size``), or the least larger one, up to twice it, whose last batch is not a
    single window.

    Why: PyTorch sends the 3D convolutions of a batch of one to a slower kernel than those
    of two or more: the zoo's spleen UNet takes 0.25 s for one 96^3 patch where it takes
    0.11 s a patch in twos (two cores), and its 25 windows of a 512x512x100 series in
    batches of 4 leave one for the last request. In batches of 5 none is alone, and the
    network model runs each two or three patches at a time
    (:func:`~dicom_node.pipeline.patches.part_sizes`). The network sees the same windows
    and the inferer blends them in the same order; each window's logits are the same
    function of it (the network is in eval mode).
    """
    if batch < 2 or windows <= batch or windows % batch != 1:
        return batch
    for larger in range(batch + 1, 2 * batch + 1):
        if windows % larger != 1:
            return min(larger, windows)
    return batch


@contextlib.contextmanager
def _one_thread_on(device: torch.device) -> Iterator[None]:
    """Run torch's operations on one thread on a CPU for the duration.

    Why: post-processing is memory-bound and mostly numpy; a second torch thread gains
    nothing on an idle machine and, where another process keeps a core busy, makes each
    torch operation wait for it (post-processing 0.3 s became 3 s on a loaded 2-core host).

    Once OpenMP has run on a thread, torch's thread count is that thread's own (OpenMP's
    per-thread setting): a job post-processing here leaves another job's inference on its
    own thread as it was, and gets its own count back as it leaves.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inverts_preprocessing(bundle: Bundle) -> bool:
    """Whether every ``Invertd`` of the bundle's postprocessing undoes its ``preprocessing``
    (the fast path's image carries the trace of that, and of nothing else)."""
    preprocessing = bundle.parser.get_parsed_content("preprocessing")
    post = bundle.parser.get_parsed_content("postprocessing")
    steps = post.flatten().transforms if hasattr(post, "flatten") else list(post)
    return all(t.transform is preprocessing for t in steps if isinstance(t, Invertd))


def _volume(hu: np.ndarray | torch.Tensor | HandOver) -> np.ndarray | torch.Tensor:
    return hu.take() if isinstance(hu, HandOver) else hu
