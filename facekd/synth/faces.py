"""Parametric synthetic faces drawn with OpenCV primitives.

A face is an `IdentityParams` (fixed per identity: head shape, skin tone, eyes, brows, nose,
mouth, ears, hair and a skin texture of mottling, moles and freckles) seen through a `View`
(drawn per image: pose, scale, shift, lighting, expression, background, glasses, occluders,
camera blur and noise). `FaceRenderer(identity, size).render(view, rng)` returns an RGB uint8
image and the 5 landmarks (eye centres, nose tip, mouth corners) in output pixel coordinates
(pixel centres at integers).

Geometry lives in a canonical face frame: origin at the head centre, x to the right, y down,
one unit = the mean head half-width. The mean face puts its landmarks near the insightface
112x112 alignment template, so images look like aligned face crops. The head is an ellipsoid
as deep as it is wide; yaw and pitch rotate surface points (features move across the face and
foreshorten, the nose protrudes) while the silhouette stays fixed; roll, scale and shift are a
similarity transform. Shapes are filled on a 2x supersampled canvas and reduced with
INTER_AREA (anti-aliasing). Lighting (Lambertian shading of the ellipsoid, a directional
gradient, gain and colour cast) is applied at output resolution.

Randomness comes only from the arguments (identity rng, view, the per-image rng), so a given
seed gives the same pixels in any process.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "FaceRenderer",
    "IdentityParams",
    "View",
    "render_face",
    "sample_identity",
    "sample_view",
]

#: The insightface 5-point template for 112x112 crops (left eye, right eye, nose, mouth corners).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

SUPERSAMPLE = 2
_FACE_UNIT = 0.34  # head half-width as a fraction of the image side, at scale 1
_SHIFT = 4  # fractional bits for cv2 drawing
_SHIFT_SCALE = float(1 << _SHIFT)
_NOSE_TIP_DZ = 0.3  # how far the nose tip stands out of the head ellipsoid
_TEX_X = 1.35  # texture covers face coords [-_TEX_X, _TEX_X] x [-_TEX_Y, _TEX_Y]
_TEX_Y = 1.55

# Palettes (RGB in [0, 1]) blended by a parameter t in [0, 1].
_SKIN = np.array([[0.30, 0.18, 0.11], [0.55, 0.36, 0.24], [0.78, 0.58, 0.45], [0.93, 0.78, 0.68]])
_HAIR = np.array([[0.06, 0.05, 0.05], [0.25, 0.15, 0.08], [0.50, 0.33, 0.17], [0.80, 0.66, 0.40],
                  [0.62, 0.60, 0.58]])
_IRIS = np.array([[0.20, 0.11, 0.06], [0.42, 0.26, 0.12], [0.40, 0.45, 0.22], [0.25, 0.45, 0.65],
                  [0.48, 0.52, 0.56]])


def _palette(colours: np.ndarray, t: float) -> np.ndarray:
    t = float(np.clip(t, 0.0, 1.0)) * (len(colours) - 1)
    i = min(int(t), len(colours) - 2)
    return colours[i] + (colours[i + 1] - colours[i]) * (t - i)


# (mean, half-range) of every continuous identity parameter. A sampled value is
# mean + spread * half_range * u with u ~ U(-1, 1): `spread` (identity_spread) shrinks the
# population around the shared mean face. The skin texture is not scaled by spread.
_IDENTITY_RANGES: dict[str, tuple[float, float]] = {
    "head_a": (1.0, 0.09), "head_b_up": (1.28, 0.10), "head_b_low": (1.36, 0.10),
    "jaw_taper": (0.26, 0.14), "jaw_power": (2.0, 0.9),
    "skin_tone": (0.62, 0.38), "skin_red": (0.0, 0.05),
    "eye_x": (0.47, 0.06), "eye_y": (-0.12, 0.06), "eye_w": (0.19, 0.035), "eye_h": (0.085, 0.022),
    "eye_tilt": (0.0, 0.14), "iris_r": (0.072, 0.013), "iris_tone": (0.5, 0.5), "eye_asym": (0.0, 0.025),
    "brow_gap": (0.19, 0.05), "brow_w": (0.24, 0.045), "brow_t": (0.055, 0.025), "brow_arch": (0.045, 0.04),
    "brow_tilt": (0.0, 0.07), "brow_dx": (0.02, 0.04), "brow_asym": (0.0, 0.03),
    "nose_y": (0.41, 0.07), "nose_w": (0.17, 0.045), "nose_len": (0.0, 0.08), "nose_dark": (0.55, 0.12),
    "mouth_y": (0.955, 0.06), "mouth_w": (0.36, 0.06), "lip_up": (0.055, 0.02), "lip_low": (0.075, 0.025),
    "lip_red": (0.45, 0.18), "mouth_rest": (0.0, 0.04),
    "ear_y": (0.1, 0.08), "ear_w": (0.12, 0.03), "ear_h": (0.26, 0.05),
    "hair_tone": (0.4, 0.5), "hairline": (-0.72, 0.25), "hair_side": (-0.05, 0.2), "hair_power": (2.0, 0.8),
    "fringe": (0.12, 0.14), "parting": (0.0, 0.45), "hair_volume": (0.12, 0.1), "hair_length": (0.3, 1.0),
    "neck_w": (0.52, 0.08),
}


@dataclass
class IdentityParams:
    """Everything fixed about one synthetic person (canonical face-frame units). The shape and
    colour parameters (names as in `_IDENTITY_RANGES`) read as attributes: `p.eye_x`."""

    values: dict
    texture_seed: int
    moles: tuple  # ((x, y, radius, darkness), ...)
    freckles: tuple  # ((x, y, radius, darkness), ...)
    mottle: float  # skin mottling amplitude

    def __getattr__(self, name: str):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def sample_identity(rng: np.random.Generator, spread: float = 1.0) -> IdentityParams:
    """Draw an identity. `spread` in (0, 1] scales every shape/colour parameter's deviation
    from the shared mean face; the skin texture (mottling, moles, freckles) is always
    individual, so identities stay distinguishable at small spread through fine detail."""
    values = {}
    for name, (mean, half) in _IDENTITY_RANGES.items():
        values[name] = float(mean + spread * half * rng.uniform(-1.0, 1.0))
    values["hair_length"] = max(values["hair_length"], values["hair_side"] + 0.05)
    a, b = values["head_a"], values["head_b_low"]
    moles = []
    for _ in range(int(rng.integers(3, 9))):
        while True:
            x, y = rng.uniform(-0.9, 0.9), rng.uniform(-0.9, 1.2)
            if (x / (0.9 * a)) ** 2 + (y / (0.95 * b)) ** 2 < 1.0:
                break
        moles.append((float(x), float(y), float(rng.uniform(0.018, 0.045)), float(rng.uniform(0.35, 0.65))))
    freckles = []
    centre_x = rng.uniform(-0.2, 0.2)
    for _ in range(int(rng.integers(0, 30))):
        x = centre_x + rng.normal(0.0, 0.35)
        y = 0.25 + rng.normal(0.0, 0.15)
        freckles.append((float(x), float(y), float(rng.uniform(0.012, 0.022)), float(rng.uniform(0.72, 0.88))))
    return IdentityParams(values=values, texture_seed=int(rng.integers(0, 2**31 - 1)), moles=tuple(moles),
                          freckles=tuple(freckles), mottle=float(rng.uniform(0.03, 0.06)))


@dataclass(frozen=True)
class View:
    """Per-image nuisance: pose (degrees), framing, lighting, expression and extras."""

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    scale: float = 1.0
    shift_x: float = 0.0  # fraction of the image side
    shift_y: float = 0.0
    light_azimuth: float = 0.0  # radians, direction the light comes from in the image plane
    light_elevation: float = 1.2  # radians; pi/2 = frontal
    light_strength: float = 0.3  # diffuse share of the Lambertian shading
    gradient_angle: float = 0.0
    gradient: float = 0.0  # strength of a linear brightness ramp across the image
    gain: float = 1.0
    cast: tuple = (1.0, 1.0, 1.0)
    smile: float = 0.0  # mouth-corner lift (face units, may be negative)
    mouth_open: float = 0.0
    brow_raise: float = 0.0
    squint: float = 0.0  # 0 open .. 1 nearly closed
    gaze_x: float = 0.0
    gaze_y: float = 0.0
    glasses: int = 0  # 0 none, 1 round, 2 rectangular, 3 sunglasses
    glasses_colour: tuple = (0.1, 0.1, 0.1)
    background_clutter: int = 0
    occluder: str = ""  # "", "hand", "scarf", "hat", "patch"
    occluder_size: float = 0.0
    blur: float = 0.0  # Gaussian sigma in output pixels at 112 (scaled with size)
    noise: float = 0.0  # noise std in [0, 1] intensity units

    def replace(self, **changes) -> "View":
        return dataclasses.replace(self, **changes)


def sample_view(rng: np.random.Generator, nuisance: float = 0.5) -> View:
    """Draw the per-image nuisance. `nuisance` in [0, 1] scales pose range, framing jitter,
    lighting strength, expression range and the odds of glasses and occluders."""
    n = float(np.clip(nuisance, 0.0, 1.0))
    u = lambda: float(rng.uniform(-1.0, 1.0))  # noqa: E731
    glasses = 0
    if rng.random() < 0.04 + 0.22 * n:
        glasses = 3 if rng.random() < 0.25 else int(rng.integers(1, 3))
    occluder, occluder_size = "", 0.0
    if rng.random() < 0.3 * n:
        occluder = ("hand", "scarf", "hat", "patch")[int(rng.integers(0, 4))]
        occluder_size = float(rng.uniform(0.3, 0.3 + 0.7 * n))
    frame = float(rng.uniform(0.05, 0.3))
    return View(
        yaw=u() * (8 + 37 * n), pitch=u() * (5 + 15 * n), roll=u() * (4 + 16 * n),
        scale=math.exp(u() * (0.03 + 0.12 * n)),
        shift_x=u() * (0.02 + 0.06 * n), shift_y=u() * (0.02 + 0.06 * n),
        light_azimuth=float(rng.uniform(0, 2 * math.pi)),
        light_elevation=float(rng.uniform(math.pi / 2 - (0.3 + 0.9 * n), math.pi / 2)),
        light_strength=float(rng.uniform(0.15, 0.25 + 0.45 * n)),
        gradient_angle=float(rng.uniform(0, 2 * math.pi)), gradient=float(rng.uniform(0, 0.1 + 0.4 * n)),
        gain=math.exp(u() * (0.08 + 0.3 * n)),
        cast=tuple(math.exp(u() * (0.02 + 0.1 * n)) for _ in range(3)),
        smile=float(rng.uniform(-0.03, 0.04 + 0.1 * n)),
        mouth_open=float(max(0.0, rng.uniform(-0.1, 0.04 + 0.14 * n))),
        brow_raise=float(max(0.0, rng.uniform(-0.05, 0.03 + 0.07 * n))),
        squint=float(max(0.0, rng.uniform(-0.3, 0.2 + 0.5 * n))),
        gaze_x=u() * 0.35, gaze_y=u() * 0.2,
        glasses=glasses, glasses_colour=(frame, frame * float(rng.uniform(0.8, 1.2)), frame),
        background_clutter=int(rng.integers(0, 1 + int(4 * n))),
        occluder=occluder, occluder_size=occluder_size,
        blur=float(rng.uniform(0.0, 0.2 + 0.6 * n)), noise=float(rng.uniform(0.0, 0.004 + 0.016 * n)),
    )


# ---------------------------------------------------------------------------------------------
# Rendering


_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                    np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False))], axis=1)
_U = np.linspace(-1.0, 1.0, 13)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    pts = _CIRCLE * (rx, ry)
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        pts = pts @ np.array([[c, s], [-s, c]])
    return pts + (cx, cy)


def _colour(rgb) -> tuple:
    return tuple(min(max(float(v), 0.0), 1.0) * 255.0 for v in rgb)


_NOISE_BANK: list = []


def _noise_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit Gaussian noise (size x size x 1): a random crop of a fixed bank (cheap, deterministic)."""
    if not _NOISE_BANK:
        _NOISE_BANK.append(np.random.default_rng(20240611).standard_normal((384, 384), dtype=np.float32))
    bank = _NOISE_BANK[0]
    if size > bank.shape[0]:
        return rng.standard_normal((size, size, 1), dtype=np.float32)
    y, x = rng.integers(0, bank.shape[0] - size + 1, 2)
    field = bank[y:y + size, x:x + size]
    if rng.random() < 0.5:
        field = field.T
    return field[..., None]


