#!/bin/sh
# Install Order Edge Agent as a systemd service (Debian 12, as root). Run from a checkout of
# this repository:
#
#   systemd/install.sh dist/order_edge_agent-*.whl   # a built wheel (python3 -m build --wheel)
#   systemd/install.sh                               # or pip-installs this checkout
#
# What it does (docs/operations.md "Running under systemd"; tests/system/test_systemd_real.py runs it under a
# real systemd): a venv in /opt/edge-agent with the package; the system user edge-agent
# (sysusers.d); the spool /var/spool/edge-agent (tmpfiles.d); both units; /etc/edge-agent with
# the example config and empty secret files, root-only. Rerunning it upgrades the package and
# the units and never overwrites anything in /etc/edge-agent. It does not start the service:
# edit /etc/edge-agent/agent.toml first, then: systemctl enable --now edge-agent
set -eu
#
# Offline (the bundle of ops/offline/build-bundle.sh runs it so): EDGE_AGENT_WHEELS=DIR makes
# pip install the package named by the argument from DIR only, with no index and no network.
usage() {
    cat <<'EOF2'
usage: systemd/install.sh [PACKAGE]

Install Order Edge Agent as a systemd service (Debian 12, as root, from a checkout):
a venv /opt/edge-agent with PACKAGE pip-installed (a wheel path such as
dist/order_edge_agent-*.whl; default: this checkout), the system user edge-agent,
/var/spool/edge-agent, both units, and /etc/edge-agent with the example config and empty
secret files. Never overwrites a file in /etc/edge-agent; rerun it to upgrade. Does not
start the service. EDGE_AGENT_WHEELS=DIR installs PACKAGE from DIR only (no network).
See docs/operations.md.

  -h, --help    show this help and exit
EOF2
}
bad_usage() {
    echo "systemd/install.sh: $1" >&2
    echo "usage: systemd/install.sh [PACKAGE]  (--help for more)" >&2
    exit 2
}
# Options first: nothing is installed or created before they are understood.
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) bad_usage "unknown option $1" ;;
        *) break ;;
    esac
done
[ $# -le 1 ] || bad_usage "one PACKAGE at most, got: $*"
package="${1:-.}"
wheels="${EDGE_AGENT_WHEELS:-}"
if [ -z "$wheels" ]; then
    case "$package" in /*) ;; *) package="$PWD/$package" ;; esac
fi
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "systemd/install.sh: run as root" >&2; exit 1; }

# An existing venv is kept (an upgrade; or the offline bundle's install.sh made it without
# ensurepip, which a server without python3-venv lacks).
[ -x /opt/edge-agent/bin/pip ] || python3 -m venv /opt/edge-agent
if [ -n "$wheels" ]; then
    env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_CONSTRAINT \
        PIP_CONFIG_FILE=/dev/null /opt/edge-agent/bin/pip install --quiet --upgrade --isolated \
        --no-index --find-links "$wheels" --disable-pip-version-check "$package"
else
    /opt/edge-agent/bin/pip install --quiet --upgrade "$package"
fi
# -D: stock Debian 12 has no /etc/sysusers.d (nor always /etc/tmpfiles.d).
install -D -m 0644 systemd/edge-agent.sysusers.conf /etc/sysusers.d/edge-agent.conf
install -D -m 0644 systemd/edge-agent.tmpfiles.conf /etc/tmpfiles.d/edge-agent.conf
systemd-sysusers /etc/sysusers.d/edge-agent.conf           # the system user edge-agent
systemd-tmpfiles --create /etc/tmpfiles.d/edge-agent.conf  # /var/spool/edge-agent, 0700
install -m 0644 systemd/edge-agent.service systemd/edge-recover@.service /etc/systemd/system/
install -d -m 0755 /etc/edge-agent
# Secrets stay root:root 0600: systemd hands them to the service (LoadCredential=).
[ -e /etc/edge-agent/agent.toml ] || install -m 0644 config/agent.toml /etc/edge-agent/agent.toml
[ -e /etc/edge-agent/tokens ] || install -m 0600 /dev/null /etc/edge-agent/tokens
[ -e /etc/edge-agent/sms ] || install -m 0600 /dev/null /etc/edge-agent/sms
systemctl daemon-reload
echo "systemd/install.sh: installed $(/opt/edge-agent/bin/edge-agent --version)." \
     "Next: edit /etc/edge-agent/agent.toml (node_id, upstream) and /etc/edge-agent/tokens," \
     "then: systemctl enable --now edge-agent"
