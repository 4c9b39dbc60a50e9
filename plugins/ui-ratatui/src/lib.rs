//! `syncra-ui-ratatui`: the default `UiFrontend`, a full-screen terminal UI on ratatui and
//! crossterm.
//!
//! Elm-style: one closed [`model::Message`] enum, [`model::Model::update`] and [`view::view`];
//! one `tokio::select!` over terminal events, client events and a tick; a redraw only when
//! something changed. The terminal is restored when the UI returns — and on panic.
//!
//! What it must never do: lose what a person typed (the composer is cleared only once the text
//! is handed to the client), show a message from a changed key as if nothing happened, or print
//! a passphrase (passphrase fields are masked and travel as `Secret`).

pub mod config;
pub mod model;
pub mod view;

use std::io::Write;
use std::time::Duration;

use async_trait::async_trait;
use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture, Event,
    EventStream, KeyEventKind,
};
use crossterm::execute;
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use futures_util::StreamExt;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use syncra_core::error::Error;
use syncra_core::ui::{AppEvent, UiFrontend, UserAction};
use tokio::sync::mpsc;

use crate::config::{Keymap, Theme, UiSettings};
use crate::model::{Message, Model};

/// The kind name this frontend registers under.
pub const KIND: &str = "ratatui";

/// The ratatui frontend.
#[derive(Debug, Clone)]
pub struct RatatuiFrontend {
    keymap: Keymap,
    theme: Theme,
    bell: bool,
}

impl RatatuiFrontend {
    /// A frontend with the given settings.
    pub fn new(settings: &UiSettings, bell: bool) -> Result<Self, Error> {
        let keymap = Keymap::with_overrides(&settings.keys)
            .map_err(|e| Error::Ui(format!("in [ui.keys]: {e}")))?;
        Ok(RatatuiFrontend {
            keymap,
            theme: settings.theme.clone(),
            bell,
        })
    }
}

fn ui_err(e: std::io::Error) -> Error {
    Error::Ui(format!("terminal: {e}"))
}

/// Restores the terminal: raw mode off, main screen back, mouse and paste modes off.
fn restore_terminal() {
    let _ = disable_raw_mode();
    let mut out = std::io::stdout();
    let _ = execute!(
        out,
        DisableBracketedPaste,
        DisableMouseCapture,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
    let _ = out.flush();
}

/// Restores the terminal when dropped, so every exit path (errors, early returns) leaves the
/// terminal usable.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

#[async_trait]
impl UiFrontend for RatatuiFrontend {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn run(
        &mut self,
        mut events: mpsc::Receiver<AppEvent>,
        actions: mpsc::Sender<UserAction>,
    ) -> Result<(), Error> {
        enable_raw_mode().map_err(ui_err)?;
        let _guard = TerminalGuard;
        let mut stdout = std::io::stdout();
        execute!(
            stdout,
            EnterAlternateScreen,
            EnableMouseCapture,
            EnableBracketedPaste
        )
        .map_err(ui_err)?;
        // A panic anywhere must not leave the terminal in raw mode.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
        let mut terminal =
            Terminal::new(CrosstermBackend::new(std::io::stdout())).map_err(ui_err)?;
        let mut model = Model::new(self.keymap.clone(), self.bell);
        let mut input = EventStream::new();
        let mut tick = tokio::time::interval(Duration::from_millis(400));
        loop {
            if model.dirty {
                terminal
                    .draw(|f| view::view(&model, &self.theme, f))
                    .map_err(ui_err)?;
                model.dirty = false;
                if let model::Screen::Main(m) = &mut model.screen
                    && m.bell
                {
                    m.bell = false;
                    let _ = std::io::stdout().write_all(b"\x07");
                    let _ = std::io::stdout().flush();
                }
            }
            let msg = tokio::select! {
                ev = input.next() => match ev {
                    Some(Ok(Event::Key(k))) if k.kind != KeyEventKind::Release => Message::Key(k),
                    Some(Ok(Event::Paste(text))) => Message::Paste(text),
                    Some(Ok(Event::Mouse(m))) => Message::Mouse(m),
                    Some(Ok(Event::Resize(..))) => Message::Resize,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(ui_err(e)),
                    None => return Ok(()),
                },
                ev = events.recv() => match ev {
                    Some(e) => Message::App(e),
                    None => return Ok(()),
                },
                _ = tick.tick() => Message::Tick,
            };
            let was_tick = matches!(msg, Message::Tick);
            let actions_out = model.update(msg);
            if was_tick && actions_out.is_empty() {
                // A tick that changed nothing does not need a redraw.
                model.dirty = false;
            }
            for action in actions_out {
                if actions.send(action).await.is_err() {
                    return Ok(());
                }
            }
            if model.quit {
                return Ok(());
            }
        }
    }
}
