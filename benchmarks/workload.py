"""The benchmarks' common workload: the stream configuration every engine-level row runs."""

from __future__ import annotations

from engine.config import EngineConfig

BENCH_T_INDEX_LIST = (0, 16, 32, 45)


def bench_config(model: str, size: int) -> EngineConfig:
    """The benchmark's default: 4 stream-batch steps, RCFG `self` at guidance 1.2, tiny VAE, no filter."""
    return EngineConfig(model=model, width=size, height=size, t_index_list=BENCH_T_INDEX_LIST, cfg_type="self",
                        guidance_scale=1.2, similarity_filter=False)
