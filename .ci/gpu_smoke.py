"""First thing .ci/gpu runs after the build: which cuSOLVER EP loaded, and one log P(f) on the GPU against the
CPU, so that a broken device path shows its own traceback before the test suite and benches start."""
import time

import numpy as np
import torch

import flatfast
from flatfast.backend import xp as _xp

reason = _xp.device_ep_unavailable()
print("EP on the GPU:", "available" if reason is None else f"UNAVAILABLE: {reason}")
with open("/proc/self/maps") as maps:
    print("cuSOLVER loaded:", sorted({line.split()[-1] for line in maps if "libcusolver" in line}))
n = 2000
X = torch.rand(n, 784, dtype=torch.float64, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
y = np.where(X[:, :392].sum(1).cpu().numpy() > X[:, 392:].sum(1).cpu().numpy(), 1, -1)
t0 = time.perf_counter()
gpu = flatfast.log_prior(X, y, return_info=True)
t1 = time.perf_counter()
cpu = flatfast.log_prior(X.cpu().numpy(), y, return_info=True)
t2 = time.perf_counter()
print(f"log P(f), n = {n}: GPU {gpu.log_z:.10f} ({gpu.sweeps} sweeps, {t1 - t0:.2f} s, site arrays on "
      f"{type(gpu.site_precision).__module__.split('.')[0]}), CPU {cpu.log_z:.10f} ({cpu.sweeps} sweeps, "
      f"{t2 - t1:.2f} s), relative difference {abs(gpu.log_z - cpu.log_z) / abs(cpu.log_z):.2e}")
