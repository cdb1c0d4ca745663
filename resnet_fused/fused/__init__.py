"""Block orchestration shared by the fused backends (docs/design.md sections 3 and 4).

``forward.py`` and ``backward.py`` say which kernels a whole block runs, in which order, with
which prologues and epilogues; the kernels themselves come from a :class:`KernelSet`
(``kernel_set.py``): ``resnet_fused.triton.kernel_set.TRITON`` or
``resnet_fused.cuda.kernel_set.CUDA``. One orchestration, one autograd registration
(``ops/blocks.py``), several kernel implementations.
"""
