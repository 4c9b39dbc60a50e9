//! CPU time and memory of processes, read from `/proc`, and the open-file limit.
//!
//! CPU time is `utime + stime` from `/proc/PID/stat` (fields 14 and 15, in clock ticks; the
//! tick rate comes from `sysconf(_SC_CLK_TCK)`, 100 on Linux). It covers every thread of the
//! process. Memory is `VmRSS` (resident set) and `VmHWM` (its peak) from `/proc/PID/status`.

use anyhow::{Context, bail};
use serde::Serialize;

/// Clock ticks per second for `/proc/PID/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100,
        n => n,
    }
}

/// CPU time (user + system) of a process so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may contain spaces: skip past it.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) as f64 / clock_ticks_per_second() as f64)
}

/// Resident memory of a process.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Memory {
    /// Current resident set, KiB.
    pub rss_kib: u64,
    /// Peak resident set, KiB.
    pub hwm_kib: u64,
}

/// Reads `VmRSS` and `VmHWM` of a process.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{path} has no {name}"))?;
        let kib = line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim();
        Ok(kib.parse()?)
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// RSS and peak RSS summed over several processes, KiB; a process that is gone counts 0.
pub fn memory_all(pids: &[u32]) -> Memory {
    pids.iter()
        .filter_map(|p| memory(*p).ok())
        .fold(Memory::default(), |sum, m| Memory {
            rss_kib: sum.rss_kib + m.rss_kib,
            hwm_kib: sum.hwm_kib + m.hwm_kib,
        })
}

/// CPU seconds summed over several processes.
pub fn cpu_seconds_all(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// The parent process id of `pid`, from `/proc/PID/stat` (field 4).
fn parent_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pids` and every process descending from them, as `/proc` shows them now. A server that
/// works in child processes (PostgreSQL: a backend per connection) is measured whole this way.
pub fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let mut out: Vec<u32> = pids.to_vec();
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        for &p in &all {
            if parent_of(p) == Some(parent) && !out.contains(&p) {
                out.push(p);
            }
        }
        i += 1;
    }
    out
}

/// CPU seconds of `pids` and their descendants; a process gone since the list was made counts
/// 0 (its CPU time is lost with it, so sample trees whose children live through the window).
pub fn cpu_seconds_tree(pids: &[u32]) -> f64 {
    with_descendants(pids)
        .iter()
        .filter_map(|p| cpu_seconds(*p).ok())
        .sum()
}

/// Checks that every pid exists before a run starts, so a typo fails early.
pub fn check_pids(pids: &[u32]) -> anyhow::Result<()> {
    for pid in pids {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process {pid} (--pid); is the server running?");
        }
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard limit and returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        // Failing to raise is not fatal: the caller reports the limit it got.
        let _ = setrlimit(Resource::Nofile, raised);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// CPU seconds all processors have spent busy since boot (everything in the first line of
/// `/proc/stat` except idle and iowait). The difference over a window, less the server's and
/// the generator's own CPU, is what other programs took: a run on a busy machine shows it.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    // counted in user.
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Ok(busy as f64 / clock_ticks_per_second() as f64)
}

/// This process's own id.
pub fn self_pid() -> u32 {
    std::process::id()
}
