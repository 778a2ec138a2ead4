-- ISO images are disks of content type iso (oVirt's DiskContentType); a VM's CD-ROM holds one:
-- cdrom_disk_id is the VM's configuration (next start), run_cdrom_disk_id what the running VM
-- has in its drive (changed with current=true, or a run once). The boot order and the OS type
-- (which decides the CD-ROM's controller) are oVirt's <os><boot> and <os><type>.
ALTER TABLE disks ADD COLUMN content_type TEXT NOT NULL DEFAULT 'data';
ALTER TABLE vms ADD COLUMN os_type TEXT NOT NULL DEFAULT 'other';
ALTER TABLE vms ADD COLUMN os_boot_devices TEXT NOT NULL DEFAULT 'hd';
ALTER TABLE vms ADD COLUMN cdrom_disk_id TEXT;
ALTER TABLE vms ADD COLUMN run_cdrom_disk_id TEXT;
