"""The benchmarks' common workload: the configuration every engine-level row runs."""

from __future__ import annotations

from engine.config import LoadConfig, StreamConfig

BENCH_T_INDEX_LIST = (0, 16, 32, 45)


def bench_load(model: str) -> LoadConfig:
    """The benchmarks' load-time settings: `model` on the CPU in float32 (where the diffusers baseline runs), on
    the eager backend, the rows' reference (other backends, `auto` included, are rows of their own)."""
    return LoadConfig(model=model, device="cpu", dtype="float32", backend="eager")


def bench_stream(width: int, height: int | None = None) -> StreamConfig:
    """The benchmark's stream (`height` defaults to `width`): 4 stream-batch steps, RCFG `self` at guidance 1.2,
    no similarity filter."""
    return StreamConfig(width=width, height=width if height is None else height, t_index_list=BENCH_T_INDEX_LIST,
                        cfg_type="self", guidance_scale=1.2, similarity_filter=False)
