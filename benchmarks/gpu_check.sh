#!/usr/bin/env bash
# The GPU check, as one prepared run on a machine with an NVIDIA GPU, from an environment installed as
# README.md says (torch with CUDA):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: ./gpu_check
#
# 1. names the card (nvidia-smi and torch);
# 2. the test suite with CUDA visible: the CUDA variants run (every monitor on every model of
#    tests/integration/test_model_coverage.py on "cuda", `precision="16-mixed"` in test_mixed_precision.py) and
#    every other test as on the CPU; `-rs` lists what was skipped, so a CUDA test that did not run shows;
# 3. the Jacobian norm on the GPU: `jacobian_norm` against `torch.func.vmap(jacrev)` (the reference to beat,
#    the functional reference) on resnet18 at 32 x 32 and on an MLP, exact values compared, timings as medians;
# 4. the benchmarks of benchmarks/ in their quick form. They take no device argument and measure on the CPU of the
#    GPU machine; their figures belong in the docs with that said.
# Everything is written to OUT_DIR/gpu_check.log as well as printed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

echo "== card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c 'import sys, torch; torch.cuda.is_available() or sys.exit("torch sees no CUDA device"); print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'

echo "== tests with CUDA (the DDP tests are CPU/gloo by design and left out)"
timeout 900 python -m pytest lightning_sensitivity tests -q -rs -m "not multiprocess" -p no:cacheprovider

echo "== jacobian_norm on the GPU"
python - <<'PY'
import statistics
import time

import torch
from torch import nn
from torchvision.models import resnet18

from lightning_sensitivity.functional import jacobian_norm

device = torch.device("cuda")
torch.manual_seed(0)


def reference(model, x):
    def probabilities(point):
        return model(point[None]).softmax(-1)[0]

    return torch.func.vmap(torch.func.jacrev(probabilities))(x).flatten(1).norm(dim=1)


def seconds(fn, repeats=7):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


cases = {
    "resnet18, 64 points 3x32x32": (resnet18(num_classes=10), torch.rand(64, 3, 32, 32)),
    "MLP 3072-1024-1024-10, 256 points": (
        nn.Sequential(nn.Flatten(), nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)),
        torch.rand(256, 3, 32, 32),
    ),
}
for name, (model, x) in cases.items():
    model, x = model.to(device).eval(), x.to(device)
    ours, theirs = jacobian_norm(model, x), reference(model, x)
    error = ((ours - theirs).abs() / theirs).max().item()
    t_ours, t_theirs = seconds(lambda: jacobian_norm(model, x)), seconds(lambda: reference(model, x))
    print(f"{name:38s} jacobian_norm {t_ours * 1e3:8.2f} ms   vmap(jacrev) {t_theirs * 1e3:8.2f} ms   "
          f"max relative difference {error:.1e}")
PY

echo "== benchmarks (quick; measured on the CPU of this machine)"
python -m benchmarks.jacobian --quick
python -m benchmarks.transitions --quick
