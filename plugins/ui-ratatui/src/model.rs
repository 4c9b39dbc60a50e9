//! The state of the interface and the one function that changes it.
//!
//! Elm style: everything that happens is a [`Message`]; [`Model::update`] applies it and
//! returns the [`UserAction`]s to send to the client. Rendering ([`crate::view`]) only reads.
//! This keeps every behaviour testable without a terminal.

use std::collections::{HashMap, HashSet, VecDeque};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseEvent, MouseEventKind};
use ratatui_textarea::TextArea;
use syncra_core::UserId;
use syncra_core::ui::{
    AppEvent, ChatLine, CommandInfo, ConnectionState, ConversationId, ConversationSummary,
    DeliveryState, Me, OnboardingStep, Secret, UserAction,
};

use crate::config::{KeyAction, Keymap};

/// Everything that can happen.
#[derive(Debug, Clone)]
pub enum Message {
    /// A key press.
    Key(KeyEvent),
    /// Text pasted (bracketed paste).
    Paste(String),
    /// The mouse wheel or a click.
    Mouse(MouseEvent),
    /// The client said something.
    App(AppEvent),
    /// A second passed (debounce timers, clocks).
    Tick,
    /// The terminal was resized.
    Resize,
}

/// Onboarding steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// What Syncra is.
    Welcome,
    /// Which relay.
    Relay,
    /// Which handle.
    Handle,
    /// The passphrase, twice.
    Passphrase,
    /// Creating the identity and registering.
    Creating,
    /// The new user id and fingerprint.
    Done,
}

/// Whether a handle is free, as far as we know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleStatus {
    /// Not checked yet (typing).
    Unknown,
    /// Asked the relay.
    Checking(String),
    /// Free.
    Free(String),
    /// Taken or invalid, with why.
    Unavailable(String, String),
}

/// Onboarding state.
#[derive(Debug)]
pub struct Onboarding {
    /// Current step.
    pub step: Step,
    /// The relay address.
    pub relay: TextArea<'static>,
    /// The result of checking the relay.
    pub relay_status: Option<Result<String, String>>,
    /// The handle.
    pub handle: TextArea<'static>,
    /// Availability of the handle.
    pub handle_status: HandleStatus,
    /// Ticks since the handle was last edited (debounce).
    pub handle_idle: u32,
    /// The passphrase.
    pub pass: TextArea<'static>,
    /// The passphrase again.
    pub pass2: TextArea<'static>,
    /// Which of the two passphrase fields has focus.
    pub pass_focus: u8,
    /// The last error.
    pub error: Option<String>,
    /// The created identity.
    pub me: Option<Me>,
}

/// Unlock state.
#[derive(Debug)]
pub struct Unlock {
    /// Whose identity.
    pub user_id: UserId,
    /// Its handle.
    pub handle: Option<String>,
    /// The passphrase field.
    pub pass: TextArea<'static>,
    /// The last error.
    pub error: Option<String>,
    /// Waiting for the client.
    pub busy: bool,
}

/// An overlay on the main screen.
#[derive(Debug)]
pub enum Overlay {
    /// Every key.
    Help,
    /// The command palette.
    Palette {
        /// What was typed.
        input: Box<TextArea<'static>>,
        /// The highlighted entry.
        selected: usize,
    },
    /// A contact's safety number.
    Safety {
        /// The contact.
        contact: UserId,
        /// The digits.
        number: String,
        /// Marked verified.
        verified: bool,
    },
    /// A paste of many lines waiting for confirmation.
    ConfirmPaste(String),
}

/// Where keys go on the main screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    /// The message composer.
    Composer,
    /// The conversation list.
    List,
    /// The conversation filter.
    Filter,
}

/// The main screen.
#[derive(Debug)]
pub struct Main {
    /// Who I am.
    pub me: Me,
    /// The connection.
    pub connection: ConnectionState,
    /// Conversations, most recent first.
    pub conversations: Vec<ConversationSummary>,
    /// The open conversation.
    pub selected: Option<ConversationId>,
    /// Messages per conversation, oldest first.
    pub messages: HashMap<ConversationId, Transcript>,
    /// Lines scrolled up from the bottom of the message view (0 = following).
    pub scroll: usize,
    /// New messages arrived below while scrolled up.
    pub new_below: bool,
    /// The composer.
    pub composer: TextArea<'static>,
    /// The conversation filter.
    pub filter: TextArea<'static>,
    /// Where keys go.
    pub focus: Focus,
    /// An overlay, if open.
    pub overlay: Option<Overlay>,
    /// The latest notice or error (text, is_error).
    pub status: Option<(String, bool)>,
    /// Commands from plugins, for the palette.
    pub extra_commands: Vec<CommandInfo>,
    /// Ring the bell on the next render.
    pub bell: bool,
    /// Texts the client gave back for a conversation that was not open: they go back into
    /// the composer when it is opened.
    pub held: HashMap<ConversationId, String>,
    /// The texts given back at the start of the composer, while unchanged: one given back
    /// after them goes after them, so several come back in the order they were sent.
    pub given_back: Option<String>,
}

