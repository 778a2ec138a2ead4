//! The DHCPv4 client of links whose network asks for `bootproto: dhcp`.
//!
//! oxvirt keeps its own small client instead of running `dhclient`: the ISC client's default
//! script rewrites the host's `/etc/resolv.conf` and hostname, Debian confines it with an
//! AppArmor profile that forbids the node's state directory and scripts, and it outlives the
//! node with nobody to tell it the network is gone. This client only gets an address (and the
//! default route when the network carries it) and hands each change to the [`super::NetworkService`],
//! which applies it through netlink like every other change.
//!
//! [`Machine`] is the pure protocol (RFC 2131) on an injected time line:
//!
//! ```text
//!   Selecting ──OFFER──► Requesting ──ACK──► Bound ──T1──► Renewing ──T2──► Rebinding
//!     ▲   ▲                 │ NAK, no reply        ▲  ACK      │                │
//!     │   └─────────────────┘                      └───────────┴────────────────┘
//!     └──────────── NAK while renewing/rebinding, or the lease expires (Lost) ──────┘
//! ```
//!
//! Retransmissions back off 2, 4, 8 … 32 s while selecting; renewals go out at half the time
//! left (at least 1 s apart). Renewals are broadcast like rebinding requests, so the whole
//! client needs one packet socket and no UDP port 68 of its own (which another DHCP client on
//! the host may hold). [`Client`] runs a machine on a thread inside the node's network
//! namespace with an `AF_PACKET` socket bound to the link.
//!
//! Not done: ARP probing of an offered address (DHCPDECLINE), option overload, DHCP relays'
//! unicast replies to giaddr.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use oxvirt_lease::clock::Clock;

use super::model::Ipv4Cidr;
use super::netns::NetNs;

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;
/// The fixed BOOTP header before the options' magic cookie.
const HEADER: usize = 236;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_HOSTNAME: u8 = 12;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAMS: u8 = 55;
const OPT_T1: u8 = 58;
const OPT_T2: u8 = 59;
const OPT_CLIENT_ID: u8 = 61;
const OPT_END: u8 = 255;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Ack = 5,
    Nak = 6,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<MessageType> {
        Some(match v {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            _ => return None,
        })
    }
}

/// A BOOTP/DHCP message, as much of it as a client uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub op: u8,
    pub xid: u32,
    /// The broadcast flag: replies before an address is configured must be broadcast.
    pub broadcast: bool,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    /// Options in order, without pad and end.
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Message {
    fn request(xid: u32, mac: [u8; 6], ciaddr: Ipv4Addr, kind: MessageType) -> Message {
        Message {
            op: BOOTREQUEST,
            xid,
            broadcast: ciaddr.is_unspecified(),
            ciaddr,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: mac,
            options: vec![(OPT_MESSAGE_TYPE, vec![kind as u8])],
        }
    }

    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    pub fn kind(&self) -> Option<MessageType> {
        self.option(OPT_MESSAGE_TYPE)
            .and_then(|v| v.first().copied())
            .and_then(MessageType::from_u8)
    }

    fn addr_option(&self, code: u8) -> Option<Ipv4Addr> {
        self.option(code)
            .filter(|v| v.len() >= 4)
            .map(|v| Ipv4Addr::new(v[0], v[1], v[2], v[3]))
    }

    fn secs_option(&self, code: u8) -> Option<u32> {
        self.option(code)
            .filter(|v| v.len() == 4)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER];
        b[0] = self.op;
        b[1] = 1; // Ethernet
        b[2] = 6;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        if self.broadcast {
            b[10] = 0x80;
        }
        b[12..16].copy_from_slice(&self.ciaddr.octets());
        b[16..20].copy_from_slice(&self.yiaddr.octets());
        b[20..24].copy_from_slice(&self.siaddr.octets());
        b[28..34].copy_from_slice(&self.chaddr);
        b.extend_from_slice(&MAGIC);
        for (code, value) in &self.options {
            // Option values here are at most a few dozen bytes; longer ones are cut, not wrapped.
            let len = value.len().min(255);
            b.push(*code);
            b.push(len as u8);
            b.extend_from_slice(&value[..len]);
        }
        b.push(OPT_END);
        // Some servers drop BOOTP messages shorter than the original 300 bytes.
        if b.len() < 300 {
            b.resize(300, OPT_PAD);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Message> {
        if b.len() < HEADER + MAGIC.len() || b[1] != 1 || b[2] != 6 || b[HEADER..HEADER + 4] != MAGIC {
            return None;
        }
        let addr = |at: usize| Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
        let mut options = Vec::new();
        let mut i = HEADER + 4;
        while i < b.len() {
            match b[i] {
                OPT_PAD => i += 1,
                OPT_END => break,
                code => {
                    let len = *b.get(i + 1)? as usize;
                    let value = b.get(i + 2..i + 2 + len)?;
                    options.push((code, value.to_vec()));
                    i += 2 + len;
                }
            }
        }
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&b[28..34]);
        Some(Message {
            op: b[0],
            xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            broadcast: b[10] & 0x80 != 0,
            ciaddr: addr(12),
            yiaddr: addr(16),
            siaddr: addr(20),
            chaddr,
            options,
        })
    }
}

