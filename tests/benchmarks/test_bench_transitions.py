"""`python -m benchmarks.transitions`: a faded prompt or seed change moves the output in smaller steps."""

from __future__ import annotations

import json

import pytest

from benchmarks.transitions import main, run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seeds", [False, True])
def test_a_fade_spreads_the_jump_of_a_hard_switch(seeds):
    results = run("demo", size=64, frames=(0, 8), before=4, after=4, seeds=seeds)
    hard, faded = results["rows"]
    assert (hard["transition_frames"], faded["transition_frames"]) == (0, 8)
    assert len(hard["changes"]) == 4 + 0 and len(faded["changes"]) == 8 + 4
    # A still input with fixed noise: the settled stream does not move at all.
    assert hard["steady_change"] < 0.01 and faded["steady_change"] < 0.01
    assert hard["largest_change"] > 5  # the styles (or the noise) differ visibly
    # The visible jump is at most half the hard switch's, and the fade is over when it says it is.
    assert faded["largest_change"] < hard["largest_change"] / 2
    assert faded["settled_after"] <= 8 + 2


def test_main_prints_and_writes_the_table(tmp_path, capsys):
    main(["--size", "32", "--frames", "0,2", "--before", "3", "--after", "2", "--json", str(tmp_path / "t.json")])
    results = json.loads((tmp_path / "t.json").read_text())
    assert [row["transition_frames"] for row in results["rows"]] == [0, 2]
    assert results["change"] == {"prompt": ["pencil sketch", "neon edges"]}
    assert "settled after" in capsys.readouterr().out
