//! The line-mode frontend: plain lines on stdin and stdout, for terminals without full-screen
//! support, pipes and tests. It implements the same `UiFrontend` contract as the ratatui UI.
//!
//! Typing a line sends it to the open conversation; lines starting with `/` are commands
//! (`/help` lists them). Passphrases are read as lines too, so use this mode only where the
//! terminal is private (it does not mask input).

use std::io::{BufRead, Write};

use async_trait::async_trait;
use syncra_core::error::Error;
use syncra_core::text::escape_untrusted;
use syncra_core::ui::{
    AppEvent, ConnectionState, ConversationId, ConversationSummary, Secret, UiFrontend, UserAction,
};
use tokio::sync::mpsc;

/// The kind name this frontend registers under.
pub const KIND: &str = "line";

/// The line-mode frontend.
#[derive(Debug, Default)]
pub struct LineFrontend;

#[derive(Debug)]
enum Stage {
    Starting,
    Relay { default: String },
    Handle { relay: String },
    Passphrase { relay: String, handle: String },
    Locked,
    Main,
}

struct State {
    stage: Stage,
    open: Option<ConversationId>,
    conversations: Vec<ConversationSummary>,
}

/// Prints one line. Everything printed passes through here and is made inert first: a peer's
/// text, handle or group name (and any error that quotes one) cannot start a line of its own,
/// overwrite the screen or set the window title.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", escape_untrusted(text));
    let _ = out.flush();
}

fn prompt(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", escape_untrusted(text));
    let _ = out.flush();
}

const HELP: &str = "commands: /list, /open NAME, /add HANDLE, /verify, /verified, /history, /quit; \
                    any other line is sent to the open conversation";

impl State {
    fn name_of(&self, id: &ConversationId) -> String {
        syncra_core::ui::conversation_name(&self.conversations, id)
    }

    fn on_event(&mut self, event: AppEvent) {
        match event {
            AppEvent::Onboarding { default_relay } => {
                say("Welcome to Syncra. No identity yet: let's make one.");
                prompt(&format!("relay [{default_relay}]: "));
                self.stage = Stage::Relay {
                    default: default_relay,
                };
            }
            AppEvent::RelayCheck { url, result } => match result {
                Ok(detail) => {
                    say(&detail);
                    prompt("handle: ");
                    self.stage = Stage::Handle { relay: url };
                }
                Err(e) => {
                    say(&format!("cannot use {url}: {e}"));
                    prompt("relay: ");
                    self.stage = Stage::Relay { default: url };
                }
            },
            AppEvent::HandleAvailability { handle, available } => {
                if let Stage::Handle { relay } = &self.stage {
                    if available {
                        say(&format!("{handle} is free"));
                        prompt("passphrase (at least 10 characters; it cannot be recovered): ");
                        self.stage = Stage::Passphrase {
                            relay: relay.clone(),
                            handle,
                        };
                    } else {
                        say(&format!("{handle} is taken"));
                        prompt("handle: ");
                    }
                }
            }
            AppEvent::OnboardingFailed { message, .. } => {
                say(&format!("error: {message}"));
                if let Stage::Passphrase { relay, .. } = &self.stage {
                    let relay = relay.clone();
                    prompt("handle: ");
                    self.stage = Stage::Handle { relay };
                }
            }
            AppEvent::Locked { user_id, handle } => {
                say(&format!(
                    "identity {} ({})",
                    handle.unwrap_or_default(),
                    user_id.short()
                ));
                prompt("passphrase: ");
                self.stage = Stage::Locked;
            }
            AppEvent::UnlockFailed(why) => {
                say(&format!("error: {why}"));
                prompt("passphrase: ");
            }
            AppEvent::Ready(me) => {
                say(&format!(
                    "ready: {} ({}), fingerprint {}",
                    me.handle.unwrap_or_default(),
                    me.user_id,
                    me.fingerprint
                ));
                say(HELP);
                self.stage = Stage::Main;
            }
            AppEvent::Connection(ConnectionState::Online) => say("* online"),
            AppEvent::Connection(ConnectionState::Offline {
                retry_in_secs,
                reason,
            }) => say(&format!(
                "* offline ({reason}); retrying in {retry_in_secs}s"
            )),
            AppEvent::Connection(ConnectionState::Connecting(_)) => {}
            AppEvent::Conversations(list) => {
                if self.open.is_none()
                    && let Some(first) = list.first()
                {
                    self.open = Some(first.id.clone());
                }
                self.conversations = list;
            }
            AppEvent::History {
                conversation,
                lines,
            } => {
                say(&format!("--- {} ---", self.name_of(&conversation)));
                for l in lines {
                    let who = l.sender_name.unwrap_or_else(|| l.sender.short());
                    say(&format!("{who}: {}", l.text));
                }
            }
            AppEvent::Message(l) if !l.outgoing => {
                let who = l.sender_name.clone().unwrap_or_else(|| l.sender.short());
                say(&format!(
                    "[{}] {who}: {}",
                    self.name_of(&l.conversation),
                    l.text
                ));
            }
            AppEvent::Delivery { state, .. } => say(&format!("* {state:?}").to_lowercase()),
            AppEvent::KeyChanged { handle, .. } => say(&format!(
                "WARNING: the identity key of {handle} CHANGED; messages are held and sending \
                 is blocked until you /verify and /verified"
            )),
            AppEvent::SafetyNumber {
                number, verified, ..
            } => say(&format!(
                "safety number: {number}{}",
                if verified { " (verified)" } else { "" }
            )),
            AppEvent::Notice(n) => say(&format!("* {n}")),
            AppEvent::Error(e) => say(&format!("error: {e}")),
            // The text is the line just typed, still on the screen above.
            AppEvent::NotSent {
                conversation,
                reason,
                ..
            } => say(&format!(
                "not sent to {}: {reason}",
                self.name_of(&conversation)
            )),
            // Outgoing lines are what the person just typed; commands and shutdown need no line.
            AppEvent::Message(_) | AppEvent::Commands(_) | AppEvent::Shutdown => {}
        }
    }

