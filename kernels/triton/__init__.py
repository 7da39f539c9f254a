"""Triton kernels (installed as flatfast.kernels). Importing this package requires triton; flatfast imports
it lazily. Under TRITON_INTERPRET=1 (set before import) the kernels run on CPU tensors, for testing."""
from flatfast.kernels.nngp_triton import nngp_kernel_triton  # noqa: F401
from flatfast.kernels.mlp_hvp_triton import masked_matmul_triton  # noqa: F401
