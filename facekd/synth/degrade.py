r"""Real image degradations at a severity in [0, 1], and the synthetic MOS they earn.

Degradations (applied to any RGB uint8 face image; `occlusion` and `crop` use its 5 landmarks),
in the order `apply_degradations` runs them, which is a plausible capture chain:

=========  ==========================================================================
pose       render-time only: yaw up to 60 deg, roll up to 35, pitch up to 25 (`pose_view`)
occlusion  a hand / bar / scarf / hat / patch over one face region (eyes, side, mouth,
           lower face, forehead); its extent grows with severity
crop       the face is shifted out of the frame by up to 45 % of the side (black or
           smeared border)
exposure   under (gain 1-0.8s, gamma 1+0.6s) or over (gain 1+2.2s, gamma 1-0.3s), clipped
noise      signal-dependent sensor noise, std 0.16 s at mid grey (luma + colour mix)
blur       Gaussian, sigma = 4 s px (scaled by size/112)
motion     line kernel of length 1 + 16 s px at a random angle
downscale  down by 1 + 5 s (INTER_AREA), back up (linear or cubic)
jpeg       a real cv2 JPEG encode/decode at quality round(95 - 90 s)
=========  ==========================================================================

Blur, motion and downscale come after noise, so they really smooth it.

MOS (`mos_from_severities`). With s_i the severities, each degradation's perceptual
impairment is the normalised saturating curve

    D(s; a, g) = (1 - exp(-a * s**g)) / (1 - exp(-a))          (D(0)=0, D(1)=1, increasing)

Loss of sharpness combines blur, motion and downscale in quadrature (like blur radii), so they
saturate each other instead of adding:

    e       = min(1, sqrt(s_blur**2 + (0.9 s_motion)**2 + (0.95 s_downscale)**2))
    d_sharp = D(e; 3.0, 1.4)

Noise is masked by the low-pass filtering applied after it:

    d_noise = D(s_noise; 3.0, 1.3) * (1 - 0.7 * e**0.8)

the others are single curves:

    d_jpeg = D(s_jpeg; 2.5, 1.6)   d_exposure = D(s_exposure; 2.2, 1.5)
    d_occ  = D(s_occlusion; 2.0, 1.0)   d_pose = D(s_pose; 2.0, 1.6)   d_crop = D(s_crop; 2.0, 1.2)

and they combine multiplicatively into a quality in [0, 1]:

    Q = (1 - 0.85 d_sharp) (1 - 0.55 d_noise) (1 - 0.6 d_jpeg) (1 - 0.65 d_exposure)
        (1 - w_region d_occ) (1 - 0.6 d_pose) (1 - 0.7 d_crop)

where the occlusion weight depends on what is covered: eyes 0.9, side 0.55, mouth 0.5,
lower face 0.45, forehead 0.3. Q maps to the MOS scale by a normalised logistic,

    L(Q) = (sig(k (Q - q0)) - sig(-k q0)) / (sig(k (1 - q0)) - sig(-k q0)),  k = 6, q0 = 0.45
    MOS_clean = 1.15 + 3.7 L(Q)                                   (in [1.15, 4.85])
    MOS = clip(MOS_clean + N(0, 0.12**2), 1, 5)                   (label noise)

`sample_severities` picks a target MOS uniformly in [1.2, 4.85] (5 % of images pristine),
a random set of degradations, and scales their severities together until MOS_clean meets it,
so the MOS distribution is close to uniform and several degradations at once are common.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = [
    "DEGRADATIONS",
    "IMAGE_DEGRADATIONS",
    "LABEL_NOISE",
    "OCCLUSION_REGIONS",
    "Degradation",
    "apply_degradations",
    "blur",
    "crop_shift",
    "downscale",
    "draw_occluder",
    "exposure",
    "jpeg",
    "motion_blur",
    "mos_from_severities",
    "noise",
    "occlude",
    "pose_view",
    "quality_score",
    "sample_severities",
]

#: Every degradation name, in the order they are applied.
DEGRADATIONS = ("pose", "occlusion", "crop", "exposure", "noise", "blur", "motion", "downscale", "jpeg")
#: The ones applied to a finished image (pose is drawn by the renderer).
IMAGE_DEGRADATIONS = DEGRADATIONS[1:]
#: Occlusion regions and how much covering them hurts the MOS.
OCCLUSION_REGIONS = {"eyes": 0.9, "side": 0.55, "mouth": 0.5, "lower": 0.45, "forehead": 0.3}
#: Standard deviation of the Gaussian label noise on the MOS.
LABEL_NOISE = 0.12

_CURVES = {"sharp": (3.0, 1.4), "noise": (3.0, 1.3), "jpeg": (2.5, 1.6), "exposure": (2.2, 1.5),
           "occlusion": (2.0, 1.0), "pose": (2.0, 1.6), "crop": (2.0, 1.2)}
_WEIGHTS = {"sharp": 0.85, "noise": 0.55, "jpeg": 0.6, "exposure": 0.65, "pose": 0.6, "crop": 0.7}
_MOS_LOW, _MOS_SPAN, _K, _Q0 = 1.15, 3.7, 6.0, 0.45


@dataclass
class Degradation:
    """Severities of one image (0 = absent) plus the random choices that make them concrete."""

    severities: dict = field(default_factory=lambda: {name: 0.0 for name in DEGRADATIONS})
    region: str = "eyes"  # occlusion region

    def active(self) -> list[str]:
        return [name for name in DEGRADATIONS if self.severities.get(name, 0.0) > 0]


# ---------------------------------------------------------------------------------------------
# MOS


def _curve(s: float, a: float, g: float) -> float:
    s = min(max(float(s), 0.0), 1.0)
    return (1.0 - math.exp(-a * s**g)) / (1.0 - math.exp(-a))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def quality_score(severities: dict, region: str = "eyes") -> float:
    """The noiseless quality Q in [0, 1] (see the module docstring)."""
    s = {name: float(severities.get(name, 0.0)) for name in DEGRADATIONS}
    e = min(1.0, math.sqrt(s["blur"] ** 2 + (0.9 * s["motion"]) ** 2 + (0.95 * s["downscale"]) ** 2))
    d = {
        "sharp": _curve(e, *_CURVES["sharp"]),
        "noise": _curve(s["noise"], *_CURVES["noise"]) * (1.0 - 0.7 * e**0.8),
        "jpeg": _curve(s["jpeg"], *_CURVES["jpeg"]),
        "exposure": _curve(s["exposure"], *_CURVES["exposure"]),
        "pose": _curve(s["pose"], *_CURVES["pose"]),
        "crop": _curve(s["crop"], *_CURVES["crop"]),
    }
    q = 1.0
    for name, value in d.items():
        q *= 1.0 - _WEIGHTS[name] * value
    q *= 1.0 - OCCLUSION_REGIONS[region] * _curve(s["occlusion"], *_CURVES["occlusion"])
    return q


def mos_from_severities(severities: dict, region: str = "eyes",
                        rng: np.random.Generator | None = None, noise: float = LABEL_NOISE) -> float:
    """MOS in [1, 5]: the logistic map of `quality_score`, plus N(0, noise^2) when `rng` is given."""
    q = quality_score(severities, region)
    lo, hi = _sigmoid(-_K * _Q0), _sigmoid(_K * (1.0 - _Q0))
    mos = _MOS_LOW + _MOS_SPAN * (_sigmoid(_K * (q - _Q0)) - lo) / (hi - lo)
    if rng is not None and noise > 0:
        mos += float(rng.normal(0.0, noise))
    return float(min(5.0, max(1.0, mos)))


def sample_severities(rng: np.random.Generator, allow: tuple[str, ...] = DEGRADATIONS) -> Degradation:
    """Random degradations whose noiseless MOS is close to a target drawn uniformly."""
    deg = Degradation(region=list(OCCLUSION_REGIONS)[int(rng.integers(0, len(OCCLUSION_REGIONS)))])
    if rng.random() < 0.05:
        return deg
    target = float(rng.uniform(1.2, 4.85))
    badness = (4.85 - target) / 3.65
    names = list(allow)
    order = [names[i] for i in rng.permutation(len(names))]
    count = 1 + int(rng.binomial(3, 0.15 + 0.45 * badness))
    mix = rng.uniform(0.35, 1.0, len(order))
    while True:
        chosen = order[:count]
        weights = {name: float(mix[i]) for i, name in enumerate(chosen)}
        top = max(weights.values())

        def at(lam: float) -> dict:
            return {name: min(1.0, lam * w / top) for name, w in weights.items()}

        if mos_from_severities(at(1.0), deg.region) <= target or count >= len(order):
            break
        count += 1
    lo, hi = 0.0, 1.0
    if mos_from_severities(at(1.0), deg.region) < target:
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if mos_from_severities(at(mid), deg.region) > target:
                lo = mid
            else:
                hi = mid
    for name, value in at(hi).items():
        deg.severities[name] = round(value, 4)
    return deg


# ---------------------------------------------------------------------------------------------
# Degradations on images (RGB uint8 in, RGB uint8 out)


def _k(image: np.ndarray) -> float:
    return image.shape[0] / 112.0


def blur(image: np.ndarray, severity: float) -> np.ndarray:
    """Gaussian blur with sigma 4*severity px at 112 px."""
    sigma = 4.0 * severity * _k(image)
    return image.copy() if sigma < 0.05 else cv2.GaussianBlur(image, (0, 0), sigma)


def motion_blur(image: np.ndarray, severity: float, angle: float) -> np.ndarray:
    """Line-kernel blur of length 1 + 16*severity px (at 112 px) along `angle` (radians)."""
    length = (1.0 + 16.0 * severity) * _k(image)
    if length < 1.5:
        return image.copy()
    size = int(math.ceil(length)) | 1
    kernel = np.zeros((size * 4, size * 4), np.float32)
    c = (size * 4 - 1) / 2.0
    dx, dy = math.cos(angle) * (length * 2 - 2), math.sin(angle) * (length * 2 - 2)
    cv2.line(kernel, (int(round((c - dx) * 16)), int(round((c - dy) * 16))),
             (int(round((c + dx) * 16)), int(round((c + dy) * 16))), 1.0, 4, cv2.LINE_AA, 4)
    kernel = cv2.resize(kernel, (size, size), interpolation=cv2.INTER_AREA)
    kernel /= kernel.sum()
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT)


def noise(image: np.ndarray, severity: float, rng: np.random.Generator, colour: float = 0.5) -> np.ndarray:
    """Signal-dependent sensor noise, std 0.16*severity at mid grey; `colour` in [0,1] mixes
    luma noise (same in all channels) with independent per-channel noise."""
    sigma = 0.16 * severity
    if sigma <= 0:
        return image.copy()
    x = image.astype(np.float32) * (1.0 / 255.0)
    h, w = image.shape[:2]
    n = math.sqrt(1 - colour) * rng.standard_normal((h, w, 1), dtype=np.float32) \
        + math.sqrt(colour) * rng.standard_normal((h, w, 3), dtype=np.float32)
    std = sigma * (0.35 + 0.65 * np.sqrt(x * 2.0))
    return np.clip((x + std * n) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, severity: float) -> np.ndarray:
    """Real JPEG round trip at quality round(95 - 90*severity)."""
    quality = int(round(95 - 90 * min(max(severity, 0.0), 1.0)))
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - cv2 always encodes uint8 RGB
        raise RuntimeError("JPEG encoding failed")
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


def downscale(image: np.ndarray, severity: float, cubic: bool = False) -> np.ndarray:
    """Resize down by 1 + 5*severity with INTER_AREA, then back up (linear or cubic)."""
    factor = 1.0 + 5.0 * severity
    h, w = image.shape[:2]
    small = (max(2, int(round(w / factor))), max(2, int(round(h / factor))))
    if small == (w, h):
        return image.copy()
    down = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
    return cv2.resize(down, (w, h), interpolation=cv2.INTER_CUBIC if cubic else cv2.INTER_LINEAR)


def exposure(image: np.ndarray, severity: float, over: bool) -> np.ndarray:
    """Under-exposure (gain 1-0.8s, gamma 1+0.6s) or over-exposure (gain 1+2.2s, gamma 1-0.3s)."""
    gain, gamma = (1 + 2.2 * severity, 1 - 0.3 * severity) if over else (1 - 0.8 * severity, 1 + 0.6 * severity)
    lut = np.clip(255.0 * np.clip(gain * np.arange(256) / 255.0, 0, 1) ** gamma + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(image, lut)


def crop_shift(image: np.ndarray, severity: float, angle: float, black: bool = True) -> np.ndarray:
    """Shift the content by 0.45*severity of the side along `angle`, as a bad detector crop
    that cuts part of the face; the uncovered border is black or smeared (replicated)."""
    h, w = image.shape[:2]
    dist = 0.45 * severity * w
    m = np.float32([[1, 0, math.cos(angle) * dist], [0, 1, math.sin(angle) * dist]])
    border = cv2.BORDER_CONSTANT if black else cv2.BORDER_REPLICATE
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=(0, 0, 0))


def _face_frame(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Origin (between the eyes), unit right, unit down and eye distance from 5 landmarks."""
    lm = np.asarray(landmarks, dtype=np.float64)
    right = lm[1] - lm[0]
    dist = float(np.hypot(*right)) or 1.0
    right = right / dist
    down = np.array([-right[1], right[0]])
    return (lm[0] + lm[1]) / 2, right, down, dist


