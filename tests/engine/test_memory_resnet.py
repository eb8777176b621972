"""UNet ResNet blocks in row bands with two-pass GroupNorm (`engine.memory.resnet`): equal to diffusers'
own block at several band sizes and heights, and blocks of another form are not banded."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from engine.memory.resnet import forward_in_bands, supports_bands


def _block(in_channels: int, out_channels: int, **kwargs) -> ResnetBlock2D:
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=16, groups=8,
                          **kwargs).eval()
    with torch.no_grad():
        for parameter in block.parameters():  # away from the init's unit norms and zero biases
            parameter.normal_(0.0, 0.2)
    return block


@pytest.mark.parametrize(("in_channels", "out_channels"), [(48, 16), (16, 16)])
@pytest.mark.parametrize("height", [13, 32])
@pytest.mark.parametrize("band_rows", [1, 4, 64])
def test_banded_resnet_equals_the_block(in_channels, out_channels, height, band_rows):
    block = _block(in_channels, out_channels)
    assert supports_bands(block)
    generator = torch.Generator().manual_seed(height)
    x = torch.randn(2, in_channels, height, 20, generator=generator) * 3 + 1
    temb = torch.randn(2, 16, generator=generator)
    with torch.no_grad():
        reference = block(x, temb)
        output = forward_in_bands(block, x, temb, band_rows)
    torch.testing.assert_close(output, reference, rtol=0, atol=2e-5)


def test_banded_resnet_without_time_embedding_and_with_output_scale():
    block = _block(16, 24, output_scale_factor=2.0)
    block.time_emb_proj = None
    x = torch.randn(1, 16, 21, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(forward_in_bands(block, x, None, 5), block(x, None), rtol=0, atol=2e-5)


@pytest.mark.parametrize("kwargs", [{"up": True}, {"down": True}, {"time_embedding_norm": "scale_shift"}])
def test_other_block_forms_are_not_banded(kwargs):
    assert not supports_bands(_block(16, 16, **kwargs))
