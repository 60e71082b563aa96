from __future__ import annotations

import numpy as np
import pytest

from facekd.errors import ConfigError, FacekdError
from facekd.io.align import ARCFACE_TEMPLATE_112, align_face, arcface_template, estimate_similarity


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_template_values_and_order():
    assert ARCFACE_TEMPLATE_112.shape == (5, 2)
    left_eye, right_eye, nose, left_mouth, right_mouth = ARCFACE_TEMPLATE_112
    assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert left_eye[1] < nose[1] < left_mouth[1]
    np.testing.assert_allclose(ARCFACE_TEMPLATE_112[0], [38.2946, 51.6963])
    with pytest.raises(ValueError):
        ARCFACE_TEMPLATE_112[0, 0] = 0.0  # shared constant is read-only
    np.testing.assert_allclose(arcface_template(224), ARCFACE_TEMPLATE_112 * 2)


@pytest.mark.parametrize("seed", range(5))
def test_recovers_a_known_similarity_exactly(seed):
    rng = np.random.default_rng(seed)
    truth = similarity(rng.uniform(0.2, 5), rng.uniform(-np.pi, np.pi), *rng.uniform(-300, 300, 2))
    dst = apply(truth, ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(estimate_similarity(ARCFACE_TEMPLATE_112, dst), truth, atol=1e-6)


def test_reflected_points_still_give_a_proper_rotation():
    mirrored = ARCFACE_TEMPLATE_112 * [-1.0, 1.0]
    matrix = estimate_similarity(ARCFACE_TEMPLATE_112, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_noisy_fit_is_the_least_squares_optimum():
    rng = np.random.default_rng(11)
    src = rng.uniform(0, 100, (12, 2))
    dst = apply(similarity(1.7, 0.4, 5, -3), src) + rng.normal(0, 2.0, src.shape)
    matrix = estimate_similarity(src, dst)
    # Parametrise as [[a, -b, tx], [b, a, ty]]: any small step away raises the squared error.
    a, b, tx, ty = matrix[0, 0], matrix[1, 0], matrix[0, 2], matrix[1, 2]
    assert np.isclose(matrix[1, 1], a) and np.isclose(matrix[0, 1], -b)

    def error(params):
        a, b, tx, ty = params
        return ((apply(np.array([[a, -b, tx], [b, a, ty]]), src) - dst) ** 2).sum()

    best = error([a, b, tx, ty])
    for index in range(4):
        for step in (-1e-3, 1e-3):
            params = [a, b, tx, ty]
            params[index] += step
            assert error(params) > best


def test_estimate_refuses_bad_points():
    with pytest.raises(FacekdError):
        estimate_similarity(np.zeros((5, 2)), ARCFACE_TEMPLATE_112)  # all points coincide
    with pytest.raises(FacekdError):
        estimate_similarity(np.zeros((4, 2)) + np.arange(4)[:, None], ARCFACE_TEMPLATE_112)
    with pytest.raises(FacekdError):
        estimate_similarity(np.ones((1, 2)), np.ones((1, 2)))


def gaussian_dots(shape: tuple[int, int], centres: np.ndarray, sigma: float) -> np.ndarray:
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    image = np.zeros(shape)
    for cx, cy in centres:
        image += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def dot_centres(image: np.ndarray, expected: np.ndarray, radius: int) -> np.ndarray:
    """Intensity-weighted centroid in a window around each expected position."""
    y, x = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    found = []
    for ex, ey in expected:
        window = ((x - ex) ** 2 + (y - ey) ** 2 <= radius**2) * image.astype(np.float64)
        found.append([(window * x).sum() / window.sum(), (window * y).sum() / window.sum()])
    return np.array(found)


@pytest.mark.parametrize("size", [112, 224])
def test_align_puts_landmarks_on_the_template(size):
    rng = np.random.default_rng(size)
    scale = 2.5
    face_to_image = similarity(scale, rng.uniform(-0.6, 0.6), 120, 90)
    landmarks = apply(face_to_image, ARCFACE_TEMPLATE_112)
    dots = gaussian_dots((420, 440), landmarks, sigma=1.5 * scale)
    image = np.dstack([dots, dots // 2, np.zeros_like(dots)])

    aligned = align_face(image, landmarks, size)
    assert aligned.shape == (size, size, 3) and aligned.dtype == np.uint8
    template = arcface_template(size)
    found = dot_centres(aligned[:, :, 0], template, radius=size // 16)
    assert np.abs(found - template).max() < 1.0
    # The other channels went through the same warp.
    np.testing.assert_allclose(aligned[:, :, 1].astype(int), aligned[:, :, 0] // 2, atol=1)


def test_align_fills_outside_with_black_and_keeps_gray_layout():
    image = np.full((60, 60), 200, np.uint8)
    landmarks = ARCFACE_TEMPLATE_112 + 0.0  # identity warp: the image covers the crop's top-left
    aligned = align_face(image, landmarks, (112, 112))
    assert aligned.shape == (112, 112)
    assert (aligned[:58, :58] == 200).all()
    assert (aligned[62:, :] == 0).all() and (aligned[:, 62:] == 0).all()  # black border


@pytest.mark.parametrize(
    "landmarks",
    [
        np.zeros((4, 2)),
        np.zeros((5, 3)),
        np.zeros(10),
        np.full((5, 2), np.nan),
        np.where(np.eye(5, 2) > 0, np.inf, 10.0),
        [["a", "b"]] * 5,
        np.full((5, 2), 7.0),  # coincident points
    ],
    ids=["four-points", "three-columns", "flat", "nan", "inf", "text", "coincident"],
)
def test_align_refuses_bad_landmarks(landmarks):
    with pytest.raises(FacekdError):
        align_face(np.zeros((50, 50, 3), np.uint8), landmarks)


def test_align_refuses_bad_sizes_and_images():
    landmarks = ARCFACE_TEMPLATE_112
    for size in [(112, 96), 0, -5, 112.0, True]:
        with pytest.raises(ConfigError):
            align_face(np.zeros((50, 50, 3), np.uint8), landmarks, size)
    for image in [np.zeros((0, 5, 3), np.uint8), np.zeros(5, np.uint8), "image"]:
        with pytest.raises(FacekdError):
            align_face(image, landmarks)
