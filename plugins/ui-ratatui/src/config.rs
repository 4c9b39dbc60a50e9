//! Keymap and theme, configurable in the client's `settings.toml` (`[ui.keys]`, `[ui.theme]`).

use std::collections::BTreeMap;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;
use serde::{Deserialize, Serialize};

/// Things a key can do, independent of which key it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyAction {
    /// Quit.
    Quit,
    /// Open the command palette.
    Palette,
    /// Show the help overlay.
    Help,
    /// Jump to the next conversation with unread messages.
    NextUnread,
    /// Filter the conversation list.
    Filter,
    /// Next conversation.
    NextConversation,
    /// Previous conversation.
    PrevConversation,
    /// Scroll the messages up a page.
    ScrollUp,
    /// Scroll the messages down a page.
    ScrollDown,
    /// Insert a newline in the composer.
    Newline,
    /// Show the safety number of the current contact.
    SafetyNumber,
}

impl KeyAction {
    /// Every action, for the help overlay.
    pub const ALL: [KeyAction; 11] = [
        KeyAction::Quit,
        KeyAction::Palette,
        KeyAction::Help,
        KeyAction::NextUnread,
        KeyAction::Filter,
        KeyAction::NextConversation,
        KeyAction::PrevConversation,
        KeyAction::ScrollUp,
        KeyAction::ScrollDown,
        KeyAction::Newline,
        KeyAction::SafetyNumber,
    ];

    /// What it does, for the help overlay.
    pub fn describe(self) -> &'static str {
        match self {
            KeyAction::Quit => "quit",
            KeyAction::Palette => "command palette (also : in an empty composer)",
            KeyAction::Help => "this help (also ? in an empty composer)",
            KeyAction::NextUnread => "next conversation with unread messages",
            KeyAction::Filter => "filter conversations (also / in the conversation list)",
            KeyAction::NextConversation => "next conversation",
            KeyAction::PrevConversation => "previous conversation",
            KeyAction::ScrollUp => "scroll messages up",
            KeyAction::ScrollDown => "scroll messages down",
            KeyAction::Newline => "new line in the message (Enter sends)",
            KeyAction::SafetyNumber => "safety number of this contact",
        }
    }
}

/// A key with modifiers, written like `ctrl-p`, `alt-a`, `f1`, `pageup`, `?`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeySpec {
    /// The key.
    pub code: KeyCode,
    /// Ctrl, Alt, Shift.
    pub modifiers: KeyModifiers,
}

impl KeySpec {
    /// Parses `ctrl-p`, `alt-enter`, `f1`, `pageup`, `?`...
    pub fn parse(s: &str) -> Result<KeySpec, String> {
        let lower = s.trim().to_ascii_lowercase();
        let mut modifiers = KeyModifiers::NONE;
        let mut rest = lower.as_str();
        loop {
            if let Some(r) = rest.strip_prefix("ctrl-") {
                modifiers |= KeyModifiers::CONTROL;
                rest = r;
            } else if let Some(r) = rest.strip_prefix("alt-") {
                modifiers |= KeyModifiers::ALT;
                rest = r;
            } else if let Some(r) = rest.strip_prefix("shift-") {
                modifiers |= KeyModifiers::SHIFT;
                rest = r;
            } else {
                break;
            }
        }
        let code = match rest {
            "enter" => KeyCode::Enter,
            "tab" => KeyCode::Tab,
            "esc" => KeyCode::Esc,
            "up" => KeyCode::Up,
            "down" => KeyCode::Down,
            "left" => KeyCode::Left,
            "right" => KeyCode::Right,
            "pageup" => KeyCode::PageUp,
            "pagedown" => KeyCode::PageDown,
            "home" => KeyCode::Home,
            "end" => KeyCode::End,
            f if f.starts_with('f') && f.len() > 1 && f[1..].parse::<u8>().is_ok() => {
                KeyCode::F(f[1..].parse().map_err(|_| format!("bad key {s:?}"))?)
            }
            c if c.chars().count() == 1 => KeyCode::Char(c.chars().next().unwrap_or(' ')),
            _ => {
                return Err(format!(
                    "unknown key {s:?} (try ctrl-p, alt-a, f1, pageup, ?)"
                ));
            }
        };
        Ok(KeySpec { code, modifiers })
    }

    /// Whether a key event is this key.
    pub fn matches(&self, key: &KeyEvent) -> bool {
        let mods = key.modifiers - KeyModifiers::SHIFT;
        let want = self.modifiers - KeyModifiers::SHIFT;
        let code = match key.code {
            KeyCode::Char(c) => KeyCode::Char(c.to_ascii_lowercase()),
            other => other,
        };
        code == self.code && mods == want
    }

