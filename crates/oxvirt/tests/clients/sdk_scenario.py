#!/usr/bin/env python3
"""oVirt's Python SDK (ovirtsdk4, unmodified) against a live oxvirt engine with real nodes.

Run by crates/oxvirt/tests/it/rest_clients.rs, which starts the engine and the node processes
(waiting to enroll) and passes, in the environment:
  OXVIRT_URL        https://127.0.0.1:PORT/ovirt-engine/api
  OXVIRT_PASSWORD   admin@internal's password
  OXVIRT_NODES      name=ip:port,name=ip:port   nodes to add as hosts
  OXVIRT_NODE_DIRS  name=dir,...                each node's data dir (its VMs' serial consoles)
  OXVIRT_STORAGE    a directory for the local storage domain
  OXVIRT_KERNEL, OXVIRT_INITRD, OXVIRT_CMDLINE  the test guest
  OXVIRT_PREFIX     a prefix for object names

The scenario: data center, cluster, two hosts, storage domain, attach, disk image upload and
download (ovirt_imageio.client through /imagetransfers), VM with a disk, start
(the guest boots), live snapshot, a VM cloned from it, live migration, stop, clone, preview/undo/commit/restore
(data and configuration), template, VM from the template, start,
stop, then removal; jobs by correlation id, events, faults and re-authentication on the way.
Prints one line per step with its time; exits non-zero on the first failure.
"""

import json
import os
import sys
import time

import ovirtsdk4 as sdk
import ovirtsdk4.types as types

T0 = time.monotonic()
MIB = 1 << 20
P = os.environ.get("OXVIRT_PREFIX", "sdk")


def step(msg):
    print("[%6.1fs] %s" % (time.monotonic() - T0, msg), flush=True)


def wait(what, fn, timeout=120, interval=0.5):
    """Polls fn() until it returns a truthy value; fails naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError("timed out after %ss waiting for %s (last: %r)" % (timeout, what, last))


def pairs(var):
    return dict(p.split("=", 1) for p in os.environ[var].split(",") if p)


def console_has(node_dir, vm_id, text):
    path = os.path.join(node_dir, "run", "vms", vm_id, "serial.log")
    try:
        with open(path, errors="replace") as f:
            return text in f.read()
    except FileNotFoundError:
        return False


def node_disk_buses(node_dir, vm_id):
    """The bus of each disk in the node's record of the running VM."""
    with open(os.path.join(node_dir, "run", "vms", vm_id, "vm.json")) as f:
        return [d.get("bus", "virtio_blk") for d in json.load(f)["create"]["disks"]]


def node_cpu_devices(node_dir, vm_id):
    """How many vCPUs were hot plugged into the running VM, by the node's record."""
    with open(os.path.join(node_dir, "run", "vms", vm_id, "vm.json")) as f:
        return len(json.load(f)["create"].get("cpu_devices", []))


def node_dimms(node_dir, vm_id):
    """The sizes, MiB, of the DIMMs hot plugged into the running VM, by the node's record."""
    with open(os.path.join(node_dir, "run", "vms", vm_id, "vm.json")) as f:
        return [d["size_mib"] for d in json.load(f)["create"].get("dimms", [])]


def node_resume_behavior(node_dir, vm_id):
    """What the node does with the running VM when storage errors stop it, by its record."""
    with open(os.path.join(node_dir, "run", "vms", vm_id, "vm.json")) as f:
        return json.load(f)["create"]["resume_behavior"]


def node_disks(node_dir, vm_id):
    """How many disks the node's record of the running VM has."""
    return len(node_disk_buses(node_dir, vm_id))


def image_volumes(sd_id, disk_id):
    """The disk's volumes on the local storage domain, base first, from their VDSM metadata."""
    d = os.path.join(os.environ["OXVIRT_STORAGE"], sd_id, "images", disk_id)
    meta = {}
    for f in os.listdir(d):
        if f.endswith(".meta"):
            with open(os.path.join(d, f)) as m:
                kv = dict(l.strip().split("=", 1) for l in m if "=" in l)
            meta[f[:-5]] = kv
    children = {kv["PUUID"]: v for v, kv in meta.items()}
    chain = [v for v, kv in meta.items() if kv["PUUID"] not in meta]
    assert len(chain) == 1, meta
    while chain[-1] in children:
        chain.append(children[chain[-1]])
    assert len(chain) == len(meta), (chain, meta)
    assert meta[chain[-1]]["VOLTYPE"] == "LEAF", meta
    return [os.path.join(d, v) for v in chain]


def virtual_size(path):
    """The image's guest-visible size (read while QEMU holds it)."""
    import subprocess
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["virtual-size"]


def content(path):
    """The guest-visible content of a volume with its backing chain, as a digest of its first
    64 MiB (the disk's size when it was snapshotted: it grows later)."""
    import hashlib
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile() as t:
        subprocess.run(["qemu-img", "convert", "-O", "raw", path, t.name], check=True)
        with open(t.name, "rb") as f:
            return hashlib.sha256(f.read(64 * MIB)).hexdigest()


def qemu_write(path, pattern, offset_mib):
    import subprocess
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d %dM 1M" % (pattern, offset_mib), path],
                   check=True, stdout=subprocess.DEVNULL)


def revoke(token):
    """Logs the token out behind the SDK's back (as an expired session would be)."""
    import ssl
    import urllib.parse
    import urllib.request
    base = os.environ["OXVIRT_URL"].split("/ovirt-engine/")[0]
    data = urllib.parse.urlencode({"scope": "", "token": token}).encode()
    ctx = ssl._create_unverified_context()
    with urllib.request.urlopen(base + "/ovirt-engine/services/sso-logout", data=data, context=ctx) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    req = urllib.request.Request(os.environ["OXVIRT_URL"], headers={"Authorization": "Bearer " + token})
    try:
        urllib.request.urlopen(req, context=ctx)
        raise AssertionError("a revoked token still works")
    except urllib.error.HTTPError as e:
        assert e.code == 401, e.code


def add_cow_disk(vm_svc, name, size, interface, bootable):
    """A new thin COW disk on the scenario's domain, attached active to the VM."""
    return vm_svc.disk_attachments_service().add(types.DiskAttachment(
        disk=types.Disk(name=name, format=types.DiskFormat.COW, provisioned_size=size,
                        sparse=True, storage_domains=[types.StorageDomain(name=P + "-data")]),
        interface=interface,
        bootable=bootable,
        active=True,
    ))