/// Lines kept per conversation: the most the `history` command loads. Older lines are dropped
/// as new ones arrive (they stay in the client's history), so a conversation that stays open
/// for days costs the same to update and draw as one opened a minute ago.
pub const MAX_LINES_KEPT: usize = 5000;

/// The loaded lines of one conversation, oldest first, at most [`MAX_LINES_KEPT`], each
/// message id once.
#[derive(Debug, Default, Clone)]
pub struct Transcript {
    lines: VecDeque<ChatLine>,
    /// The ids in `lines`: a message delivered twice is found without a scan.
    ids: HashSet<String>,
}

impl Transcript {
    /// The lines the client loaded (the newest [`MAX_LINES_KEPT`] of them).
    pub fn loaded(lines: Vec<ChatLine>) -> Self {
        let mut t = Transcript::default();
        let skip = lines.len().saturating_sub(MAX_LINES_KEPT);
        for line in lines.into_iter().skip(skip) {
            t.ids.insert(line.message_id.clone());
            t.lines.push_back(line);
        }
        t
    }

    /// Adds a line unless a line with its id is already here; drops the oldest beyond
    /// [`MAX_LINES_KEPT`].
    pub fn push(&mut self, line: ChatLine) {
        if !self.ids.insert(line.message_id.clone()) {
            return;
        }
        self.lines.push_back(line);
        while self.lines.len() > MAX_LINES_KEPT {
            if let Some(old) = self.lines.pop_front() {
                self.ids.remove(&old.message_id);
            }
        }
    }

    /// The line with this message id (the newest, should the client have loaded it twice).
    pub fn find_mut(&mut self, message_id: &str) -> Option<&mut ChatLine> {
        if !self.ids.contains(message_id) {
            return None;
        }
        self.lines
            .iter_mut()
            .rev()
            .find(|l| l.message_id == message_id)
    }

    /// The lines, oldest first.
    pub fn lines(&self) -> &VecDeque<ChatLine> {
        &self.lines
    }
}

/// Which screen is up.
#[derive(Debug)]
pub enum Screen {
    /// Waiting for the client to say what it has.
    Starting,
    /// No identity yet.
    Onboarding(Box<Onboarding>),
    /// An identity to unlock.
    Unlock(Box<Unlock>),
    /// Chatting.
    Main(Box<Main>),
}

/// The whole interface state.
#[derive(Debug)]
pub struct Model {
    /// The screen.
    pub screen: Screen,
    /// Key bindings.
    pub keymap: Keymap,
    /// Whether to ring the bell for background conversations.
    pub bell_enabled: bool,
    /// Set when the person quit.
    pub quit: bool,
    /// Needs a redraw.
    pub dirty: bool,
}

/// Built-in palette commands: (name, help, takes an argument).
pub const COMMANDS: &[(&str, &str)] = &[
    ("add", "add HANDLE — add a contact by handle or user id"),
    ("verify", "show the safety number of the open contact"),
    (
        "verified",
        "mark the open contact verified (after comparing numbers)",
    ),
    ("search", "search TEXT — find TEXT in the open conversation"),
    ("history", "load more history of the open conversation"),
    ("help", "show every key"),
    ("quit", "quit Syncra"),
];

/// Lines pasted at once above which the paste asks for confirmation.
pub const PASTE_CONFIRM_LINES: usize = 5;

fn text_area(placeholder: &str) -> TextArea<'static> {
    let mut t = TextArea::default();
    t.set_placeholder_text(placeholder);
    t.set_cursor_line_style(ratatui::style::Style::default());
    t
}

/// An empty message composer.
fn composer() -> TextArea<'static> {
    text_area("write a message — Enter sends, Alt-Enter for a new line")
}

/// Gives a message the client refused back to the person: into the composer, after the texts
/// given back before it and before anything typed since, the cursor at the end.
fn give_back(m: &mut Main, text: &str) {
    let typed = text_of(&m.composer);
    let (mut block, since) = match m.given_back.take() {
        Some(earlier) if typed.starts_with(&earlier) => {
            let rest = &typed[earlier.len()..];
            let since = rest.strip_prefix('\n').unwrap_or(rest).to_owned();
            (earlier, since)
        }
        _ => (String::new(), typed),
    };
    if !block.is_empty() {
        block.push('\n');
    }
    block.push_str(text);
    let mut fresh = composer();
    fresh.insert_str(&block);
    if !since.is_empty() {
        fresh.insert_newline();
        fresh.insert_str(&since);
    }
    m.composer = fresh;
    m.focus = Focus::Composer;
    m.given_back = Some(block);
}

/// A conversation's name as the list shows it.
pub fn conversation_name(m: &Main, id: &ConversationId) -> String {
    syncra_core::ui::conversation_name(&m.conversations, id)
}

fn secret_area(placeholder: &str) -> TextArea<'static> {
    let mut t = text_area(placeholder);
    t.set_mask_char('•');
    t
}

fn text_of(t: &TextArea<'_>) -> String {
    t.lines().join("\n")
}