    /// As written in the config.
    pub fn label(&self) -> String {
        let mut s = String::new();
        if self.modifiers.contains(KeyModifiers::CONTROL) {
            s.push_str("Ctrl-");
        }
        if self.modifiers.contains(KeyModifiers::ALT) {
            s.push_str("Alt-");
        }
        match self.code {
            KeyCode::Char(c) => s.push(c.to_ascii_uppercase()),
            KeyCode::F(n) => s.push_str(&format!("F{n}")),
            KeyCode::Enter => s.push_str("Enter"),
            KeyCode::PageUp => s.push_str("PgUp"),
            KeyCode::PageDown => s.push_str("PgDn"),
            KeyCode::Up => s.push_str("Up"),
            KeyCode::Down => s.push_str("Down"),
            KeyCode::Tab => s.push_str("Tab"),
            KeyCode::Esc => s.push_str("Esc"),
            other => s.push_str(&format!("{other:?}")),
        }
        s
    }
}

/// The key bindings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keymap {
    bindings: BTreeMap<KeyAction, KeySpec>,
}

impl Default for Keymap {
    fn default() -> Self {
        let b = |a, k: &str| {
            (
                a,
                KeySpec::parse(k).unwrap_or(KeySpec {
                    code: KeyCode::Null,
                    modifiers: KeyModifiers::NONE,
                }),
            )
        };
        Keymap {
            bindings: [
                b(KeyAction::Quit, "ctrl-q"),
                b(KeyAction::Palette, "ctrl-p"),
                b(KeyAction::Help, "f1"),
                b(KeyAction::NextUnread, "alt-a"),
                b(KeyAction::Filter, "ctrl-f"),
                b(KeyAction::NextConversation, "alt-down"),
                b(KeyAction::PrevConversation, "alt-up"),
                b(KeyAction::ScrollUp, "pageup"),
                b(KeyAction::ScrollDown, "pagedown"),
                b(KeyAction::Newline, "alt-enter"),
                b(KeyAction::SafetyNumber, "ctrl-s"),
            ]
            .into_iter()
            .collect(),
        }
    }
}

impl Keymap {
    /// The default keymap with overrides (`action = "key"`).
    pub fn with_overrides(overrides: &BTreeMap<KeyAction, String>) -> Result<Keymap, String> {
        let mut k = Keymap::default();
        for (action, key) in overrides {
            k.bindings.insert(*action, KeySpec::parse(key)?);
        }
        Ok(k)
    }

    /// The action a key triggers.
    pub fn action(&self, key: &KeyEvent) -> Option<KeyAction> {
        self.bindings
            .iter()
            .find(|(_, spec)| spec.matches(key))
            .map(|(a, _)| *a)
    }

    /// The key bound to an action.
    pub fn key(&self, action: KeyAction) -> String {
        self.bindings
            .get(&action)
            .map(KeySpec::label)
            .unwrap_or_else(|| "-".into())
    }
}

/// Colours.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Theme {
    /// Titles, the selection, my name.
    pub accent: Color,
    /// Timestamps, hints, separators.
    pub muted: Color,
    /// Errors and the key-changed banner.
    pub error: Color,
    /// Warnings and requests.
    pub warn: Color,
    /// Delivered marks, "online".
    pub ok: Color,
}

impl Default for Theme {
    fn default() -> Self {
        Theme {
            accent: Color::Cyan,
            muted: Color::DarkGray,
            error: Color::Red,
            warn: Color::Yellow,
            ok: Color::Green,
        }
    }
}

/// The UI section of the client's settings.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UiSettings {
    /// Key overrides, `action = "key"`.
    pub keys: BTreeMap<KeyAction, String>,
    /// Colours.
    pub theme: Theme,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_match() {
        let k = KeySpec::parse("ctrl-p").unwrap();
        assert!(k.matches(&KeyEvent::new(KeyCode::Char('p'), KeyModifiers::CONTROL)));
        assert!(!k.matches(&KeyEvent::new(KeyCode::Char('p'), KeyModifiers::NONE)));
        assert_eq!(k.label(), "Ctrl-P");
        assert!(KeySpec::parse("hyper-x").is_err());
        let m = Keymap::with_overrides(&[(KeyAction::Quit, "alt-x".to_string())].into()).unwrap();
        assert_eq!(
            m.action(&KeyEvent::new(KeyCode::Char('x'), KeyModifiers::ALT)),
            Some(KeyAction::Quit)
        );
        assert_eq!(m.key(KeyAction::Palette), "Ctrl-P");
    }
}