class _Projector:
    """Face-frame points -> supersampled canvas pixels for one image."""

    def __init__(self, p: IdentityParams, view: View, size: int):
        w = size * SUPERSAMPLE
        self.a, self.b_up, self.b_low = p.head_a, p.head_b_up, p.head_b_low
        self.f = _FACE_UNIT * w * view.scale
        self.cx = (0.5 + view.shift_x) * w - 0.5
        self.cy = (0.5 + view.shift_y) * w - 0.5
        r = math.radians(view.roll)
        self.cr, self.sr = math.cos(r), math.sin(r)
        y, t = math.radians(view.yaw), math.radians(view.pitch)
        self.cy_, self.sy_ = math.cos(y), math.sin(y)
        self.ct, self.st = math.cos(t), math.sin(t)

    def depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        b = np.where(y < 0, self.b_up, self.b_low)
        return self.a * np.sqrt(np.clip(1.0 - (x / self.a) ** 2 - (y / b) ** 2, 0.0, None))

    def rotate(self, pts: np.ndarray, dz: float = 0.0) -> np.ndarray:
        """Yaw and pitch a surface point (depth from the head ellipsoid, plus dz)."""
        x, y = pts[..., 0], pts[..., 1]
        z = self.depth(x, y) + dz
        x1 = x * self.cy_ + z * self.sy_
        z1 = -x * self.sy_ + z * self.cy_
        y1 = y * self.ct - z1 * self.st
        return np.stack([x1, y1], axis=-1)

    def place(self, pts: np.ndarray) -> np.ndarray:
        """Roll, scale, shift: rotated face coords -> canvas pixels."""
        x, y = pts[..., 0], pts[..., 1]
        return np.stack([self.cx + self.f * (self.cr * x - self.sr * y),
                         self.cy + self.f * (self.sr * x + self.cr * y)], axis=-1)

    def surface(self, pts: np.ndarray, dz: float = 0.0) -> np.ndarray:
        return self.place(self.rotate(np.asarray(pts, dtype=np.float64), dz))

    def silhouette(self, pts: np.ndarray) -> np.ndarray:
        return self.place(np.asarray(pts, dtype=np.float64))

    def unplace(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = (px - self.cx) / self.f, (py - self.cy) / self.f
        return self.cr * dx + self.sr * dy, -self.sr * dx + self.cr * dy

    def unrotate(self, x1: np.ndarray, y1: np.ndarray,
                 iterations: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Approximate inverse of `rotate` (fixed-point iterations); also returns depth."""
        x, y = x1.copy(), y1.copy()
        for _ in range(iterations):
            z = self.depth(x, y)
            z1 = -x * self.sy_ + z * self.cy_
            x = (x1 - z * self.sy_) / self.cy_
            y = (y1 + z1 * self.st) / self.ct
        return x, y, self.depth(x, y)


class _Scene:
    """Primitives in face coordinates, projected in one numpy pass, then drawn in order."""

    def __init__(self, pr: _Projector):
        self.pr = pr
        self.ops: list = []
        self.pts: list = []
        self.dz: list = []
        self.flat: list = []

    def _add(self, pts, dz: float, surface) -> None:
        pts = np.asarray(pts, dtype=np.float64)
        self.pts.append(pts)
        self.dz.append(np.full(len(pts), dz))
        self.flat.append(np.logical_not(np.broadcast_to(np.asarray(surface, bool), (len(pts),))))

    def fill(self, polys, colour, dz: float = 0.0, surface=True) -> None:
        """Filled polygon(s); `surface=False` (or per-point False) keeps points on the silhouette."""
        self.ops.append((True, len(polys), _colour(colour), 0, False))
        for poly in polys:
            self._add(poly, dz, surface)

    def line(self, pts, colour, thickness: float, closed: bool = False, dz: float = 0.0, surface=True) -> None:
        self.ops.append((False, 1, _colour(colour), max(1, int(round(thickness))), closed))
        self._add(pts, dz, surface)

    def draw(self, canvas: np.ndarray) -> None:
        if not self.pts:
            return
        lengths = np.array([len(p) for p in self.pts])
        pts = np.concatenate(self.pts)
        rotated = self.pr.rotate(pts, np.concatenate(self.dz))
        flat = np.concatenate(self.flat)
        rotated[flat] = pts[flat]
        fixed = np.round(self.pr.place(rotated) * _SHIFT_SCALE).astype(np.int32)
        pieces = np.split(fixed, np.cumsum(lengths)[:-1])
        k = 0
        for is_fill, n, colour, thickness, closed in self.ops:
            polys = pieces[k:k + n]
            k += n
            if is_fill:
                cv2.fillPoly(canvas, polys, colour, cv2.LINE_8, _SHIFT)
            else:
                cv2.polylines(canvas, polys, closed, colour, thickness, cv2.LINE_8, _SHIFT)


class FaceRenderer:
    """Renders one identity at one output size; caches its skin texture between images."""

    def __init__(self, identity: IdentityParams, size: int = 112):
        self.p = identity
        self.size = int(size)
        self.skin = np.clip(_palette(_SKIN, identity.skin_tone) + (identity.skin_red, 0.0, -identity.skin_red), 0, 1)
        self.hair = _palette(_HAIR, identity.hair_tone)
        self.iris = _palette(_IRIS, identity.iris_tone)
        self.lip = self.skin * (1 - identity.lip_red) + np.array([0.72, 0.30, 0.30]) * identity.lip_red
        self._texture = self._make_texture()

    # -- identity texture ---------------------------------------------------------------------
    def _make_texture(self) -> np.ndarray:
        """Skin layer in face coords: skin colour x mottling, with moles and freckles."""
        p = self.p
        texel = 1.0 / (_FACE_UNIT * self.size * SUPERSAMPLE)  # about one canvas pixel per texel
        tw, th = int(2 * _TEX_X / texel), int(2 * _TEX_Y / texel)
        self._texel = (2 * _TEX_X / tw, 2 * _TEX_Y / th)
        rng = np.random.default_rng(p.texture_seed)
        coarse = cv2.resize(rng.normal(0, 1, (7, 6)).astype(np.float32), (tw, th), interpolation=cv2.INTER_CUBIC)
        fine = cv2.resize(rng.normal(0, 1, (26, 22)).astype(np.float32), (tw, th), interpolation=cv2.INTER_CUBIC)
        shade = 1.0 + p.mottle * (0.7 * coarse + 0.6 * fine)
        layer = np.clip(shade[..., None] * (self.skin * 255.0).astype(np.float32), 0, 255).astype(np.uint8)
        to_tex = lambda x, y: ((x + _TEX_X) / self._texel[0] - 0.5, (y + _TEX_Y) / self._texel[1] - 0.5)  # noqa: E731
        for x, y, r, dark in p.moles + p.freckles:
            cx, cy = to_tex(x, y)
            rad = r / self._texel[0]
            colour = self.skin * dark * np.array([1.0, 0.9, 0.85])
            cv2.circle(layer, (int(round(cx * 16)), int(round(cy * 16))), int(round(rad * 16)), _colour(colour),
                       -1, cv2.LINE_AA, _SHIFT)
        return layer

    # -- drawing ------------------------------------------------------------------------------
    def render(self, view: View, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One image (RGB uint8, size x size) and its 5 landmarks (5x2 float32, output pixels)."""
        p, size = self.p, self.size
        w = size * SUPERSAMPLE
        pr = _Projector(p, view, size)
        canvas = _background(rng, w, view.background_clutter)

        # Behind the head: back hair, neck, ears (set back from the face plane).
        back = _Scene(pr)
        a, bu, v = p.head_a, p.head_b_up, max(0.02, p.hair_volume)
        if p.hair_length > p.hair_side:
            t = np.linspace(math.pi, 2 * math.pi, 17)
            top = np.stack([(a + v) * np.cos(t), (bu + v) * np.sin(t)], axis=1)
            low = max(p.hair_length, 0.0)
            back.fill([np.concatenate([top, [[a + v * 0.8, low], [-(a + v * 0.8), low]]])], self.hair * 0.85,
                      surface=False)
        nw = p.neck_w
        back.fill([np.array([[-nw, 0.5], [nw, 0.5], [nw * 1.15, 2.2], [-nw * 1.15, 2.2]])], self.skin * 0.78,
                  surface=False)
        back.fill([_ellipse(side * (a - 0.03), p.ear_y, p.ear_w, p.ear_h) for side in (-1, 1)], self.skin * 0.9,
                  dz=-0.35)
        back.draw(canvas)

        # Head: the identity's skin layer remapped through the pose, inside the outline.
        mask = np.zeros((w, w), np.uint8)
        outline = np.round(pr.silhouette(_head_outline(p)) * _SHIFT_SCALE).astype(np.int32)
        cv2.fillPoly(mask, [outline], 1, cv2.LINE_8, _SHIFT)
        cv2.copyTo(self._skin_layer(pr, w), mask, canvas)

        front = _Scene(pr)
        self._draw_eyes(front, view)
        self._draw_brows(front, view)
        self._draw_nose(front)
        self._draw_mouth(front, view)
        self._draw_hair_cap(front)
        if view.glasses:
            self._draw_glasses(front, view)
        front.draw(canvas)

        image = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
        image = self._light(image, pr, view)
        if view.blur > 0.05:
            image = cv2.GaussianBlur(image, (0, 0), view.blur * size / 112.0)
        if view.noise > 0:
            image += np.float32(view.noise) * _noise_field(rng, size)
        image *= 255.0
        image += 0.5
        image = np.clip(image, 0, 255, out=image).astype(np.uint8)
        landmarks = self.landmarks(view, pr)
        if view.occluder:
            from facekd.synth.degrade import draw_occluder

            image = draw_occluder(image, landmarks, view.occluder, view.occluder_size, rng)
        return image, landmarks

    def landmarks(self, view: View, projector: _Projector | None = None) -> np.ndarray:
        """Eye centres, nose tip, mouth corners (image left to right) in output pixels."""
        p = self.p
        pr = projector or _Projector(p, view, self.size)
        lift = view.smile + p.mouth_rest
        pts = np.array([[-p.eye_x, p.eye_y - p.eye_asym], [p.eye_x, p.eye_y + p.eye_asym],
                        [0.0, p.nose_y + p.nose_len], [-p.mouth_w, p.mouth_y - lift], [p.mouth_w, p.mouth_y - lift]])
        canvas_pts = pr.surface(pts, dz=np.array([0.0, 0.0, _NOSE_TIP_DZ, 0.0, 0.0]))
        return ((canvas_pts + 0.5) / SUPERSAMPLE - 0.5).astype(np.float32)

    def _skin_layer(self, pr: _Projector, w: int) -> np.ndarray:
        lo = max(8, w // 4)
        grid = (np.arange(lo, dtype=np.float64) + 0.5) * (w / lo) - 0.5
        gx, gy = np.meshgrid(grid, grid)
        x1, y1 = pr.unplace(gx, gy)
        x, y, _ = pr.unrotate(x1, y1)
        mx = ((x + _TEX_X) / self._texel[0] - 0.5).astype(np.float32)
        my = ((y + _TEX_Y) / self._texel[1] - 0.5).astype(np.float32)
        mx = cv2.resize(mx, (w, w), interpolation=cv2.INTER_LINEAR)
        my = cv2.resize(my, (w, w), interpolation=cv2.INTER_LINEAR)
        return cv2.remap(self._texture, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def _draw_eyes(self, sc: _Scene, view: View) -> None:
        p = self.p
        f = sc.pr.f
        open_up = p.eye_h * (1.0 - 0.55 * view.squint)
        open_low = 0.55 * p.eye_h * (1.0 - 0.3 * view.squint)
        ew, ir = p.eye_w, p.iris_r
        u = _U
        upper = -open_up * (1 - u**2) ** 0.8
        lower = open_low * (1 - u**2) ** 0.9
        almond = np.concatenate([np.stack([u * ew, upper], 1), np.stack([u[::-1] * ew, lower[::-1]], 1)])
        # Iris and pupil clipped to the almond: clamp each point between the lids.
        ix, iy = view.gaze_x * (ew - ir), view.gaze_y * 0.3 * ir
        discs = []
        for radius in (ir, 0.42 * ir):
            qx = np.clip(ix + radius * _CIRCLE[::2, 0], -ew * 0.98, ew * 0.98)
            uu = qx / ew
            qy = np.clip(iy + radius * _CIRCLE[::2, 1], -open_up * (1 - uu**2) ** 0.8, open_low * (1 - uu**2) ** 0.9)
            discs.append(np.stack([qx, qy], 1))
        lid = np.stack([u * ew * 1.02, upper - 0.006], 1)
        crease = np.stack([u[2:-2] * ew * 0.9, upper[2:-2] * 1.1 - 0.06 - 0.2 * view.brow_raise], 1)
        for side in (-1, 1):
            tilt = -side * p.eye_tilt  # positive eye_tilt lifts the outer corners
            c, s = math.cos(tilt), math.sin(tilt)
            rot = np.array([[c, s], [-s, c]])
            centre = (side * p.eye_x, p.eye_y + side * p.eye_asym)
            sc.fill([almond @ rot + centre], (0.93, 0.91, 0.87))
            sc.fill([discs[0] @ rot + centre], self.iris)
            sc.fill([discs[1] @ rot + centre], (0.04, 0.03, 0.03))
            sc.line(lid @ rot + centre, (0.12, 0.08, 0.07), f * 0.022)
            sc.line(crease @ rot + centre, self.skin * 0.8, f * 0.012)

    def _draw_brows(self, sc: _Scene, view: View) -> None:
        p = self.p
        u = _U
        along = (u + 1) / 2  # 0 inner end .. 1 outer end
        centre = -p.brow_arch * (1 - u**2) + p.brow_tilt * u
        half = p.brow_t * (1.0 - 0.55 * along) / 2
        polys = []
        for side in (-1, 1):
            cx = side * (p.eye_x + p.brow_dx)
            cy = p.eye_y - p.brow_gap - view.brow_raise + side * p.brow_asym
            xs = cx + side * u * p.brow_w
            polys.append(np.concatenate([np.stack([xs, cy + centre - half], 1),
                                         np.stack([xs[::-1], (cy + centre + half)[::-1]], 1)]))
        sc.fill(polys, self.hair * 0.8 + self.skin * 0.08)

    def _draw_nose(self, sc: _Scene) -> None:
        p = self.p
        ny, nw = p.nose_y + p.nose_len, p.nose_w
        for side in (-1, 1):
            sc.line(np.array([[side * 0.1, p.eye_y + 0.06], [side * nw * 0.55, ny - 0.1]]), self.skin * 0.82,
                    sc.pr.f * 0.025, dz=0.12)
        sc.fill([_ellipse(side * nw * 0.75, ny, 0.065, 0.055) for side in (-1, 1)], self.skin * 0.9, dz=0.12)
        sc.fill([_ellipse(0.0, ny - 0.015, nw * 0.48, 0.07)], self.skin * 0.97, dz=_NOSE_TIP_DZ)
        sc.fill([_ellipse(side * nw * 0.45, ny + 0.045, 0.05, 0.022, side * 0.3) for side in (-1, 1)],
                self.skin * p.nose_dark, dz=0.2)

    def _draw_mouth(self, sc: _Scene, view: View) -> None:
        p = self.p
        u = _U
        my, mw = p.mouth_y, p.mouth_w
        line = my - (view.smile + p.mouth_rest) * u**2
        bell = (1 - u**2) ** 0.6
        gap = view.mouth_open * (1 - u**2) ** 0.8
        top = line - p.lip_up * bell * (1 - 0.3 * np.exp(-((u / 0.18) ** 2)))
        xs = u * mw
        if view.mouth_open > 0.01:
            inner = np.concatenate([np.stack([xs, line - 0.005], 1),
                                    np.stack([xs[::-1], (line + gap + 0.005)[::-1]], 1)])
            sc.fill([inner], (0.22, 0.08, 0.08))
            if view.mouth_open > 0.04:
                teeth_h = min(0.5 * view.mouth_open, 0.05)
                mid = slice(2, -2)
                teeth = np.concatenate([np.stack([xs[mid] * 0.9, line[mid]], 1),
                                        np.stack([xs[mid][::-1] * 0.9, line[mid][::-1] + teeth_h], 1)])
                sc.fill([teeth], (0.9, 0.88, 0.82))
        upper = np.concatenate([np.stack([xs, top], 1), np.stack([xs[::-1], line[::-1]], 1)])
        lower = np.concatenate([np.stack([xs, line + gap], 1),
                                np.stack([xs[::-1], (line + gap + p.lip_low * bell)[::-1]], 1)])
        sc.fill([upper, lower], self.lip)
        sc.line(np.stack([xs, line], 1), self.lip * 0.55, sc.pr.f * 0.014)

    def _draw_hair_cap(self, sc: _Scene) -> None:
        p = self.p
        a, bu, v = p.head_a, p.head_b_up, max(0.02, p.hair_volume)
        side_y = float(np.clip(p.hair_side, -0.9 * bu, 0.6))
        if p.hairline < -1.2 * bu:
            return  # bald
        half = a * math.sqrt(max(1e-6, 1 - (side_y / (bu if side_y < 0 else p.head_b_low)) ** 2))
        xs = np.linspace(-half, half, 21)
        hl = p.hairline + (side_y - p.hairline) * (np.abs(xs) / half) ** max(0.8, p.hair_power)
        hl = hl + p.fringe * np.clip(1 - ((xs - p.parting * 0.5) / 0.9) ** 2, 0, None)
        hl = np.minimum(hl, side_y + 0.02)
        big_a, big_b = a + v, bu + v
        t0 = math.asin(float(np.clip(-side_y / big_b, -1, 1)))
        t = np.linspace(t0, math.pi - t0, 21)
        outer = np.stack([big_a * np.cos(t), -big_b * np.sin(t)], 1)
        on_surface = np.r_[np.ones(21, bool), np.zeros(21, bool)]
        sc.fill([np.concatenate([np.stack([xs, hl], 1), outer])], self.hair, dz=0.02, surface=on_surface)
        for x in np.linspace(-0.8, 0.8, 7) * half:  # a few strands from the parting
            strand = np.array([[p.parting * 0.5, -bu * 0.95], [x, float(np.interp(x, xs, hl)) - 0.05]])
            sc.line(strand, self.hair * 0.85 + 0.02, sc.pr.f * 0.01, dz=0.02)

    def _draw_glasses(self, sc: _Scene, view: View) -> None:
        p = self.p
        colour = view.glasses_colour
        rx, ry = p.eye_w * 1.35, p.eye_h * 2.3
        rims = []
        for side in (-1, 1):
            cx, cy = side * p.eye_x, p.eye_y + 0.01
            if view.glasses == 2:
                top, bottom = cy - ry, cy + 0.9 * ry
                box = np.array([[cx - rx, top], [cx + rx, top], [cx + rx, bottom], [cx - rx, bottom]])
                edges = [np.linspace(box[i], box[(i + 1) % 4], 5, endpoint=False) for i in range(4)]
                rims.append(np.concatenate(edges))
            else:
                rims.append(_ellipse(cx, cy, rx, ry))
        if view.glasses == 3:
            sc.fill(rims, (0.06, 0.06, 0.07), dz=0.15)
        thick = sc.pr.f * 0.03
        for rim in rims:
            sc.line(rim, colour, thick, closed=True, dz=0.15)
        sc.line(np.array([[-p.eye_x + rx, p.eye_y - 0.02], [p.eye_x - rx, p.eye_y - 0.02]]), colour, thick, dz=0.2)
        for side in (-1, 1):
            arm = np.array([[side * (p.eye_x + rx), p.eye_y - 0.02], [side * p.head_a * 0.98, p.eye_y + 0.02]])
            sc.line(arm, colour, thick, dz=0.05)

    def _light(self, image: np.ndarray, pr: _Projector, view: View) -> np.ndarray:
        """Lambertian ellipsoid shading on the head, a ramp, gain and cast. Returns float32 [0,1]."""
        size = self.size
        lo = 24
        grid = (np.arange(lo, dtype=np.float64) + 0.5) * (size / lo) - 0.5
        gx, gy = np.meshgrid(grid, grid)
        cgx, cgy = (gx + 0.5) * SUPERSAMPLE - 0.5, (gy + 0.5) * SUPERSAMPLE - 0.5
        x1, y1 = pr.unplace(cgx, cgy)
        p = self.p
        b = np.where(y1 < 0, p.head_b_up, p.head_b_low)
        r2 = (x1 / p.head_a) ** 2 + (y1 / b) ** 2
        x, y, z = pr.unrotate(x1, y1)
        # Normal in the face frame, then into the camera frame (yaw then pitch).
        nx, ny, nz = x / p.head_a**2, y / b**2, z / p.head_a**2
        nx1 = nx * pr.cy_ + nz * pr.sy_
        nz1 = -nx * pr.sy_ + nz * pr.cy_
        ny1 = ny * pr.ct - nz1 * pr.st
        nz2 = ny * pr.st + nz1 * pr.ct
        norm = np.sqrt(nx1**2 + ny1**2 + nz2**2) + 1e-9
        el, az = view.light_elevation, view.light_azimuth
        lx, ly, lz = math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)
        lam = np.clip((nx1 * lx + ny1 * ly + nz2 * lz) / norm, 0.0, 1.0)
        k = view.light_strength
        face = (1 - k) + k * lam / max(lz, 0.3)
        inside = np.clip((1.0 - r2) * 5.0, 0.0, 1.0)
        field = 1.0 + inside * (np.minimum(face, 1.25) - 1.0)
        ramp = ((gx / size - 0.5) * math.cos(view.gradient_angle) + (gy / size - 0.5) * math.sin(view.gradient_angle))
        field = field * (1.0 + view.gradient * 2.0 * ramp) * view.gain
        field = cv2.resize(field.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        out = image.astype(np.float32) * (1.0 / 255.0)
        out *= field[..., None]
        out *= np.asarray(view.cast, dtype=np.float32)
        return out


def _head_outline(p: IdentityParams) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = p.head_a * np.cos(t)
    s = np.sin(t)
    y = np.where(s < 0, p.head_b_up * s, p.head_b_low * s)
    low = np.clip(y / p.head_b_low, 0, 1)
    x = x * (1.0 - p.jaw_taper * low ** max(0.6, p.jaw_power))
    return np.stack([x, y], 1)


def _background(rng: np.random.Generator, w: int, clutter: int) -> np.ndarray:
    """Colour gradient plus low-frequency texture and a few random shapes (uint8 RGB)."""
    base = rng.uniform(0.05, 0.95, 3)
    other = np.clip(base + rng.normal(0, 0.25, 3), 0, 1)
    angle = rng.uniform(0, 2 * np.pi)
    lo = 6
    g = (np.arange(lo) + 0.5) / lo - 0.5
    ramp = np.cos(angle) * g[None, :] + np.sin(angle) * g[:, None] + 0.5
    small = base + (other - base) * ramp[..., None] + rng.normal(0, 0.06, (lo, lo, 3))
    canvas = cv2.resize(np.clip(small * 255 + 0.5, 0, 255).astype(np.uint8), (w, w), interpolation=cv2.INTER_CUBIC)
    for _ in range(clutter):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cx, cy = rng.uniform(0, w, 2)
        if rng.random() < 0.5:
            axes = (int(rng.uniform(0.05, 0.3) * w), int(rng.uniform(0.05, 0.3) * w))
            cv2.ellipse(canvas, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_8)
        else:
            half = rng.uniform(0.03, 0.25, 2) * w
            cv2.rectangle(canvas, (int(cx - half[0]), int(cy - half[1])), (int(cx + half[0]), int(cy + half[1])),
                          colour, -1, cv2.LINE_8)
    return canvas


def render_face(identity: IdentityParams, view: View, size: int = 112,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Convenience: render one image of `identity` (see FaceRenderer.render)."""
    return FaceRenderer(identity, size).render(view, rng if rng is not None else np.random.default_rng(0))
