"""Triton kernels registered as torch custom ops (namespace `flashu`), each with a torch reference.

Importing needs neither a GPU nor triton: on CPU tensors every op runs its pure-torch reference.
"""

from triton_kernels.vnorm_topk import vnorm_topk, vnorm_topk_reference

__all__ = ["vnorm_topk", "vnorm_topk_reference"]