def engine_ca(path):
    """The engine's CA certificate, fetched as oVirt's docs tell clients to (pki-resource)."""
    import ssl
    import urllib.request
    base = os.environ["OXVIRT_URL"].split("/ovirt-engine/")[0]
    url = base + "/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA"
    with urllib.request.urlopen(url, context=ssl._create_unverified_context()) as r:
        pem = r.read()
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----"), pem[:40]
    with open(path, "wb") as f:
        f.write(pem)
    return path


def start_transfer(system, disk_id, direction, inactivity_timeout=None, snapshot=None):
    """An image transfer as the SDK's upload_disk.py example starts it (download_disk_snapshot.py
    with `snapshot`, a disk snapshot's id), once it serves."""
    transfers = system.image_transfers_service()
    if snapshot:
        t = transfers.add(types.ImageTransfer(snapshot=types.DiskSnapshot(id=snapshot), direction=direction,
                                              format=types.DiskFormat.RAW))
    else:
        t = transfers.add(types.ImageTransfer(disk=types.Disk(id=disk_id), direction=direction,
                                              format=types.DiskFormat.RAW,
                                              inactivity_timeout=inactivity_timeout))
    svc = transfers.image_transfer_service(t.id)
    t = wait("transfer serving", lambda: (lambda x: x if x.phase != types.ImageTransferPhase.INITIALIZING
                                          else None)(svc.get()), 60, 0.2)
    assert t.phase == types.ImageTransferPhase.TRANSFERRING, t.phase
    assert t.transfer_url.startswith("https://") and t.transfer_url.endswith("/images/" + t.id), t.transfer_url
    return svc, t


def transfer_ended(svc):
    return wait("transfer finished", lambda: (lambda x: x if x.phase in (
        types.ImageTransferPhase.FINISHED_SUCCESS, types.ImageTransferPhase.FINISHED_FAILURE) else None)(svc.get()),
        60, 0.2)


def same_image(a, b):
    import subprocess
    r = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    assert r.returncode == 0, "%s and %s differ: %s%s" % (a, b, r.stdout, r.stderr)


def image_transfers(system, sd):
    """Upload a qcow2 image into a new disk and download it again with ovirt-imageio's client
    (the one the SDK's examples and Ansible's ovirt_disk use); a cancelled upload removes its
    disk, an idle download is cancelled by the system, a second transfer of a locked disk and
    a transfer of a missing disk are refused."""
    import subprocess
    import tempfile
    from ovirt_imageio import client as imageio
    disks = system.disks_service()
    with tempfile.TemporaryDirectory() as tmp:
        ca = engine_ca(os.path.join(tmp, "ca.pem"))
        src = os.path.join(tmp, "src.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, "48M"], check=True)
        qemu_write(src, 0xab, 1)
        qemu_write(src, 0xcd, 30)
        up = disks.add(types.Disk(name=P + "-upload", format=types.DiskFormat.COW, provisioned_size=48 * MIB,
                                  sparse=True, storage_domains=[types.StorageDomain(id=sd.id)]))
        up_svc = disks.disk_service(up.id)
        wait("upload disk ok", lambda: up_svc.get().status == types.DiskStatus.OK)
        svc, t = start_transfer(system, up.id, types.ImageTransferDirection.UPLOAD)
        assert up_svc.get().status == types.DiskStatus.LOCKED
        try:
            start_transfer(system, up.id, types.ImageTransferDirection.UPLOAD)
            raise AssertionError("a second transfer of a locked disk was accepted")
        except sdk.Error as e:
            assert e.code == 409, e
        imageio.upload(src, t.transfer_url, ca)
        svc.finalize()
        t = transfer_ended(svc)
        assert t.phase == types.ImageTransferPhase.FINISHED_SUCCESS, (t.phase, t)
        assert t.transferred >= 2 * MIB, t.transferred
        d = up_svc.get()
        assert d.status == types.DiskStatus.OK and d.actual_size > 0, (d.status, d.actual_size)
        same_image(src, image_volumes(sd.id, up.id)[-1])
        step("image transfer: a qcow2 image uploaded with ovirt_imageio.client into disk %s" % up.id)

        svc, t = start_transfer(system, up.id, types.ImageTransferDirection.DOWNLOAD)
        dst = os.path.join(tmp, "dst.qcow2")
        imageio.download(t.transfer_url, dst, ca, fmt="qcow2")
        svc.finalize()
        assert transfer_ended(svc).phase == types.ImageTransferPhase.FINISHED_SUCCESS
        same_image(src, dst)
        assert up_svc.get().status == types.DiskStatus.OK
        step("image transfer: downloaded again, the same guest data")

        # Idle for longer than inactivity_timeout: the system cancels; a download keeps its disk.
        svc, t = start_transfer(system, up.id, types.ImageTransferDirection.DOWNLOAD, inactivity_timeout=2)
        t = transfer_ended(svc)
        assert t.phase == types.ImageTransferPhase.FINISHED_FAILURE, t.phase
        wait("disk unlocked", lambda: up_svc.get().status == types.DiskStatus.OK, 30)
        # A cancelled upload removes its disk (oVirt: "removes the partial image").
        svc, t = start_transfer(system, up.id, types.ImageTransferDirection.UPLOAD)
        svc.cancel()
        assert transfer_ended(svc).phase == types.ImageTransferPhase.FINISHED_FAILURE

        def gone():
            try:
                up_svc.get()
                return False
            except sdk.NotFoundError:
                return True
        wait("cancelled upload's disk removed", gone, 60)
        assert not os.path.exists(os.path.join(os.environ["OXVIRT_STORAGE"], sd.id, "images", up.id))
        try:
            start_transfer(system, up.id, types.ImageTransferDirection.DOWNLOAD)
            raise AssertionError("a transfer of a missing disk was accepted")
        except sdk.NotFoundError:
            pass
        step("image transfer: idle download cancelled by the system, cancelled upload's disk removed")

        # An ISO uploads as a raw disk of content type iso, for VMs' CD-ROMs.
        root = os.path.join(tmp, "isoroot")
        os.makedirs(root)
        with open(os.path.join(root, "id"), "w") as f:
            f.write("tools\n")
        iso = os.path.join(tmp, "tools.iso")
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "TOOLS", "-o", iso, root], check=True)
        cd = disks.add(types.Disk(name=P + "-tools.iso", content_type=types.DiskContentType.ISO,
                                  format=types.DiskFormat.RAW, sparse=True, provisioned_size=os.path.getsize(iso),
                                  storage_domains=[types.StorageDomain(id=sd.id)]))
        cd_svc = disks.disk_service(cd.id)
        wait("ISO disk ok", lambda: cd_svc.get().status == types.DiskStatus.OK)
        svc, t = start_transfer(system, cd.id, types.ImageTransferDirection.UPLOAD)
        imageio.upload(iso, t.transfer_url, ca)
        svc.finalize()
        assert transfer_ended(svc).phase == types.ImageTransferPhase.FINISHED_SUCCESS
        assert cd_svc.get().content_type == types.DiskContentType.ISO
        same_image(iso, image_volumes(sd.id, cd.id)[-1])
        step("ISO %s uploaded as a disk of content type iso" % cd.id)
        return cd.id


