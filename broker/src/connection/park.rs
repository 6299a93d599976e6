//! Idle plain TCP connections without a task: a connection with nothing to do hands its
//! socket and state to the broker-wide park and its task ends. The socket leaves tokio's
//! reactor (no registration kept) and waits in one `epoll` set that a thread of its own
//! watches; the connection's state waits in a slot here. Anything that concerns the
//! connection makes a task for it again: bytes or a hang-up from the client, a delivery or
//! question in its mailbox (the keep-alive watch and a kick come that way too), or the stop
//! of its listener.
//!
//! Memory per idle client is what bounds how many a broker holds: a task (its header, its
//! future, 128-byte aligned) and a reactor registration cost about 900 bytes per
//! connection; a slot here costs a few dozen.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

use super::{Conn, ListenerInfo, Resting};
use crate::listener::Permit;
use crate::metrics::OpenConnection;

/// A plain TCP connection apart from its socket: what its task holds (`Box<Conn>`), and
/// what a slot of the park holds while it is idle (`Box<Resting>`).
pub(super) struct Tcp<C = Box<Conn>> {
    pub conn: C,
    pub listener: Arc<ListenerInfo>,
    pub open: OpenConnection,
    pub _permit: Permit,
}

impl<C> Tcp<C> {
    /// The same connection with its state in another form.
    pub fn map<D>(self, f: impl FnOnce(C) -> D) -> Tcp<D> {
        Tcp {
            conn: f(self.conn),
            listener: self.listener,
            open: self.open,
            _permit: self._permit,
        }
    }
}

/// An idle connection: its state and its socket, out of tokio's reactor, and which
/// parking this is (a wake-up that names an earlier one of its slot, from a stale mailbox
/// name or an event read before the socket left the set, does not wake this one). One
/// allocation; a slot of the park holds a pointer to it.
struct Parked {
    tcp: Tcp<Resting>,
    socket: std::net::TcpStream,
    generation: u32,
}

/// A slot of the park: a parked connection, if any.
type Slot = Option<Box<Parked>>;

/// The name a parked connection goes by (in its mailbox and as its `epoll` token): its
/// slot + 1 in the low half, the slot's generation in the high half; never 0.
fn name(key: usize, generation: u32) -> Option<u64> {
    let slot = u32::try_from(key.checked_add(1)?).ok()?;
    Some(u64::from(generation) << 32 | u64::from(slot))
}

/// The slot and generation a name gives.
fn unname(name: u64) -> Option<(usize, u32)> {
    let slot = usize::try_from(name & 0xFFFF_FFFF).ok()?.checked_sub(1)?;
    Some((slot, (name >> 32) as u32))
}

/// The park of a process: the idle connections' slots and the `epoll` set their sockets
/// wait in.
struct Park {
    registry: Registry,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    parked: Vec<Slot>,
    free: Vec<usize>,
    /// The generation the next parked connection gets.
    generation: u32,
    /// Listeners whose stop a task watches for the connections parked from them.
    watched: Vec<Arc<ListenerInfo>>,
}

static PARK: OnceLock<Option<Park>> = OnceLock::new();

/// The park, started on first use (`None` if the system would not give an `epoll` set or
/// a thread: connections then wait in their tasks).
fn park() -> Option<&'static Park> {
    PARK.get_or_init(|| match Park::start() {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "idle connections keep their tasks: no park");
            None
        }
    })
    .as_ref()
}

impl Park {
    fn start() -> std::io::Result<Park> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        std::thread::Builder::new()
            .name("sandpiper-park".into())
            .spawn(move || watch(poll))?;
        Ok(Park {
            registry,
            slots: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a task for the connection parked under `name`, if it is still parked.
    fn wake(&self, name: u64) {
        let Some((key, generation)) = unname(name) else {
            return;
        };
        let mut slots = self.lock();
        let Some(slot) = slots.parked.get_mut(key) else {
            return;
        };
        if slot.as_ref().is_none_or(|p| p.generation != generation) {
            return;
        }
        if let Some(p) = slot.take() {
            slots.free.push(key);
            self.resume(p);
        }
    }

    /// Takes `p` out of the park's `epoll` set and spawns its task (under the slots' lock,
    /// so that a shutdown that wakes every parked connection finds each either here or in
    /// the broker's task tracker).
    fn resume(&self, p: Box<Parked>) {
        let _ = self
            .registry
            .deregister(&mut SourceFd(&p.socket.as_raw_fd()));
        let mailbox = &p.tcp.conn.state.mailbox;
        mailbox.set_parked(0);
        let broker = p.tcp.conn.broker.clone();
        match &broker.runtime {
            Some(rt) => {
                let Parked { tcp, socket, .. } = *p;
                broker.tasks.spawn_on(super::resume(tcp, socket), rt);
            }
            // Not reached: a connection parks only when the broker has a runtime.
            None => drop(p),
        }
    }
}

/// The park's thread: wakes the connections whose sockets became readable or hung up.
fn watch(mut poll: Poll) {
    let mut events = Events::with_capacity(1024);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "park: waiting on idle connections failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        let Some(park) = PARK.get().and_then(Option::as_ref) else {
            continue;
        };
        for event in events.iter() {
            park.wake(event.token().0 as u64);
        }
    }
}

/// Wakes the parked connection a mailbox names (see `Mailbox::set_parked`).
pub(crate) fn wake(name: u64) {
    if let Some(park) = PARK.get().and_then(Option::as_ref) {
        park.wake(name);
    }
}

