#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the GPU machine's Python (3.12, with torch, transformers, h5py,
# click, numpy ... already there) lacks for refseg; bench/gpu_check.sh installs them from there.
# Run once from anywhere in the checkout, on a machine that reaches PyPI; .whl/ is git-ignored and
# travels to the GPU machine as a carried path. Versions are those the CPU suite runs with.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in diffusers==0.42.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 crc32c==2.9.post0 \
           tensorstore==0.1.86 pycocotools==2.0.11 importlib_metadata==10.2.0 PyYAML==6.0.4 "$@"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$pkg"
done
ls -1 .whl
du -sh .whl
