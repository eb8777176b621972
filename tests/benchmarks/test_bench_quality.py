"""PSNR and SSIM on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.quality import mse, psnr_of_mse, ssim

pytestmark = pytest.mark.slow


def test_psnr_of_a_uniform_offset_is_exact():
    image = torch.full((3, 16, 16), 0.5)
    assert psnr_of_mse(mse(image, image)) == math.inf
    assert psnr_of_mse(mse(image + 0.1, image)) == pytest.approx(20.0)
    assert psnr_of_mse(mse(image + 0.01, image)) == pytest.approx(40.0)


def test_clip_psnr_pools_the_squared_error_of_every_frame():
    image = torch.full((3, 16, 16), 0.5)
    # One identical frame and one 20 dB frame: the clip is at 23 dB, not at the mean of inf and 20.
    errors = [mse(image, image), mse(image + 0.1, image)]
    assert errors == [0.0, pytest.approx(0.01)]
    assert psnr_of_mse(sum(errors) / 2) == pytest.approx(20 + 10 * math.log10(2))


def test_ssim_of_constant_images_has_the_closed_form():
    # No variance anywhere: SSIM reduces to the luminance term (2ab + C1)/(a² + b² + C1).
    a, b, c1 = 0.3, 0.6, 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(torch.full((3, 24, 24), a), torch.full((3, 24, 24), b)) == pytest.approx(expected, rel=1e-9)


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 32, 32, generator=generator)
    noise = torch.randn(3, 32, 32, generator=generator)
    scores = [ssim((image + level * noise).clamp(0, 1), image) for level in (0.0, 0.02, 0.1, 0.3)]
    assert scores[0] == pytest.approx(1.0)
    assert scores == sorted(scores, reverse=True) and scores[-1] < 0.8


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(3, 40, 40, generator=generator)
    other = (image + 0.1 * torch.randn(3, 40, 40, generator=generator)).clamp(0, 1)
    expected = metrics.structural_similarity(image.numpy(), other.numpy(), gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=1.0, channel_axis=0)
    assert ssim(other, image) == pytest.approx(float(expected), abs=1e-6)


def test_uniform_window_ssim_matches_scikit_image_defaults_on_uint8_images():
    metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 40, 48), generator=generator, dtype=torch.uint8)
    other = (image.float() + 20 * torch.randn(3, 40, 48, generator=generator)).clamp(0, 255).to(torch.uint8)
    expected = metrics.structural_similarity(image.permute(1, 2, 0).numpy(), other.permute(1, 2, 0).numpy(),
                                             channel_axis=2, data_range=255)
    assert ssim(other, image, data_range=255, window="uniform") == pytest.approx(float(expected), abs=1e-9)
    assert ssim(other, image, data_range=255, window="uniform") != pytest.approx(ssim(other, image, data_range=255))


def test_unknown_ssim_window_is_refused():
    with pytest.raises(ValueError, match="`window`"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), window="box")


def test_psnr_of_uint8_images_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    generator = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 16, 16), generator=generator, dtype=torch.uint8)
    other = torch.randint(0, 256, (3, 16, 16), generator=generator, dtype=torch.uint8)
    expected = cv2.PSNR(image.permute(1, 2, 0).numpy(), other.permute(1, 2, 0).numpy())
    assert psnr_of_mse(mse(other, image), data_range=255) == pytest.approx(expected, rel=1e-12)