def _region_box(region: str, severity: float, landmarks: np.ndarray, side: int) -> tuple[np.ndarray, float, float]:
    """Centre (in face frame units of eye distance), half width, half height of a region patch."""
    lm = np.asarray(landmarks, dtype=np.float64)
    origin, right, down, d = _face_frame(lm)
    to_face = lambda p: np.array([np.dot(p - origin, right), np.dot(p - origin, down)]) / d  # noqa: E731
    nose, mouth = to_face(lm[2]), (to_face(lm[3]) + to_face(lm[4])) / 2
    s = min(max(severity, 0.0), 1.0)
    if region == "eyes":
        half_w = 0.3 + 0.75 * s
        cx = side * max(0.0, 0.5 - half_w + 0.15)
        return np.array([cx, 0.0]), half_w, 0.18 + 0.22 * s
    if region == "mouth":
        return np.array([0.0, mouth[1]]), 0.25 + 0.55 * s, 0.12 + 0.22 * s
    if region == "lower":
        top = mouth[1] + 0.45 - s * (mouth[1] + 0.45 - nose[1] + 0.1)
        return np.array([0.0, top + 1.0]), 1.4, 1.0
    if region == "forehead":
        bottom = -1.1 + s * 0.95
        return np.array([0.0, bottom - 1.0]), 1.5, 1.0
    if region == "side":
        inner = side * (1.0 - 1.25 * s)
        return np.array([inner + side * 1.0, mouth[1] * 0.4]), 1.0, 1.6
    raise ValueError(f"unknown occlusion region {region!r}")


