#!/usr/bin/env bash
# Build a wheelhouse for a GPU node that reaches no package index (README "Offline GPU node").
#
#   scripts/wheelhouse.sh [OUT]      # run on a connected machine, in the repository root; OUT defaults to wheelhouse/
#
# OUT receives: the project's wheel, a DeepSpeed wheel built from its sdist, every other wheel the project needs for the
# target's Python and platform -- except torch and its CUDA stack (torch, triton, nvidia-*, cuda-*), which the node's
# image already has -- and requirements.txt (the project's dependencies without torch) to install them with.
# Target: PYTHON_VERSION (default 3.12) on x86-64 Linux with glibc 2.GLIBC_MINOR (default 2.28) or newer.
set -euo pipefail

OUT="${1:-wheelhouse}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
DEEPSPEED_VERSION="${DEEPSPEED_VERSION:-0.19.8}"
GLIBC_MINOR="${GLIBC_MINOR:-28}"  # the node's glibc 2.x (ldd --version)
# pip does not widen --platform to older manylinux tags by itself: list every tag such a node can load.
PLATFORMS="manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64"
for ((minor = GLIBC_MINOR; minor >= 5; minor--)); do PLATFORMS="$PLATFORMS manylinux_2_${minor}_x86_64"; done

mkdir -p "$OUT"
TARGET=(--only-binary=:all: --python-version "$PYTHON_VERSION")
for tag in $PLATFORMS; do TARGET+=(--platform "$tag"); done

# 1. Wheels that must be built here: the project (pure Python) and DeepSpeed (PyPI has only its sdist; the wheel is
#    pure Python, its C++/CUDA ops are JIT-built on the node).
pip wheel --quiet --no-deps --wheel-dir "$OUT" .
pip wheel --quiet --no-deps --wheel-dir "$OUT" "deepspeed==$DEEPSPEED_VERSION"
project_wheel=$(ls -t "$OUT"/phi3v_bench-*.whl | head -n 1)

# 2. Resolve everything for the target (metadata only: nothing large is downloaded) and keep all but torch's stack.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
pip install --quiet --dry-run --ignore-installed --report "$scratch/plan.json" --target "$scratch/t" \
    "${TARGET[@]}" --find-links "$OUT" "$project_wheel"
python3 - "$scratch/plan.json" "$project_wheel" "$OUT/requirements.txt" > "$scratch/download.txt" <<'EOF'
import json
import re
import sys
import zipfile

from packaging.requirements import Requirement

plan, wheel, requirements = sys.argv[1:]
TORCH_STACK = re.compile(r"^(torch|triton|cuda-.*|nvidia-(?!ml-py$).*)$")  # nvidia-ml-py is NVML, not CUDA
BUILT_HERE = {"phi3v-bench", "deepspeed"}
for item in json.load(open(plan))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if not TORCH_STACK.match(name) and name not in BUILT_HERE:
        print(f"{name}=={item['metadata']['version']}")
# The project's own dependencies without torch: what the node installs (keeping what its image already satisfies).
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    lines = zf.read(meta).decode().splitlines()
deps = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
keep = [str(r) for r in deps if r.marker is None and r.name != "torch"]
open(requirements, "w").write("\n".join(keep) + "\n")
EOF

# 3. Download those wheels for the target.
pip download --quiet --no-deps "${TARGET[@]}" --dest "$OUT" -r "$scratch/download.txt"
echo "$OUT: $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1); install with:"
echo "  pip install --no-index --find-links $OUT -r $OUT/requirements.txt"
echo "  pip install --no-index --find-links $OUT --no-deps phi3v-bench"
