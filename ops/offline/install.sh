#!/bin/sh
# Install Order Edge Agent from this offline bundle: no network is used (pip --no-index
# --find-links wheels/, nothing else; pip's own config files and PIP_* variables are
# ignored so no index or cache of the machine is consulted).
#
#   ./install.sh                 # as root on Debian 12: the systemd service (systemd/install.sh)
#   ./install.sh --venv DIR      # only a venv with the agent in DIR (any user; for tests)
set -eu

usage() {
    cat <<'EOF2'
usage: ./install.sh [--venv DIR]

Install Order Edge Agent from this offline bundle, with no network (pip --no-index
--find-links wheels/). The bundle's SHA256SUMS and TARGET are checked first.

  (no option)     as root on Debian 12: the systemd service (systemd/install.sh):
                  /opt/edge-agent, the edge-agent user, the units, /etc/edge-agent
  --venv DIR      only a venv with the agent in DIR (any user; nothing else is touched)
  -h, --help      show this help and exit
EOF2
}
bad_usage() {
    echo "install.sh: $1" >&2
    echo "usage: ./install.sh [--venv DIR]  (--help for more)" >&2
    exit 2
}
# Options first: nothing is checked, installed or created before they are understood.
venv="" venv_given=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --venv) venv_given=1; venv="${2:-}"; [ $# -ge 2 ] && shift; shift ;;
        --venv=*) venv_given=1; venv="${1#--venv=}"; shift ;;
        -*) bad_usage "unknown option $1" ;;
        *) bad_usage "unexpected argument $1" ;;
    esac
done
case "$venv" in
    -*) bad_usage "--venv needs a directory, not an option ($venv; ./$venv if you mean it)" ;;
esac
if [ "$venv_given" = 1 ] && [ -z "$venv" ]; then bad_usage "--venv needs a directory"; fi
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"

(cd "$here" && sha256sum --quiet -c SHA256SUMS) || {
    echo "install.sh: the bundle is damaged (SHA256SUMS does not match)" >&2; exit 1; }
want="$(cat "$here/TARGET")"
have="$("$python" -c 'import sys, sysconfig; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-" + sysconfig.get_platform().replace("-", "_").replace(".", "_"))')"
[ "$want" = "$have" ] || {
    echo "install.sh: this bundle is for $want, this machine's $python is $have" >&2; exit 1; }

# Offline pip: only the bundle's wheels.
pip_offline() {
    env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_CONSTRAINT \
        PIP_CONFIG_FILE=/dev/null "$@" --isolated --no-index --find-links "$here/wheels" \
        --disable-pip-version-check
}

# A venv without ensurepip: Debian keeps ensurepip in python3.11-venv, which a stock server
# lacks and whose .deb pins the exact python3.11 point release it was built with, so a
# carried .deb fails on a server a few security updates apart. venv itself is in the
# standard library; pip comes from the bundle's own pip wheel (pip runs from its wheel).
make_venv() {
    [ -x "$1/bin/pip" ] && return 0
    "$python" -m venv --without-pip "$1"
    set -- "$1" "$here"/wheels/pip-*.whl
    [ -f "$2" ] || { echo "install.sh: the bundle has no pip wheel in wheels/" >&2; exit 1; }
    pip_offline "$1/bin/python" "$2/pip" install --quiet pip
}

if [ -n "$venv" ]; then
    make_venv "$venv"
    pip_offline "$venv/bin/pip" install --quiet --upgrade order-edge-agent
    echo "install.sh: installed $("$venv/bin/edge-agent" --version) in $venv"
    exit 0
fi

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (or: install.sh --venv DIR)" >&2; exit 1; }
# The service's venv, made here without ensurepip; systemd/install.sh keeps an existing one,
# and EDGE_AGENT_WHEELS makes it install the package offline.
make_venv /opt/edge-agent
cd "$here"
EDGE_AGENT_WHEELS="$here/wheels" systemd/install.sh order-edge-agent
