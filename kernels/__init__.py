"""Triton kernels of prmkd-dist, imported as ``prmkd_dist.kernels`` (one op per file).

Each kernel has a PyTorch reference (``prmkd_dist.distill.reference``) that defines its semantics;
tests compare them. On CPU-only machines the kernels run under ``TRITON_INTERPRET=1`` (tests do this)."""