def occlude(image: np.ndarray, landmarks: np.ndarray, severity: float, rng: np.random.Generator,
            region: str = "eyes", style: str | None = None) -> np.ndarray:
    """Cover one face `region` with a patch whose extent grows with `severity`. `style` is
    "hand", "bar", "scarf", "hat" or "patch" (default: one that fits the region)."""
    if severity <= 0:
        return image.copy()
    side = 1 if rng.random() < 0.5 else -1
    if style is None:
        options = {"eyes": ("bar", "hand", "patch"), "mouth": ("hand", "bar", "patch"), "lower": ("scarf",),
                   "forehead": ("hat",), "side": ("hand", "patch")}[region]
        style = options[int(rng.integers(0, len(options)))]
    centre, half_w, half_h = _region_box(region, severity, landmarks, side)
    return _paint(image, landmarks, centre, half_w, half_h, style, rng)


def _paint(image: np.ndarray, landmarks: np.ndarray, centre: np.ndarray, half_w: float, half_h: float,
           style: str, rng: np.random.Generator) -> np.ndarray:
    origin, right, down, d = _face_frame(landmarks)
    to_img = lambda q: origin + d * (q[..., :1] * right + q[..., 1:2] * down)  # noqa: E731
    out = image.copy()
    scale = 16.0
    if style == "hand":
        skin = (np.array([0.30, 0.18, 0.11]) + rng.uniform(0, 1) * np.array([0.63, 0.60, 0.57])) * 255
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        palm = np.stack([centre[0] + half_w * np.cos(t), centre[1] + half_h * np.sin(t)], 1)
        pts = np.round(to_img(palm) * scale).astype(np.int32)
        cv2.fillPoly(out, [pts], tuple(float(c) for c in skin), cv2.LINE_AA, 4)
        for i in range(4):  # finger gaps
            x = centre[0] - half_w * 0.6 + i * half_w * 0.4
            line = np.array([[x, centre[1] - half_h * 0.9], [x, centre[1] + half_h * 0.2]])
            pts = np.round(to_img(line) * scale).astype(np.int32)
            cv2.polylines(out, [pts], False, tuple(float(c) * 0.75 for c in skin), max(1, int(d * 0.03)),
                          cv2.LINE_AA, 4)
        return out
    colour = rng.uniform(0, 255, 3)
    box = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * (half_w, half_h) + centre
    if style == "hat":
        bottom, cx = centre[1] + half_h, centre[0]
        t = np.linspace(np.pi, 2 * np.pi, 20)
        crown = np.stack([cx + half_w * 0.7 * np.cos(t), bottom - 0.15 + 1.8 * half_h * np.sin(t)], 1)
        brim = np.array([[cx + half_w * 0.9, bottom - 0.15], [cx + half_w * 0.9, bottom],
                         [cx - half_w * 0.9, bottom], [cx - half_w * 0.9, bottom - 0.15]])
        box = np.concatenate([crown, brim])
    pts = np.round(to_img(box) * scale).astype(np.int32)
    cv2.fillPoly(out, [pts], tuple(float(c) for c in colour), cv2.LINE_AA, 4)
    if style in ("scarf", "patch"):
        mask = np.zeros(out.shape[:2], np.uint8)
        cv2.fillPoly(mask, [pts], 255, cv2.LINE_8, 4)
        if style == "scarf":
            stripe = tuple(float(c) for c in rng.uniform(0, 255, 3))
            layer = out.copy()
            for k in range(-6, 7):
                y = centre[1] - half_h + (k + 6) * half_h / 6
                line = np.array([[centre[0] - half_w, y], [centre[0] + half_w, y + 0.2]])
                cv2.polylines(layer, [np.round(to_img(line) * scale).astype(np.int32)], False, stripe,
                              max(1, int(d * 0.06)), cv2.LINE_AA, 4)
        else:
            h, w = out.shape[:2]
            small = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
            layer = np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
        cv2.copyTo(layer, mask, out)
    return out


