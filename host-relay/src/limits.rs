//! Rate and connection limits.
//!
//! Token buckets per user and per client address, a connection count per address, an
//! authentication-attempt budget and a pre-login lookup budget per address, and a fan-out budget
//! per user (bytes × recipients). State for an address disappears when it has no connections
//! left and its buckets are full again, and a user's when its buckets are full again, so memory
//! follows live load, not history — and reconnecting never refills a spent budget.
//!
//! An IPv6 client is counted by its /64: one subscriber usually holds a whole /64 and can pick
//! any of its 2^64 addresses, so counting single IPv6 addresses would be no limit at all.

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
        self.take_n(1.0, f64::from(rate), burst, now)
    }

    /// Takes `cost` tokens if there are that many; `per_second` refills up to `burst`.
    fn take_n(&mut self, cost: f64, per_second: f64, burst: u32, now: Instant) -> bool {
        self.tokens = self.level(per_second, burst, now);
        self.last = now;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// The key an address is counted under: IPv4 addresses (and IPv4-mapped IPv6 ones) as they
/// are, IPv6 addresses by their /64 prefix.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

/// Per-address state.
#[derive(Debug)]
struct AddressState {
    connections: u32,
    messages: Bucket,
    auth: Bucket,
    lookups: Bucket,
}

impl AddressState {
    /// Whether every budget is full again (nothing would be lost by forgetting the address).
    fn refilled(&self, s: &LimitSettings, now: Instant) -> bool {
        let full = |b: &Bucket, per_second: f64, burst: u32| {
            b.level(per_second, burst, now) >= f64::from(burst)
        };
        full(&self.messages, f64::from(s.address_rate), s.address_burst)
            && full(&self.auth, per_minute(s.auth_per_minute), s.auth_per_minute)
            && full(
                &self.lookups,
                per_minute(s.lookups_per_minute),
                s.lookups_per_minute,
            )
    }
}

/// Per-user state, shared by all of the user's sessions on this node.
#[derive(Debug)]
struct UserState {
    messages: Bucket,
    fanout: Bucket,
}

impl UserState {
    fn refilled(&self, s: &LimitSettings, now: Instant) -> bool {
        self.messages
            .level(f64::from(s.user_rate), s.user_burst, now)
            >= f64::from(s.user_burst)
            && self
                .fanout
                .level(f64::from(s.fanout_rate), s.fanout_burst, now)
                >= f64::from(s.fanout_burst)
    }
}

/// A budget of `n` per minute as a rate per second.
fn per_minute(n: u32) -> f64 {
    f64::from(n) / 60.0
}

/// Why a send was refused by the user's budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendRefusal {
    /// Too many sends per second.
    Rate,
    /// The send's fan-out (bytes × recipients) exceeds what is left of the budget.
    Fanout,
    /// The send's fan-out alone is larger than the whole burst: it can never pass.
    FanoutTooLarge,
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
    /// Handle lookups per minute per address before login.
    pub lookups_per_minute: u32,
    /// Fan-out bytes (envelope size × recipients) per second per user, sustained.
    pub fanout_rate: u32,
    /// Fan-out burst per user, in bytes.
    pub fanout_burst: u32,
}

/// All limit state of a relay node.
#[derive(Debug)]
pub struct Limits {
    settings: LimitSettings,
    addresses: DashMap<IpAddr, AddressState>,
    users: DashMap<UserId, Mutex<UserState>>,
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

