"""Synthetic abdominal CT phantoms with a known spleen.

The demo segmentation model is trained on these phantoms and the tests measure the pipeline
against them, so a phantom must look like an abdominal CT to a small network: a body outline
with skin, subcutaneous fat and an abdominal-wall muscle ring; liver on the patient's right,
spleen on the patient's left and posterior, kidneys with an enhancing cortex, stomach and bowel
with air, aorta and vena cava, a vertebral column with discs and posterior elements, ribs, and
Gaussian noise. Shapes, sizes, positions and densities vary with the seed; the same seed (and
grid) always gives the same phantom.

Array convention is the one :func:`dicom_node_testing.synthetic.write_ct_series` writes with its default
orientation ``(1, 0, 0, 0, 1, 0)``: the array is (slices, rows, columns); columns advance along
+x (towards the patient's LEFT), rows along +y (towards POSTERIOR) and slices along +z (towards
SUPERIOR). So the liver lies at low column indices and the spleen at high ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Label value of the spleen in :attr:`Phantom.labels`.
SPLEEN_LABEL = 1

# Tissue ids of the paint map: later paint overwrites earlier, so organs keep exact masks.
_AIR, _SKIN, _FAT, _MUSCLE, _VISCERAL_FAT = 0, 1, 2, 3, 4
_ORGANS = (
    "bowel",
    "stomach",
    "liver",
    "kidney_right",
    "kidney_left",
    "spleen",
    "aorta",
    "vena_cava",
    "psoas",
    "paraspinal_muscle",
    "spine",
    "ribs",
)
_ORGAN_ID = {name: 5 + i for i, name in enumerate(_ORGANS)}


@dataclass
class Phantom:
    """A synthetic CT volume with its ground truth.

    Attributes
    ----------
    hu:
        (slices, rows, columns) int16 Hounsfield units.
    labels:
        uint8 array of the same shape: :data:`SPLEEN_LABEL` on the spleen, 0 elsewhere.
    organs:
        Boolean mask of every painted structure by name (``"liver"``, ``"spleen"``,
        ``"kidney_left"``, ``"spine"``, ...), exactly the voxels painted with its density.
    spacing:
        (slice, row, column) spacing in mm.
    origin:
        LPS position (mm) of the first voxel, as :func:`write_ct_series` takes it.
    tissues:
        The density (HU) drawn for each tissue of this phantom, and ``"noise"``, the standard
        deviation of its noise.
    """

    hu: np.ndarray
    labels: np.ndarray
    organs: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    tissues: dict[str, float] = field(default_factory=dict)

    @property
    def spleen(self) -> np.ndarray:
        """Boolean spleen mask."""
        return self.labels == SPLEEN_LABEL

    @property
    def affine(self) -> np.ndarray:
        """4x4 map of (slice, row, column, 1) to LPS mm for the array as written to files.

        This is the geometry :func:`write_ct_series` gives the series (default orientation);
        the assembled volume may order the slices differently, so compare positions, not
        indices, with an assembled volume.
        """
        s, r, c = self.spacing
        affine = np.eye(4)
        affine[:3, 0] = (0.0, 0.0, s)  # slices along the normal of (1,0,0) x (0,1,0) = +z
        affine[:3, 1] = (0.0, r, 0.0)  # rows along the column direction cosines (+y)
        affine[:3, 2] = (c, 0.0, 0.0)  # columns along the row direction cosines (+x)
        affine[:3, 3] = self.origin
        return affine


class _Grid:
    """Millimetre coordinates of the voxel centres, centred on the field of view.

    x is towards patient left, y posterior, z superior (LPS axes), each as a broadcastable
    1-D array so that every shape below is evaluated without building 3-D coordinate arrays.
    """

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]) -> None:
        ns, nr, nc = shape
        sz, sy, sx = spacing
        self.shape = (ns, nr, nc)
        self.z = ((np.arange(ns) - (ns - 1) / 2) * sz)[:, None, None]
        self.y = ((np.arange(nr) - (nr - 1) / 2) * sy)[None, :, None]
        self.x = ((np.arange(nc) - (nc - 1) / 2) * sx)[None, None, :]


def _ellipsoid(
    g: _Grid,
    center: Sequence[float],
    semi: Sequence[float],
    angle: float = 0.0,
    wobble: Sequence[tuple[float, float, float, float, float]] = (),
) -> np.ndarray:
    """Boolean ellipsoid (x, y, z centre and semi-axes in mm), rotated by ``angle`` about z.

    ``wobble`` terms ``(amp, fu, fv, fw, phase)`` add ``amp * sin(fu*u + fv*v + fw*w + phase)``
    to the radius in normalised coordinates: smooth, organ-like bumps instead of a perfect
    quadric, so that the network cannot learn a fixed shape.
    """
    cx, cy, cz = center
    a, b, c = semi
    dx, dy = g.x - cx, g.y - cy
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / a
    v = (-dx * sin + dy * cos) / b
    w = (g.z - cz) / c
    d2 = u * u + v * v + w * w
    limit = 1.0
    for amp, fu, fv, fw, phase in wobble:
        limit = limit + amp * np.sin(fu * u + fv * v + fw * w + phase)
    return d2 < limit * limit


def _ellipse_z(g: _Grid, cx, cy, ax, ay) -> np.ndarray:
    """Elliptic cylinder along z; centre and semi-axes may vary with z (broadcast arrays)."""
    return ((g.x - cx) / ax) ** 2 + ((g.y - cy) / ay) ** 2 < 1.0


def _wobble(
    rng: np.random.Generator, n: int, amp: float
) -> list[tuple[float, float, float, float, float]]:
    return [
        (
            float(rng.uniform(0.3, 1.0) * amp),
            float(rng.uniform(-3, 3)),
            float(rng.uniform(-3, 3)),
            float(rng.uniform(-3, 3)),
            float(rng.uniform(0, 2 * np.pi)),
        )
        for _ in range(n)
    ]


def make_phantom(
    shape: Sequence[int] = (40, 96, 96),
    spacing: Sequence[float] = (5.0, 3.5, 3.5),
    seed: int = 0,
    noise: float | None = None,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
) -> Phantom:
    """Make a random abdominal CT phantom on a (slices, rows, columns) grid.

    ``spacing`` is (slice, row, column) in mm. The anatomy is built in millimetres around
    the centre of the field of view, so the same seed gives the same patient on any grid;
    the body is shrunk to fit fields of view smaller than about 330 x 250 mm. ``noise`` is
    the standard deviation of the Gaussian noise in HU (random per seed when ``None``).
    """
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    rng = np.random.default_rng(seed)
    g = _Grid(shape, spacing)
    fov_y = shape[1] * spacing[1]
    fov_x = shape[2] * spacing[2]

    # Body: an ellipse that breathes slowly along z.
    ax = min(rng.uniform(140.0, 165.0), 0.47 * fov_x)
    ay = min(rng.uniform(100.0, 122.0), 0.45 * fov_y)
    body_dy = rng.uniform(-8.0, 8.0)  # table height varies
    phase = rng.uniform(0, 2 * np.pi)
    bend = 1.0 + 0.04 * np.sin(g.z / 90.0 + phase)
    skin = rng.uniform(1.5, 3.0)
    fat = rng.uniform(8.0, 28.0)
    wall = rng.uniform(7.0, 12.0)
    # Interior of the abdominal wall, in body-normalised terms used to place the organs.
    cav_ax, cav_ay = ax - skin - fat - wall, ay - skin - fat - wall

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[_ellipse_z(g, 0.0, body_dy, ax * bend, ay * bend)] = _SKIN
    tissue[_ellipse_z(g, 0.0, body_dy, (ax - skin) * bend, (ay - skin) * bend)] = _FAT
    inner_body = _ellipse_z(g, 0.0, body_dy, (ax - skin - fat) * bend, (ay - skin - fat) * bend)
    tissue[inner_body] = _MUSCLE
    cavity = _ellipse_z(g, 0.0, body_dy, cav_ax * bend, cav_ay * bend)
    tissue[cavity] = _VISCERAL_FAT

    def paint(name: str, mask: np.ndarray, inside: bool = True) -> None:
        """Paint inside the abdominal cavity, or (``inside=False``) anywhere under the fat."""
        tissue[mask & (cavity if inside else inner_body)] = _ORGAN_ID[name]

    def jitter(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    # Bowel loops in the lower, anterior abdomen, some with air.
    bowel = np.zeros(shape, dtype=bool)
    bowel_air = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(5, 10))):
        c = (
            rng.uniform(-0.55, 0.55) * cav_ax,
            body_dy + rng.uniform(-0.7, 0.05) * cav_ay,
            rng.uniform(-110.0, 10.0),
        )
        semi = (rng.uniform(12, 22), rng.uniform(10, 18), rng.uniform(20, 50))
        loop = _ellipsoid(g, c, semi, rng.uniform(0, np.pi), _wobble(rng, 2, 0.1))
        bowel |= loop
        if rng.random() < 0.5:
            bowel_air |= loop & _ellipsoid(g, (c[0], c[1] - semi[1] * 0.5, c[2]), semi)
    paint("bowel", bowel)

    # Stomach: left, anterior, upper; fluid with an air cap anteriorly.
    st_c = (
        0.32 * cav_ax + jitter(12),
        body_dy - 0.38 * cav_ay + jitter(8),
        rng.uniform(25.0, 50.0),
    )
    st_semi = (rng.uniform(30, 45), rng.uniform(25, 35), rng.uniform(35, 50))
    stomach = _ellipsoid(g, st_c, st_semi, rng.uniform(-0.5, 0.5), _wobble(rng, 3, 0.08))
    paint("stomach", stomach)
    stomach_air = stomach & (g.y < st_c[1] - 0.45 * st_semi[1])

    # Liver: right (negative x), large, upper abdomen, follows the wall (cut by the cavity).
    li_c = (-0.45 * cav_ax + jitter(10), body_dy - 0.05 * cav_ay + jitter(10), 30 + jitter(12))
    li_semi = (rng.uniform(70, 88), rng.uniform(75, 95), rng.uniform(70, 90))
    paint("liver", _ellipsoid(g, li_c, li_semi, rng.uniform(-0.3, 0.3), _wobble(rng, 3, 0.07)))

    # Kidneys: posterior, either side of the spine; the right one lower (under the liver).
    kidneys = {}
    for name, side, dz in (("kidney_right", -1.0, -35.0), ("kidney_left", 1.0, -15.0)):
        kc = (
            side * (0.40 * cav_ax + jitter(6)),
            body_dy + 0.42 * cav_ay + jitter(6),
            dz + jitter(10),
        )
        ks = (rng.uniform(22, 28), rng.uniform(28, 36), rng.uniform(45, 58))
        angle = side * rng.uniform(0.2, 0.6)
        k = _ellipsoid(g, kc, ks, angle, _wobble(rng, 2, 0.05))
        paint(name, k)
        kidneys[name] = _ellipsoid(g, kc, [s * 0.55 for s in ks], angle) & k

    # Spleen: left, posterior, upper; a crescent along the wall with a concave hilum.
    theta = rng.uniform(0.35, 0.75)  # angle from +x towards posterior
    radial = np.array([np.cos(theta), np.sin(theta)])
    sp_semi = (rng.uniform(22, 30), rng.uniform(45, 62), rng.uniform(42, 58))
    reach = np.array([cav_ax, cav_ay]) * radial
    sp_xy = reach - radial * (sp_semi[0] + rng.uniform(4, 12)) + (0.0, body_dy)
    sp_c = (float(sp_xy[0]), float(sp_xy[1]), 35.0 + jitter(12))
    spleen = _ellipsoid(g, sp_c, sp_semi, theta, _wobble(rng, 3, 0.07))
    hilum_xy = sp_xy - radial * sp_semi[0] * rng.uniform(1.0, 1.25)
    spleen &= ~_ellipsoid(
        g,
        (float(hilum_xy[0]), float(hilum_xy[1]), sp_c[2]),
        (sp_semi[0] * 0.8, sp_semi[1] * 0.45, sp_semi[2] * 0.55),
        theta,
    )
    paint("spleen", spleen)

    # Spine and its neighbours, posterior midline. The posterior elements and the back
    # muscles need 35-45 mm between the vertebral body and the subcutaneous fat.
    vb_r = rng.uniform(16, 21)
    vb_back = body_dy + (ay - skin - fat) * min(bend.min(), 1.0) - rng.uniform(36, 44)
    vb_c = (jitter(3), vb_back - vb_r * 0.85)
    vessels_y = vb_c[1] - vb_r - rng.uniform(10, 16)
    paint("aorta", _ellipse_z(g, 14 + jitter(4), vessels_y, *(rng.uniform(9, 12),) * 2))
    paint("vena_cava", _ellipse_z(g, -20 + jitter(4), vessels_y, 12, rng.uniform(8, 12)))
    psoas_r = np.clip(14 - g.z / 12.0, 4.0, 26.0)
    psoas = _ellipse_z(g, vb_c[0] + vb_r + psoas_r * 0.6, vb_c[1], psoas_r, psoas_r * 0.9)
    psoas |= _ellipse_z(g, vb_c[0] - vb_r - psoas_r * 0.6, vb_c[1], psoas_r, psoas_r * 0.9)
    paint("psoas", psoas)
    canal_y = vb_back + 9
    para = _ellipse_z(g, 30, canal_y + 10, rng.uniform(22, 30), 22)
    para |= _ellipse_z(g, -30, canal_y + 10, rng.uniform(22, 30), 22)
    paint("paraspinal_muscle", para, inside=False)
    vertebra = _ellipse_z(g, vb_c[0], vb_c[1], vb_r, vb_r * 0.85)
    cortex = vertebra & ~_ellipse_z(g, vb_c[0], vb_c[1], vb_r - 2.5, vb_r * 0.85 - 2.5)
    period = rng.uniform(28, 34)
    disc = np.broadcast_to(((g.z + rng.uniform(0, period)) % period) < rng.uniform(5, 8), shape)
    disc = disc & vertebra
    canal = _ellipse_z(g, vb_c[0], canal_y, 8, 7)
    arch = _ellipse_z(g, vb_c[0], canal_y, 15, 13)
    spinous = (np.abs(g.x - vb_c[0]) < 4) & (g.y > canal_y) & (g.y < canal_y + 40)
    paint("spine", vertebra | arch | spinous, inside=False)  # the canal is part of it

    # Ribs: small bony cross-sections just inside the wall in the upper abdomen.
    ribs = np.zeros(shape, dtype=bool)
    for angle in np.linspace(-0.2, np.pi + 0.2, int(rng.integers(7, 11))):
        angle += jitter(0.1)
        if np.sin(angle) < -0.1:
            continue
        rx = float(np.cos(angle) * (cav_ax + wall * 0.5))
        ry = float(np.sin(angle) * (cav_ay + wall * 0.5) + body_dy)
        rz = rng.uniform(10, 60)
        ribs |= _ellipsoid(g, (rx, ry, rz), (6, 6, rng.uniform(12, 25)), angle)
    paint("ribs", ribs, inside=False)

    # Densities (HU), jittered per patient.
    hu_of = {
        "skin": 35 + jitter(10),
        "fat": -100 + jitter(12),
        "muscle": 40 + jitter(5),
        "visceral_fat": -95 + jitter(12),
        "bowel": 30 + jitter(8),
        "stomach": 12 + jitter(8),
        "liver": 60 + jitter(6),
        "kidney_cortex": 150 + jitter(20),
        "kidney_medulla": 30 + jitter(6),
        "spleen": 45 + jitter(4),
        "aorta": 140 + jitter(25),
        "vena_cava": 110 + jitter(20),
        "cortical_bone": 850 + jitter(150),
        "cancellous_bone": 300 + jitter(80),
        "disc": 85 + jitter(10),
        "canal": 15 + jitter(5),
    }
    lut = np.full(5 + len(_ORGANS), -1000.0)
    lut[[_SKIN, _FAT, _MUSCLE, _VISCERAL_FAT]] = (
        hu_of["skin"],
        hu_of["fat"],
        hu_of["muscle"],
        hu_of["visceral_fat"],
    )
    for name in ("bowel", "stomach", "liver", "spleen", "aorta", "vena_cava"):
        lut[_ORGAN_ID[name]] = hu_of[name]
    lut[[_ORGAN_ID["psoas"], _ORGAN_ID["paraspinal_muscle"]]] = hu_of["muscle"]
    lut[[_ORGAN_ID["kidney_left"], _ORGAN_ID["kidney_right"]]] = hu_of["kidney_cortex"]
    lut[[_ORGAN_ID["spine"], _ORGAN_ID["ribs"]]] = hu_of["cancellous_bone"]
    hu = lut[tissue]

    organs = {name: tissue == _ORGAN_ID[name] for name in _ORGANS}
    for name, medulla in kidneys.items():
        hu[medulla & organs[name]] = hu_of["kidney_medulla"]
    spine_mask = organs["spine"]
    hu[spine_mask & (cortex | ~vertebra)] = hu_of["cortical_bone"]
    hu[spine_mask & disc] = hu_of["disc"]
    hu[spine_mask & canal] = hu_of["canal"]
    hu[organs["ribs"]] = hu_of["cortical_bone"] * 0.8
    hu[(bowel_air & organs["bowel"]) | (stomach_air & organs["stomach"])] = -1000.0

    sigma = float(rng.uniform(6.0, 12.0)) if noise is None else float(noise)
    hu += rng.normal(0.0, sigma, size=shape)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    organs["body"] = tissue != _AIR
    labels = organs["spleen"].astype(np.uint8) * SPLEEN_LABEL
    return Phantom(
        hu=hu,
        labels=labels,
        organs=organs,
        spacing=spacing,  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        tissues={k: float(v) for k, v in hu_of.items()} | {"noise": sigma},
    )