def draw_occluder(image: np.ndarray, landmarks: np.ndarray, kind: str, size: float,
                  rng: np.random.Generator) -> np.ndarray:
    """A nuisance occluder (`View.occluder`): "hand", "scarf", "hat" or "patch" of extent `size`."""
    region = {"hand": ("mouth", "side", "eyes"), "scarf": ("lower",), "hat": ("forehead",),
              "patch": ("mouth", "side", "eyes", "lower")}[kind]
    chosen = region[int(rng.integers(0, len(region)))]
    style = "patch" if kind == "patch" else kind
    return occlude(image, landmarks, size, rng, region=chosen, style=style)


def pose_view(view, severity: float, rng: np.random.Generator):
    """A `View` turned to an extreme pose: yaw to 60 deg, roll to 35, pitch to 25 (random signs)."""
    s = min(max(severity, 0.0), 1.0)
    sign = lambda: 1.0 if rng.random() < 0.5 else -1.0  # noqa: E731
    return view.replace(yaw=sign() * 60.0 * s * float(rng.uniform(0.8, 1.0)) + view.yaw * (1 - s),
                        roll=sign() * 35.0 * s * float(rng.uniform(0.3, 1.0)) + view.roll * (1 - s),
                        pitch=sign() * 25.0 * s * float(rng.uniform(0.0, 1.0)) + view.pitch * (1 - s))