/// A rough passphrase strength hint (what a person can act on, not an entropy claim).
pub fn strength_hint(pass: &str) -> (&'static str, u8) {
    let len = pass.chars().count();
    let classes = [
        pass.chars().any(|c| c.is_ascii_lowercase()),
        pass.chars().any(|c| c.is_ascii_uppercase()),
        pass.chars().any(|c| c.is_ascii_digit()),
        pass.chars().any(|c| !c.is_ascii_alphanumeric()),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    let words = pass.split_whitespace().count();
    match (len, classes, words) {
        (0, _, _) => ("type a passphrase", 0),
        (l, _, _) if l < 10 => ("too short: use at least 10 characters", 1),
        (_, _, w) if w >= 4 => ("strong: several words", 3),
        (l, c, _) if l >= 16 || (l >= 12 && c >= 3) => ("good", 3),
        _ => ("fair: longer is better (try four random words)", 2),
    }
}

impl Model {
    /// A fresh model.
    pub fn new(keymap: Keymap, bell_enabled: bool) -> Self {
        Model {
            screen: Screen::Starting,
            keymap,
            bell_enabled,
            quit: false,
            dirty: true,
        }
    }

    /// Applies a message; returns actions for the client.
    pub fn update(&mut self, msg: Message) -> Vec<UserAction> {
        self.dirty = true;
        if let Message::App(event) = msg {
            return self.on_app(event);
        }
        if let Message::Key(key) = &msg
            && self.keymap.action(key) == Some(KeyAction::Quit)
        {
            self.quit = true;
            return vec![UserAction::Quit];
        }
        if let (Screen::Onboarding(o), Message::Key(key)) = (&self.screen, &msg)
            && o.step == Step::Done
            && is_enter(key)
            && let Some(me) = o.me.clone()
        {
            self.open_main(me);
            return vec![UserAction::Refresh];
        }
        match &mut self.screen {
            Screen::Starting => Vec::new(),
            Screen::Onboarding(o) => on_onboarding(o, msg),
            Screen::Unlock(u) => on_unlock(u, msg),
            Screen::Main(m) => {
                let actions = on_main(m, &self.keymap, msg);
                if actions.contains(&UserAction::Quit) {
                    self.quit = true;
                }
                actions
            }
        }
    }

    fn on_app(&mut self, event: AppEvent) -> Vec<UserAction> {
        match inert(event) {
            AppEvent::Onboarding { default_relay } => {
                let mut relay = text_area("ws://127.0.0.1:7443/");
                relay.insert_str(&default_relay);
                self.screen = Screen::Onboarding(Box::new(Onboarding {
                    step: Step::Welcome,
                    relay,
                    relay_status: None,
                    handle: text_area("your handle, e.g. alice"),
                    handle_status: HandleStatus::Unknown,
                    handle_idle: 0,
                    pass: secret_area("passphrase"),
                    pass2: secret_area("the same passphrase again"),
                    pass_focus: 0,
                    error: None,
                    me: None,
                }));
            }
            AppEvent::Locked { user_id, handle } => {
                self.screen = Screen::Unlock(Box::new(Unlock {
                    user_id,
                    handle,
                    pass: secret_area("passphrase"),
                    error: None,
                    busy: false,
                }));
            }
            AppEvent::UnlockFailed(why) => {
                if let Screen::Unlock(u) = &mut self.screen {
                    u.busy = false;
                    u.error = Some(why);
                    u.pass = secret_area("passphrase");
                }
            }
            AppEvent::OnboardingFailed { step, message } => {
                if let Screen::Onboarding(o) = &mut self.screen {
                    // Back to the step the error is about, keeping what was typed.
                    o.step = match step {
                        OnboardingStep::Handle => Step::Handle,
                        OnboardingStep::Relay => Step::Relay,
                        OnboardingStep::Passphrase => Step::Passphrase,
                    };
                    o.error = Some(message);
                }
            }
            AppEvent::RelayCheck { url, result } => {
                if let Screen::Onboarding(o) = &mut self.screen
                    && text_of(&o.relay).trim() == url
                {
                    let ok = result.is_ok();
                    o.relay_status = Some(result);
                    if ok && o.step == Step::Relay {
                        o.step = Step::Handle;
                        o.error = None;
                    }
                }
            }
            AppEvent::HandleAvailability { handle, available } => {
                if let Screen::Onboarding(o) = &mut self.screen
                    && text_of(&o.handle).trim().to_ascii_lowercase() == handle
                {
                    o.handle_status = if available {
                        HandleStatus::Free(handle)
                    } else {
                        HandleStatus::Unavailable(handle, "taken".into())
                    };
                }
            }
            AppEvent::Ready(me) => match &mut self.screen {
                Screen::Onboarding(o) if o.step == Step::Creating => {
                    o.me = Some(me);
                    o.step = Step::Done;
                }
                _ => self.open_main(me),
            },
            AppEvent::Commands(commands) => {
                if let Screen::Main(m) = &mut self.screen {
                    m.extra_commands = commands;
                }
            }
            AppEvent::Connection(state) => {
                if let Screen::Main(m) = &mut self.screen {
                    m.connection = state;
                }
            }
            AppEvent::Conversations(list) => {
                if let Screen::Main(m) = &mut self.screen {
                    m.conversations = list;
                    if m.selected.is_none() {
                        m.selected = m.conversations.first().map(|c| c.id.clone());
                        if let Some(id) = m.selected.clone() {
                            return vec![
                                UserAction::LoadHistory {
                                    conversation: id.clone(),
                                    limit: 500,
                                },
                                UserAction::MarkRead(id),
                            ];
                        }
                    }
                }
            }
            AppEvent::History {
                conversation,
                lines,
            } => {
                if let Screen::Main(m) = &mut self.screen {
                    m.messages.insert(conversation, Transcript::loaded(lines));
                }
            }
            AppEvent::Message(line) => {
                if let Screen::Main(m) = &mut self.screen {
                    let open = m.selected.as_ref() == Some(&line.conversation);
                    let incoming = !line.outgoing;
                    m.messages
                        .entry(line.conversation.clone())
                        .or_default()
                        .push(line.clone());
                    if open && m.scroll > 0 && incoming {
                        m.new_below = true;
                    }
                    if incoming && !open && self.bell_enabled {
                        m.bell = true;
                    }
                    if open && incoming {
                        return vec![UserAction::MarkRead(line.conversation)];
                    }
                }
            }
            AppEvent::Delivery {
                conversation,
                message_id,
                state,
            } => {
                if let Screen::Main(m) = &mut self.screen
                    && let Some(list) = m.messages.get_mut(&conversation)
                    && let Some(line) = list.find_mut(&message_id)
                {
                    line.delivery = Some(state);
                }
            }
            AppEvent::NotSent {
                conversation,
                text,
                reason,
            } => {
                if let Screen::Main(m) = &mut self.screen {
                    // Only into the composer of the conversation it was written in, so Enter
                    // cannot send it elsewhere, nor move what is typed for another.
                    if m.selected.as_ref() == Some(&conversation) {
                        give_back(m, &text);
                        m.status = Some((format!("not sent: {reason}"), true));
                    } else {
                        let name = conversation_name(m, &conversation);
                        m.status = Some((
                            format!(
                                "not sent to {name}: {reason} — it is back in the composer when \
                                 you open {name}"
                            ),
                            true,
                        ));
                        m.held
                            .entry(conversation)
                            .and_modify(|held| {
                                held.push('\n');
                                held.push_str(&text);
                            })
                            .or_insert(text);
                    }
                }
            }
            AppEvent::KeyChanged { handle, .. } => {
                if let Screen::Main(m) = &mut self.screen {
                    m.status = Some((
                        format!(
                            "the identity key of {handle} CHANGED — open the conversation and verify"
                        ),
                        true,
                    ));
                }
            }
            AppEvent::SafetyNumber {
                contact,
                number,
                verified,
            } => {
                if let Screen::Main(m) = &mut self.screen {
                    m.overlay = Some(Overlay::Safety {
                        contact,
                        number,
                        verified,
                    });
                }
            }
            AppEvent::Notice(text) => {
                if let Screen::Main(m) = &mut self.screen {
                    m.status = Some((text, false));
                }
            }
            AppEvent::Error(text) => match &mut self.screen {
                Screen::Main(m) => m.status = Some((text, true)),
                Screen::Onboarding(o) => o.error = Some(text),
                Screen::Unlock(u) => {
                    u.error = Some(text);
                    u.busy = false;
                }
                Screen::Starting => {}
            },
            AppEvent::Shutdown => self.quit = true,
        }
        Vec::new()
    }

    fn open_main(&mut self, me: Me) {
        self.screen = Screen::Main(Box::new(Main {
            me,
            connection: ConnectionState::Connecting(0),
            conversations: Vec::new(),
            selected: None,
            messages: HashMap::new(),
            scroll: 0,
            new_below: false,
            composer: composer(),
            filter: text_area("filter"),
            focus: Focus::Composer,
            overlay: None,
            status: None,
            extra_commands: Vec::new(),
            bell: false,
            held: HashMap::new(),
            given_back: None,
        }));
    }
}

fn is_enter(key: &KeyEvent) -> bool {
    key.code == KeyCode::Enter && !key.modifiers.contains(KeyModifiers::ALT)
}

fn on_onboarding(o: &mut Onboarding, msg: Message) -> Vec<UserAction> {
    let Message::Key(key) = msg else {
        if let Message::Tick = msg {
            return onboarding_tick(o);
        }
        if let Message::Paste(text) = msg {
            let field = match o.step {
                Step::Relay => &mut o.relay,
                Step::Handle => &mut o.handle,
                _ => return Vec::new(),
            };
            field.insert_str(text.lines().next().unwrap_or_default());
        }
        return Vec::new();
    };
    if key.code == KeyCode::Esc {
        o.step = match o.step {
            Step::Relay => Step::Welcome,
            Step::Handle => Step::Relay,
            Step::Passphrase => Step::Handle,
            other => other,
        };
        return Vec::new();
    }
    match o.step {
        Step::Welcome => {
            if is_enter(&key) {
                o.step = Step::Relay;
            }
        }
        Step::Relay => {
            if is_enter(&key) {
                let url = text_of(&o.relay).trim().to_owned();
                if url.is_empty() {
                    o.error = Some("type the address of a relay".into());
                    return Vec::new();
                }
                if matches!(&o.relay_status, Some(Ok(_))) {
                    o.step = Step::Handle;
                    return Vec::new();
                }
                o.relay_status = Some(Ok(format!("checking {url}…")));
                return vec![UserAction::CheckRelay(url)];
            }
            if o.relay.input(key) {
                o.relay_status = None;
            }
        }
        Step::Handle => {
            if is_enter(&key) {
                match &o.handle_status {
                    HandleStatus::Free(_) => {
                        o.step = Step::Passphrase;
                        o.error = None;
                    }
                    HandleStatus::Unavailable(h, why) => {
                        o.error = Some(format!("{h:?} is {why}; pick another handle"));
                    }
                    _ => o.error = Some("checking whether the handle is free…".into()),
                }
                return Vec::new();
            }
            if o.handle.input(key) {
                o.handle_idle = 0;
                let h = text_of(&o.handle).trim().to_ascii_lowercase();
                o.handle_status = match syncra_core::Handle::parse(&h) {
                    Err(syncra_core::error::IdError::BadHandle { why, .. }) => {
                        HandleStatus::Unavailable(h, why.to_string())
                    }
                    Err(e) => HandleStatus::Unavailable(h, e.to_string()),
                    Ok(_) => HandleStatus::Unknown,
                };
            }
        }
        Step::Passphrase => {
            if key.code == KeyCode::Tab || key.code == KeyCode::BackTab {
                o.pass_focus = 1 - o.pass_focus.min(1);
                return Vec::new();
            }
            if is_enter(&key) {
                if o.pass_focus == 0 {
                    o.pass_focus = 1;
                    return Vec::new();
                }
                let p1 = text_of(&o.pass);
                let p2 = text_of(&o.pass2);
                if strength_hint(&p1).1 < 2 {
                    o.error =
                        Some("the passphrase is too short: use at least 10 characters".into());
                    return Vec::new();
                }
                if p1 != p2 {
                    o.error = Some("the two passphrases differ; type them again".into());
                    o.pass2 = secret_area("the same passphrase again");
                    return Vec::new();
                }
                o.step = Step::Creating;
                o.error = None;
                return vec![UserAction::CreateIdentity {
                    relay: text_of(&o.relay).trim().to_owned(),
                    handle: text_of(&o.handle).trim().to_ascii_lowercase(),
                    passphrase: Secret::new(p1),
                }];
            }
            if o.pass_focus == 0 {
                o.pass.input(key);
            } else {
                o.pass2.input(key);
            }
        }
        Step::Creating => {} // Enter on the last step is handled by the model, which opens the main screen.
        Step::Done => {}
    }
    Vec::new()
}

/// Checks the handle once typing paused for a tick.
fn onboarding_tick(o: &mut Onboarding) -> Vec<UserAction> {
    if o.step != Step::Handle || o.handle_status != HandleStatus::Unknown {
        return Vec::new();
    }
    o.handle_idle += 1;
    if o.handle_idle < 1 {
        return Vec::new();
    }
    let handle = text_of(&o.handle).trim().to_ascii_lowercase();
    if handle.is_empty() {
        return Vec::new();
    }
    o.handle_status = HandleStatus::Checking(handle.clone());
    vec![UserAction::CheckHandle {
        relay: text_of(&o.relay).trim().to_owned(),
        handle,
    }]
}

fn on_unlock(u: &mut Unlock, msg: Message) -> Vec<UserAction> {
    let Message::Key(key) = msg else {
        return Vec::new();
    };
    if u.busy {
        return Vec::new();
    }
    if is_enter(&key) {
        let pass = text_of(&u.pass);
        if pass.is_empty() {
            u.error = Some("type your passphrase".into());
            return Vec::new();
        }
        u.busy = true;
        u.error = None;
        return vec![UserAction::Unlock(Secret::new(pass))];
    }
    u.pass.input(key);
    Vec::new()
}

fn visible_conversations(m: &Main) -> Vec<&ConversationSummary> {
    let f = text_of(&m.filter).to_lowercase();
    m.conversations
        .iter()
        .filter(|c| f.is_empty() || c.name.to_lowercase().contains(&f))
        .collect()
}

fn select(m: &mut Main, id: Option<ConversationId>) -> Vec<UserAction> {
    if id == m.selected {
        return Vec::new();
    }
    m.selected = id.clone();
    m.scroll = 0;
    m.new_below = false;
    if let Some(text) = id.as_ref().and_then(|id| m.held.remove(id)) {
        give_back(m, &text);
    }
    match id {
        Some(id) => vec![
            UserAction::LoadHistory {
                conversation: id.clone(),
                limit: 500,
            },
            UserAction::MarkRead(id),
        ],
        None => Vec::new(),
    }
}

fn move_selection(m: &mut Main, delta: isize) -> Vec<UserAction> {
    let list: Vec<ConversationId> = visible_conversations(m)
        .iter()
        .map(|c| c.id.clone())
        .collect();
    if list.is_empty() {
        return Vec::new();
    }
    let current = m
        .selected
        .as_ref()
        .and_then(|s| list.iter().position(|c| c == s))
        .unwrap_or(0) as isize;
    let next = (current + delta).rem_euclid(list.len() as isize) as usize;
    select(m, Some(list[next].clone()))
}

fn selected_summary(m: &Main) -> Option<&ConversationSummary> {
    let id = m.selected.as_ref()?;
    m.conversations.iter().find(|c| &c.id == id)
}

/// All palette entries: built-in commands, then plugin commands.
pub fn palette_entries(m: &Main) -> Vec<(String, String)> {
    COMMANDS
        .iter()
        .map(|(n, h)| ((*n).to_owned(), (*h).to_owned()))
        .chain(
            m.extra_commands
                .iter()
                .map(|c| (c.name.clone(), c.help.clone())),
        )
        .collect()
}

/// Palette entries matching what was typed.
pub fn palette_matches(m: &Main, typed: &str) -> Vec<(String, String)> {
    let word = typed.split_whitespace().next().unwrap_or("").to_lowercase();
    palette_entries(m)
        .into_iter()
        .filter(|(n, _)| word.is_empty() || n.starts_with(&word))
        .collect()
}

fn run_command(m: &mut Main, line: &str) -> Vec<UserAction> {
    let line = line.trim().trim_start_matches(['/', ':']);
    let (name, args) = line.split_once(' ').unwrap_or((line, ""));
    let args = args.trim().to_owned();
    let contact = match &m.selected {
        Some(ConversationId::Direct(id)) => Some(*id),
        _ => None,
    };
    match name {
        "" => Vec::new(),
        "quit" | "q" => vec![UserAction::Quit],
        "help" => {
            m.overlay = Some(Overlay::Help);
            Vec::new()
        }
        "add" if !args.is_empty() => vec![UserAction::AddContact(args)],
        "add" => {
            m.status = Some(("usage: add HANDLE".into(), true));
            Vec::new()
        }
        "verify" | "verified" => match contact {
            Some(contact) => vec![UserAction::Verify {
                contact,
                mark_verified: name == "verified",
            }],
            None => {
                m.status = Some(("open a conversation with a contact first".into(), true));
                Vec::new()
            }
        },
        "history" => match m.selected.clone() {
            Some(conversation) => vec![UserAction::LoadHistory {
                conversation,
                limit: 5000,
            }],
            None => Vec::new(),
        },
        "search" => {
            let hits = m
                .selected
                .as_ref()
                .and_then(|s| m.messages.get(s))
                .map(|transcript| {
                    transcript
                        .lines()
                        .iter()
                        .filter(|l| l.text.to_lowercase().contains(&args.to_lowercase()))
                        .count()
                })
                .unwrap_or(0);
            m.status = Some((format!("{hits} messages contain {args:?}"), false));
            Vec::new()
        }
        other => vec![UserAction::Command {
            name: other.to_owned(),
            args,
        }],
    }
}

fn send_composer(m: &mut Main) -> Vec<UserAction> {
    let text = text_of(&m.composer);
    if text.trim().is_empty() {
        return Vec::new();
    }
    // `/add bob` runs a built-in command and `/roll 2d6` a plugin's; any other text starting
    // with a slash is an ordinary message (a bot may understand it).
    if let Some(cmd) = text.strip_prefix('/') {
        let word = cmd.split_whitespace().next().unwrap_or("");
        let builtin = COMMANDS.iter().any(|(n, _)| *n == word);
        let plugin = m.extra_commands.iter().any(|c| c.name == word);
        if builtin || plugin {
            m.composer = composer();
            return run_command(m, cmd);
        }
    }
    let Some(conversation) = m.selected.clone() else {
        m.status = Some((
            "no conversation open: add a contact with Ctrl-P, add HANDLE".into(),
            true,
        ));
        return Vec::new();
    };
    if let Some(s) = selected_summary(m)
        && s.key_changed
    {
        m.status = Some((
            "sending is blocked: this contact's key changed; verify it first (Ctrl-S)".into(),
            true,
        ));
        return Vec::new();
    }
    if text.len() > syncra_core::ui::MAX_MESSAGE_TEXT {
        // Kept in the composer: the person can cut it in two.
        m.status = Some((
            format!(
                "the message is {} KiB, over the {} KiB limit for one message: split it",
                text.len().div_ceil(1024),
                syncra_core::ui::MAX_MESSAGE_TEXT / 1024
            ),
            true,
        ));
        return Vec::new();
    }
    // Clear the composer only once the text is handed to the client, which writes it to the
    // outbox before anything else or, refusing it, gives it back (`AppEvent::NotSent`).
    m.composer = composer();
    m.given_back = None;
    m.scroll = 0;
    m.new_below = false;
    vec![UserAction::Send { conversation, text }]
}

fn on_main(m: &mut Main, keymap: &Keymap, msg: Message) -> Vec<UserAction> {
    match msg {
        Message::Tick | Message::Resize | Message::App(_) => Vec::new(),
        Message::Mouse(MouseEvent { kind, .. }) => {
            match kind {
                MouseEventKind::ScrollUp => m.scroll += 3,
                MouseEventKind::ScrollDown => {
                    m.scroll = m.scroll.saturating_sub(3);
                    if m.scroll == 0 {
                        m.new_below = false;
                    }
                }
                _ => {}
            }
            Vec::new()
        }
        Message::Paste(text) => {
            if let Some(Overlay::Palette { input, .. }) = &mut m.overlay {
                input.insert_str(text.lines().next().unwrap_or_default());
                return Vec::new();
            }
            if text.lines().count() > PASTE_CONFIRM_LINES {
                m.overlay = Some(Overlay::ConfirmPaste(text));
            } else {
                m.composer.insert_str(&text);
            }
            Vec::new()
        }
        Message::Key(key) => on_main_key(m, keymap, key),
    }
}

fn on_main_key(m: &mut Main, keymap: &Keymap, key: KeyEvent) -> Vec<UserAction> {
    // Overlays take keys first.
    if let Some(overlay) = &mut m.overlay {
        match overlay {
            Overlay::Help => {
                m.overlay = None;
            }
            Overlay::Safety {
                contact, verified, ..
            } => {
                let contact = *contact;
                let already = *verified;
                m.overlay = None;
                if key.code == KeyCode::Char('v') && !already {
                    return vec![UserAction::Verify {
                        contact,
                        mark_verified: true,
                    }];
                }
            }
            Overlay::ConfirmPaste(text) => {
                let text = text.clone();
                m.overlay = None;
                if matches!(key.code, KeyCode::Char('y') | KeyCode::Enter) {
                    m.composer.insert_str(&text);
                } else {
                    m.status = Some(("paste cancelled".into(), false));
                }
            }
            Overlay::Palette { input, selected } => {
                match key.code {
                    KeyCode::Esc => m.overlay = None,
                    KeyCode::Up => *selected = selected.saturating_sub(1),
                    KeyCode::Down => *selected += 1,
                    KeyCode::Tab => {
                        let typed = text_of(input);
                        let chosen = *selected;
                        let matches = palette_matches(m, &typed);
                        if let Some(Overlay::Palette { input, .. }) = &mut m.overlay
                            && let Some((name, _)) =
                                matches.get(chosen.min(matches.len().saturating_sub(1)))
                        {
                            **input = TextArea::default();
                            input.insert_str(format!("{name} "));
                        }
                    }
                    KeyCode::Enter => {
                        let typed = text_of(input);
                        let chosen = *selected;
                        let matches = palette_matches(m, &typed);
                        let sel = chosen.min(matches.len().saturating_sub(1));
                        m.overlay = None;
                        // A bare word picks the highlighted command; with arguments, run as typed.
                        let line = if typed.contains(' ') || matches.is_empty() {
                            typed
                        } else {
                            matches[sel].0.clone()
                        };
                        return run_command(m, &line);
                    }
                    _ => {
                        input.input(key);
                        *selected = 0;
                    }
                }
            }
        }
        return Vec::new();
    }

    let composer_empty = text_of(&m.composer).is_empty();
    match keymap.action(&key) {
        Some(KeyAction::Palette) => {
            m.overlay = Some(Overlay::Palette {
                input: Box::default(),
                selected: 0,
            });
            return Vec::new();
        }
        Some(KeyAction::Help) => {
            m.overlay = Some(Overlay::Help);
            return Vec::new();
        }
        Some(KeyAction::NextUnread) => {
            let next = visible_conversations(m)
                .iter()
                .find(|c| c.unread > 0 && Some(&c.id) != m.selected.as_ref())
                .map(|c| c.id.clone());
            return match next {
                Some(id) => select(m, Some(id)),
                None => {
                    m.status = Some(("no unread messages".into(), false));
                    Vec::new()
                }
            };
        }
        Some(KeyAction::Filter) => {
            m.focus = Focus::Filter;
            return Vec::new();
        }
        Some(KeyAction::NextConversation) => return move_selection(m, 1),
        Some(KeyAction::PrevConversation) => return move_selection(m, -1),
        Some(KeyAction::ScrollUp) => {
            m.scroll += 10;
            return Vec::new();
        }
        Some(KeyAction::ScrollDown) => {
            m.scroll = m.scroll.saturating_sub(10);
            if m.scroll == 0 {
                m.new_below = false;
            }
            return Vec::new();
        }
        Some(KeyAction::SafetyNumber) => return run_command(m, "verify"),
        Some(KeyAction::Newline) if m.focus == Focus::Composer => {
            m.composer.insert_newline();
            return Vec::new();
        }
        _ => {}
    }

    match m.focus {
        Focus::Filter => {
            match key.code {
                KeyCode::Esc => {
                    m.filter = text_area("filter");
                    m.focus = Focus::Composer;
                }
                KeyCode::Enter => {
                    m.focus = Focus::List;
                    let first = visible_conversations(m).first().map(|c| c.id.clone());
                    return select(m, first);
                }
                _ => {
                    m.filter.input(key);
                }
            }
            Vec::new()
        }
        Focus::List => match key.code {
            KeyCode::Up | KeyCode::Char('k') => move_selection(m, -1),
            KeyCode::Down | KeyCode::Char('j') => move_selection(m, 1),
            KeyCode::Enter | KeyCode::Tab | KeyCode::Esc => {
                m.focus = Focus::Composer;
                Vec::new()
            }
            KeyCode::Char('/') => {
                m.focus = Focus::Filter;
                Vec::new()
            }
            _ => Vec::new(),
        },
        Focus::Composer => {
            if composer_empty && key.modifiers == KeyModifiers::NONE {
                match key.code {
                    KeyCode::Char('?') => {
                        m.overlay = Some(Overlay::Help);
                        return Vec::new();
                    }
                    KeyCode::Char(':') => {
                        m.overlay = Some(Overlay::Palette {
                            input: Box::default(),
                            selected: 0,
                        });
                        return Vec::new();
                    }
                    KeyCode::Tab => {
                        m.focus = Focus::List;
                        return Vec::new();
                    }
                    KeyCode::Up => return move_selection(m, -1),
                    KeyCode::Down => return move_selection(m, 1),
                    _ => {}
                }
            }
            if is_enter(&key) {
                return send_composer(m);
            }
            m.composer.input(key);
            Vec::new()
        }
    }
}

/// The delivery mark shown after an outgoing message.
pub fn delivery_mark(state: Option<DeliveryState>) -> &'static str {
    match state {
        Some(DeliveryState::Sending) => "…",
        Some(DeliveryState::Delivered) => "✓",
        Some(DeliveryState::Offline) => "○ offline",
        Some(DeliveryState::Stored) => "◷ held for them",
        Some(DeliveryState::Failed) => "✗ failed",
        None => "",
    }
}

