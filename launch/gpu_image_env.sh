#!/usr/bin/env bash
# A virtual environment with the GPU image's torch (2.11.0, with torchvision 0.26), so the test
# suite runs here on the torch our GPU machines have. Prints the environment's path.
#
#   bash launch/gpu_image_env.sh        # -> ~/.cache/twolevel_dist/venv-torch2.11.0-py3.11-<key>
#
# The environment lives outside the clone (TWOLEVEL_CACHE, default ~/.cache/twolevel_dist, about
# 5.5 GB: torch 2.11.0's CUDA build and its nvidia libraries, which import and run on a CPU).
# Its name carries a key of everything it holds (Python version, torch, torchvision and the
# project's requirements from pyproject.toml), so a second run on the same machine reuses it and
# a changed requirement builds a new one. It is marked complete only after every install has
# succeeded: an interrupted build is removed and redone, never used. The project itself is not
# installed there; run it with PYTHONPATH=<clone> (launch/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=2.11.0
TORCHVISION=0.26.0
requirements=$("$PYTHON" - "$TORCH" "$TORCHVISION" <<'EOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
torch, torchvision = sys.argv[1:]
needs = [r for r in project["dependencies"] + project["optional-dependencies"]["dev"]
         if not r.startswith(("torch", "ruff"))]
print("\n".join([f"torch=={torch}", f"torchvision=={torchvision}", *needs]))
EOF
)
py_version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
key=$(printf '%s\n%s\n' "$py_version" "$requirements" | sha256sum | cut -c1-12)
cache=${TWOLEVEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/twolevel_dist}
venv="$cache/venv-torch$TORCH-py$py_version-$key"
if [ ! -f "$venv/.complete" ]; then
    echo "building $venv (torch $TORCH, about 5.5 GB, a minute or two)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    "$PYTHON" -m venv "$venv"
    printf '%s\n' "$requirements" > "$venv/requirements.txt"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -r "$venv/requirements.txt" >&2
    "$venv/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('$TORCH')" >&2
    touch "$venv/.complete"
fi
echo "$venv"