def apply_degradations(image: np.ndarray, landmarks: np.ndarray, degradation: Degradation,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply every image degradation with a severity > 0, in the order of DEGRADATIONS.
    Returns the image and the landmarks moved with it (a crop shifts them).
    (`pose` must be applied when rendering: see `pose_view`.)"""
    s = degradation.severities
    out = image
    landmarks = np.asarray(landmarks, dtype=np.float32)
    # Every random choice is drawn up front, so each one is fixed per image whatever is active.
    angle_crop, black = float(rng.uniform(0, 2 * np.pi)), bool(rng.random() < 0.6)
    over, colour = bool(rng.random() < 0.5), float(rng.uniform(0.0, 1.0))
    angle_motion, cubic = float(rng.uniform(0, np.pi)), bool(rng.random() < 0.5)
    occ_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
    noise_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
    if s.get("occlusion", 0) > 0:
        out = occlude(out, landmarks, s["occlusion"], occ_rng, region=degradation.region)
    if s.get("crop", 0) > 0:
        out = crop_shift(out, s["crop"], angle_crop, black)
        dist = 0.45 * s["crop"] * out.shape[1]
        landmarks = landmarks + np.float32([math.cos(angle_crop) * dist, math.sin(angle_crop) * dist])
    if s.get("exposure", 0) > 0:
        out = exposure(out, s["exposure"], over)
    if s.get("noise", 0) > 0:
        out = noise(out, s["noise"], noise_rng, colour)
    if s.get("blur", 0) > 0:
        out = blur(out, s["blur"])
    if s.get("motion", 0) > 0:
        out = motion_blur(out, s["motion"], angle_motion)
    if s.get("downscale", 0) > 0:
        out = downscale(out, s["downscale"], cubic)
    if s.get("jpeg", 0) > 0:
        out = jpeg(out, s["jpeg"])
    return (out if out is not image else image.copy()), landmarks
