#!/usr/bin/env bash
# Builds the oxvirt test guest: Debian's cloud kernel + a busybox initramfs.
#
# Output (default: <repo>/target/test-guest, override with OXVIRT_TEST_GUEST_DIR):
#   vmlinuz, initramfs.cpio.gz, kernel-version, stamp
# Rebuilt only when missing or when this script (or the guest init) changed.
#
# The guest's init loads the virtio modules (virtio-blk disks are /dev/vdX, virtio-scsi ones
# /dev/sdX, a virtio-scsi CD-ROM /dev/sr0 with iso9660; the cloud kernel has no AHCI driver, so SATA
# disks and CD-ROMs stay invisible to it), then runs
# what the kernel command line asks:
#   oxvirt.run=<base64 of a sh script>   run it (after the built-in steps below)
#   oxvirt.write_mib=N                   write N MiB of a known pattern to /dev/vda (O_DIRECT)
#   oxvirt.writer=N                      keep rewriting 1 MiB blocks 0..N-1 of /dev/vda in the
#                                        background, block i = byte 'A'+i%26, printing
#                                        "OXVIRT-GUEST pass P" after each pass
# A virtio-serial port named org.qemu.guest_agent.0 gets a minimal guest agent (guest-sync,
# guest-ping, guest-fsfreeze-freeze/thaw/status; it prints "OXVIRT-GUEST fsfreeze frozen|thawed").
#   oxvirt.marker=TEXT                   print "OXVIRT-MARKER TEXT" on the console
#   oxvirt.poweroff=1                    power off when done
# Without oxvirt.poweroff the guest stays up (an ACPI power button press powers it off).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${OXVIRT_TEST_GUEST_DIR:-$repo/target/test-guest}"
init_src="$here/guest-init.sh"
stamp_want="$(cat "$0" "$init_src" | sha256sum | cut -c1-16)"

if [[ -f "$out/stamp" && "$(cat "$out/stamp")" == "$stamp_want" && -f "$out/vmlinuz" && -f "$out/initramfs.cpio.gz" ]]; then
    echo "test guest: up to date in $out"
    exit 0
fi

for tool in apt-get apt-cache dpkg cpio gzip; do
    command -v "$tool" >/dev/null || { echo "test guest: missing tool '$tool' (run scripts/deps.sh)" >&2; exit 1; }
done

echo "test guest: building in $out"
work="$(mktemp -d "${TMPDIR:-/tmp}/oxvirt-guest.XXXXXX")"
trap 'rm -rf "$work"' EXIT

kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
if [[ -z "$kernel_pkg" ]]; then
    echo "test guest: refreshing the package lists (apt-get update)"
    apt-get update -q >/dev/null
    kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
fi
[[ -n "$kernel_pkg" ]] || { echo "test guest: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }

echo "test guest: apt-get download $kernel_pkg busybox-static"
# _apt cannot write into a root-owned mktemp dir; the warning about an unsandboxed download is expected.
(cd "$work" && apt-get download -q "$kernel_pkg" busybox-static 2>&1 | grep -v 'unsandboxed' || true)
ls "$work"/linux-image-*.deb "$work"/busybox-static_*.deb >/dev/null \
    || { echo "test guest: apt-get download failed" >&2; exit 1; }

dpkg -x "$work"/linux-image-*.deb "$work/kernel"
dpkg -x "$work"/busybox-static_*.deb "$work/busybox"
kver="$(ls "$work/kernel/lib/modules")"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
cp "$init_src" "$root/init"
chmod 0755 "$root/init" "$root/bin/busybox"
# Flat module directory; guest-init.sh loads them in dependency order.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         scsi_common scsi_mod sd_mod virtio_scsi cdrom sr_mod isofs \
         virtio_balloon virtio_console failover net_failover virtio_net button evdev; do
    f="$(find "$work/kernel/lib/modules/$kver" -name "$m.ko" | head -n1)"
    [[ -n "$f" ]] || { echo "test guest: module $m.ko not in $kernel_pkg" >&2; exit 1; }
    cp "$f" "$root/lib/modules/"
done

mkdir -p "$out.new"
cp "$work/kernel/boot/vmlinuz-$kver" "$out.new/vmlinuz"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) | gzip -1 > "$out.new/initramfs.cpio.gz"
echo "$kver" > "$out.new/kernel-version"
echo "$stamp_want" > "$out.new/stamp"
rm -rf "$out"
mv "$out.new" "$out"
echo "test guest: ready ($kver) in $out"
