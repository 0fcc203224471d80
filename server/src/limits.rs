//! Things counted in total and per client address: the TCP connections `serve` holds and
//! the log requests in progress.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// At most `total` at once, at most `per_address` from one client IP address (0: any number).
#[derive(Debug)]
pub(crate) struct Counted {
    total: usize,
    per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One counted thing, given back when the last clone is dropped. A TCP connection's place is
/// held by its HTTP task and, once upgraded, by its WebSocket (through the request's
/// extensions, see `ws::handler`), so a WebSocket counts for its whole life; a log request's
/// place is held until its body is sent.
#[derive(Debug)]
pub(crate) struct Admitted {
    counted: Arc<Counted>,
    ip: Option<IpAddr>,
}

impl Admitted {
    /// The client's address.
    pub(crate) fn ip(&self) -> Option<IpAddr> {
        self.ip
    }
}

impl Counted {
    pub(crate) fn new(total: usize, per_address: usize) -> Arc<Counted> {
        Arc::new(Counted { total, per_address, open: Mutex::new((0, HashMap::new())) })
    }

    /// Takes a place for `ip` (unknown: only the total counts), unless a limit is reached.
    pub(crate) fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Option<Arc<Admitted>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per) = &mut *open;
        if *total >= self.total {
            return None;
        }
        if let (Some(ip), true) = (ip, self.per_address > 0) {
            let n = per.entry(ip).or_insert(0);
            if *n >= self.per_address {
                return None;
            }
            *n += 1;
        }
        *total += 1;
        Some(Arc::new(Admitted { counted: self.clone(), ip }))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.counted.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per) = &mut *open;
        *total = total.saturating_sub(1);
        if let (Some(ip), true) = (self.ip, self.counted.per_address > 0) {
            if let Some(n) = per.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_addresses() {
        let c = Counted::new(3, 2);
        let (a, b) = (Some(IpAddr::from([10, 0, 0, 1])), Some(IpAddr::from([10, 0, 0, 2])));
        let a1 = c.admit(a).unwrap();
        let a2 = c.admit(a).unwrap();
        assert!(c.admit(a).is_none(), "two per address");
        let b1 = c.admit(b).unwrap();
        assert!(c.admit(b).is_none() && c.admit(None).is_none(), "three in all");
        drop(a1);
        assert!(c.admit(a).is_some_and(|x| x.ip() == a), "a place given back");
        drop((a2, b1));
        let unlimited = Counted::new(usize::MAX, 0);
        let many: Vec<_> = (0..1000).map(|_| unlimited.admit(a).unwrap()).collect();
        assert_eq!(many.len(), 1000);
    }
}