/// What became of a connection offered to the park.
pub(super) enum Parking {
    /// Parked: the caller's task ends.
    Parked,
    /// Not parked (no park, no runtime, or the registration refused): the caller waits in
    /// its task.
    Kept(
        Tcp,
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::tcp::OwnedWriteHalf,
    ),
    /// The socket could not leave tokio's reactor and is closed.
    Lost(Tcp),
}

/// Parks an idle connection (its read buffer and write buffer empty, its keep-alive watch
/// asked for): its task can end.
pub(super) fn park_tcp(
    tcp: Tcp,
    rd: tokio::net::tcp::OwnedReadHalf,
    wr: tokio::net::tcp::OwnedWriteHalf,
) -> Parking {
    let Some(park) = self::park().filter(|_| tcp.conn.broker.runtime.is_some()) else {
        return Parking::Kept(tcp, rd, wr);
    };
    let socket = match rd.reunite(wr) {
        Ok(s) => s,
        // Not reached: both halves come from one socket.
        Err(e) => return Parking::Kept(tcp, e.0, e.1),
    };
    let socket = match socket.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take an idle connection out of the reactor");
            return Parking::Lost(tcp);
        }
    };
    let mut slots = park.lock();
    let key = match slots.free.pop() {
        Some(k) => k,
        None => {
            slots.parked.push(None);
            slots.parked.len() - 1
        }
    };
    let generation = slots.generation;
    slots.generation = generation.wrapping_add(1);
    let registered = name(key, generation).and_then(|n| {
        let token = Token(usize::try_from(n).ok()?);
        let fd = socket.as_raw_fd();
        match park
            .registry
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            Ok(()) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "cannot park an idle connection");
                None
            }
        }
    });
    let Some(name) = registered else {
        // Not parked (the system refused the registration; four billion slots are not
        // reached): the connection waits in its task.
        slots.free.push(key);
        drop(slots);
        return match tokio::net::TcpStream::from_std(socket) {
            Ok(s) => {
                let (rd, wr) = s.into_split();
                Parking::Kept(tcp, rd, wr)
            }
            Err(_) => Parking::Lost(tcp),
        };
    };
    let tcp = tcp.map(Conn::rest);
    let mailbox = tcp.conn.state.mailbox.clone();
    mailbox.set_parked(name);
    let listener = tcp.listener.clone();
    if !slots.watched.iter().any(|l| Arc::ptr_eq(l, &listener))
        && let Some(rt) = &tcp.conn.broker.runtime
    {
        // One task per listener wakes its parked connections when it stops (a reload
        // removed it, or the broker is shutting down); they close as they would have.
        slots.watched.push(listener.clone());
        let l = listener.clone();
        tcp.conn.broker.tasks.spawn_on(
            async move {
                l.stop.cancelled().await;
                if let Some(p) = self::park() {
                    p.wake_listener(&l);
                }
            },
            rt,
        );
    }
    let parked = Box::new(Parked {
        tcp,
        socket,
        generation,
    });
    // Something that came while parking (a delivery, a question, a kick, the keep-alive
    // watch) left the mailbox's wake-up unanswered: serve it now. Under the lock, so that
    // no task of this connection's but ours exists while its wake-up is taken (one woken
    // after the unlock would lose a wake-up meant for it to us).
    if mailbox.take_wake() || mailbox.kicked().is_some() {
        slots.free.push(key);
        park.resume(parked);
    } else if let Some(slot) = slots.parked.get_mut(key) {
        *slot = Some(parked);
    }
    Parking::Parked
}

impl Park {
    /// Wakes every connection parked from `listener` (it stopped).
    fn wake_listener(&self, listener: &Arc<ListenerInfo>) {
        let mut slots = self.lock();
        slots.watched.retain(|l| !Arc::ptr_eq(l, listener));
        let mut woken = Vec::new();
        for (key, slot) in slots.parked.iter_mut().enumerate() {
            if slot
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(&p.tcp.listener, listener))
                && let Some(p) = slot.take()
            {
                woken.push((key, p));
            }
        }
        for (key, p) in woken {
            slots.free.push(key);
            self.resume(p);
        }
    }
}

/// Connections parked now (for tests and metrics).
pub fn parked() -> usize {
    PARK.get().and_then(Option::as_ref).map_or(0, |p| {
        let s = p.lock();
        s.parked.len() - s.free.len()
    })
}

#[cfg(test)]
mod tests {
    use super::{name, unname};

    /// A name is never 0 (a mailbox's "not parked") and gives back its slot and
    /// generation; slots past four billion have none.
    #[test]
    fn names_round_trip_and_are_never_zero() {
        for key in [0, 1, 7, 65_535, 4_294_967_294] {
            for generation in [0, 1, u32::MAX] {
                let n = name(key, generation).unwrap_or(0);
                assert_ne!(n, 0, "slot {key} generation {generation}");
                assert_eq!(unname(n), Some((key, generation)));
            }
        }
        assert_eq!(name(4_294_967_295, 0), None);
        assert_eq!(unname(0), None);
        assert_eq!(unname(5 << 32), None);
    }

    /// A parked connection is one allocation, and every idle plain TCP client holds one:
    /// 256 bytes is one of the allocator's size classes (the next is 320). A change that
    /// grows it past this bound grows every idle connection by 64 bytes: box the part
    /// that does, or raise the bound knowingly (ARCHITECTURE.md, "connection").
    #[test]
    fn a_parked_connection_fits_in_256_bytes() {
        let size = std::mem::size_of::<super::Parked>();
        assert!(size <= 256, "Parked is {size} bytes");
    }
}
