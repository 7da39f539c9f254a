"""Empirical NNGP kernels: draws per second against the floor of the bare forward pass of the same batch with
the same model (what one draw cannot do without), on the CPU and, when present, on a GPU. Models: the FCN
784-512-512-1 on 1,000 inputs and a small ReLU CNN (Conv 1->32 3x3, Conv 32->32 3x3, Linear) on 1,000 8x8
images, 8 draws per round."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import flatfast  # noqa: E402

DRAWS = 8
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _models():
    fcn = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                              torch.nn.ReLU(), torch.nn.Linear(512, 1))
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(32 * 64, 1))
    return {"fcn": (fcn, (1000, 784)), "cnn": (cnn, (1000, 1, 8, 8))}


@pytest.fixture(scope="module", params=[(arch, dev) for arch in ("fcn", "cnn") for dev in DEVICES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    arch, device = request.param
    model, shape = _models()[arch]
    X = torch.rand(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    return arch, device, model.to(device), X


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def test_forward_floor(benchmark, case):
    arch, device, model, X = case
    benchmark.group = f"empirical {arch} {device}"
    benchmark.name = f"empirical-forward-{arch}-{device}"

    def forward():
        with torch.no_grad():
            for _ in range(DRAWS):
                model(X)
        _sync(device)

    benchmark.pedantic(forward, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("readout", ["penultimate", "output"])
def test_empirical_kernel(benchmark, case, readout):
    arch, device, model, X = case
    benchmark.group = f"empirical {arch} {device}"
    benchmark.name = f"empirical-{readout}-{arch}-{device}"
    benchmark.extra_info["baseline"] = [f"empirical-forward-{arch}-{device}"]

    def run():
        K = flatfast.empirical_nngp_kernel(model, X, DRAWS, readout=readout, progress=False)
        _sync(device)
        return K

    K = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["draws_per_second"] = round(DRAWS / benchmark.stats.stats.median, 1)
    assert np.isfinite(K).all()
