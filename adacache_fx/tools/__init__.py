"""adacache-fx tooling: the ``adacache-fx`` command line, demo, benchmarks, reference model, metrics, fixtures.

The core (``adacache_fx``) never imports this package; it needs the ``tools`` extra (diffusers, safetensors,
matplotlib, pillow, pytorch-msssim) and, for ``adacache-fx bench``, the ``bench`` extra.
"""
