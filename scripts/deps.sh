#!/usr/bin/env bash
# Installs the system packages oxvirt needs, only those missing. Needs root (apt-get).
#
#   qemu-system-x86 + qemu-utils   QEMU and qemu-img/qemu-io, installed together at one version:
#                                  installing qemu-system-x86 alone can remove a newer qemu-utils.
#   cpio                           building the test guest's initramfs
#   libsqlite3-dev pkg-config      the engine links the system's SQLite (.cargo/config.toml)
#   sanlock                        compatibility tests of our lease format against the real sanlock
#   iproute2                       network namespaces for multi-host tests
#   dnsmasq-base                   the DHCP server the node's DHCP client is tested against
#   postgresql                     the engine's tests on PostgreSQL (scripts/pg-test.sh)
#   gcc python3-dev python3-venv   the venv of oVirt's Python SDK (a C extension) and Ansible for the
#   libxml2-dev                    REST compatibility tests (scripts/py-clients.sh)
#   xorriso isolinux               ISO images for the CD-ROM tests (a bootable one boots the test
#   syslinux-common                guest from its CD, as an installer CD does)
#   chromium nodejs npm            the web portal's browser test (headless Chromium driven by
#                                  playwright-core, which the test installs with npm ci)
set -euo pipefail

say() { echo "deps: $*"; }
missing=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }

qemu_ok=1
have_cmd qemu-system-x86_64 || qemu_ok=0
have_cmd qemu-img || qemu_ok=0
have_cmd qemu-io || qemu_ok=0
if [[ $qemu_ok == 1 ]]; then
    sys_v="$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)"
    img_v="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
    [[ -n "$sys_v" && "$sys_v" == "$img_v" ]] || qemu_ok=0
fi
have_cmd cpio || missing+=(cpio)
have_cmd sanlock || missing+=(sanlock)
have_cmd ip || missing+=(iproute2)
[[ -x /usr/sbin/dnsmasq ]] || missing+=(dnsmasq-base)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
have_cmd gcc || missing+=(gcc)
have_cmd xorriso || missing+=(xorriso)
[[ -f /usr/lib/ISOLINUX/isolinux.bin ]] || missing+=(isolinux)
[[ -f /usr/lib/syslinux/modules/bios/ldlinux.c32 ]] || missing+=(syslinux-common)
have_cmd chromium || missing+=(chromium)
have_cmd node || missing+=(nodejs)
have_cmd npm || missing+=(npm)
have_cmd pkg-config || missing+=(pkg-config)
for p in libsqlite3-dev python3-dev python3-venv libxml2-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done

if [[ $qemu_ok == 1 && ${#missing[@]} == 0 ]]; then
    say "all system packages present (qemu $(dpkg-query -W -f='${Version}' qemu-system-x86))"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    say "need root to install: ${missing[*]} $([[ $qemu_ok == 0 ]] && echo qemu-system-x86 qemu-utils)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
say "apt-get update"
apt-get update -q >/dev/null
pkgs=("${missing[@]}")
if [[ $qemu_ok == 0 ]]; then
    # Pin both to qemu-system-x86's candidate so apt cannot pair it with a qemu-utils of another release.
    v="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')"
    [[ -n "$v" && "$v" != "(none)" ]] || { say "no qemu-system-x86 package available" >&2; exit 1; }
    pkgs+=("qemu-system-x86=$v" "qemu-utils=$v")
    if dpkg-query -W -f='${Status}' qemu-block-extra 2>/dev/null | grep -q installed; then
        pkgs+=("qemu-block-extra=$v")
    fi
fi
say "apt-get install ${pkgs[*]}"
apt-get install -y -q --allow-downgrades --no-install-recommends "${pkgs[@]}" >/tmp/oxvirt-apt.log 2>&1 \
    || { tail -20 /tmp/oxvirt-apt.log >&2; say "apt-get install failed (log: /tmp/oxvirt-apt.log)" >&2; exit 1; }
say "installed: qemu $(qemu-img --version | head -n1 | awk '{print $3}'), ${missing[*]}"
