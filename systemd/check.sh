#!/usr/bin/env bash
# CI: check the systemd units without a running systemd (a clean Debian 12 as root).
#
#  1. systemd-analyze verify on edge-agent.service and edge-recover@.service:
#     any output at all (verify exits 0 even on "Unknown key ... ignoring") fails.
#     verify insists that every Exec*= binary exists; on a CI machine
#     /opt/edge-agent is not installed, so verify runs with --root= on a
#     throwaway tree in /tmp holding the units, the distribution's own units
#     (for the targets we order after) and executable stubs for our own
#     binaries (see below).
#  2. the sysusers.d and tmpfiles.d files are applied to that same tree: the
#     user is created and the spool gets owner edge-agent and mode 0700.
#  3. systemd-analyze security --offline=true: the overall exposure of each unit
#     must be at most MAX_EXPOSURE (default 2.0); the figure is printed.
#
# Installs the "systemd" package if systemd-analyze is missing (needs root + apt).
# Writes nothing outside the repository and one mktemp directory, removed on exit.
set -euo pipefail

usage() {
    cat <<'EOF2'
usage: systemd/check.sh

Check the systemd units without a running systemd: systemd-analyze verify (any output
fails), the sysusers.d/tmpfiles.d files applied to a throwaway root, and the sandbox
exposure of each unit (at most MAX_EXPOSURE, default 2.0). Installs the systemd package
with apt-get if systemd-analyze is missing (root). Writes only one mktemp directory.

  -h, --help    show this help and exit
EOF2
}
# Options first: nothing is installed or created before they are understood.
case "${1:-}" in
    "") ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "systemd/check.sh: unknown option $1" >&2
        echo "usage: systemd/check.sh  (--help for more)" >&2; exit 2 ;;
    *) echo "systemd/check.sh: takes no arguments, got: $*" >&2
       echo "usage: systemd/check.sh  (--help for more)" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "systemd/check.sh: takes no arguments, got: $*" >&2
                  echo "usage: systemd/check.sh  (--help for more)" >&2; exit 2; }
cd "$(dirname "$0")"

MAX_EXPOSURE="${MAX_EXPOSURE:-2.0}"
UNITS=(edge-agent.service edge-recover@.service)
# What verify loads: the template needs an instance; every mode gets checked.
VERIFY=(edge-agent.service edge-recover@merge.service edge-recover@dry-run.service
        edge-recover@verify.service)

fail() { echo "systemd/check.sh: FAIL: $*" >&2; exit 1; }

if ! command -v systemd-analyze >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "systemd-analyze is missing and we are not root to install it"
    echo "systemd/check.sh: installing the systemd package for systemd-analyze"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
systemd-analyze --version | head -n 1

root="$(mktemp -d /tmp/edge-agent-units.XXXXXX)"
trap 'rm -rf -- "$root"' EXIT

# -- 1. verify ----------------------------------------------------------------------
mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
if [ -d /lib/systemd/system ] && [ ! /lib -ef /usr/lib ]; then  # not merged-/usr
    mkdir -p "$root/lib/systemd" && cp -a /lib/systemd/system "$root/lib/systemd/"
fi
cp -- "${UNITS[@]}" "$root/etc/systemd/system/"
# Exec*=[-+!@:|]PATH ...  ->  PATH. Our own console scripts (pyproject.toml
# [project.scripts]) and /bin/kill (procps: absent from minimal images) become
# stubs; any other binary is copied from this machine if it has it, else verify
# reports it missing. A typo in a path is therefore still caught.
mapfile -t exes < <(sed -n 's/^Exec[A-Za-z]*=[-+!@:|]*\(\/[^ ]*\).*/\1/p' "${UNITS[@]}" | sort -u)
[ "${#exes[@]}" -ge 3 ] || fail "expected Exec*= lines in ${UNITS[*]}, found: ${exes[*]:-none}"
for exe in "${exes[@]}"; do
    mkdir -p "$root$(dirname "$exe")"
    case "$exe" in
        /opt/edge-agent/bin/*)
            grep -q "^${exe##*/} = " ../pyproject.toml \
                || fail "$exe is not a console script in pyproject.toml [project.scripts]"
            printf '#!/bin/sh\nexit 0\n' >"$root$exe" && chmod 0755 "$root$exe" ;;
        /bin/kill)
            printf '#!/bin/sh\nexit 0\n' >"$root$exe" && chmod 0755 "$root$exe" ;;
        *)
            if [ -x "$exe" ]; then cp -L -- "$exe" "$root$exe"; fi ;;
    esac
done

status=0
out="$(systemd-analyze verify --man=no --generators=no --root="$root" "${VERIFY[@]}" 2>&1)" \
    || status=$?
if [ "$status" -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify complained (exit $status)"
fi
echo "verify: ${VERIFY[*]}: clean"

# -- 2. sysusers.d / tmpfiles.d -----------------------------------------------------
systemd-sysusers --root="$root" "$PWD/edge-agent.sysusers.conf" 2>/dev/null \
    || fail "systemd-sysusers rejected edge-agent.sysusers.conf"
uid="$(awk -F: '$1 == "edge-agent" { print $3 }' "$root/etc/passwd")"
[ -n "$uid" ] || fail "edge-agent.sysusers.conf did not create the user edge-agent"
systemd-tmpfiles --root="$root" --create "$PWD/edge-agent.tmpfiles.conf" \
    || fail "systemd-tmpfiles rejected edge-agent.tmpfiles.conf"
spool="$(stat -c '%u %a' "$root/var/spool/edge-agent")"
[ "$spool" = "$uid 700" ] || fail "spool is '$spool' (uid mode), expected '$uid 700'"
for unit in "${UNITS[@]}"; do
    grep -qx 'User=edge-agent' "$unit" || fail "$unit does not run as User=edge-agent"
    grep -qx 'ReadWritePaths=/var/spool/edge-agent' "$unit" \
        || fail "$unit does not grant the spool (ReadWritePaths=/var/spool/edge-agent)"
done
echo "sysusers/tmpfiles: user edge-agent, /var/spool/edge-agent 0700: ok"

# -- 3. security exposure -----------------------------------------------------------
for unit in "${UNITS[@]}"; do
    report="$(systemd-analyze security --offline=true --no-pager "$PWD/$unit" 2>&1)" \
        || { printf '%s\n' "$report" >&2; fail "systemd-analyze security failed on $unit"; }
    exposure="$(printf '%s\n' "$report" \
        | sed -n 's/.*Overall exposure level for .*: \([0-9][0-9.]*\) .*/\1/p' | tail -n 1)"
    [ -n "$exposure" ] || { printf '%s\n' "$report" >&2; fail "no exposure figure for $unit"; }
    echo "security: $unit: overall exposure $exposure (max $MAX_EXPOSURE)"
    if awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e > m) }'; then
        printf '%s\n' "$report" | grep '✗' >&2 || true
        fail "$unit exposure $exposure is above $MAX_EXPOSURE"
    fi
done
echo "systemd/check.sh: ok"
