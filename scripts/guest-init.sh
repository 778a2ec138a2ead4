#!/bin/busybox sh
# PID 1 of the oxvirt test guest (see scripts/test-guest.sh for the command-line protocol).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         scsi_common scsi_mod sd_mod virtio_scsi cdrom sr_mod isofs \
         virtio_balloon virtio_console failover net_failover virtio_net button evdev; do
    insmod "/lib/modules/$m.ko" 2>/dev/null || echo "OXVIRT-GUEST module $m failed"
done

# The ACPI power button (QMP system_powerdown) powers the guest off, as a real OS would.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho OXVIRT-GUEST powerdown > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod 0755 /etc/acpi/PWRF/00000080
# busybox acpid exits at once without its log and pid directories.
mkdir -p /var/log /var/run
acpid

arg() { # value of oxvirt.$1= on the kernel command line
    for w in $(cat /proc/cmdline); do
        case "$w" in "oxvirt.$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

# A minimal QEMU guest agent on the virtio-serial port org.qemu.guest_agent.0 (when the VM has
# one): guest-sync, guest-ping and fsfreeze freeze/thaw/status, one JSON request per line. The
# port reads EOF while the host side is closed, so the loop reopens it.
qga_serve() {
    frozen=thawed
    while true; do
        exec 3<>"$1" || { sleep 1; continue; }
        while read -r line <&3; do
            case "$line" in
            *guest-sync*)
                id="$(echo "$line" | sed -n 's/.*"id": *\([0-9]*\).*/\1/p')"
                echo "{\"return\": ${id:-0}}" >&3 ;;
            *guest-ping*) echo '{"return": {}}' >&3 ;;
            *guest-fsfreeze-freeze*)
                n=0
                for m in $(awk '$3 ~ /^(ext[234]|xfs|btrfs)$/ {print $2}' /proc/mounts); do
                    fsfreeze -f "$m" && n=$((n + 1))
                done
                frozen=frozen
                echo "OXVIRT-GUEST fsfreeze frozen $n"
                echo "{\"return\": $n}" >&3 ;;
            *guest-fsfreeze-thaw*)
                n=0
                for m in $(awk '$3 ~ /^(ext[234]|xfs|btrfs)$/ {print $2}' /proc/mounts); do
                    fsfreeze -u "$m" && n=$((n + 1))
                done
                frozen=thawed
                echo "OXVIRT-GUEST fsfreeze thawed $n"
                echo "{\"return\": $n}" >&3 ;;
            *guest-fsfreeze-status*) echo "{\"return\": \"$frozen\"}" >&3 ;;
            *) echo '{"error": {"class": "CommandNotFound", "desc": "not in the test agent"}}' >&3 ;;
            esac
        done
        exec 3>&-
        usleep 200000
    done
}
# Ports and their names arrive asynchronously after the driver loads: look for a few seconds,
# when there is a virtio-serial device at all (drivers bind synchronously at insmod).
ls /sys/bus/virtio/drivers/virtio_console/ 2>/dev/null | grep -q '^virtio' && (
    tries=0
    while [ "$tries" -lt 50 ]; do
        for p in /sys/class/virtio-ports/*; do
            if [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
                echo "OXVIRT-GUEST agent on /dev/${p##*/}"
                qga_serve "/dev/${p##*/}"
            fi
        done
        tries=$((tries + 1))
        usleep 100000
    done
) &

# Writes 1 MiB blocks 0..N-1 of /dev/vda forever, block i filled with the byte 'A' + i % 26
# (O_DIRECT), and prints "OXVIRT-GUEST pass P" after each full pass. Rewriting a block with the
# same bytes keeps the disk's expected contents fixed whenever the VM is stopped.
writer() {
    pass=0
    while true; do
        i=0
        while [ "$i" -lt "$1" ]; do
            c="$(printf "\\$(printf %03o $((65 + i % 26)))")"
            tr '\000' "$c" < /dev/zero | dd of=/dev/vda bs=1M seek="$i" count=1 iflag=fullblock \
                oflag=direct 2>/dev/null || echo "OXVIRT-GUEST write failed block $i"
            i=$((i + 1))
            usleep 20000
        done
        echo "OXVIRT-GUEST pass $pass"
        pass=$((pass + 1))
    done
}

echo "OXVIRT-GUEST ready"
if n="$(arg write_mib)"; then
    # A recognisable pattern: every byte is 0x5a. Written with O_DIRECT so it reaches the disk.
    tr '\000' 'Z' < /dev/zero | dd of=/dev/vda bs=1M count="$n" iflag=fullblock oflag=direct 2>/dev/null \
        && echo "OXVIRT-GUEST wrote $n MiB" || echo "OXVIRT-GUEST write failed"
fi
if n="$(arg writer)"; then
    writer "$n" &
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
