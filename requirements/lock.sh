#!/usr/bin/env bash
# Regenerate requirements/lock.txt and lock-dev.txt from pyproject.toml in throwaway venvs.
set -euo pipefail
export LC_ALL=C  # one collation for sort and comm
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$python" -m venv "$tmp/rt"
"$tmp/rt/bin/pip" install --quiet --disable-pip-version-check .
"$tmp/rt/bin/pip" freeze --exclude flytetune | sed 's/^torch==\(.*\)+cpu$/torch==\1/' | sort > "$tmp/rt.txt"
"$tmp/rt/bin/pip" install --quiet --disable-pip-version-check '.[dev]'
"$tmp/rt/bin/pip" freeze --exclude flytetune | sed 's/^torch==\(.*\)+cpu$/torch==\1/' | sort > "$tmp/all.txt"

{
  sed -n '1,/^$/p' requirements/lock.txt
  cat "$tmp/rt.txt"
} > "$tmp/lock.txt"
{
  sed -n '1,/^-r lock.txt$/p' requirements/lock-dev.txt
  comm -13 "$tmp/rt.txt" "$tmp/all.txt"
} > "$tmp/lock-dev.txt"
mv "$tmp/lock.txt" requirements/lock.txt
mv "$tmp/lock-dev.txt" requirements/lock-dev.txt
echo "requirements/lock.txt: $(grep -c '==' requirements/lock.txt) pins; lock-dev.txt: $(grep -c '==' requirements/lock-dev.txt) pins"
