"""Benchmarks and the demo clip, beside the library and not installed with it.

Run from a checkout: `python -m benchmarks.engine | batching | memory | skip | server`, and
`python -m benchmarks.demo_clip` (a synthetic clip through the engine into out/demo.mp4).
"""
