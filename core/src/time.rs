//! Civil (UTC) date and time from Unix milliseconds, for display. Kept here so every interface
//! formats time the same way without a date crate. And the one jittered backoff every
//! reconnecting part uses (the client, the Redis and NATS brokers).

use std::time::Duration;

/// The pause before retry number `step` (0-based): `first` doubled `step` times, capped at
/// `max`, then scaled by a random factor in [0.5, 1] from the OS's generator, so that many
/// clients of a restarted relay, or the nodes of a cluster, do not come back in lockstep.
pub fn backoff(step: u32, first: Duration, max: Duration) -> Duration {
    let full = first.saturating_mul(1u32 << step.min(16)).min(max);
    let mut r = [0u8; 2];
    crate::crypto::fill_random(&mut r);
    let fraction = f64::from(u16::from_le_bytes(r) % 1025) / 1024.0;
    full.mul_f64(0.5 + fraction / 2.0)
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for step in 0..40 {
            let pause = backoff(step, first, max);
            let full = first.saturating_mul(1 << step.min(16)).min(max);
            assert!(pause >= full / 2 && pause <= full, "{step}: {pause:?}");
        }
    }
}

/// A UTC date and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    /// Year.
    pub year: i64,
    /// Month, 1-12.
    pub month: u32,
    /// Day, 1-31.
    pub day: u32,
    /// Hour, 0-23.
    pub hour: u32,
    /// Minute.
    pub minute: u32,
    /// Second.
    pub second: u32,
}

impl Civil {
    /// Converts milliseconds since the Unix epoch (Howard Hinnant's days-to-civil algorithm).
    pub fn from_ms(ms: u64) -> Civil {
        let secs = ms / 1000;
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        Civil {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: ((rem / 60) % 60) as u32,
            second: (rem % 60) as u32,
        }
    }

    /// `YYYY-MM-DD`.
    pub fn date(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// `HH:MM`.
    pub fn hm(&self) -> String {
        format!("{:02}:{:02}", self.hour, self.minute)
    }

    /// `YYYY-MM-DD HH:MM:SS`.
    pub fn full(&self) -> String {
        format!(
            "{} {:02}:{:02}:{:02}",
            self.date(),
            self.hour,
            self.minute,
            self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(Civil::from_ms(0).full(), "1970-01-01 00:00:00");
        assert_eq!(Civil::from_ms(951_782_400_000).date(), "2000-02-29");
        assert_eq!(
            Civil::from_ms(1_795_650_392_388).full(),
            "2026-11-25 23:46:32"
        );
    }
}
