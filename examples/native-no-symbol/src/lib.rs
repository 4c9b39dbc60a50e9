//! `syncra-example-native-no-symbol`: a test fixture, a perfectly loadable shared library that
//! does not export `syncra_plugin_descriptor`, as when someone points the relay at the wrong
//! `.so`. A host must refuse it as "not a Syncra native plugin".
//!
//! It must never export the descriptor symbol.

/// Something for the library to contain.
pub fn not_a_plugin() -> &'static str {
    "this library is not a Syncra native plugin"
}
