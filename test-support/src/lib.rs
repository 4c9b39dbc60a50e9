//! `syncra-test-support`: the trait conformance suites, helpers that spawn real servers on free
//! ports, and fixtures shared by Syncra's tests.
//!
//! Status: not built yet; the relay issue adds the first suites.
