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

/// Compact serialized JSON (no whitespace between tokens) with every unsafe character (see [`is_unsafe_char`]) that the serializer
/// left raw written as a `\uXXXX` escape instead. JSON serializers escape C0 controls already
/// but pass DEL, C1 controls and bidi overrides through; outside strings JSON has none of
/// them, so the result parses to exactly the same value and is inert on a terminal.
pub fn json_inert(json: &str) -> Cow<'_, str> {
    if !json.chars().any(is_unsafe_char) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_unsafe_char(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
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

    #[test]
    fn json_stays_exact_and_becomes_inert() {
        let raw = "a\u{7f}b\u{9b}c\u{202e}d\n\u{1b}";
        let json = format!(
            "{{\"text\":\"{}\"}}",
            raw.replace('\n', "\\n").replace('\u{1b}', "\\u001b")
        );
        let inert = json_inert(&json);
        assert!(!inert.chars().any(is_unsafe_char), "{inert}");
        assert_eq!(inert, r#"{"text":"a\u007fb\u009bc\u202ed\n\u001b"}"#);
        assert!(matches!(json_inert("{}"), Cow::Borrowed(_)));
    }
}
