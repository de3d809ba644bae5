"""The in-process network sees a sliding window's patch batch a few patches at a time.

The activations of a network grow with its batch, its logits do not: the local backend's
pipeline calls the network on parts of each batch (:class:`PatchByPatch`), which must give the
very logits of the whole batch, hence the same label map, with the same windows and blending.
The networks are the bundles' own: the demo bundle's TorchScript UNet, and the public spleen
bundle's (full-size, batch norm) UNet built from its ``network_def`` with seeded weights.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from dicom_node.pipeline import SegmentationPipeline, load_bundle
from dicom_node.pipeline.install import write_seeded_weights
from dicom_node.pipeline.patches import PatchByPatch, default_patches_at_once, part_sizes
from dicom_node.pipeline.segment import served_batch, window_count
from dicom_node_testing.phantom import make_phantom
from tests.peers import ROOT, TEST_DATA

pytestmark = pytest.mark.cost(25)

DEMO_BUNDLE = ROOT / "bundles" / "spleen_ct_demo"
PUBLIC_INFERENCE = TEST_DATA / "spleen_ct_segmentation_inference.json"
#: float32 convolutions give the same sums in another order on another batch size (oneDNN or
#: PyTorch's fallback): equal to a few ulps of logits of order 1.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


class Counting(torch.nn.Module):
    """A network that records the batch size of every call it gets."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.sizes: list[int] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(batch.shape[0]))
        return self.network(batch)


@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO_BUNDLE)


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """The public spleen_ct_segmentation config, with seeded weights in ``network_def``."""
    root = tmp_path_factory.mktemp("public") / "spleen_ct_segmentation"
    (root / "configs").mkdir(parents=True)
    shutil.copy(PUBLIC_INFERENCE, root / "configs" / "inference.json")
    meta = json.loads((DEMO_BUNDLE / "configs" / "metadata.json").read_text())
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    write_seeded_weights(root, seed=3)
    return load_bundle(root)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(24, 64, 64), spacing=(5.0, 4.0, 4.0), seed=2)


def _patches(count: int, roi: tuple[int, ...]) -> torch.Tensor:
    """``count`` patches of CT-like intensities in [0, 1], as the sliding window cuts them."""
    generator = torch.Generator().manual_seed(7)
    return torch.rand((count, 1, *roi), generator=generator)


@pytest.mark.parametrize("which", ["demo", "public"])
def test_parts_of_a_batch_give_the_whole_batch_s_logits(which, request):
    bundle = request.getfixturevalue(which)
    network = bundle.load_network("cpu")
    assert not network.training
    roi = tuple(min(n, 48) for n in bundle.roi_size)  # the batch is the point, not the size
    batch = _patches(bundle.sw_batch_size, roi)
    with torch.inference_mode():
        whole = network(batch)
        for patches in (1, 3):  # 3: the last patch joins the part before it
            parts = PatchByPatch(network, patches)(batch)
            assert parts.shape == whole.shape == (4, bundle.num_classes, *roi)
            torch.testing.assert_close(parts, whole, **TOLERANCE)
        # Parts of two or more run the batch's own kernels: the very same logits.
        assert torch.equal(PatchByPatch(network, 2)(batch), whole)


def test_a_patch_batch_is_split_and_every_patch_is_seen_once(demo):
    counting = Counting(demo.load_network("cpu"))
    batch = _patches(4, (32, 32, 32))  # any size the UNet takes: the batch is the point
    with torch.inference_mode():
        PatchByPatch(counting, 1)(batch)
        assert counting.sizes == [1, 1, 1, 1]
        counting.sizes.clear()
        PatchByPatch(counting, 3)(batch)
        assert counting.sizes == [4]  # no lone patch: it joins the part before it
        counting.sizes.clear()
        PatchByPatch(counting, 2)(_patches(5, (32, 32, 32)))
        assert counting.sizes == [2, 3]
        counting.sizes.clear()
        PatchByPatch(counting, 4)(batch)
        assert counting.sizes == [4]  # a batch no larger than a part goes as it is


@pytest.mark.parametrize(
    ("batch", "patches", "sizes"),
    [(1, 2, [1]), (2, 2, [2]), (3, 2, [3]), (5, 2, [2, 3]), (6, 4, [4, 2]), (9, 4, [4, 5]),
     (25, 2, [2] * 11 + [3]), (3, 1, [1, 1, 1])],
)  # fmt: skip
def test_part_sizes_cover_the_batch_and_leave_no_patch_alone(batch, patches, sizes):
    assert part_sizes(batch, patches) == sizes


@pytest.mark.parametrize("path", ["fast", "bundle"])
def test_the_label_map_is_the_whole_batch_s(demo, phantom, path):
    # The same phantom through the pipeline's sliding window, the network seeing whole
    # batches of 4 or parts of them: the same logits and the same labels.
    whole = SegmentationPipeline(demo, "cpu", path=path, patches_at_once=None)
    expected = whole.run(phantom.hu, phantom.affine, contours=False).labels
    assert expected.any(), "the demo network finds the phantom's spleen"
    for patches in (1, 2):
        pipeline = SegmentationPipeline(demo, "cpu", path=path, patches_at_once=patches)
        counting = Counting(pipeline.network)
        pipeline._network = counting
        labels = pipeline.run(phantom.hu, phantom.affine, contours=False).labels
        np.testing.assert_array_equal(labels, expected)
        assert counting.sizes and max(counting.sizes) == patches


