#!/bin/bash
# Run bench/gpu_check.py on a lent GPU machine (no network there), building llama-cpp-python
# with CUDA on the way. Prepare here first, in the repo root (devpack/ is git-ignored):
#   mkdir -p devpack && echo /devpack/ >> .git/info/exclude
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d devpack, then strip
#     the sdist to ~5 MB (drop .git, docs, models, tests, examples, tools/* but mtmd, and the
#     ggml backends other than cpu/cuda) and pack it again as devpack/llama_cpp_python-0.3.36.tar.gz
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#     --platform manylinux_2_28_x86_64 -d devpack pyzmq pykka gguf diskcache
#   cp bench/gpu_device_run.sh devpack/run.sh
# Then: device run, carry ["devpack"], command "bash devpack/run.sh", about 250 s of a lease
# (the CUDA build for sm_90 took 202-224 s on the H200 machine's 16 cores).
# CHECKS1 picks the checks run while the build goes on (default nvml,torch,node).
# The device check: NVML/torch/node checks while llama-cpp-python builds with CUDA, then gguf.
set -u
export PYTHONUNBUFFERED=1
R=$(cd "$(dirname "$0")/.." && pwd)
cd "$R"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site devpack/*.whl > "$OUT/pip.log" 2>&1
export PYTHONPATH=/tmp/site:$R
nvidia-smi > "$OUT/smi.txt" 2>&1
NVCC=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc /opt/*/bin/nvcc 2>/dev/null | head -1)
echo "nvcc: $NVCC; python3: $(command -v python3); skbuild: $(python3 -c 'import scikit_build_core as s; print(s.__version__)' 2>&1)"
(
  mkdir -p /tmp/b && cd /tmp/b && tar xzf "$R/devpack/llama_cpp_python-0.3.36.tar.gz" && cd llama_cpp_python-0.3.36 &&
  CUDACXX="$NVCC" PATH="$(dirname "$NVCC"):$PATH" \
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DLLAVA_BUILD=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=16 timeout "${BUILD_S:-420}" python3 -m pip wheel -v --no-build-isolation --no-deps -w /tmp/whl . > /tmp/build.log 2>&1
  echo "build rc=$? after $(( $(date +%s) - T0 )) s" >> /tmp/build.log
  tail -c 3000000 /tmp/build.log > "$OUT/build.log"
) &
BUILD=$!
python3 bench/gpu_check.py --checks "${CHECKS1:-nvml,torch,node}" --json 2>&1 | tee "$OUT/check1.txt"
echo "checks 1 done after $(( $(date +%s) - T0 )) s; waiting for the build"
wait $BUILD
tail -5 "$OUT/build.log"
grep -E "error|Error" "$OUT/build.log" | head -20
if ls /tmp/whl/llama_cpp_python*.whl 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 /tmp/whl/llama_cpp_python*.whl
  PYTHONPATH=/tmp/site2:$PYTHONPATH python3 bench/gpu_check.py --checks gguf --json 2>&1 | tee "$OUT/check2.txt"
fi
echo "all done after $(( $(date +%s) - T0 )) s"
