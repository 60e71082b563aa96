"""Five-point face alignment to the ArcFace template."""

from __future__ import annotations

import cv2
import numpy as np

from facekd.checks import whole_number
from facekd.errors import ConfigError, DataError, FacekdError

__all__ = ["ARCFACE_TEMPLATE_112", "align_face", "arcface_template", "estimate_similarity"]

#: ArcFace landmark positions (x, y) in a 112x112 crop: left eye, right eye, nose tip,
#: left mouth corner, right mouth corner ("left" as seen in the image).
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE_112.setflags(write=False)


def arcface_template(size: int | tuple[int, int] = 112) -> np.ndarray:
    """The template for a square crop of `size` pixels: ARCFACE_TEMPLATE_112 * size / 112.

    Note: recent insightface releases place the template differently for sizes that are
    multiples of 128 (scale size/128 plus an 8*size/128 pixel x-shift); facekd always scales.
    """
    return ARCFACE_TEMPLATE_112 * (_square_size(size) / 112.0)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (scale, rotation, translation) taking `src` points onto `dst`.

    Umeyama's closed form (1991), with the reflection fix: the result is always a proper
    rotation, never a mirror. Points are (N, 2) arrays of (x, y), N >= 2. Returns the 2x3
    float64 matrix M with dst ~= M @ [x, y, 1].
    """
    src = _as_points(src, "source points", None)
    dst = _as_points(dst, "destination points", None)
    if src.shape != dst.shape:
        raise FacekdError(
            f"source and destination point sets differ in shape: {src.shape} vs {dst.shape}"
        )
    if len(src) < 2:
        raise FacekdError(f"a similarity needs at least 2 points, got {len(src)}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centered, dst_centered = src - src_mean, dst - dst_mean
    src_variance = (src_centered**2).sum() / len(src)
    if not src_variance > 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise FacekdError("source points are degenerate (they all coincide)")
    covariance = dst_centered.T @ src_centered / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal fit would be a reflection
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float((singular * signs).sum() / src_variance)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(
    image: np.ndarray, landmarks: np.ndarray, size: int | tuple[int, int] = 112
) -> np.ndarray:
    """Warp `image` so its five landmarks land on the ArcFace template of a size x size crop.

    `landmarks` is (5, 2) (x, y) in image pixels, in template order (left eye, right eye,
    nose, left mouth corner, right mouth corner). Only square crops are supported; other
    sizes scale the 112 template by size/112. Bilinear sampling; pixels from outside the
    image are black (constant border 0). Returns an array of the image's dtype and channels.
    """
    crop = _square_size(size)
    points = _as_points(landmarks, "landmarks", 5)
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        shape = getattr(image, "shape", type(image).__name__)
        raise DataError("<array>", f"expected a non-empty HxW or HxWxC image, got {shape}")
    matrix = estimate_similarity(points, arcface_template(crop))
    try:
        warped = cv2.warpAffine(
            image,
            matrix,
            (crop, crop),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
    except cv2.error as exc:
        raise FacekdError(f"cannot warp image of {image.dtype} {image.shape}: {exc}") from None
    if image.ndim == 3 and warped.ndim == 2:  # OpenCV drops a single channel axis
        warped = warped[:, :, None]
    return warped


def _square_size(size: int | tuple[int, int]) -> int:
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"face crops must be square, got size {tuple(size)!r}")
        size = size[0]
    return whole_number(size, "face crop size")


def _as_points(points: np.ndarray, name: str, count: int | None) -> np.ndarray:
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        kind = type(points).__name__
        raise FacekdError(f"{name} must be numeric (x, y) pairs, got {kind}") from None
    expected = f"({count}, 2)" if count else "(N, 2)"
    if array.ndim != 2 or array.shape[1] != 2 or (count is not None and array.shape[0] != count):
        raise FacekdError(f"{name} must have shape {expected}, got {array.shape}")
    if not np.isfinite(array).all():
        raise FacekdError(f"{name} contain NaN or infinite values")
    return array
