#!/usr/bin/env bash
# Fetch what bench/gpu/run.py needs on the GPU machine but does not find there, as wheels, into .whl/ at the
# repository root (git-ignored: .gitignore lists /.whl/; never commit them).
#
# The GPU machine has Python 3.12, JAX, PyTorch, NumPy, SciPy, h5py, rich, absl-py, ml-dtypes, packaging and
# typing-extensions, but no Keras and no internet. Keras (the version installed here, so that both machines run
# the same Keras) declares absl-py, numpy, rich, namex, h5py, optree, ml-dtypes and packaging: namex and optree are
# the missing ones. optree is compiled, so its wheel is the CPython 3.12 manylinux x86-64 one; keras and namex are
# pure Python (py3-none-any, which pip accepts for any platform).
#
#     bench/gpu/fetch_wheels.sh            # then carry ".whl" to the GPU machine (bench/gpu/README.md)
set -euo pipefail
cd "$(dirname "$0")/../.."

python=${PYTHON:-python3}
keras_version=$("$python" -c "import importlib.metadata as m; print(m.version('keras'))")
namex_version=$("$python" -c "import importlib.metadata as m; print(m.version('namex'))")
optree_version=$("$python" -c "import importlib.metadata as m; print(m.version('optree'))")

rm -rf .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "keras==$keras_version" "namex==$namex_version" "optree==$optree_version"

# Keras's own requirements must all be there or in the wheels: a new one would fail only on the GPU machine.
there="absl-py numpy rich h5py ml-dtypes packaging namex optree"
for requirement in $(unzip -p .whl/keras-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: \([A-Za-z0-9_.-]*\)[^;]*$/\1/p'); do
  case " $there " in
    *" $requirement "*) ;;
    *) echo "keras $keras_version requires $requirement, which the GPU machine lacks: add it here" >&2; exit 1 ;;
  esac
done
ls -l .whl
