"""Block orchestration shared by the fused backends (docs/design.md sections 3 and 4).

``chain.py`` is the link every block repeats, conv(relu(bn(y))) forward and backward, written
once; ``forward.py`` and ``backward.py`` (pre-activation) and ``postact.py`` (post-activation)
supply each kind's two ends and say which kernels a whole block runs, in which order, with which
prologues and epilogues; the kernels come
from the :class:`~resnet_fused.kernel_set.KernelSet` the op layer hands in. Nothing here names a
backend or calls the oracle.
"""
