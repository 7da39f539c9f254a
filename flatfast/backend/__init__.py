"""The backends every part runs on: the array-module seam (numpy on the CPU, cupy on a GPU), the lazy loaders of
the native modules (the C++ core, the CUDA C++ module, the Triton kernels), and the one dispatch mechanism that
picks a backend for each primitive. Nothing here knows the parts above it; they register their implementations.
Internal: the public names are ``flatfast.NAME``."""
