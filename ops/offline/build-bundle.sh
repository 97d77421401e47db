#!/bin/sh
# Build the offline install bundle for a warehouse server with no internet access:
#
#   ops/offline/build-bundle.sh [OUTDIR]        # default OUTDIR: dist/
#
# Run it on a machine with the package index (or a warm pip cache) and the same Python as
# the warehouse server (Debian 12: python3 = 3.11, x86_64; PYTHON=/path/to/python3.11 picks
# another interpreter). It writes OUTDIR/order-edge-agent-<version>-offline-<tag>.tar.gz
# holding: wheels/ (the agent, every dependency and pip, built or downloaded for this Python;
# no python3-venv needed on the server), systemd/ (units, install.sh), config/agent.toml, install.sh,
# TARGET (the Python tag the wheels are for) and SHA256SUMS.
# Installing: docs/operations.md "Offline install" (no network: pip --no-index --find-links).
set -eu

usage() {
    cat <<'EOF2'
usage: ops/offline/build-bundle.sh [OUTDIR]

Build the offline install bundle (wheels, units, config, install.sh, SHA256SUMS)
for this machine's Python and write OUTDIR/order-edge-agent-<version>-offline-<tag>.tar.gz
(default OUTDIR: dist/ in the checkout). Needs the package index or a warm pip cache.
PYTHON=/path/to/python3.11 picks the interpreter. See docs/operations.md.

  -h, --help    show this help and exit
EOF2
}
# Options first: nothing is built, downloaded or created before they are understood.
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "build-bundle.sh: unknown option $1" >&2
            echo "usage: ops/offline/build-bundle.sh [OUTDIR]  (--help for more)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -gt 1 ]; then
    echo "build-bundle.sh: one OUTDIR at most, got: $*" >&2
    echo "usage: ops/offline/build-bundle.sh [OUTDIR]  (--help for more)" >&2; exit 2
fi
out="${1:-}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="${out:-$repo/dist}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
python="${PYTHON:-python3}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -1)"
tag="$("$python" -c 'import sys, sysconfig; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-" + sysconfig.get_platform().replace("-", "_").replace(".", "_"))')"
name="order-edge-agent-$version-offline-$tag"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
stage="$work/$name"
mkdir -p "$stage/wheels" "$stage/systemd" "$stage/config" "$out"

# Build from a copy: no build/ or *.egg-info left in the checkout.
tar -C "$repo" --exclude=.git --exclude=.venv --exclude=build --exclude=dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude='.*_cache' --exclude=test-artifacts \
    -cf - . | (mkdir "$work/src" && tar -C "$work/src" -xf -)
# The agent's wheel and one wheel per dependency, for this interpreter. --only-binary for
# the dependencies: the server has no compiler either.
# pip's own wheel too: install.sh makes venvs --without-pip (a stock Debian 12 has no
# ensurepip) and runs pip from this wheel, so the bundle carries no .deb (python3.11-venv's
# .deb pins the exact python3.11 point release it was built with).
"$python" -m pip wheel --quiet --wheel-dir "$stage/wheels" --only-binary=:all: \
    --no-binary=order-edge-agent "$work/src" pip

cp "$repo/systemd/edge-agent.service" "$repo/systemd/edge-recover@.service" \
   "$repo/systemd/edge-agent.sysusers.conf" "$repo/systemd/edge-agent.tmpfiles.conf" \
   "$repo/systemd/install.sh" "$stage/systemd/"
cp "$repo/config/agent.toml" "$stage/config/"
cp "$repo/ops/offline/install.sh" "$stage/install.sh"
chmod 0755 "$stage/install.sh" "$stage/systemd/install.sh"
echo "$tag" > "$stage/TARGET"
echo "$version" > "$stage/VERSION"
(cd "$stage" && find . -type f ! -name SHA256SUMS | sort | xargs sha256sum > SHA256SUMS)
tar -C "$work" -czf "$out/$name.tar.gz" "$name"
echo "$out/$name.tar.gz"