/// An address lease, with its times on the machine's time line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub addr: Ipv4Cidr,
    pub router: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub acquired: Duration,
    pub lease_time: Duration,
    pub t1: Duration,
    pub t2: Duration,
}

impl Lease {
    fn from_ack(m: &Message, now: Duration) -> Option<Lease> {
        if m.yiaddr.is_unspecified() {
            return None;
        }
        let prefix = match m.addr_option(OPT_SUBNET_MASK) {
            Some(mask) => {
                let bits = u32::from(mask);
                // A mask must be contiguous ones.
                if bits.leading_ones() + bits.trailing_zeros() != 32 {
                    return None;
                }
                bits.leading_ones() as u8
            }
            None => 32,
        };
        let lease = m.secs_option(OPT_LEASE_TIME)?;
        // 0xffffffff is "infinite": keep it for a century rather than special-casing it.
        let secs = |s: u32| Duration::from_secs(u64::from(s));
        let lease_time = secs(lease);
        let t1 = m.secs_option(OPT_T1).map_or(lease_time / 2, secs).min(lease_time);
        let t2 = m
            .secs_option(OPT_T2)
            .map_or(lease_time * 7 / 8, secs)
            .clamp(t1, lease_time);
        Some(Lease {
            addr: Ipv4Cidr {
                addr: m.yiaddr,
                prefix,
            },
            router: m.addr_option(OPT_ROUTER).filter(|r| !r.is_unspecified()),
            server: m.addr_option(OPT_SERVER_ID).unwrap_or(m.siaddr),
            acquired: now,
            lease_time,
            t1,
            t2,
        })
    }

    fn expires(&self) -> Duration {
        self.acquired + self.lease_time
    }
}

/// What the host must change after a step of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Configure this lease (new, or renewed: the same address again with a fresh time);
    /// `replaces` is the previous lease when its address differs.
    Bound { lease: Lease, replaces: Option<Lease> },
    /// The lease ended (expired, or the server refused to renew it): remove its address.
    Lost(Lease),
}

/// What one step of the machine produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// A message to broadcast now.
    pub send: Option<Message>,
    pub change: Option<Change>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Selecting,
    Requesting { offer: Ipv4Addr, server: Ipv4Addr },
    Bound,
    Renewing,
    Rebinding,
}

/// The client protocol for one link; pure: time comes in as `now` on any monotonic line.
#[derive(Debug)]
pub struct Machine {
    mac: [u8; 6],
    hostname: Option<String>,
    xid: u32,
    phase: Phase,
    lease: Option<Lease>,
    /// An address to ask for again (the one the link had before the node restarted).
    prefer: Option<Ipv4Addr>,
    next_tx: Duration,
    tries: u32,
}

/// Requests sent while requesting an offer before going back to selecting.
const REQUEST_TRIES: u32 = 4;