    /// Turns a typed line into actions.
    fn on_line(&mut self, line: String) -> Vec<UserAction> {
        let text = line.trim_end_matches(['\r', '\n']).to_owned();
        match &self.stage {
            Stage::Starting => Vec::new(),
            Stage::Relay { default } => {
                let url = if text.trim().is_empty() {
                    default.clone()
                } else {
                    text.trim().to_owned()
                };
                vec![UserAction::CheckRelay(url)]
            }
            Stage::Handle { relay } => vec![UserAction::CheckHandle {
                relay: relay.clone(),
                handle: text.trim().to_ascii_lowercase(),
            }],
            Stage::Passphrase { relay, handle } => vec![UserAction::CreateIdentity {
                relay: relay.clone(),
                handle: handle.clone(),
                passphrase: Secret::new(text),
            }],
            Stage::Locked => vec![UserAction::Unlock(Secret::new(text))],
            Stage::Main => self.main_line(text),
        }
    }

    fn main_line(&mut self, text: String) -> Vec<UserAction> {
        let Some(cmd) = text.strip_prefix('/') else {
            if text.trim().is_empty() {
                return Vec::new();
            }
            return match &self.open {
                Some(c) => vec![UserAction::Send {
                    conversation: c.clone(),
                    text,
                }],
                None => {
                    say("no conversation open: /add HANDLE first");
                    Vec::new()
                }
            };
        };
        let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let arg = arg.trim();
        match name {
            "quit" | "q" => vec![UserAction::Quit],
            "help" => {
                say(HELP);
                Vec::new()
            }
            "list" => {
                for c in &self.conversations {
                    let unread = if c.unread > 0 {
                        format!(" ({})", c.unread)
                    } else {
                        String::new()
                    };
                    say(&format!("{}{unread}", c.name));
                }
                Vec::new()
            }
            "open" => {
                let found = self
                    .conversations
                    .iter()
                    .find(|c| c.name == arg || c.name == format!("@{arg}"))
                    .map(|c| c.id.clone());
                match found {
                    Some(id) => {
                        self.open = Some(id.clone());
                        vec![
                            UserAction::LoadHistory {
                                conversation: id.clone(),
                                limit: 20,
                            },
                            UserAction::MarkRead(id),
                        ]
                    }
                    None => {
                        say(&format!("no conversation named {arg:?}; /list shows them"));
                        Vec::new()
                    }
                }
            }
            "add" if !arg.is_empty() => vec![UserAction::AddContact(arg.to_owned())],
            "history" => match &self.open {
                Some(c) => vec![UserAction::LoadHistory {
                    conversation: c.clone(),
                    limit: 50,
                }],
                None => Vec::new(),
            },
            "verify" | "verified" => match &self.open {
                Some(ConversationId::Direct(contact)) => vec![UserAction::Verify {
                    contact: *contact,
                    mark_verified: name == "verified",
                }],
                _ => {
                    say("open a conversation with a contact first");
                    Vec::new()
                }
            },
            other => vec![UserAction::Command {
                name: other.to_owned(),
                args: arg.to_owned(),
            }],
        }
    }
}

#[async_trait]
impl UiFrontend for LineFrontend {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn run(
        &mut self,
        mut events: mpsc::Receiver<AppEvent>,
        actions: mpsc::Sender<UserAction>,
    ) -> Result<(), Error> {
        let (line_tx, mut lines) = mpsc::channel::<String>(64);
        // stdin is blocking; a thread feeds it in.
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                match line {
                    Ok(l) => {
                        if line_tx.blocking_send(l).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        let mut state = State {
            stage: Stage::Starting,
            open: None,
            conversations: Vec::new(),
        };
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(AppEvent::Shutdown) | None => return Ok(()),
                    Some(e) => state.on_event(e),
                },
                line = lines.recv() => match line {
                    // End of input: quit like /quit.
                    None => {
                        let _ = actions.send(UserAction::Quit).await;
                        return Ok(());
                    }
                    Some(l) => {
                        for a in state.on_line(l) {
                            let quit = a == UserAction::Quit;
                            if actions.send(a).await.is_err() || quit {
                                return Ok(());
                            }
                        }
                    }
                },
            }
        }
    }
}
