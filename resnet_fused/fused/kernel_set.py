"""An alias of :mod:`resnet_fused.kernel_set` (the kernel contract) for importers that name it here."""
from ..kernel_set import *  # noqa: F401,F403
from ..kernel_set import __all__  # noqa: F401
