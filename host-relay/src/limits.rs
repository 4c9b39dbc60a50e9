//! Rate and connection limits.
//!
//! Token buckets per user and per client address, a connection count per address, and an
//! authentication-attempt budget per address. State for an address disappears when it has no
//! connections left and its buckets are full again, so memory follows live load, not history.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use dashmap::DashMap;
use syncra_core::UserId;

/// A token bucket: `rate` tokens per second, up to `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(burst),
            last: now,
        }
    }
    /// The level at `now`, refilled at `per_second` up to `burst`.
    fn level(&self, per_second: f64, burst: u32, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * per_second).min(f64::from(burst))
    }

    /// Takes one token if there is one.
    fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Per-address state.
#[derive(Debug)]
struct AddressState {
    connections: u32,
    messages: Bucket,
    auth: Bucket,
}

impl AddressState {
    /// Whether both budgets are full again (nothing would be lost by forgetting the address).
    fn refilled(&self, s: &LimitSettings, now: Instant) -> bool {
        let burst = f64::from(s.address_burst);
        let auth = f64::from(s.auth_per_minute);
        self.messages
            .level(f64::from(s.address_rate), s.address_burst, now)
            >= burst
            && self
                .auth
                .level(f64::from(s.auth_per_minute) / 60.0, s.auth_per_minute, now)
                >= auth
    }
}

/// The limits configured for this relay.
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    /// Sends per second per user.
    pub user_rate: u32,
    /// Burst per user.
    pub user_burst: u32,
    /// Frames per second per address.
    pub address_rate: u32,
    /// Burst per address.
    pub address_burst: u32,
    /// Connections per address.
    pub connections_per_address: u32,
    /// Auth attempts per minute per address.
    pub auth_per_minute: u32,
}

/// All limit state of a relay node.
#[derive(Debug)]
pub struct Limits {
    settings: LimitSettings,
    addresses: DashMap<IpAddr, AddressState>,
    users: DashMap<UserId, Mutex<Bucket>>,
    last_sweep: Mutex<Instant>,
}

/// A held connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot<'a> {
    limits: &'a Limits,
    ip: IpAddr,
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.limits.release(self.ip);
    }
}

impl Limits {
    /// Limits with the given settings.
    pub fn new(settings: LimitSettings) -> Self {
        Limits {
            settings,
            addresses: DashMap::new(),
            users: DashMap::new(),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    fn address(&self, ip: IpAddr) -> dashmap::mapref::one::RefMut<'_, IpAddr, AddressState> {
        let now = Instant::now();
        self.addresses.entry(ip).or_insert_with(|| AddressState {
            connections: 0,
            messages: Bucket::full(self.settings.address_burst, now),
            auth: Bucket::full(self.settings.auth_per_minute, now),
        })
    }

    /// Takes a connection slot for an address, or `None` if it has too many.
    pub fn connect(&self, ip: IpAddr) -> Option<ConnectionSlot<'_>> {
        let mut state = self.address(ip);
        if state.connections >= self.settings.connections_per_address {
            return None;
        }
        state.connections += 1;
        Some(ConnectionSlot { limits: self, ip })
    }
    fn release(&self, ip: IpAddr) {
        let s = self.settings;
        let now = Instant::now();
        let mut idle = false;
        if let Some(mut state) = self.addresses.get_mut(&ip) {
            state.connections = state.connections.saturating_sub(1);
            // Forget an address only once its budgets have refilled: otherwise reconnecting
            // would reset them and the limits would be per connection, not per address.
            idle = state.connections == 0 && state.refilled(&s, now);
        }
        if idle {
            self.addresses
                .remove_if(&ip, |_, st| st.connections == 0 && st.refilled(&s, now));
        }
        self.sweep(now);
    }

