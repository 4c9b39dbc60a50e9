//! `syncra-bench`: criterion benchmarks of the cryptography (see `benches/`) and, later, the
//! `syncra-load` load generator.