impl Machine {
    pub fn new(mac: [u8; 6], hostname: Option<String>, prefer: Option<Ipv4Addr>, xid: u32) -> Machine {
        Machine {
            mac,
            hostname,
            xid,
            phase: Phase::Selecting,
            lease: None,
            prefer,
            next_tx: Duration::ZERO,
            tries: 0,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// When [`Machine::poll`] has something to do next.
    pub fn wake_at(&self) -> Duration {
        let Some(l) = &self.lease else {
            return self.next_tx;
        };
        match self.phase {
            Phase::Bound => l.acquired + l.t1,
            Phase::Renewing => self.next_tx.min(l.acquired + l.t2),
            Phase::Rebinding => self.next_tx.min(l.expires()),
            _ => self.next_tx,
        }
    }

    /// Runs the timers: (re)transmits what is due, moves between renewing and rebinding, and
    /// gives the lease up when it expires. `xid` is a fresh random transaction id, used when a
    /// new exchange starts (retransmissions keep theirs).
    pub fn poll(&mut self, now: Duration, xid: u32) -> Step {
        if let Some(l) = self.lease.clone() {
            if now >= l.expires() {
                self.lease = None;
                self.restart(now, xid);
                let mut step = self.poll(now, xid);
                step.change = Some(Change::Lost(l));
                return step;
            }
            match self.phase {
                Phase::Bound if now >= l.acquired + l.t1 => {
                    self.phase = Phase::Renewing;
                    self.next_tx = now;
                    self.xid = xid;
                }
                Phase::Renewing if now >= l.acquired + l.t2 => {
                    self.phase = Phase::Rebinding;
                    self.next_tx = now;
                    self.xid = xid;
                }
                _ => {}
            }
        }
        if now < self.next_tx || self.phase == Phase::Bound {
            return Step::default();
        }
        let msg = match self.phase.clone() {
            Phase::Selecting => {
                self.next_tx = now + Duration::from_secs(2u64 << self.tries.min(4));
                self.tries += 1;
                self.discover()
            }
            Phase::Requesting { offer, server } => {
                if self.tries >= REQUEST_TRIES {
                    self.restart(now, xid);
                    return self.poll(now, xid);
                }
                self.next_tx = now + Duration::from_secs(2);
                self.tries += 1;
                self.select(offer, server)
            }
            Phase::Renewing | Phase::Rebinding => {
                let l = self.lease.clone().expect("a lease while renewing");
                let until = if self.phase == Phase::Renewing {
                    l.acquired + l.t2
                } else {
                    l.expires()
                };
                let half = until.saturating_sub(now) / 2;
                self.next_tx = now + half.clamp(Duration::from_secs(1), Duration::from_secs(60));
                self.renew(l.addr.addr)
            }
            Phase::Bound => unreachable!("returned above"),
        };
        Step {
            send: Some(msg),
            change: None,
        }
    }

    /// Handles a message received on the link (anything: foreign ones are ignored).
    pub fn receive(&mut self, now: Duration, m: &Message) -> Step {
        if m.op != BOOTREPLY || m.xid != self.xid || m.chaddr != self.mac {
            return Step::default();
        }
        match (self.phase.clone(), m.kind()) {
            (Phase::Selecting, Some(MessageType::Offer)) if !m.yiaddr.is_unspecified() => {
                let server = m.addr_option(OPT_SERVER_ID).unwrap_or(m.siaddr);
                self.phase = Phase::Requesting {
                    offer: m.yiaddr,
                    server,
                };
                self.tries = 1;
                self.next_tx = now + Duration::from_secs(2);
                Step {
                    send: Some(self.select(m.yiaddr, server)),
                    change: None,
                }
            }
            (Phase::Requesting { .. } | Phase::Renewing | Phase::Rebinding, Some(MessageType::Ack)) => {
                let Some(lease) = Lease::from_ack(m, now) else {
                    return Step::default();
                };
                let replaces = self.lease.take().filter(|old| old.addr != lease.addr);
                self.lease = Some(lease.clone());
                self.prefer = Some(lease.addr.addr);
                self.phase = Phase::Bound;
                self.tries = 0;
                Step {
                    send: None,
                    change: Some(Change::Bound { lease, replaces }),
                }
            }
            (Phase::Requesting { .. }, Some(MessageType::Nak)) => {
                self.prefer = None;
                self.restart(now, self.xid);
                Step::default()
            }
            (Phase::Renewing | Phase::Rebinding, Some(MessageType::Nak)) => {
                let lost = self.lease.take();
                self.prefer = None;
                self.restart(now, self.xid);
                Step {
                    send: None,
                    change: lost.map(Change::Lost),
                }
            }
            _ => Step::default(),
        }
    }

    fn restart(&mut self, now: Duration, xid: u32) {
        self.phase = Phase::Selecting;
        self.tries = 0;
        self.next_tx = now;
        self.xid = xid;
    }

    fn with_common(&self, mut m: Message) -> Message {
        let mut id = vec![1u8];
        id.extend_from_slice(&self.mac);
        m.options.push((OPT_CLIENT_ID, id));
        if let Some(h) = &self.hostname {
            m.options.push((OPT_HOSTNAME, h.as_bytes().to_vec()));
        }
        m.options.push((
            OPT_PARAMS,
            vec![
                OPT_SUBNET_MASK,
                OPT_ROUTER,
                OPT_LEASE_TIME,
                OPT_SERVER_ID,
                OPT_T1,
                OPT_T2,
            ],
        ));
        m
    }

    fn discover(&self) -> Message {
        let mut m = Message::request(self.xid, self.mac, Ipv4Addr::UNSPECIFIED, MessageType::Discover);
        if let Some(p) = self.prefer {
            m.options.push((OPT_REQUESTED_IP, p.octets().to_vec()));
        }
        self.with_common(m)
    }

    /// The REQUEST that takes an offer.
    fn select(&self, offer: Ipv4Addr, server: Ipv4Addr) -> Message {
        let mut m = Message::request(self.xid, self.mac, Ipv4Addr::UNSPECIFIED, MessageType::Request);
        m.options.push((OPT_REQUESTED_IP, offer.octets().to_vec()));
        m.options.push((OPT_SERVER_ID, server.octets().to_vec()));
        self.with_common(m)
    }

    /// The REQUEST that extends a lease (RFC 2131 4.3.2: ciaddr set, no server id).
    fn renew(&self, addr: Ipv4Addr) -> Message {
        self.with_common(Message::request(self.xid, self.mac, addr, MessageType::Request))
    }
}

/// A running client: a thread with a packet socket on the link, inside the namespace.
pub struct Client {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the client thread looks at its stop flag while waiting for packets.
const TICK: Duration = Duration::from_millis(100);

impl Client {
    /// Starts the client on `link`; every change of its lease goes to `on_change`. Fails when
    /// the link or its packet socket cannot be opened.
    pub fn start(
        ns: &NetNs,
        link: &str,
        prefer: Option<Ipv4Addr>,
        clock: Arc<dyn Clock>,
        on_change: Box<dyn Fn(Change) + Send>,
    ) -> io::Result<Client> {
        let (sock, ifindex, mac) = ns.run(|| open_socket(link))?;
        let stop = Arc::new(AtomicBool::new(false));
        let hostname = hostname();
        let link = link.to_string();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("dhcp-{link}"))
            .spawn(move || {
                let mut m = Machine::new(mac, hostname, prefer, random_xid());
                run(&sock, ifindex, &mut m, &*clock, &flag, &*on_change, &link);
            })?;
        Ok(Client {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the client and waits for its thread; the lease's address stays where it is.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(
    sock: &OwnedFd,
    ifindex: i32,
    m: &mut Machine,
    clock: &dyn Clock,
    stop: &AtomicBool,
    on_change: &dyn Fn(Change),
    link: &str,
) {
    let mut buf = vec![0u8; 1600];
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        let step = m.poll(clock.now(), random_xid());
        let mut handle = |step: Step| {
            if let Some(msg) = step.send {
                if let Err(e) = send(sock, ifindex, &msg) {
                    // A link that is down or gone fails every send; say so once per outage.
                    if !warned {
                        tracing::warn!(link, error = %e, "DHCP: cannot send");
                        warned = true;
                    }
                } else {
                    warned = false;
                }
            }
            if let Some(c) = step.change {
                match &c {
                    Change::Bound { lease, .. } => tracing::info!(
                        link, addr = %lease.addr, router = ?lease.router, server = %lease.server,
                        lease_secs = lease.lease_time.as_secs(), "DHCP lease bound"
                    ),
                    Change::Lost(lease) => tracing::warn!(link, addr = %lease.addr, "DHCP lease lost"),
                }
                on_change(c);
            }
        };
        handle(step);
        let wait = m
            .wake_at()
            .saturating_sub(clock.now())
            .clamp(Duration::from_millis(10), TICK);
        match recv(sock, &mut buf, wait) {
            Ok(Some(n)) => {
                if let Some(msg) = udp_payload(&buf[..n]).and_then(Message::decode) {
                    handle(m.receive(clock.now(), &msg));
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(link, error = %e, "DHCP: receive failed");
                std::thread::sleep(TICK);
            }
        }
    }
}

const ETH_P_IP: u16 = 0x0800;

fn os<T: Default + PartialOrd>(r: T) -> io::Result<T> {
    if r < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A packet socket on `link` for IPv4, with the link's index and MAC.
fn open_socket(link: &str) -> io::Result<(OwnedFd, i32, [u8; 6])> {
    let name = std::ffi::CString::new(link).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    if ifindex == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no link {link:?}"),
        ));
    }
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = os(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_IP.to_be()),
        )
    })?;
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_IP.to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    os(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    })?;
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr, which is a valid ifreq with the name set.
    os(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) })?;
    // SAFETY: after SIOCGIFHWADDR the union holds the hardware address.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.iter()) {
        *d = *s as u8;
    }
    Ok((sock, ifindex, mac))
}

