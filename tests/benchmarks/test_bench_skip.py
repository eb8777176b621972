"""The skip-policy benchmark rows: their JSON shape and argument parsing (tiny model, few frames)."""

from __future__ import annotations

import itertools
import json

import pytest

from benchmarks import skip as bench
from benchmarks.engine import main as engine_main
from engine.config import StreamConfig

pytestmark = pytest.mark.slow


def test_rows_cover_every_policy_and_motion_category(tiny_engine):
    config = StreamConfig(width=32, height=32, similarity_filter=False, t_index_list=(16, 32, 45))
    # A clock that ticks once per reading: every timed call lasts one tick, so the speed-up of engines timed
    # on the same frames is exactly 1 (it is not if one engine's priming frame is timed, or a frame is missed).
    results = bench.run(tiny_engine, config, ["rehash", "adacache"], frames=4, clock=itertools.count().__next__)
    assert set(results) == {"rehash", "adacache"}
    for categories in results.values():
        assert all(any(word in name for name in categories) for word in ("static", "slow", "fast", "cut"))
        for row in categories.values():
            assert set(row) == {"speedup", "psnr", "psnr_min", "ssim", "skip_rate"}
            assert row["speedup"] == 1.0 and 0 < row["skip_rate"] < 1
            assert 20 < row["psnr_min"] <= row["psnr"] <= bench.PSNR_CAP and 0.9 < row["ssim"] <= 1.0


def test_overrides_parse_to_the_field_types():
    overrides = bench.parse_overrides(["skip_cut_threshold=0.05", "rehash_interval=4",
                                       "adacache_codebook=((0.1, 3), (1.0, 1))"])
    assert overrides == {"skip_cut_threshold": 0.05, "rehash_interval": 4, "adacache_codebook": ((0.1, 3), (1.0, 1))}
    with pytest.raises(ValueError, match="not a skip-policy parameter"):
        bench.parse_overrides(["width=64"])
    with pytest.raises(ValueError, match="not a skip-policy parameter"):
        bench.parse_overrides(["cut_threshold=0.1"])  # a `SkipSettings` attribute, not its flat parameter name


def test_command_writes_the_rows_and_their_settings(tmp_path, capsys):
    bench.main(["--policies", "rehash", "--size", "32", "--frames", "3", "--skip-param", "rehash_interval=2",
                "--json", str(tmp_path / "skip.json")])
    results = json.loads((tmp_path / "skip.json").read_text())
    assert (results["model"], results["size"], results["frames"]) == ("tiny", 32, 3)
    assert (results["width"], results["height"]) == (32, 32)
    assert results["skip_params"] == {"rehash_interval": 2}
    assert set(results["skip_policies"]) == {"rehash"} and len(results["skip_policies"]["rehash"]) == 4
    assert "rehash" in capsys.readouterr().out


@pytest.mark.parametrize("size_flags", [["--width", "32", "--height", "48"], ["--size", "48", "--width", "32"]])
def test_engine_command_measures_skip_policies_on_non_square_frames(tmp_path, size_flags):
    # `--width` and `--height` each default to `--size`.
    engine_main(["--skip", "adacache", *size_flags, "--frames", "3", "--json", str(tmp_path / "skip.json")])
    results = json.loads((tmp_path / "skip.json").read_text())
    assert (results["width"], results["height"], results["frames"]) == (32, 48, 3)
    assert set(results["skip_policies"]) == {"adacache"} and len(results["skip_policies"]["adacache"]) == 4