def vnc_login(host, port, password):
    """Logs in to a VNC server with VNC authentication (RFB 3.8, DES of the challenge);
    returns the server's SecurityResult (0: accepted)."""
    import socket
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rwb")
        version = f.read(12)
        assert version.startswith(b"RFB 003."), version
        f.write(b"RFB 003.008\n")
        f.flush()
        offered = f.read(f.read(1)[0])
        assert list(offered) == [2], "the console offers %r, not VNC authentication only" % offered
        f.write(bytes([2]))
        f.flush()
        challenge = f.read(16)
        # VNC's DES key: the password's first 8 bytes, each with its bits reversed.
        key = bytes(int("{:08b}".format(b)[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
        enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
        f.write(enc.update(challenge) + enc.finalize())
        f.flush()
        return int.from_bytes(f.read(4), "big")


def raw(method, path, token, body=None, headers=()):
    """A request outside the SDK, to see what it hides (the status code): (status, JSON body)."""
    import ssl
    import urllib.request
    h = {"Authorization": "Bearer " + token, "Version": "4", "Accept": "application/json",
         "Content-Type": "application/xml"}
    h.update(headers)
    req = urllib.request.Request(os.environ["OXVIRT_URL"] + path, method=method, headers=h,
                                 data=body.encode() if body is not None else None)
    with urllib.request.urlopen(req, context=ssl._create_unverified_context()) as r:
        return r.status, json.loads(r.read() or b"{}")


def main():
    nodes = pairs("OXVIRT_NODES")
    node_dirs = pairs("OXVIRT_NODE_DIRS")
    names = sorted(nodes)
    guest_os = types.OperatingSystem(
        kernel=os.environ["OXVIRT_KERNEL"],
        initrd=os.environ["OXVIRT_INITRD"],
        cmdline=os.environ["OXVIRT_CMDLINE"],
    )

    conn = sdk.Connection(
        url=os.environ["OXVIRT_URL"],
        username="admin@internal",
        password=os.environ["OXVIRT_PASSWORD"],
        insecure=True,
        timeout=180,
    )
    conn.test(raise_exception=True)
    system = conn.system_service()
    api = system.get()
    assert api.product_info.version.major == 4, api.product_info.version.major
    assert api.special_objects.blank_template.id == "00000000-0000-0000-0000-000000000000"
    step("connected to %s %s" % (api.product_info.name, api.product_info.version.full_version))

    # Bad credentials are an AuthError.
    try:
        sdk.Connection(url=os.environ["OXVIRT_URL"], username="admin@internal",
                       password="wrong", insecure=True).system_service().get()
        raise AssertionError("a wrong password was accepted")
    except sdk.AuthError:
        pass

    dcs = system.data_centers_service()
    dc = dcs.add(types.DataCenter(name=P + "-dc", description="from the SDK", local=False,
                                  version=types.Version(major=4, minor=7)))
    assert dc.id and dc.status == types.DataCenterStatus.UNINITIALIZED, dc.status
    try:
        dcs.add(types.DataCenter(name=P + "-dc"))
        raise AssertionError("a duplicate data center was accepted")
    except sdk.Error as e:
        assert e.code == 409, e
    found = dcs.list(search='name="%s-dc"' % P)
    assert [d.id for d in found] == [dc.id], found
    try:
        dcs.data_center_service("5b0e9b3c-0000-4000-8000-000000000000").get()
        raise AssertionError("a missing data center was found")
    except sdk.NotFoundError:
        pass
    step("data center %s" % dc.id)

    clusters = system.clusters_service()
    cl = clusters.add(types.Cluster(
        name=P + "-cl",
        cpu=types.Cpu(architecture=types.Architecture.X86_64, type="qemu64"),
        data_center=types.DataCenter(name=P + "-dc"),
    ))
    assert cl.data_center.id == dc.id
    assert [c.id for c in clusters.list(search="datacenter=%s-dc" % P)] == [cl.id]
    step("cluster %s" % cl.id)

    hosts = system.hosts_service()
    for n in names:
        h = hosts.add(types.Host(name=n, address=nodes[n], root_password="unused",
                                 cluster=types.Cluster(name=P + "-cl")))
        assert h.name == n
    wait("hosts up", lambda: len(hosts.list(search="cluster=%s-cl and status=up" % P)) == len(names), 120)
    step("hosts %s up" % ", ".join(names))

    sds = system.storage_domains_service()
    sd = sds.add(types.StorageDomain(
        name=P + "-data",
        type=types.StorageDomainType.DATA,
        host=types.Host(name=names[0]),
        storage=types.HostStorage(type=types.StorageType.LOCALFS, path=os.environ["OXVIRT_STORAGE"]),
    ))
    assert sd.status == types.StorageDomainStatus.UNATTACHED, sd.status
    attached = dcs.data_center_service(dc.id).storage_domains_service()
    attached.add(types.StorageDomain(id=sd.id))
    wait("storage domain active",
         lambda: attached.storage_domain_service(sd.id).get().status == types.StorageDomainStatus.ACTIVE, 120)
    wait("data center up", lambda: dcs.data_center_service(dc.id).get().status == types.DataCenterStatus.UP, 60)
    assert [s.id for s in sds.list(search="name=%s-data" % P)] == [sd.id]
    step("storage domain %s active" % sd.id)

    # Select the last host as SPM (the current SPM steps down), as an admin does.
    last = hosts.list(search="name=%s" % names[-1])[0]
    hosts.host_service(last.id).force_select_spm()
    assert hosts.host_service(last.id).get().spm.status == types.SpmStatus.SPM
    assert all(h.spm.status != types.SpmStatus.SPM
               for h in hosts.list(search="cluster=%s-cl" % P) if h.id != last.id)
    step("host %s selected as SPM" % last.name)

    # An add with storage work answers 202 at once, the disk locked while its volume is made
    # (as oVirt); with `Expect: 201-created` it answers 201 once the disk is ready.
    disks = system.disks_service()
    token = conn.authenticate()

    def disk_xml(name):
        return ("<disk><name>%s</name><provisioned_size>%d</provisioned_size><format>cow</format>"
                "<storage_domains><storage_domain><name>%s-data</name></storage_domain>"
                "</storage_domains></disk>" % (name, 8 * MIB, P))
    code, early = raw("POST", "/disks", token, disk_xml(P + "-early"))
    assert code == 202 and early["status"] in ("locked", "ok"), (code, early)
    wait("early disk ok", lambda: disks.disk_service(early["id"]).get().status == types.DiskStatus.OK)
    code, done = raw("POST", "/disks", token, disk_xml(P + "-done"), {"Expect": "201-created"})
    assert code == 201 and done["status"] == "ok", (code, done)
    # DiskService.copy: a new disk of its own on the domain, named by the action's disk alias.
    disks.disk_service(done["id"]).copy(storage_domain=types.StorageDomain(id=sd.id),
                                        disk=types.Disk(alias=P + "-copy"))
    copies = disks.list(search="name=%s-copy" % P)
    assert len(copies) == 1 and copies[0].id != done["id"], copies
    assert copies[0].status == types.DiskStatus.OK and copies[0].provisioned_size == 8 * MIB
    assert len(image_volumes(sd.id, copies[0].id)) == 1
    for d in (early, done, {"id": copies[0].id}):
        disks.disk_service(d["id"]).remove()
    step("disk adds: 202 while locked, 201 with Expect: 201-created; a disk copied")

    iso_id = image_transfers(system, sd)

    # The cluster's MAC pool: followed from the cluster, its ranges replaced.
    pool_ref = clusters.cluster_service(cl.id).get().mac_pool
    pool_svc = system.mac_pools_service().mac_pool_service(pool_ref.id)
    assert pool_svc.get().ranges[0].from_.startswith("56:6f:")
    pool = pool_svc.update(types.MacPool(ranges=[
        types.Range(from_="02:1a:4a:00:01:00", to="02:1a:4a:00:01:ff"),
    ]))
    assert [(r.from_, r.to) for r in pool.ranges] == [("02:1a:4a:00:01:00", "02:1a:4a:00:01:ff")]
    assert pool_ref.id in [p.id for p in system.mac_pools_service().list()]
    step("MAC pool ranges replaced")

    vms = system.vms_service()
    vm = vms.add(
        types.Vm(
            name=P + "-vm",
            cluster=types.Cluster(name=P + "-cl"),
            template=types.Template(name="Blank"),
            memory=256 * MIB,
            memory_policy=types.MemoryPolicy(guaranteed=256 * MIB),
            cpu=types.Cpu(topology=types.CpuTopology(cores=1, sockets=1, threads=1)),
            os=guest_os,
            storage_error_resume_behaviour=types.VmStorageErrorResumeBehaviour.LEAVE_PAUSED,
        ),
        headers={"Correlation-Id": P + "-add-vm"},
    )
    vm_svc = vms.vm_service(vm.id)
    assert vm.storage_error_resume_behaviour == types.VmStorageErrorResumeBehaviour.LEAVE_PAUSED
    # Tags: one under the root tag, on the VM, found by search, removed.
    tags = system.tags_service()
    tag = tags.add(types.Tag(name=P + "-tag", description="front ends"))
    assert conn.follow_link(tag.parent).name == "root"
    vm_svc.tags_service().add(types.Tag(id=tag.id))
    assert [t.name for t in vm_svc.tags_service().list()] == [P + "-tag"]
    assert [v.name for v in vms.list(search="tag=" + P + "-tag")] == [P + "-vm"]
    tags.tag_service(tag.id).remove()
    assert vm_svc.tags_service().list() == []
    step("tag put on the VM and searched")
    att = add_cow_disk(vm_svc, P + "-disk", 64 * MIB, types.DiskInterface.VIRTIO, bootable=True)
    disk_svc = system.disks_service().disk_service(att.disk.id)
    wait("disk ok", lambda: disk_svc.get().status == types.DiskStatus.OK)
    assert disk_svc.get().provisioned_size == 64 * MIB
    assert len(vm_svc.disk_attachments_service().list()) == 1
    full = vm_svc.get(follow="disk_attachments.disk")
    assert full.disk_attachments[0].disk.name == P + "-disk", full.disk_attachments
    step("VM %s with disk %s" % (vm.id, att.disk.id))

    vm_svc.start()
    up = wait("VM up", lambda: (lambda v: v if v.status == types.VmStatus.UP else None)(vm_svc.get()), 120)
    src = conn.follow_link(up.host)
    wait("guest boot on " + src.name, lambda: console_has(node_dirs[src.name], vm.id, "OXVIRT-GUEST"), 120)
    assert node_resume_behavior(node_dirs[src.name], vm.id) == "leave_paused"
    step("VM up on %s, guest booted" % src.name)

    # Statistics, as monitoring tools read them: the VM's memory and CPU, its host's.
    stat_svc = vm_svc.statistics_service()
    stats = {st.name: st for st in stat_svc.list()}
    assert stats["memory.installed"].values[0].datum == 256 * MIB, stats["memory.installed"]
    assert 0 < stats["memory.used"].values[0].datum <= 256 * MIB, stats["memory.used"]
    assert stats["memory.used"].unit == types.StatisticUnit.BYTES
    for name in ["cpu.current.guest", "cpu.current.hypervisor", "cpu.current.total"]:
        assert 0 <= stats[name].values[0].datum <= 100, stats[name]
        assert stats[name].unit == types.StatisticUnit.PERCENT
    one = stat_svc.statistic_service(stats["cpu.current.total"].id).get()
    assert one.name == "cpu.current.total" and one.vm.id == vm.id, one
    hstats = {st.name: st for st in hosts.host_service(src.id).statistics_service().list()}
    assert hstats["memory.total"].values[0].datum > hstats["memory.free"].values[0].datum > 0, hstats
    assert 0 <= hstats["cpu.current.idle"].values[0].datum <= 100
    assert hstats["boot.time"].values[0].datum > 1_600_000_000
    step("statistics of the VM (%d) and its host (%d)" % (len(stats), len(hstats)))

    # An external event, as a backup or monitoring tool records one; once per origin and id.
    events = system.events_service()
    ev = events.add(types.Event(description="checked %s" % vm.id, severity=types.LogSeverity.NORMAL,
                                origin=P + "-monitor", custom_id=7, vm=types.Vm(id=vm.id)))
    assert ev.origin == P + "-monitor" and ev.custom_id == 7 and ev.code == 12000, ev
    try:
        events.add(types.Event(description="again", severity=types.LogSeverity.NORMAL,
                               origin=P + "-monitor", custom_id=7))
        raise AssertionError("an external event was recorded twice")
    except sdk.Error as e:
        assert e.code == 409, e
    step("external event %s" % ev.id)

    # Its VNC console: no way in without a ticket; the remote-viewer file's works, a wrong
    # password does not, a ticket of one's own works too.
    consoles_svc = vm_svc.graphics_consoles_service()
    consoles = consoles_svc.list()
    assert [c.protocol for c in consoles] == [types.GraphicsType.VNC], consoles
    console_svc = consoles_svc.console_service(consoles[0].id)
    vv = console_svc.remote_viewer_connection_file()
    fields = dict(l.split("=", 1) for l in vv.splitlines() if "=" in l and not l.startswith("#"))
    assert fields["type"] == "vnc" and fields["host"].startswith("127."), vv
    host, port = fields["host"], int(fields["port"])
    assert vnc_login(host, port, fields["password"]) == 0, "the ticket was refused"
    assert vnc_login(host, port, "not-it") != 0, "a wrong password was accepted"
    console_svc.ticket(ticket=types.Ticket(value="s3cret", expiry=60))
    assert vnc_login(host, port, "s3cret") == 0
    step("VNC console through a ticket and a remote-viewer file; a wrong password refused")

    # The CD of the running VM changes now (current=True); the configuration keeps its own;
    # an ISO in a drive is not removed; ejected, the drive is empty.
    cdroms = vm_svc.cdroms_service()
    cds = cdroms.list()
    assert len(cds) == 1 and cds[0].file is None, cds
    cd_svc = cdroms.cdrom_service(cds[0].id)
    cd_svc.update(types.Cdrom(file=types.File(id=iso_id)), current=True)
    assert cd_svc.get(current=True).file.id == iso_id
    assert cd_svc.get().file is None, "the configuration's CD changed"
    with open(os.path.join(node_dirs[src.name], "run", "vms", vm.id, "vm.json")) as f:
        media = json.load(f)["create"]["cdrom"]["media"]
    assert iso_id in media["path"], media
    try:
        system.disks_service().disk_service(iso_id).remove()
        raise AssertionError("an ISO in a running VM's CD-ROM was removed")
    except sdk.Error as e:
        assert e.code == 409, e
    cd_svc.update(types.Cdrom(file=types.File(id="")), current=True)
    assert cd_svc.get(current=True).file is None
    system.disks_service().disk_service(iso_id).remove()
    step("CD changed in the running VM and ejected; the ISO removed once out of the drive")

    snaps = vm_svc.snapshots_service()
    snap = snaps.add(types.Snapshot(description=P + "-snap", persist_memorystate=True))
    wait("snapshot ok", lambda: snaps.snapshot_service(snap.id).get().snapshot_status == types.SnapshotStatus.OK)
    assert snaps.snapshot_service(snap.id).get().persist_memorystate is True
    kinds = sorted(str(s.snapshot_type) for s in snaps.list())
    assert kinds == ["active", "regular"], kinds
    step("live snapshot %s" % snap.id)

    # A snapshot-based backup of the running VM, as backup tools do it: the snapshot's disks,
    # the domain's disk snapshots, and the disk's data as of the snapshot downloaded.
    sdisks = snaps.snapshot_service(snap.id).disks_service().list()
    assert [d.id for d in sdisks] == [att.disk.id], sdisks
    dsnaps = [x for x in sds.storage_domain_service(sd.id).disk_snapshots_service().list()
              if x.disk.id == att.disk.id]
    assert [x.id for x in dsnaps] == [sdisks[0].image_id], (dsnaps, sdisks)
    try:
        start_transfer(system, None, types.ImageTransferDirection.UPLOAD, snapshot=dsnaps[0].id)
        raise AssertionError("an upload into a disk snapshot was accepted")
    except sdk.Error as e:
        assert e.code == 400, e
    import tempfile
    from ovirt_imageio import client as imageio
    with tempfile.TemporaryDirectory() as tmp:
        ca = engine_ca(os.path.join(tmp, "ca.pem"))
        svc, t = start_transfer(system, None, types.ImageTransferDirection.DOWNLOAD, snapshot=dsnaps[0].id)
        backup = os.path.join(tmp, "backup.qcow2")
        imageio.download(t.transfer_url, backup, ca, fmt="qcow2")
        svc.finalize()
        assert transfer_ended(svc).phase == types.ImageTransferPhase.FINISHED_SUCCESS
        vols = image_volumes(sd.id, att.disk.id)
        assert os.path.basename(vols[0]) == dsnaps[0].id, vols
        same_image(backup, vols[0])
    assert vm_svc.get().status == types.VmStatus.UP
    wait("disk unlocked after the backup", lambda: disk_svc.get().status == types.DiskStatus.OK, 30)
    step("disk snapshot %s downloaded while the VM runs" % dsnaps[0].id)

    # A VM made from the snapshot while the VM runs (oVirt's clone from snapshot): the
    # snapshot's configuration, and the disk's data as of the snapshot in a volume of its own.
    sclone = vms.add(types.Vm(name=P + "-snapclone", cluster=types.Cluster(id=cl.id),
                              snapshots=[types.Snapshot(id=snap.id)]))
    sclone_svc = vms.vm_service(sclone.id)
    wait("snapshot clone made", lambda: sclone_svc.get().status == types.VmStatus.DOWN, 120)
    assert sclone_svc.get().memory == 256 * MIB, sclone_svc.get().memory
    assert vm_svc.get().status == types.VmStatus.UP
    satts = sclone_svc.disk_attachments_service().list()
    assert len(satts) == 1 and satts[0].disk.id != att.disk.id, satts
    svols = image_volumes(sd.id, satts[0].disk.id)
    assert len(svols) == 1, svols
    same_image(svols[0], image_volumes(sd.id, att.disk.id)[0])
    assert snaps.snapshot_service(snap.id).get().snapshot_status == types.SnapshotStatus.OK
    active = [x for x in snaps.list() if x.snapshot_type == types.SnapshotType.ACTIVE][0]
    try:
        vms.add(types.Vm(name=P + "-snapclone2", cluster=types.Cluster(id=cl.id),
                         snapshots=[types.Snapshot(id=active.id)]))
        raise AssertionError("a VM was made from the active snapshot")
    except sdk.Error as e:
        assert e.code == 400, e
    sclone_svc.remove()
    wait("the snapshot clone's disk removed", lambda: not os.path.exists(svols[0]), 30)
    step("VM made from snapshot %s while the VM runs, and removed" % snap.id)

    # A second data domain; the running VM's disk moves there (a live storage migration: the
    # guest writes on), its chain with it, and the automatic snapshot goes again.
    sd2 = sds.add(types.StorageDomain(
        name=P + "-data2",
        type=types.StorageDomainType.DATA,
        host=types.Host(name=names[0]),
        storage=types.HostStorage(type=types.StorageType.LOCALFS, path=os.environ["OXVIRT_STORAGE"]),
    ))
    attached.add(types.StorageDomain(id=sd2.id))
    wait("second storage domain active",
         lambda: attached.storage_domain_service(sd2.id).get().status == types.StorageDomainStatus.ACTIVE, 120)
    vols = lambda sd_id: [os.path.basename(v) for v in image_volumes(sd_id, att.disk.id)]
    chain = vols(sd.id)
    disk_svc.move(storage_domain=types.StorageDomain(id=sd2.id))
    moved = disk_svc.get()
    assert moved.status == types.DiskStatus.OK, moved.status
    assert [s.id for s in moved.storage_domains] == [sd2.id], moved.storage_domains
    assert vols(sd2.id) == chain, (vols(sd2.id), chain)
    assert not os.path.exists(os.path.join(os.environ["OXVIRT_STORAGE"], sd.id, "images", att.disk.id))
    assert vm_svc.get().status == types.VmStatus.UP
    kinds = sorted(str(s.snapshot_type) for s in snaps.list())
    assert kinds == ["active", "regular"], kinds
    step("disk moved live to %s" % sd2.id)

    # More memory for the running VM: a DIMM hot plugged (in 256 MiB steps, as oVirt); an odd
    # amount is refused unless it waits for the next start.
    vm_svc.update(types.Vm(memory=512 * MIB))
    assert node_dimms(node_dirs[src.name], vm.id) == [256], node_dimms(node_dirs[src.name], vm.id)
    try:
        vm_svc.update(types.Vm(memory=600 * MIB))
        raise AssertionError("a running VM took 88 MiB more")
    except sdk.Error as e:
        assert e.code == 409 and "256" in str(e), e
    assert vm_svc.get().memory == 512 * MIB
    step("256 MiB of memory hot plugged")

    # A CPU change reaches the running VM at once (a vCPU hot plugged, oVirt's default); with
    # next_run only the next start gets it; past the VM's maximum it is refused, unchanged.
    topo = lambda n: types.Vm(cpu=types.Cpu(topology=types.CpuTopology(sockets=n, cores=1, threads=1)))
    vm_svc.update(topo(2))
    assert node_cpu_devices(node_dirs[src.name], vm.id) == 1
    vm_svc.update(topo(3), next_run=True)
    assert vm_svc.get().cpu.topology.sockets == 3
    assert node_cpu_devices(node_dirs[src.name], vm.id) == 1
    vm_svc.update(topo(2), next_run=True)
    try:
        vm_svc.update(topo(40))
        raise AssertionError("40 vCPUs were accepted for a VM started with at most 16")
    except sdk.Error as e:
        assert e.code in (400, 409) and "16" in str(e), e
    assert vm_svc.get().cpu.topology.sockets == 2
    assert node_cpu_devices(node_dirs[src.name], vm.id) == 1
    step("a vCPU hot plugged; a next-run change waits; too many refused")

    # Its state saved now would not load into a VM started from its configuration.
    try:
        vm_svc.suspend()
        raise AssertionError("a VM with hot plugged devices was suspended")
    except sdk.Error as e:
        assert e.code == 409 and "hot plugged" in str(e), e
    assert vm_svc.get().status == types.VmStatus.UP

    dst = [n for n in names if n != src.name][0]
    # The cluster's migrations go encrypted from now on (TLS between the nodes).
    cl = clusters.cluster_service(cl.id).update(types.Cluster(
        migration=types.MigrationOptions(encrypted=types.InheritableBoolean.TRUE)))
    assert cl.migration.encrypted == types.InheritableBoolean.TRUE, cl.migration.encrypted
    # Asynchronous requests: a refused one is still the request's error (here: to the host it
    # runs on), an accepted one is answered before the migration is done.
    try:
        vm_svc.migrate(host=types.Host(name=src.name), async_=True)
        raise AssertionError("an asynchronous migration to the VM's own host was accepted")
    except sdk.Error as e:
        assert e.code == 400 and "already runs on that host" in str(e), e
    vm_svc.migrate(host=types.Host(name=dst), async_=True)
    wait("VM up on " + dst, lambda: (lambda v: v.status == types.VmStatus.UP and v.host is not None
                                     and conn.follow_link(v.host).name == dst)(vm_svc.get()), 120)
    wait("guest alive after migration", lambda: console_has(node_dirs[dst], vm.id, "OXVIRT-GUEST"), 60,)
    assert node_cpu_devices(node_dirs[dst], vm.id) == 1, "the hot plugged vCPU did not migrate"
    assert node_dimms(node_dirs[dst], vm.id) == [256], "the hot plugged memory did not migrate"
    step("migrated to %s, encrypted, with its hot plugged vCPU and memory" % dst)

    # The running VM's disk grows through its attachment (oVirt's way): QEMU resizes the active
    # layer under the guest and the SPM records the capacity; a shrink is refused.
    att_svc = vm_svc.disk_attachments_service().attachment_service(att.id)
    att_svc.update(types.DiskAttachment(disk=types.Disk(provisioned_size=96 * MIB)))
    assert disk_svc.get().provisioned_size == 96 * MIB
    assert disk_svc.get().status == types.DiskStatus.OK
    leaf = image_volumes(sd2.id, att.disk.id)[-1]
    assert virtual_size(leaf) == 96 * MIB, virtual_size(leaf)
    with open(leaf + ".meta") as m:
        cap = dict(l.strip().split("=", 1) for l in m if "=" in l)["CAP"]
    assert int(cap) == 96 * MIB, cap
    try:
        att_svc.update(types.DiskAttachment(disk=types.Disk(provisioned_size=32 * MIB)))
        raise AssertionError("a shrink was accepted")
    except sdk.Error as e:
        assert "shrink" in str(e), e
    assert vm_svc.get().status == types.VmStatus.UP
    step("disk extended to 96 MiB under the running guest")

    # A disk added to the running VM is hot plugged (the node's record of the VM has it, on
    # the virtio-scsi controller as asked); deactivated it is unplugged, and it goes with its
    # attachment.
    assert node_disks(node_dirs[dst], vm.id) == 1
    hot_att = add_cow_disk(vm_svc, P + "-hot", 16 * MIB, types.DiskInterface.VIRTIO_SCSI, bootable=False)
    hot_svc = vm_svc.disk_attachments_service().attachment_service(hot_att.id)
    # Answered while the volume is made: plugged once it is.
    wait("hot disk plugged", lambda: hot_svc.get().active is True)
    assert node_disk_buses(node_dirs[dst], vm.id) == ["virtio_blk", "virtio_scsi"], \
        "the running VM did not get the disk on its SCSI controller"
    hot_svc.update(types.DiskAttachment(active=False))
    assert hot_svc.get().active is False
    assert node_disks(node_dirs[dst], vm.id) == 1, "the deactivated disk is still plugged"
    hot_svc.remove(detach_only=False)
    assert all(d.name != P + "-hot" for d in system.disks_service().list())
    step("disk hot plugged and unplugged")

    # A revoked token: the next request gets a 401, the SDK logs in again and retries once.
    revoke(conn.authenticate())
    vm_svc.stop()
    wait("VM down", lambda: vm_svc.get().status == types.VmStatus.DOWN)
    step("stopped")

    # A clone: the same data in disks of its own, the same configuration, then removed.
    vm_svc.clone(vm=types.Vm(name=P + "-clone"))
    clone = vms.list(search="name=%s-clone" % P)[0]
    assert clone.status == types.VmStatus.DOWN and clone.memory == 512 * MIB, clone
    clone_svc = vms.vm_service(clone.id)
    catts = clone_svc.disk_attachments_service().list()
    assert len(catts) == 1 and catts[0].disk.id != att.disk.id, catts
    assert len(image_volumes(sd2.id, catts[0].disk.id)) == 1, "the chain is collapsed"
    same_image(image_volumes(sd2.id, att.disk.id)[-1], image_volumes(sd2.id, catts[0].disk.id)[-1])
    clone_svc.remove()
    step("cloned and the clone removed")

    # Preview, undo, preview again, commit, restore: the data the VM sees each time, read on
    # storage. The present differs from the snapshot by a MiB written while the VM is down.
    vols = image_volumes(sd2.id, att.disk.id)
    assert len(vols) == 2, vols
    # The snapshot kept the VM's configuration too: a preview or restore brings it back, an
    # undo returns the present's.
    vm_svc.update(types.Vm(memory=384 * MIB))
    qemu_write(vols[-1], 0x5A, 1)
    at_snap, present = content(vols[0]), content(vols[-1])
    assert at_snap != present
    snap_svc = snaps.snapshot_service(snap.id)
    # With its memory: the VM waits, suspended, to resume at the snapshot's moment.
    vm_svc.preview_snapshot(snapshot=types.Snapshot(id=snap.id), restore_memory=True)
    assert snap_svc.get().snapshot_status == types.SnapshotStatus.IN_PREVIEW
    assert vm_svc.get().status == types.VmStatus.SUSPENDED, vm_svc.get().status
    kinds = sorted(str(s.snapshot_type) for s in snaps.list())
    assert kinds == ["active", "preview", "regular"], kinds
    assert content(image_volumes(sd2.id, att.disk.id)[-1]) == at_snap
    assert vm_svc.get().memory == 256 * MIB, vm_svc.get().memory
    try:
        snaps.add(types.Snapshot(description="during the preview"))
        raise AssertionError("a snapshot was taken during a preview")
    except sdk.Error as e:
        assert e.code == 409, e
    vm_svc.undo_snapshot()
    assert snap_svc.get().snapshot_status == types.SnapshotStatus.OK
    assert vm_svc.get().status == types.VmStatus.DOWN, vm_svc.get().status
    assert image_volumes(sd2.id, att.disk.id) == vols
    assert content(vols[-1]) == present
    assert vm_svc.get().memory == 384 * MIB, vm_svc.get().memory
    step("preview and undo, the configuration with them")

    vm_svc.preview_snapshot(snapshot=types.Snapshot(id=snap.id), restore_memory=False)
    leaf = image_volumes(sd2.id, att.disk.id)[-1]
    qemu_write(leaf, 0x77, 3)  # the preview takes writes, and the commit keeps them
    previewed = content(leaf)
    assert previewed not in (at_snap, present)
    vm_svc.commit_snapshot()
    kinds = sorted(str(s.snapshot_type) for s in snaps.list())
    assert kinds == ["active", "regular"], kinds
    assert snap_svc.get().snapshot_status == types.SnapshotStatus.OK
    assert content(image_volumes(sd2.id, att.disk.id)[-1]) == previewed
    assert vm_svc.get().memory == 256 * MIB, vm_svc.get().memory
    vm_svc.update(types.Vm(memory=384 * MIB))
    snap_svc.restore(restore_memory=False)
    assert content(image_volumes(sd2.id, att.disk.id)[-1]) == at_snap
    assert vm_svc.get().memory == 256 * MIB, vm_svc.get().memory
    step("preview and commit; restore, the configuration with them")

    templates = system.templates_service()
    tmpl = templates.add(types.Template(name=P + "-tmpl", vm=types.Vm(id=vm.id)))
    wait("template ok", lambda: templates.template_service(tmpl.id).get().status == types.TemplateStatus.OK)
    step("template %s" % tmpl.id)

    vm2 = vms.add(types.Vm(
        name=P + "-vm2",
        cluster=types.Cluster(name=P + "-cl"),
        template=types.Template(name=P + "-tmpl"),
        memory=256 * MIB,
        os=guest_os,
    ))
    vm2_svc = vms.vm_service(vm2.id)
    assert vm2.template.id == tmpl.id
    assert len(vm2_svc.disk_attachments_service().list()) == 1
    # Locked while the template's disk is cloned for it; started before that, it is refused.
    wait("VM2 down", lambda: vm2_svc.get().status == types.VmStatus.DOWN)
    vm2_svc.start()
    up2 = wait("VM2 up", lambda: (lambda v: v if v.status == types.VmStatus.UP else None)(vm2_svc.get()), 120)
    h2 = conn.follow_link(up2.host).name
    wait("VM2 guest boot", lambda: console_has(node_dirs[h2], vm2.id, "OXVIRT-GUEST"), 120)
    step("VM %s from the template up on %s" % (vm2.id, h2))
    vm2_svc.stop()
    wait("VM2 down", lambda: vm2_svc.get().status == types.VmStatus.DOWN)

    # Jobs carry the correlation id; events can be read from a cursor.
    jobs = system.jobs_service().list(search="correlation_id=%s-add-vm" % P)
    assert len(jobs) == 1 and jobs[0].status == types.JobStatus.FINISHED, jobs
    events = system.events_service().list(max=5)
    assert events and all(e.time is not None for e in events), events
    newer = system.events_service().list(from_=int(events[-1].id))
    assert all(int(e.id) > int(events[-1].id) for e in newer)
    step("jobs and events")

    # Removal: VMs (with their disks), the template; a VM that is running cannot be removed.
    vm2_svc.start()
    wait("VM2 up again", lambda: vm2_svc.get().status == types.VmStatus.UP, 120)
    try:
        vm2_svc.remove()
        raise AssertionError("a running VM was removed")
    except sdk.Error as e:
        assert e.code == 409, e
    vm2_svc.stop()
    wait("VM2 down again", lambda: vm2_svc.get().status == types.VmStatus.DOWN)
    snaps.snapshot_service(snap.id).remove()
    wait("snapshot removed", lambda: len(snaps.list()) == 1)
    vm2_svc.remove()
    vm_svc.remove()
    templates.template_service(tmpl.id).remove()
    assert not vms.list(search="name=%s-*" % P)
    assert not system.disks_service().list(search="name=%s-*" % P)
    assert [t.name for t in templates.list()] == ["Blank"]
    step("removed")

    # Disaster recovery, as oVirt does it: a VM whose disk lives on the second domain leaves the
    # engine with that domain (deactivated: its OVF stores written; detached: forgotten) and
    # comes back by registration from the stores once the domain is attached again.
    def dr_vm(name):
        v = vms.add(types.Vm(name=name, cluster=types.Cluster(name=P + "-cl"),
                             template=types.Template(name="Blank"), memory=256 * MIB, os=guest_os))
        v_svc = vms.vm_service(v.id)
        v_svc.disk_attachments_service().add(types.DiskAttachment(
            disk=types.Disk(name=name + "-disk", format=types.DiskFormat.COW, provisioned_size=8 * MIB,
                            sparse=True, storage_domains=[types.StorageDomain(id=sd2.id)]),
            interface=types.DiskInterface.VIRTIO, bootable=True, active=True))
        wait(name + " disk ok", lambda: all(
            system.disks_service().disk_service(a.disk.id).get().status == types.DiskStatus.OK
            for a in v_svc.disk_attachments_service().list()))
        return v, v_svc
    dr, dr_svc = dr_vm(P + "-dr")
    gone, gone_svc = dr_vm(P + "-gone")
    gone_disk = gone_svc.disk_attachments_service().list()[0].disk.id
    # A snapshot with its memory, taken while it ran: the state travels with the domain too.
    dr_svc.start()
    wait("DR VM up", lambda: dr_svc.get().status == types.VmStatus.UP, 120)
    dr_snaps = dr_svc.snapshots_service()
    dr_snap = dr_snaps.add(types.Snapshot(description=P + "-dr-snap", persist_memorystate=True))
    wait("DR snapshot ok", lambda: dr_snaps.snapshot_service(dr_snap.id).get().snapshot_status == types.SnapshotStatus.OK)
    dr_svc.stop()
    wait("DR VM down", lambda: dr_svc.get().status == types.VmStatus.DOWN)
    sd2_svc = sds.storage_domain_service(sd2.id)
    sd2_svc.update_ovf_store()
    att2 = attached.storage_domain_service(sd2.id)
    att2.deactivate()
    wait("second domain in maintenance", lambda: att2.get().status == types.StorageDomainStatus.MAINTENANCE, 120)
    att2.remove()
    wait("second domain detached", lambda: sd2.id not in [x.id for x in attached.list()], 60)
    assert not vms.list(search="name=%s-dr" % P), "the VM left with its domain"
    attached.add(types.StorageDomain(id=sd2.id))
    wait("second domain active again", lambda: att2.get().status == types.StorageDomainStatus.ACTIVE, 120)
    unreg = sd2_svc.vms_service().list(unregistered=True)
    assert sorted(v.name for v in unreg) == [P + "-dr", P + "-gone"], [v.name for v in unreg]
    # One is not wanted back: removed from the domain with its disk.
    sd2_svc.vms_service().vm_service(gone.id).remove()
    assert not os.path.exists(os.path.join(os.environ["OXVIRT_STORAGE"], sd2.id, "images", gone_disk))
    unreg = sd2_svc.vms_service().list(unregistered=True)
    assert [v.name for v in unreg] == [P + "-dr"], [v.name for v in unreg]
    assert unreg[0].id == dr.id
    sd2_svc.vms_service().vm_service(dr.id).register(cluster=types.Cluster(name=P + "-cl"))
    back = dr_svc.get()
    assert back.name == P + "-dr" and back.memory == 256 * MIB, back
    kept = dr_svc.snapshots_service().snapshot_service(dr_snap.id).get()
    assert kept.description == P + "-dr-snap" and kept.persist_memorystate is True, kept
    assert len(dr_svc.disk_attachments_service().list()) == 1
    assert not sd2_svc.vms_service().list(unregistered=True)
    dr_svc.remove()
    step("VMs carried by their domain through detach and attach: one registered again, one removed")

    # Host maintenance and back.
    h = hosts.list(search="name=%s" % names[-1])[0]
    hs = hosts.host_service(h.id)
    hs.deactivate()
    wait("host in maintenance", lambda: hs.get().status == types.HostStatus.MAINTENANCE)
    hs.activate()
    wait("host up again", lambda: hs.get().status == types.HostStatus.UP, 60)
    step("host maintenance and activation")

    conn.close()
    step("done")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # print the whole story for the Rust test's failure message
        import traceback
        traceback.print_exc()
        print("SCENARIO FAILED: %s" % e, flush=True)
        sys.exit(1)