/// Broadcasts `msg` from 0.0.0.0:68 (or from ciaddr when renewing) to 255.255.255.255:67.
fn send(sock: &OwnedFd, ifindex: i32, msg: &Message) -> io::Result<()> {
    let packet = ipv4_udp(msg.ciaddr, Ipv4Addr::BROADCAST, &msg.encode());
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_IP.to_be();
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: packet and sll are valid for the lengths given.
    os(unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    })?;
    Ok(())
}

/// Waits up to `wait` for a packet; `None` when none came.
fn recv(sock: &OwnedFd, buf: &mut [u8], wait: Duration) -> io::Result<Option<usize>> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as i32) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(e)
        };
    }
    if n == 0 {
        return Ok(None);
    }
    // SAFETY: buf is valid for its length.
    let got = os(unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    });
    match got {
        Ok(n) => Ok(Some(n as usize)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// An IPv4 + UDP packet from port 68 to port 67 around `payload` (UDP checksum 0: none, which
/// IPv4 allows).
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0x10]); // version 4, IHL 5; DSCP low delay, as DHCP clients set
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]); // id, no fragments
    p.extend_from_slice(&[64, 17, 0, 0]); // TTL, UDP, checksum (below)
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    p.extend_from_slice(&SERVER_PORT.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// The payload of an IPv4 UDP packet to port 68, if `p` is one.
pub fn udp_payload(p: &[u8]) -> Option<&[u8]> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
    let udp = p.get(ihl..total)?;
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != CLIENT_PORT {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]])).clamp(8, udp.len());
    Some(&udp[8..len])
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn random_xid() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        std::process::id()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()))
    }
}

