#!/usr/bin/env bash
# The install `make demo` / `make test` run, pip against uv, in one run on the same machine.
#
#     bash benchmarks/bench_install.sh        # ~2 minutes, needs the package registry
#
# Two scratch venvs get torch the same way (pip, the Makefile's TORCH); then the rest of the
# locked set (`-e '.[dev]'` with requirements/lock.txt as constraints) through pip in one and
# through uv (the Makefile's pinned version) in the other. Prints each step's seconds and
# whether both venvs hold the same packages. Nothing is cached between the two: pip's and
# uv's caches are off.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=$(sed -n 's/^TORCH *?= *//p' Makefile)
UV=$(sed -n 's/^UV *= *//p' Makefile)
LOCK=requirements/lock.txt
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
secs() { local t0=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(date +%s.%N) - $t0" | bc; }
for v in pip uv; do
  $PY -m venv "$tmp/$v"
  echo "$v: torch through pip: $(secs "$tmp/$v/bin/python" -m pip install -q --no-cache-dir -c $LOCK "$TORCH") s"
done
echo "pip: the rest of the locked set: $(secs "$tmp/pip/bin/python" -m pip install -q --no-cache-dir -c $LOCK -e '.[dev]') s"
echo "uv: installing $UV itself: $(secs "$tmp/uv/bin/python" -m pip install -q --no-cache-dir "$UV") s"
echo "uv: the rest of the locked set: $(secs "$tmp/uv/bin/uv" pip install -q --no-cache --python "$tmp/uv/bin/python" -c $LOCK -e '.[dev]') s"
if diff <("$tmp/pip/bin/python" -m pip freeze --exclude-editable 2>/dev/null | sort) \
        <("$tmp/uv/bin/python" -m pip freeze --exclude-editable 2>/dev/null | grep -v '^uv==' | sort) >/dev/null; then
  echo "same packages, same versions: yes"
else
  echo "same packages, same versions: NO"; exit 1
fi
