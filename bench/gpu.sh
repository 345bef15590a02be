#!/bin/sh
# The GPU bench in one command, on a machine with a CUDA card and this project installed:
# writes bench/results/DEVICE.json (see bench/gpu.py). Extra arguments go to bench/gpu.py,
# e.g. --compile to also measure torch.compile and CUDA graphs (minutes of compiling).
set -e
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device')"
exec python3 -m bench.gpu "$@"
