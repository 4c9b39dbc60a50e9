//! Untrusted text made inert for terminals and logs.
//!
//! Anything a peer, a broker publisher or a plugin sent (message text, handles, group names,
//! error messages, URLs) may carry control characters: a newline that forges a line from
//! someone else, CR and erase-line that overwrite what is on screen, escape sequences that move
//! the cursor, change colours or set the window title, and Unicode bidi overrides that make
//! text read in another order than it is stored. [`escape_untrusted`] shows every such
//! character visibly (`\n`, `\u{1b}`, `\u{202e}`) instead of letting a terminal act on it.
//! Ordinary text, including every printable non-ASCII character, passes unchanged.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` must not reach a terminal as it is: C0 and C1 controls, DEL, and the Unicode
/// format characters that reorder or hide text (bidi embeddings, overrides and isolates, the
/// line and paragraph separators, zero-width joiners aside).
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' // line and paragraph separators
                | '\u{200e}' | '\u{200f}' // LRM, RLM
                | '\u{202a}'..='\u{202e}' // LRE, RLE, PDF, LRO, RLO
                | '\u{2066}'..='\u{2069}' // LRI, RLI, FSI, PDI
                | '\u{061c}' // Arabic letter mark
        )
}

/// `text` with every unsafe character (see [`is_unsafe_char`]) written as a visible escape:
/// `\n`, `\r`, `\t`, everything else as `\u{XXXX}`. The result is for reading, not for
/// parsing back. Borrows when nothing needs escaping.
pub fn escape_untrusted(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: &str) {
        assert_eq!(escape_untrusted(input), expect, "{input:?}");
    }

    #[test]
    fn controls_and_bidi_overrides_are_shown_not_executed() {
        check("hello", "hello");
        check("héllo wörld ✓ 日本", "héllo wörld ✓ 日本");
        check("hi\n[bob] bob: pay me", "hi\\n[bob] bob: pay me");
        check("a\rb", "a\\rb");
        check("\x1b[2K\x1b[1Gfake", "\\u{1b}[2K\\u{1b}[1Gfake");
        check("\x1b]0;title\x07", "\\u{1b}]0;title\\u{7}");
        check("\u{9b}31m", "\\u{9b}31m");
        check("abc\u{202e}txt.exe", "abc\\u{202e}txt.exe");
        check("\u{2066}x\u{2069}", "\\u{2066}x\\u{2069}");
        check("nul\0", "nul\\u{0}");
        check("del\x7f", "del\\u{7f}");
        check("tab\there", "tab\\there");
        assert!(matches!(escape_untrusted("plain"), Cow::Borrowed(_)));
    }
}
