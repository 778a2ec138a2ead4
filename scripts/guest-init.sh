#!/bin/busybox sh
# PID 1 of the oxvirt test guest (see scripts/test-guest.sh for the command-line protocol).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         virtio_balloon virtio_console failover net_failover virtio_net button evdev; do
    insmod "/lib/modules/$m.ko" 2>/dev/null || echo "OXVIRT-GUEST module $m failed"
done

# The ACPI power button (QMP system_powerdown) powers the guest off, as a real OS would.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho OXVIRT-GUEST powerdown\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod 0755 /etc/acpi/PWRF/00000080
acpid

arg() { # value of oxvirt.$1= on the kernel command line
    for w in $(cat /proc/cmdline); do
        case "$w" in "oxvirt.$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

echo "OXVIRT-GUEST ready"
if n="$(arg write_mib)"; then
    # A recognisable pattern: every byte is 0x5a. Written with O_DIRECT so it reaches the disk.
    tr '\000' 'Z' < /dev/zero | dd of=/dev/vda bs=1M count="$n" iflag=fullblock oflag=direct 2>/dev/null \
        && echo "OXVIRT-GUEST wrote $n MiB" || echo "OXVIRT-GUEST write failed"
fi
if script="$(arg run)"; then
    echo "$script" | base64 -d > /tmp/run.sh && sh /tmp/run.sh
    echo "OXVIRT-GUEST run exit=$?"
fi
if m="$(arg marker)"; then
    echo "OXVIRT-MARKER $m"
fi
if arg poweroff >/dev/null; then
    sync
    poweroff -f
fi
# Stay up: a shell on the console for interactive use, restarted if it exits.
while true; do
    setsid cttyhack sh 2>/dev/null || sleep 1
done
