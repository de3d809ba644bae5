"""``python -m bench gpu``: the GPU path of the segmentation, measured in one short run.

Made to run in a few minutes on a bare GPU machine that has only a Python with CUDA torch,
numpy and (optionally) CuPy: MONAI, nibabel and tritonclient travel as wheels, the Triton
server as the nvidia-pytriton wheel (``bench/gpu_prepare.sh`` packs them, ``bench/gpu_run.sh``
runs this there). On a machine without a GPU it measures the CPU side and says why each GPU
figure is missing.

The model is the MONAI model zoo's ``spleen_ct_segmentation`` bundle as published (its
``inference.json``: Orientation RAS, Spacing 1.5 x 1.5 x 2 mm, ScaleIntensityRange -57..164,
a 3-D UNet of 16..256 channels, 96^3 sliding window, overlap 0.5), with weights drawn from
its ``network_def`` with ``torch.manual_seed(0)``: the timings are those of the real
network; its output means nothing. The CT series are synthetic, 512 x 512 pixels of
0.78 mm, 1.5 mm slices: 114 slices (the size of the MONAI tutorial's case) and 200.

Figures, each the median of ``BENCH_RUNS`` runs after one warm-up:

* pre-processing (the bundle's MONAI transforms, host volume in, model-grid tensor out) and
  post-processing (argmax, largest connected component, back onto the series' grid, labels
  on the host) on the GPU against the same code on the CPU, and whether both give the same
  label map;
* the whole pipeline on the GPU, in-process (host volume in, host label map out), on the
  fast path and on the bundle's own chain as MONAI runs it;
* with a Triton server: the node's request with the volume assembled slice by slice into
  CUDA shared memory against the volume in system shared memory (what the node does
  without a GPU), both through the server's GPU instances.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PUBLIC_SPLEEN_CONFIG = PROJECT_ROOT / "tests" / "data" / "spleen_ct_segmentation_inference.json"
DEMO_METADATA = PROJECT_ROOT / "bundles" / "spleen_ct_demo" / "configs" / "metadata.json"

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SLICES = tuple(int(v) for v in os.environ.get("BENCH_GPU_SLICES", "114,200").split(","))
#: Rows and columns of the synthetic series, and their spacing in mm (slice, row, column).
MATRIX = int(os.environ.get("BENCH_GPU_MATRIX", "512"))
SPACING = (1.5, 0.78125, 0.78125)
#: Seconds the Triton server may take to load the models.
TRITON_STARTUP = float(os.environ.get("BENCH_GPU_TRITON_STARTUP", "240"))


def cuda_reason() -> str | None:
    """Why the GPU figures cannot be measured here; ``None`` when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except ImportError:
        info["cupy"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def make_bundle(root: Path) -> Path:
    """The published spleen bundle's configs with seeded weights, as a bundle folder."""
    from dicom_node.pipeline import load_bundle

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copy(PUBLIC_SPLEEN_CONFIG, root / "configs" / "inference.json")
    shutil.copy(DEMO_METADATA, root / "configs" / "metadata.json")
    torch.manual_seed(0)
    network = load_bundle(root).build_network()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


def synthetic_ct(slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 HU series (slices, rows, columns) and its (slice, row, column) -> LPS affine.

    Air around an elliptic body of soft tissue with a spleen-like brighter ellipsoid and
    noise: enough structure for the transforms; the contents do not change the timings.
    """
    rng = np.random.default_rng(seed)
    k, r, c = np.ogrid[:slices, :MATRIX, :MATRIX]
    body = ((r - MATRIX / 2) / (0.40 * MATRIX)) ** 2 + ((c - MATRIX / 2) / (0.45 * MATRIX)) ** 2
    organ = (
        ((k - slices / 2) / (0.25 * slices)) ** 2
        + ((r - 0.55 * MATRIX) / (0.10 * MATRIX)) ** 2
        + ((c - 0.70 * MATRIX) / (0.07 * MATRIX)) ** 2
    )
    hu = np.where(body <= 1.0, np.int16(40), np.int16(-1000)).astype(np.int16)
    hu = np.broadcast_to(hu, (slices, MATRIX, MATRIX)).copy()
    hu[organ <= 1.0] = 110
    hu += rng.integers(-20, 21, size=hu.shape, dtype=np.int16)
    affine = np.array(
        [
            [0.0, 0.0, SPACING[2], -200.0],
            [0.0, SPACING[1], 0.0, -200.0],
            [SPACING[0], 0.0, 0.0, -500.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    return hu, affine


def timed(fn: Callable[[], object], device: torch.device, runs: int = RUNS) -> tuple[float, object]:
    """Median seconds of ``runs`` calls after one warm-up, and the last call's result."""
    fn()
    seconds = []
    result = None
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def row(figure: str, ours: float | None, peer: float | None) -> dict:
    """A table row: GPU figure, CPU (or other peer) figure, and how many times faster."""
    return {
        "figure": figure,
        "this_project": None if ours is None else round(ours, 4),
        "peer": None if peer is None else round(peer, 4),
        "ratio": round(peer / ours, 1) if ours and peer else None,
    }


def skipped(figure: str, reason: str) -> dict:
    return {
        "figure": f"{figure}: not measured ({reason})",
        "this_project": None,
        "peer": None,
        "ratio": None,
    }


def pre_post(bundle_dir: Path, slices: int, gpu: str | None) -> list[dict]:
    """Pre- and post-processing on the GPU against the CPU for one series size.

    As the node runs them: no contour map. The GPU's pre-processing is timed twice: from the
    volume in host memory (the copy to the GPU included) and from the volume already in GPU
    memory, where the node assembles it for a server with GPU instances (CUDA shm).
    """
    from bench.postprocess import synthetic_logits
    from dicom_node.pipeline import SegmentationPipeline, load_bundle

    bundle = load_bundle(bundle_dir)
    hu, affine = synthetic_ct(slices)
    size = f"{MATRIX}x{MATRIX}x{slices}"
    measured: dict[str, dict[str, float]] = {}
    labels: dict[str, np.ndarray] = {}
    devices = [torch.device("cpu")] + ([] if gpu else [torch.device("cuda")])
    grid = ""
    for device in devices:
        pipeline = SegmentationPipeline(bundle, device, path="fast")
        pre, image = timed(lambda p=pipeline: p.preprocess(hu, affine), device)
        logits = synthetic_logits(tuple(image.shape[1:])).to(device)
        post, result = timed(
            lambda p=pipeline, i=image, g=logits: p.postprocess(g, i, contours=False), device
        )
        measured[device.type] = {"pre": pre, "post": post}
        if device.type == "cuda":
            resident = torch.from_numpy(hu).to(device)
            measured["cuda"]["pre_resident"], _ = timed(
                lambda p=pipeline, r=resident: p.preprocess(r, affine), device
            )
            del resident
        labels[device.type] = result.labels
        grid = "x".join(str(n) for n in image.shape[1:])
        del image, logits
    c = measured["cpu"]
    rows = [
        row(
            f"{size} pre-processing on the CPU, {torch.get_num_threads()} threads: s "
            f"(model grid {grid})",
            c["pre"],
            None,
        ),
        row(f"{size} post-processing on the CPU: s", c["post"], None),
    ]
    if gpu:
        rows.append(skipped(f"{size} pre+post-processing, GPU vs CPU", gpu))
        return rows
    same = bool(np.array_equal(labels["cpu"], labels["cuda"]))
    g = measured["cuda"]
    return rows + [
        row(
            f"{size} pre-processing, GPU vs CPU, volume in GPU memory: s",
            g["pre_resident"],
            c["pre"],
        ),
        row(f"{size} pre-processing, GPU vs CPU, volume in host memory: s", g["pre"], c["pre"]),
        row(f"{size} post-processing, GPU vs CPU: s (same labels: {same})", g["post"], c["post"]),
        row(
            f"{size} pre+post-processing, GPU vs CPU, volume in GPU memory: s (target >= 12x)",
            g["pre_resident"] + g["post"],
            c["pre"] + c["post"],
        ),
        row(
            f"{size} pre+post-processing, GPU vs CPU, volume in host memory: s",
            g["pre"] + g["post"],
            c["pre"] + c["post"],
        ),
    ]


def pipeline_gpu(bundle_dir: Path, slices: int, gpu: str | None) -> list[dict]:
    """The whole pipeline in-process on the GPU: host volume in, host label map out.

    Both paths: the fast one (the chain of the node's demo bundles: argmax, largest
    component, nearest inverse) and the bundle's own chain as MONAI runs it (the published
    spleen config: softmax, bilinear inverse of both probability maps, argmax).
    """
    from dicom_node.pipeline import SegmentationPipeline, load_bundle

    size = f"{MATRIX}x{MATRIX}x{slices}"
    rows = []
    hu, affine = synthetic_ct(slices)
    for path, what in (("fast", "fast path"), ("bundle", "the bundle's own MONAI chain")):
        figure = f"{size} pipeline on the GPU in-process, full-size spleen UNet, {what}: s"
        if gpu:
            rows.append(skipped(figure, gpu))
            continue
        device = torch.device("cuda")
        pipeline = SegmentationPipeline(load_bundle(bundle_dir), device, path=path)
        total, result = timed(lambda p=pipeline: p.run(hu, affine, contours=False), device)
        stages = ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items())
        rows.append(row(f"{figure} (target < 1 s at 200 slices; last run: {stages})", total, None))
        del pipeline, result
        torch.cuda.empty_cache()
    return rows


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def triton_reason() -> str | None:
    """Why the Triton figures cannot be measured here; ``None`` when they can."""
    import importlib.util

    if (reason := cuda_reason()) is not None:
        return reason
    if importlib.util.find_spec("pytriton") is None:
        return "nvidia-pytriton (the tritonserver binary) is not installed"
    from dicom_node.inference.triton.cuda_shm import unavailable_reason

    return unavailable_reason(0)


def triton_cuda_vs_system(bundle_dir: Path, slices: int) -> list[dict]:
    """The node's Triton request: volume in CUDA shared memory vs system shared memory."""
    size = f"{MATRIX}x{MATRIX}x{slices}"
    figure = f"{size} through Triton (GPU instances): CUDA shm vs system shm, s per request"
    reason = triton_reason()
    if reason is not None:
        return [skipped(figure, reason)]
    from dicom_node.inference.triton.client import TritonBackend
    from dicom_node.inference.triton.cuda_shm import CudaVolume
    from dicom_node.inference.triton.server import TritonServer
    from dicom_node.inference.triton.shm import shared_empty

    hu, affine = synthetic_ct(slices)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-triton-"))
    repo = work / "repository"
    for model in ("spleen_seg", "spleen_unet"):
        shutil.copytree(PROJECT_ROOT / "model_repository" / model, repo / model)
    server = TritonServer(
        repo,
        work / "server",
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        models=["spleen_seg", "spleen_unet"],
        startup_timeout=TRITON_STARTUP,
        env={"DICOM_NODE_BUNDLE_SPLEEN_SEG": str(bundle_dir)},
    )
    t0 = time.perf_counter()
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - reported as the row's reason
        return [skipped(figure, f"the server did not start: {exc}")]
    started = time.perf_counter() - t0
    rows = [row("Triton server start with spleen_seg + spleen_unet on the GPU: s", started, None)]
    try:
        system = TritonBackend([server.grpc_url], "spleen_seg", transport="shm")
        cuda = TritonBackend([server.grpc_url], "spleen_seg", transport="cuda_shm")

        def in_host_region() -> np.ndarray:
            volume = shared_empty(hu.shape, hu.dtype)
            for k in range(hu.shape[0]):  # as the node assembles: slice by slice
                volume[k] = hu[k]
            return volume

        def in_cuda_region() -> CudaVolume:
            volume = CudaVolume(hu.shape, hu.dtype)
            for k in range(hu.shape[0]):
                volume[k] = hu[k]
            return volume

        cpu = torch.device("cpu")
        host_fill, host_volume = timed(in_host_region, cpu)
        cuda_fill, cuda_volume = timed(in_cuda_region, cpu)
        via_system, a = timed(lambda: system.segment(host_volume, affine), cpu)
        via_cuda, b = timed(lambda: cuda.segment(cuda_volume, affine), cpu)
        same = bool(np.array_equal(a.labels, b.labels))
        rows += [
            row(
                f"{size} assembly slice by slice: into CUDA shm vs system shm, s",
                cuda_fill,
                host_fill,
            ),
            row(
                f"{figure} (same labels: {same}; server stages, CUDA: "
                + ", ".join(f"{k} {v:.3f}" for k, v in b.timings.items())
                + ")",
                via_cuda,
                via_system,
            ),
            row(
                f"{size} assembly + request: CUDA shm vs system shm, s",
                cuda_fill + via_cuda,
                host_fill + via_system,
            ),
        ]
        cuda_volume.release()
        system.close()
        cuda.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def run() -> list[dict]:
    info = environment()
    print("bench gpu:", json.dumps(info), file=sys.stderr, flush=True)
    rows = [
        {
            "figure": "machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
            "this_project": None,
            "peer": None,
            "ratio": None,
        }
    ]
    gpu = cuda_reason()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        bundle_dir = make_bundle(Path(tmp) / "spleen_ct_segmentation")
        steps: list[tuple[str, Callable[[], list[dict]]]] = []
        for slices in SLICES:
            steps.append((f"pre/post {slices}", lambda s=slices: pre_post(bundle_dir, s, gpu)))
            steps.append((f"pipeline {slices}", lambda s=slices: pipeline_gpu(bundle_dir, s, gpu)))
        steps.append(("triton", lambda: triton_cuda_vs_system(bundle_dir, max(SLICES))))
        for name, step in steps:
            t0 = time.perf_counter()
            try:
                got = step()
            except Exception as exc:  # noqa: BLE001 - one failed figure must not hide the rest
                traceback.print_exc()
                got = [skipped(name, f"failed: {type(exc).__name__}: {exc}")]
            for r in got:
                print("bench gpu:", json.dumps(r), file=sys.stderr, flush=True)
            print(
                f"bench gpu: {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True
            )
            rows += got
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    for r in run():
        print(f"{r['figure']}: ours {r['this_project']}, peer {r['peer']}, ratio {r['ratio']}")


if __name__ == "__main__":
    sys.exit(main())
