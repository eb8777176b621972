"""The default skip thresholds on the trained `demo` model: reuse where frames change little, full computes
on most fast-motion frames and on a cut (the random `tiny` VAE compresses scene changes too much to check this)."""

from __future__ import annotations

import pytest

from benchmarks.clips import synthetic_clip
from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.codec import rgb_to_tensor

SIZE = 64
FRAMES = 12
CUT = FRAMES // 2  # synthetic_clip's hard cut


@pytest.fixture(scope="module")
def demo_engine():
    return Engine.load(LoadConfig(model="demo", backend="eager"))


def slot_decisions(demo: Engine, policy: str, kind: str) -> list[list[bool]]:
    """Per frame, which slots the policy computed in full, at the engine's default thresholds."""
    engine = StreamEngine(demo, StreamConfig(width=SIZE, height=SIZE, similarity_filter=False, skip_policy=policy))
    decisions = []
    for frame in synthetic_clip(kind, FRAMES, SIZE, SIZE):
        engine(rgb_to_tensor(frame))
        decisions.append(engine.skip_policy.last_full.tolist())
    return decisions


@pytest.mark.parametrize("policy", ["rehash", "adacache"])
def test_default_thresholds_on_the_trained_model(demo_engine, policy):
    static = [full for frame in slot_decisions(demo_engine, policy, "static")[2:] for full in frame]
    slow = [full for frame in slot_decisions(demo_engine, policy, "slow_pan")[2:] for full in frame]
    fast = [frame[0] for frame in slot_decisions(demo_engine, policy, "fast_motion")[1:]]
    cut = slot_decisions(demo_engine, policy, "hard_cut")
    assert static.count(False) >= len(static) // 2, f"a still scene should mostly reuse: {static}"
    assert 4 <= slow.count(False) < len(slow) - 4, f"a slow pan should reuse some slot rows, not all: {slow}"
    # A frame whose motion happens to change its latent less than τ_cut may reuse, but most must not.
    assert fast.count(True) >= 3 * len(fast) // 4, f"fast motion should mostly be computed in full: {fast}"
    assert cut[CUT][0] and cut[CUT + 1][1], "the cut frame must be computed in full at every slot it passes"
