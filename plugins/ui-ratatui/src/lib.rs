//! `syncra-ui-ratatui`: the default `UiFrontend`, a full-screen terminal UI on ratatui.
//!
//! Status: not built yet; the terminal UI issue fills this crate.