fn hostname() -> Option<String> {
    let mut b = [0u8; 256];
    // SAFETY: gethostname writes at most b.len() bytes into b.
    if unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len()) } != 0 {
        return None;
    }
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    let h = String::from_utf8_lossy(&b[..end]).into_owned();
    (!h.is_empty()).then_some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const OFFERED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// A server's reply to `req`.
    fn reply(req: &Message, kind: MessageType, yiaddr: Ipv4Addr, lease_secs: u32) -> Message {
        let mut options = vec![
            (OPT_MESSAGE_TYPE, vec![kind as u8]),
            (OPT_SERVER_ID, SERVER.octets().to_vec()),
        ];
        if kind != MessageType::Nak {
            options.push((OPT_SUBNET_MASK, vec![255, 255, 255, 0]));
            options.push((OPT_ROUTER, SERVER.octets().to_vec()));
            options.push((OPT_LEASE_TIME, lease_secs.to_be_bytes().to_vec()));
        }
        Message {
            op: BOOTREPLY,
            xid: req.xid,
            broadcast: req.broadcast,
            ciaddr: req.ciaddr,
            yiaddr,
            siaddr: SERVER,
            chaddr: req.chaddr,
            options,
        }
    }

    /// Runs discover → offer → request → ack at `now`; returns the lease.
    fn bind(m: &mut Machine, now: Duration, lease_secs: u32) -> Lease {
        let discover = m.poll(now, 7).send.expect("a discover");
        assert_eq!(discover.kind(), Some(MessageType::Discover));
        assert!(discover.broadcast && discover.ciaddr.is_unspecified());
        let offer = reply(&discover, MessageType::Offer, OFFERED, lease_secs);
        let request = m.receive(now, &offer).send.expect("a request");
        assert_eq!(request.kind(), Some(MessageType::Request));
        assert_eq!(request.option(OPT_REQUESTED_IP), Some(&OFFERED.octets()[..]));
        assert_eq!(request.option(OPT_SERVER_ID), Some(&SERVER.octets()[..]));
        let ack = reply(&request, MessageType::Ack, OFFERED, lease_secs);
        match m.receive(now, &ack).change {
            Some(Change::Bound {
                lease,
                replaces: None,
            }) => lease,
            other => panic!("not bound: {other:?}"),
        }
    }

    #[test]
    fn a_lease_is_taken_from_the_first_offer() {
        let mut m = Machine::new(MAC, Some("h1".into()), None, 1);
        let lease = bind(&mut m, s(10), 3600);
        assert_eq!(lease.addr, "10.0.0.50/24".parse().unwrap());
        assert_eq!(lease.router, Some(SERVER));
        assert_eq!(lease.server, SERVER);
        assert_eq!((lease.t1, lease.t2), (s(1800), s(3150)));
        assert_eq!(m.phase(), &Phase::Bound);
        // Nothing to do until T1.
        assert_eq!(m.wake_at(), s(10 + 1800));
        assert_eq!(m.poll(s(1000), 9), Step::default());
    }

    #[test]
    fn discovers_back_off_and_keep_their_transaction_id() {
        let mut m = Machine::new(MAC, None, Some(OFFERED), 5);
        let mut at = Vec::new();
        let mut xids = Vec::new();
        let mut now = s(0);
        while at.len() < 7 {
            if let Some(msg) = m.poll(now, now.as_secs() as u32 + 100).send {
                assert_eq!(msg.kind(), Some(MessageType::Discover));
                // Asks for the address it had.
                assert_eq!(msg.option(OPT_REQUESTED_IP), Some(&OFFERED.octets()[..]));
                at.push(now.as_secs());
                xids.push(msg.xid);
            }
            now = m.wake_at();
        }
        assert_eq!(at, vec![0, 2, 6, 14, 30, 62, 94]);
        assert!(xids.iter().all(|x| *x == xids[0]), "{xids:?}");
    }

    #[test]
    fn replies_for_other_clients_or_exchanges_are_ignored() {
        let mut m = Machine::new(MAC, None, None, 1);
        let discover = m.poll(s(0), 1).send.unwrap();
        let mut other = reply(&discover, MessageType::Offer, OFFERED, 60);
        other.xid ^= 1;
        assert_eq!(m.receive(s(0), &other), Step::default());
        let mut other = reply(&discover, MessageType::Offer, OFFERED, 60);
        other.chaddr[5] ^= 1;
        assert_eq!(m.receive(s(0), &other), Step::default());
        // Our own broadcast coming back is a request, not a reply.
        assert_eq!(m.receive(s(0), &discover), Step::default());
        assert_eq!(m.phase(), &Phase::Selecting);
    }

    #[test]
    fn a_lease_is_renewed_at_t1_with_its_address_as_ciaddr() {
        let mut m = Machine::new(MAC, None, None, 1);
        bind(&mut m, s(0), 100);
        let renew = m.poll(s(50), 42).send.expect("a renewal at T1");
        assert_eq!(m.phase(), &Phase::Renewing);
        assert_eq!((renew.ciaddr, renew.xid), (OFFERED, 42));
        assert!(!renew.broadcast);
        assert_eq!(renew.option(OPT_SERVER_ID), None);
        let ack = reply(&renew, MessageType::Ack, OFFERED, 100);
        match m.receive(s(51), &ack).change {
            Some(Change::Bound {
                lease,
                replaces: None,
            }) => assert_eq!(lease.acquired, s(51)),
            other => panic!("not renewed: {other:?}"),
        }
        assert_eq!(m.wake_at(), s(101));
    }

    #[test]
    fn without_replies_the_client_rebinds_then_loses_the_lease_and_starts_over() {
        let mut m = Machine::new(MAC, None, None, 1);
        let lease = bind(&mut m, s(0), 80);
        let mut sent = Vec::new();
        let mut now;
        let lost = loop {
            now = m.wake_at();
            let step = m.poll(now, 3);
            if let Some(msg) = &step.send {
                sent.push((now.as_secs(), msg.kind().unwrap(), m.phase().clone()));
            }
            if let Some(Change::Lost(l)) = step.change {
                break l;
            }
            assert!(now < s(200), "never lost: {sent:?}");
        };
        assert_eq!(lost, lease);
        assert_eq!(now, s(80));
        // Renewals from T1 (40 s) to T2 (70 s), rebinding until expiry, then a new discover.
        let phases: Vec<_> = sent.iter().map(|(t, _, p)| (*t, p.clone())).collect();
        assert_eq!(phases.first(), Some(&(40, Phase::Renewing)));
        assert!(phases.contains(&(70, Phase::Rebinding)), "{phases:?}");
        assert_eq!(
            sent.last().map(|(t, k, _)| (*t, *k)),
            Some((80, MessageType::Discover))
        );
        assert!(m.lease().is_none());
    }

    #[test]
    fn a_nak_on_renewal_drops_the_lease() {
        let mut m = Machine::new(MAC, None, None, 1);
        let lease = bind(&mut m, s(0), 100);
        let renew = m.poll(s(50), 8).send.unwrap();
        let nak = reply(&renew, MessageType::Nak, Ipv4Addr::UNSPECIFIED, 0);
        assert_eq!(m.receive(s(50), &nak).change, Some(Change::Lost(lease)));
        assert_eq!(m.phase(), &Phase::Selecting);
        let d = m.poll(s(50), 9).send.unwrap();
        assert_eq!(d.kind(), Some(MessageType::Discover));
        assert_eq!(d.option(OPT_REQUESTED_IP), None);
    }

    #[test]
    fn a_renewal_giving_another_address_replaces_the_old_one() {
        let mut m = Machine::new(MAC, None, None, 1);
        let old = bind(&mut m, s(0), 100);
        let renew = m.poll(s(50), 8).send.unwrap();
        let ack = reply(&renew, MessageType::Ack, Ipv4Addr::new(10, 0, 0, 51), 100);
        match m.receive(s(50), &ack).change {
            Some(Change::Bound { lease, replaces }) => {
                assert_eq!(lease.addr.addr, Ipv4Addr::new(10, 0, 0, 51));
                assert_eq!(replaces, Some(old));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_ack_without_a_usable_lease_is_ignored() {
        let mut m = Machine::new(MAC, None, None, 1);
        let discover = m.poll(s(0), 1).send.unwrap();
        let request = m
            .receive(s(0), &reply(&discover, MessageType::Offer, OFFERED, 60))
            .send
            .unwrap();
        let mut ack = reply(&request, MessageType::Ack, OFFERED, 60);
        ack.options.retain(|(c, _)| *c != OPT_LEASE_TIME);
        assert_eq!(m.receive(s(0), &ack), Step::default());
        let mut ack = reply(&request, MessageType::Ack, OFFERED, 60);
        ack.options.retain(|(c, _)| *c != OPT_SUBNET_MASK);
        ack.options.push((OPT_SUBNET_MASK, vec![255, 0, 255, 0]));
        assert_eq!(m.receive(s(0), &ack), Step::default());
        // Unanswered requests go back to discovering after a few tries.
        let mut now = s(0);
        while matches!(m.phase(), Phase::Requesting { .. }) {
            now = m.wake_at();
            m.poll(now, 2);
        }
        assert_eq!(m.phase(), &Phase::Selecting);
        assert_eq!(now, s(8));
    }

    #[test]
    fn messages_and_packets_round_trip() {
        let mut m = Machine::new(MAC, Some("node-1".into()), Some(OFFERED), 1);
        let msg = m.poll(s(0), 1).send.unwrap();
        let bytes = msg.encode();
        assert!(bytes.len() >= 300);
        assert_eq!(Message::decode(&bytes).unwrap(), msg);
        assert_eq!(msg.option(OPT_HOSTNAME), Some(&b"node-1"[..]));
        assert_eq!(msg.option(OPT_CLIENT_ID), Some(&[1, 0x52, 0x54, 0, 1, 2, 3][..]));
        let packet = ipv4_udp(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, &bytes);
        // A correct header checksums to zero.
        assert_eq!(checksum(&packet[..20]), 0);
        // Our own packet goes to port 67, so it is not taken as a reply.
        assert_eq!(udp_payload(&packet), None);
        let mut back = packet.clone();
        back[20..22].copy_from_slice(&SERVER_PORT.to_be_bytes());
        back[22..24].copy_from_slice(&CLIENT_PORT.to_be_bytes());
        assert_eq!(udp_payload(&back), Some(&bytes[..]));
        assert_eq!(Message::decode(&bytes[..200]), None);
        let mut truncated = bytes.clone();
        truncated.truncate(HEADER + 4 + 3);
        truncated[HEADER + 5] = 200; // an option longer than the message
        assert_eq!(Message::decode(&truncated), None);
    }
}