    /// Drops idle addresses whose budgets have refilled. Runs at most once per second, on
    /// disconnects, so the table follows live load rather than history.
    fn sweep(&self, now: Instant) {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            if now.saturating_duration_since(*last) < std::time::Duration::from_secs(1) {
                return;
            }
            *last = now;
        }
        let s = self.settings;
        self.addresses
            .retain(|_, st| st.connections > 0 || !st.refilled(&s, now));
    }

    /// One message from an address.
    pub fn address_message(&self, ip: IpAddr) -> bool {
        let s = self.settings;
        self.address(ip)
            .messages
            .take(s.address_rate, s.address_burst, Instant::now())
    }

    /// One authentication attempt from an address.
    pub fn auth_attempt(&self, ip: IpAddr) -> bool {
        let s = self.settings;
        // Per minute: a rate of n/60 per second, expressed on a 60x scale.
        let mut state = self.address(ip);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(state.auth.last).as_secs_f64();
        state.auth.last = now;
        state.auth.tokens = (state.auth.tokens + elapsed * f64::from(s.auth_per_minute) / 60.0)
            .min(f64::from(s.auth_per_minute));
        if state.auth.tokens >= 1.0 {
            state.auth.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// One send by a user (shared by all of the user's sessions on this node).
    pub fn user_message(&self, user: &UserId) -> bool {
        let s = self.settings;
        let now = Instant::now();
        let entry = self
            .users
            .entry(*user)
            .or_insert_with(|| Mutex::new(Bucket::full(s.user_burst, now)));
        let mut bucket = entry.lock().unwrap_or_else(|e| e.into_inner());
        bucket.take(s.user_rate, s.user_burst, now)
    }

    /// Forgets a user's bucket when their last session on this node ends.
    pub fn forget_user(&self, user: &UserId) {
        self.users.remove(user);
    }

    /// Addresses with state.
    #[cfg(test)]
    pub fn tracked_addresses(&self) -> usize {
        self.addresses.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LimitSettings {
        LimitSettings {
            user_rate: 1,
            user_burst: 3,
            address_rate: 1,
            address_burst: 2,
            connections_per_address: 2,
            auth_per_minute: 2,
        }
    }

    #[test]
    fn connection_slots_are_counted_and_released() {
        let l = Limits::new(settings());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = l.connect(ip).unwrap();
        let _b = l.connect(ip).unwrap();
        assert!(l.connect(ip).is_none());
        drop(a);
        assert!(l.connect(ip).is_some());
    }
    #[test]
    fn reconnecting_does_not_reset_a_spent_budget() {
        let l = Limits::new(settings());
        let ip: IpAddr = "10.0.0.4".parse().unwrap();
        let slot = l.connect(ip).unwrap();
        assert!(l.auth_attempt(ip) && l.auth_attempt(ip));
        assert!(!l.auth_attempt(ip));
        drop(slot);
        let _slot = l.connect(ip).unwrap();
        assert!(!l.auth_attempt(ip), "the spent budget survives a reconnect");
    }

    #[test]
    fn state_is_forgotten_when_an_address_leaves() {
        let l = Limits::new(settings());
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        drop(l.connect(ip).unwrap());
        assert_eq!(l.tracked_addresses(), 0);
    }

    #[test]
    fn buckets_allow_a_burst_then_refuse() {
        let l = Limits::new(settings());
        let user = UserId::from_identity_key(&[1; 32]);
        assert!((0..3).all(|_| l.user_message(&user)));
        assert!(!l.user_message(&user));
        let ip: IpAddr = "10.0.0.3".parse().unwrap();
        let _slot = l.connect(ip);
        assert!(l.auth_attempt(ip) && l.auth_attempt(ip));
        assert!(!l.auth_attempt(ip));
        assert!(l.address_message(ip) && l.address_message(ip));
        assert!(!l.address_message(ip));
    }

    #[test]
    fn buckets_refill_over_time() {
        let mut b = Bucket::full(1, Instant::now());
        let t0 = Instant::now();
        assert!(b.take(10, 1, t0));
        assert!(!b.take(10, 1, t0));
        assert!(b.take(10, 1, t0 + std::time::Duration::from_millis(150)));
    }
}
