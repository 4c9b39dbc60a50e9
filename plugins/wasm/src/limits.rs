//! The store's resource limiter: one memory cap for the whole store (every linear memory of
//! every core instance together, not each on its own), a cap on table elements across all
//! tables, and small caps on how many instances, memories and tables a component may create.
//!
//! It also remembers that it refused a growth, so a guest that aborts because its allocator got
//! no memory (which surfaces as a bare `unreachable` trap) is reported as having hit its cap.

use wasmtime::ResourceLimiter;

/// Core instances a component may create. A Rust component has a handful; an interpreted one
/// (componentize-py's Python) a few dozen at most.
const MAX_INSTANCES: usize = 32;
/// Linear memories across the store. Their total size is what `memory_mib` caps.
const MAX_MEMORIES: usize = 8;
/// Tables across the store.
const MAX_TABLES: usize = 32;
/// Table elements across all tables (a pointer each on the host: 2 MiB at most).
pub(crate) const MAX_TABLE_ELEMENTS: usize = 256 * 1024;

/// Limits of one store.
#[derive(Debug)]
pub(crate) struct Limiter {
    memory_cap: usize,
    memory_used: usize,
    table_elements_used: usize,
    /// The last growth allowed, taken back if the growth then fails.
    last_memory_grow: usize,
    last_table_grow: usize,
    /// Whether a memory growth was refused since [`Limiter::take_refusal`] was last called.
    memory_refused: bool,
}

impl Limiter {
    /// A limiter for a store whose memories may total `memory_mib` MiB.
    pub(crate) fn new(memory_mib: u32) -> Self {
        Limiter {
            memory_cap: (memory_mib as usize).saturating_mul(1024 * 1024),
            memory_used: 0,
            table_elements_used: 0,
            last_memory_grow: 0,
            last_table_grow: 0,
            memory_refused: false,
        }
    }

    /// Whether a memory growth was refused since the last call; clears the flag.
    pub(crate) fn take_refusal(&mut self) -> bool {
        std::mem::take(&mut self.memory_refused)
    }

    /// Bytes of linear memory the store holds, across all its memories.
    #[cfg(test)]
    pub(crate) fn memory_used(&self) -> usize {
        self.memory_used
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow = desired.saturating_sub(current);
        if self.memory_used.saturating_add(grow) > self.memory_cap {
            self.memory_refused = true;
            self.last_memory_grow = 0;
            return Ok(false);
        }
        self.memory_used += grow;
        self.last_memory_grow = grow;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // Nothing is given back: wasmtime also reports a growth as failed without asking
        // `memory_growing` first (a size that overflows), and taking back the last allowed
        // growth then would let a guest grow, fail, and grow again without bound. Counting a
        // growth that the memory's own maximum refused errs on the safe side: a guest that keeps
        // asking past its own maximum only reaches its cap sooner.
        self.last_memory_grow = 0;
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow = desired.saturating_sub(current);
        if self.table_elements_used.saturating_add(grow) > MAX_TABLE_ELEMENTS {
            self.last_table_grow = 0;
            return Ok(false);
        }
        self.table_elements_used += grow;
        self.last_table_grow = grow;
        Ok(true)
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // As for memories: nothing is given back (`table.grow` by an amount that overflows is
        // reported as failed without a `table_growing` before it).
        self.last_table_grow = 0;
        Ok(())
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn the_cap_is_for_all_memories_together() {
        let mut l = Limiter::new(4);
        // Two memories of 2 MiB each fill the cap; a third byte-page is refused.
        assert!(l.memory_growing(0, 2 * MIB, None).unwrap());
        assert!(l.memory_growing(0, 2 * MIB, None).unwrap());
        assert!(!l.take_refusal());
        assert!(!l.memory_growing(2 * MIB, 2 * MIB + 65536, None).unwrap());
        assert!(l.take_refusal());
        assert!(!l.take_refusal(), "the flag is cleared once read");
        assert_eq!(l.memory_used(), 4 * MIB);
    }

    /// wasmtime also reports a growth as failed without asking first (an amount that
    /// overflows). Taking back the last allowed growth then let a guest grow, "fail" and grow
    /// again, past the cap, for as long as it liked (found in review, 2026-12-07): a failure
    /// report takes nothing back.
    #[test]
    fn a_failure_report_takes_nothing_back() {
        let mut l = Limiter::new(4);
        assert!(l.memory_growing(0, 3 * MIB, None).unwrap());
        l.memory_grow_failed(wasmtime::Error::msg("overflow"))
            .unwrap();
        assert_eq!(l.memory_used(), 3 * MIB);
        assert!(!l.memory_growing(3 * MIB, 5 * MIB, None).unwrap());
        let mut allowed = 0;
        for _ in 0..100 {
            if l.table_growing(0, 200_000, None).unwrap() {
                allowed += 200_000;
            }
            l.table_grow_failed(wasmtime::Error::msg("overflow"))
                .unwrap();
        }
        assert!(
            allowed <= MAX_TABLE_ELEMENTS,
            "{allowed} table elements allowed"
        );
    }

    #[test]
    fn table_elements_are_capped_across_tables() {
        let mut l = Limiter::new(4);
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS - 1, None).unwrap());
        assert!(!l.table_growing(0, 2, None).unwrap());
        assert!(l.table_growing(0, 1, None).unwrap());
    }
}
