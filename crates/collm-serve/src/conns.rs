//! The open connections, kept below the process's file-descriptor limit with a reserve: when a
//! new connection would pass [`Conns::limit`], the oldest idle one (no request in flight) is
//! closed to make room, so idle keep-alive sockets can never starve `/health` or a real request
//! (under `ulimit -n 128`, 200 idle sockets used to leave accept failing with "Too many open
//! files" until the header timeout closed them); when every connection is busy, the new one is
//! closed at once instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

struct Conn {
    /// Requests in flight on it.
    busy: usize,
    /// When a request last started or ended (or it was accepted).
    last: Instant,
    abort: Option<tokio::task::AbortHandle>,
}

/// The registry every connection task shares.
#[derive(Clone)]
pub struct Conns {
    inner: Arc<Mutex<Inner>>,
    limit: usize,
}

struct Inner {
    next: u64,
    open: HashMap<u64, Conn>,
}

/// File descriptors kept free beside the connections: the run's files, the runtime's, logging,
/// a metrics scrape: 32, and an eighth of the limit.
fn reserve(fds: usize) -> usize {
    32 + fds / 8
}

/// Connections to keep open at most: the soft `RLIMIT_NOFILE` less [`reserve`] (at least 8).
pub fn limit_from_rlimit() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        usize::try_from(r.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    fds.saturating_sub(reserve(fds)).max(8)
}

/// A connection's place in the registry: removed when dropped (its task ended or was aborted).
pub struct Slot {
    conns: Conns,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.conns.inner.lock() {
            g.open.remove(&self.id);
        }
    }
}

/// One request in flight on a connection: the connection counts as busy until dropped.
pub struct Busy {
    conns: Conns,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Ok(mut g) = self.conns.inner.lock() {
            if let Some(c) = g.open.get_mut(&self.id) {
                c.busy = c.busy.saturating_sub(1);
                c.last = Instant::now();
            }
        }
    }
}

impl Conns {
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                next: 0,
                open: HashMap::new(),
            })),
            limit: limit.max(1),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn open(&self) -> usize {
        self.inner.lock().map_or(0, |g| g.open.len())
    }

    /// Makes room for a new connection: at the limit, closes the oldest idle one. `None` when
    /// every open connection is busy (the new one is to be closed).
    pub fn admit(&self) -> Option<Slot> {
        let mut g = self.inner.lock().ok()?;
        if g.open.len() >= self.limit {
            let oldest = g
                .open
                .iter()
                .filter(|(_, c)| c.busy == 0)
                .min_by_key(|(_, c)| c.last)
                .map(|(id, _)| *id)?;
            if let Some(c) = g.open.remove(&oldest) {
                if let Some(a) = c.abort {
                    a.abort();
                }
                tracing::debug!(
                    "closed an idle connection to stay within {} open",
                    self.limit
                );
            }
        }
        let id = g.next;
        g.next += 1;
        g.open.insert(
            id,
            Conn {
                busy: 0,
                last: Instant::now(),
                abort: None,
            },
        );
        Some(Slot {
            conns: self.clone(),
            id,
        })
    }

    /// Records the task serving connection `id`, so that it can be closed to make room.
    pub fn attach_id(&self, id: u64, abort: tokio::task::AbortHandle) {
        if let Ok(mut g) = self.inner.lock() {
            match g.open.get_mut(&id) {
                Some(c) => c.abort = Some(abort),
                // Evicted before its task was recorded: close it now.
                None => abort.abort(),
            }
        }
    }

    /// A request starts on `slot`'s connection.
    pub fn busy(&self, id: u64) -> Busy {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(c) = g.open.get_mut(&id) {
                c.busy += 1;
                c.last = Instant::now();
            }
        }
        Busy {
            conns: self.clone(),
            id,
        }
    }
}

impl Slot {
    pub fn id(&self) -> u64 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_idle_connection_makes_room_and_busy_ones_stay() {
        let c = Conns::new(2);
        let a = c.admit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = c.admit().unwrap();
        let busy_b = c.busy(b.id());
        // At the limit: a (idle, oldest) goes.
        let d = c.admit().unwrap();
        assert_eq!(c.open(), 2);
        drop(a); // its slot was already removed: nothing else changes
        assert_eq!(c.open(), 2);
        let busy_d = c.busy(d.id());
        // Both busy: no room.
        assert!(c.admit().is_none());
        drop(busy_b);
        let e = c.admit().expect("b is idle again");
        assert_eq!(c.open(), 2);
        drop((busy_d, e, d, b));
        assert_eq!(c.open(), 0);
        assert!(limit_from_rlimit() >= 8);
        assert_eq!(reserve(128), 48);
    }
}
