-- Direct kernel boot, as oVirt's <os><kernel/><initrd/><cmdline/>: paths on the host.
ALTER TABLE vms ADD COLUMN os_kernel TEXT;
ALTER TABLE vms ADD COLUMN os_initrd TEXT;
ALTER TABLE vms ADD COLUMN os_cmdline TEXT;
