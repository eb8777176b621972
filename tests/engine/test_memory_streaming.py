"""Row streaming (`engine.memory.streaming`): a streamed chain equals one call, no layer ever works on
more than `max_rows` rows, and layers that need the whole image are refused."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

from engine.memory.streaming import check_streamable, streamed


def _chain() -> nn.Sequential:
    """Every supported layer kind: 3x3 and 5x5 convolutions, strided ones, nearest upsampling, a 1x1
    convolution, pointwise activations and residual blocks with an identity and a convolution skip."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        AutoencoderTinyBlock(6, 6, "relu"),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False),
        AutoencoderTinyBlock(6, 4, "relu"),
        nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 5, padding=2), nn.Tanh(),
        nn.Conv2d(4, 5, 1), nn.Conv2d(5, 2, 3, stride=2, padding=1),
    ).eval()


@pytest.mark.parametrize("height", [37, 64])
@pytest.mark.parametrize(("band_rows", "max_rows"), [(1, 1), (3, 2), (8, 5), (64, 64)])
def test_streamed_chain_equals_one_call(height, band_rows, max_rows):
    chain = _chain()
    x = torch.randn(2, 3, height, 21)
    with torch.no_grad():
        whole = chain(x * 0.5 + 0.25)
        rows_seen = []
        handles = [block.fuse.register_forward_hook(lambda mod, args, out: rows_seen.append(out.shape[-2]))
                   for block in chain if isinstance(block, AutoencoderTinyBlock)]
        try:
            result = streamed([lambda t: t * 0.5 + 0.25, *chain], x, band_rows, max_rows)
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(result, whole, rtol=0, atol=1e-5)
    assert rows_seen and max(rows_seen) <= max_rows


def test_streamed_chain_refuses_image_wide_layers():
    with pytest.raises(ValueError, match="GroupNorm"):
        check_streamable([nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)])
    with pytest.raises(ValueError, match="bilinear"):
        check_streamable([nn.Upsample(scale_factor=2, mode="bilinear")])
    with pytest.raises(ValueError, match="zero-padded"):
        check_streamable([nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")])