/// Makes untrusted text inert.
fn clean(text: String) -> String {
    match syncra_core::text::escape_untrusted(&text) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(escaped) => escaped,
    }
}

fn clean_line(mut line: ChatLine) -> ChatLine {
    line.text = clean(line.text);
    line.sender_name = line.sender_name.map(clean);
    line
}

/// The event with every text in it that a peer, the relay or a plugin may have chosen
/// (messages, handles, conversation names, previews, command help, errors) made inert: control
/// and bidi characters are shown escaped, so nothing a peer sends reaches the terminal as a
/// command. Done once, where events enter the model, so no view can forget it.
fn inert(event: AppEvent) -> AppEvent {
    match event {
        AppEvent::Locked { user_id, handle } => AppEvent::Locked {
            user_id,
            handle: handle.map(clean),
        },
        AppEvent::UnlockFailed(why) => AppEvent::UnlockFailed(clean(why)),
        AppEvent::OnboardingFailed { step, message } => AppEvent::OnboardingFailed {
            step,
            message: clean(message),
        },
        AppEvent::RelayCheck { url, result } => AppEvent::RelayCheck {
            url: clean(url),
            result: result.map(clean).map_err(clean),
        },
        AppEvent::Ready(mut me) => {
            me.handle = me.handle.map(clean);
            me.relay = me.relay.map(clean);
            AppEvent::Ready(me)
        }
        AppEvent::Commands(list) => AppEvent::Commands(
            list.into_iter()
                .map(|mut c| {
                    c.name = clean(c.name);
                    c.help = clean(c.help);
                    c
                })
                .collect(),
        ),
        AppEvent::Connection(ConnectionState::Offline {
            retry_in_secs,
            reason,
        }) => AppEvent::Connection(ConnectionState::Offline {
            retry_in_secs,
            reason: clean(reason),
        }),
        AppEvent::Conversations(list) => AppEvent::Conversations(
            list.into_iter()
                .map(|mut c| {
                    c.name = clean(c.name);
                    c.last_preview = c.last_preview.map(clean);
                    c
                })
                .collect(),
        ),
        AppEvent::History {
            conversation,
            lines,
        } => AppEvent::History {
            conversation,
            lines: lines.into_iter().map(clean_line).collect(),
        },
        AppEvent::Message(line) => AppEvent::Message(clean_line(line)),
        AppEvent::KeyChanged { contact, handle } => AppEvent::KeyChanged {
            contact,
            handle: clean(handle),
        },
        AppEvent::HandleAvailability { handle, available } => AppEvent::HandleAvailability {
            handle: clean(handle),
            available,
        },
        AppEvent::Notice(text) => AppEvent::Notice(clean(text)),
        AppEvent::Error(text) => AppEvent::Error(clean(text)),
        // The text is the person's own, going back where they typed it.
        AppEvent::NotSent {
            conversation,
            text,
            reason,
        } => AppEvent::NotSent {
            conversation,
            text,
            reason: clean(reason),
        },
        // No free text in these (the default relay is our own setting).
        other => other,
    }
}