    /// The state of an address, made with full budgets on its first use. The clock is read
    /// only then: this runs for every frame a relay receives.
    fn address(&self, ip: IpAddr) -> dashmap::mapref::one::RefMut<'_, IpAddr, AddressState> {
        self.addresses.entry(address_key(ip)).or_insert_with(|| {
            let now = Instant::now();
            AddressState {
                connections: 0,
                messages: Bucket::full(self.settings.address_burst, now),
                auth: Bucket::full(self.settings.auth_per_minute, now),
                lookups: Bucket::full(self.settings.lookups_per_minute, now),
            }
        })
    }

    /// Takes a connection slot for an address, or `None` if it has too many.
    pub fn connect(&self, ip: IpAddr) -> Option<ConnectionSlot<'_>> {
        let ip = address_key(ip);
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
        self.users.retain(|_, st| {
            !st.get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .refilled(&s, now)
        });
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
        self.address(ip).auth.take_n(
            1.0,
            per_minute(s.auth_per_minute),
            s.auth_per_minute,
            Instant::now(),
        )
    }

    /// One handle lookup before login from an address. Unauthenticated lookups get their own,
    /// stricter budget than frames in general, so the handle directory cannot be enumerated
    /// without an account.
    pub fn lookup_attempt(&self, ip: IpAddr) -> bool {
        let s = self.settings;
        self.address(ip).lookups.take_n(
            1.0,
            per_minute(s.lookups_per_minute),
            s.lookups_per_minute,
            Instant::now(),
        )
    }

    /// One send by a user to `recipients` recipients of an envelope of `size` bytes: one token
    /// of the send rate and `size × recipients` bytes of the fan-out budget, both or neither.
    /// Shared by all of the user's sessions on this node, and kept after the user's last
    /// session ends until the budgets have refilled, so reconnecting does not reset them.
    pub fn user_send(
        &self,
        user: &UserId,
        size: usize,
        recipients: usize,
    ) -> Result<(), SendRefusal> {
        let s = self.settings;
        let cost = size as f64 * recipients as f64;
        if cost > f64::from(s.fanout_burst) {
            return Err(SendRefusal::FanoutTooLarge);
        }
        let now = Instant::now();
        let entry = self.users.entry(*user).or_insert_with(|| {
            Mutex::new(UserState {
                messages: Bucket::full(s.user_burst, now),
                fanout: Bucket::full(s.fanout_burst, now),
            })
        });
        let mut state = entry.lock().unwrap_or_else(|e| e.into_inner());
        if state
            .fanout
            .level(f64::from(s.fanout_rate), s.fanout_burst, now)
            < cost
        {
            return Err(SendRefusal::Fanout);
        }
        if !state.messages.take(s.user_rate, s.user_burst, now) {
            return Err(SendRefusal::Rate);
        }
        let taken = state
            .fanout
            .take_n(cost, f64::from(s.fanout_rate), s.fanout_burst, now);
        debug_assert!(taken, "the level was checked under the same lock");
        Ok(())
    }

    /// Users with budget state.
    #[cfg(test)]
    pub fn tracked_users(&self) -> usize {
        self.users.len()
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
            lookups_per_minute: 3,
            fanout_rate: 1000,
            fanout_burst: 4000,
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
        assert!((0..3).all(|_| l.user_send(&user, 10, 1).is_ok()));
        assert_eq!(l.user_send(&user, 10, 1), Err(SendRefusal::Rate));
        let ip: IpAddr = "10.0.0.3".parse().unwrap();
        let _slot = l.connect(ip);
        assert!(l.auth_attempt(ip) && l.auth_attempt(ip));
        assert!(!l.auth_attempt(ip));
        assert!(l.address_message(ip) && l.address_message(ip));
        assert!(!l.address_message(ip));
    }

    #[test]
    fn fanout_costs_bytes_times_recipients() {
        let l = Limits::new(settings());
        let user = UserId::from_identity_key(&[2; 32]);
        // 4000 bytes of burst: one send of 1000 bytes to 3 recipients fits, a second does not,
        // and a refused send takes nothing from the rate budget.
        assert_eq!(l.user_send(&user, 1000, 3), Ok(()));
        assert_eq!(l.user_send(&user, 1000, 3), Err(SendRefusal::Fanout));
        assert_eq!(l.user_send(&user, 990, 1), Ok(()));
        assert_eq!(l.user_send(&user, 10, 1), Ok(()));
        // Bigger than the whole burst: never possible, said so.
        let other = UserId::from_identity_key(&[3; 32]);
        assert_eq!(
            l.user_send(&other, 1001, 4),
            Err(SendRefusal::FanoutTooLarge)
        );
    }

    #[test]
    fn a_users_spent_budget_survives_its_sessions() {
        let l = Limits::new(settings());
        let user = UserId::from_identity_key(&[4; 32]);
        assert_eq!(l.user_send(&user, 1000, 4), Ok(()));
        // A disconnect sweeps; the spent budget must still be there for the next session.
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        *l.last_sweep.lock().unwrap() = Instant::now() - std::time::Duration::from_secs(2);
        drop(l.connect(ip).unwrap());
        assert_eq!(l.tracked_users(), 1);
        assert_eq!(l.user_send(&user, 1000, 1), Err(SendRefusal::Fanout));
    }

    #[test]
    fn an_ipv6_64_is_one_address() {
        let l = Limits::new(settings());
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _x = l.connect(a).unwrap();
        let _y = l.connect(b).unwrap();
        assert!(l.connect(b).is_none(), "two connections per /64");
        assert!(l.connect(other).is_some(), "another /64 is another address");
        assert_eq!(
            address_key("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert!(l.auth_attempt(a) && l.auth_attempt(b));
        assert!(!l.auth_attempt(a), "the auth budget is per /64 too");
    }

    #[test]
    fn lookups_before_login_have_their_own_budget() {
        let l = Limits::new(settings());
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert!((0..3).all(|_| l.lookup_attempt(ip)));
        assert!(!l.lookup_attempt(ip));
        assert!(l.address_message(ip), "frames in general are still allowed");
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