def test_infer_gives_the_whole_batch_s_logits(demo, phantom):
    pipeline = SegmentationPipeline(demo, "cpu", path="fast", patches_at_once=1)
    image = pipeline.preprocess(phantom.hu, phantom.affine)
    network = pipeline.network
    torch.testing.assert_close(pipeline.infer(image), pipeline.infer(image, network), **TOLERANCE)


def test_the_default_is_two_patches_on_a_cpu_and_the_whole_batch_on_a_gpu(demo):
    assert default_patches_at_once("cpu") == 2
    assert default_patches_at_once("cuda") is None
    assert default_patches_at_once(torch.device("cuda", 0)) is None
    assert SegmentationPipeline(demo, "cpu").patches_at_once == 2
    with pytest.raises(ValueError, match="at least 1"):
        SegmentationPipeline(demo, "cpu", patches_at_once=0)


def test_a_predictor_given_to_the_pipeline_sees_the_whole_batch(demo, phantom):
    # Triton's model passes its own predictor (BLS): its batches are the inferer's.
    pipeline = SegmentationPipeline(demo, "cpu", patches_at_once=1)
    counting = Counting(pipeline.network)
    pipeline.run(phantom.hu, phantom.affine, predictor=counting, contours=False)
    assert counting.sizes == [4]


class _Heads(torch.nn.Module):
    """A network with several outputs, as some bundles' networks give."""

    def forward(self, batch: torch.Tensor) -> dict[str, object]:
        return {"seg": batch * 2, "aux": (batch + 1, batch.mean(dim=(1, 2, 3, 4)))}


def test_several_outputs_are_concatenated_item_by_item():
    network = _Heads()
    batch = _patches(5, (4, 4, 4))
    whole = network(batch)
    parts = PatchByPatch(network, 2)(batch)
    torch.testing.assert_close(parts["seg"], whole["seg"])
    assert isinstance(parts["aux"], tuple)
    torch.testing.assert_close(parts["aux"][0], whole["aux"][0])
    torch.testing.assert_close(parts["aux"][1], whole["aux"][1])


def test_positional_arguments_keep_the_batch_whole():
    # An inferer ``with_coord`` passes the batch's windows, which a part would not match.
    seen = []

    def network(batch: torch.Tensor, windows: list) -> torch.Tensor:
        seen.append((batch.shape[0], len(windows)))
        return batch

    PatchByPatch(network, 1)(_patches(3, (4, 4, 4)), [0, 1, 2])
    assert seen == [(3, 3)]


@pytest.mark.parametrize(
    ("shape", "overlap"),
    [((267, 267, 75), 0.5), ((50, 48, 50), 0.25), ((300, 200, 120), 0.5), ((97, 96, 200), 0.3)],
)
def test_windows_are_counted_as_monai_cuts_them(shape, overlap):
    calls = []

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        calls.append(int(batch.shape[0]))
        return batch

    sliding_window_inference(torch.zeros((1, 1, *shape)), (96, 96, 96), 1, predictor, overlap)
    assert window_count(shape, (96, 96, 96), overlap) == len(calls)


def test_a_served_network_on_a_cpu_gets_no_window_alone(demo):
    assert [served_batch(n, 4) for n in (1, 3, 4, 5, 8, 9, 25, 48)] == [4, 4, 4, 5, 4, 5, 5, 4]
    assert served_batch(7, 1) == 1  # a bundle's batch of one stays one
    # 5 windows of 96 (overlap 0.25) along one axis: 4 + 1 with the bundle's batch
    pipeline = SegmentationPipeline(demo, "cpu", path="fast")
    image = torch.rand((1, 384, 96, 96))
    counting = Counting(pipeline.network)
    served = pipeline.infer(image, counting)
    assert counting.sizes == [5]
    whole = PatchByPatch(pipeline.network, 4)  # the bundle's batches, in one call each
    torch.testing.assert_close(served, pipeline.infer(image, whole), **TOLERANCE)


def test_post_processing_on_one_thread_leaves_other_jobs_threads_as_they_were():
    """A job post-processes on one torch thread while another job's thread keeps its count
    (OpenMP's setting is the thread's once OpenMP ran there), and has its own count back
    once it ends."""
    import threading

    import torch

    from dicom_node.pipeline.segment import _one_thread_on

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.ones(1 << 16).sum()  # OpenMP has run on this thread
    try:
        inside, checked = threading.Event(), threading.Event()
        seen: dict[str, int] = {}

        def job() -> None:
            torch.ones(1 << 16).sum()
            seen["job before"] = torch.get_num_threads()
            with _one_thread_on(torch.device("cpu")):
                seen["job inside"] = torch.get_num_threads()
                inside.set()
                checked.wait(5)
            seen["job after"] = torch.get_num_threads()

        worker = threading.Thread(target=job)
        worker.start()
        assert inside.wait(5)
        seen["other job meanwhile"] = torch.get_num_threads()
        checked.set()
        worker.join(5)
        assert seen["job inside"] == 1
        assert seen["job after"] == seen["job before"]
        assert seen["other job meanwhile"] == 2
    finally:
        torch.set_num_threads(before)
