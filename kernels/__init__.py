"""Triton kernels, each in its own folder beside its PyTorch reference (``<op>/reference.py``,
``<op>/triton.py``, ``<op>/__init__.py`` dispatching to Triton on CUDA and the reference
elsewhere). Imports nothing from ``vgen_core`` or ``pipelines``. The kernels themselves (LFQ,
GRAT, ternary linear) land with the kernels issue."""
