//! The interactive host: drives a [`UiFrontend`] (the ratatui UI or line mode) from a
//! [`Client`], translating closed sets of user actions into client calls and client results
//! into app events.
//!
//! One task owns the client; the frontend runs in its own task and talks over two channels.

use std::collections::HashMap;
use std::time::Duration;

use syncra_core::UserId;
use syncra_core::crypto::keyfile::KeyFile;
use syncra_core::ui::{
    AppEvent, ChatLine, CommandInfo, ConnectionState, ConversationId, ConversationSummary, Me,
    OnboardingStep, UiFrontend, UserAction,
};
use syncra_core::wire::ErrorCode;
use tokio::sync::mpsc;

use crate::client::{Client, Incoming, InitOptions, RegisterError, SendState, Target};
use crate::history::{LastMessages, StoredMessage};
use crate::home::Home;
use crate::net::probe;
use crate::serve::{Serve, ServeEvent, Wake};

/// The sender name of a group event line ("alice added eve").
const EVENT_MARK: &str = "*";

/// Commands the client itself offers in the palette (before any extension's).
const BUILT_IN: &[(&str, &str)] = &[
    ("invite", "add contacts to the open group: /invite HANDLE…"),
    (
        "remove",
        "remove members from the open group: /remove HANDLE…",
    ),
    ("leave", "leave the open group (another member commits it)"),
];

/// The relay offered by default during onboarding.
pub const DEFAULT_RELAY: &str = "ws://127.0.0.1:7443/";

/// How the interactive client runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Allow plaintext `ws://` to a relay that is not loopback (`--insecure-plaintext`).
    pub insecure_plaintext: bool,
}

/// Runs the interactive client until the person quits.
pub async fn run(
    home: Home,
    mut frontend: Box<dyn UiFrontend>,
    options: Options,
) -> anyhow::Result<()> {
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let (act_tx, act_rx) = mpsc::channel(256);
    let ui = tokio::spawn(async move { frontend.run(ev_rx, act_tx).await });
    let mut controller = Controller::new(home, ev_tx, options);
    let result = controller.run(act_rx).await;
    // The UI returns when the person quits or the event channel closes.
    drop(controller);
    let ui_result = ui
        .await
        .map_err(|e| anyhow::anyhow!("the user interface crashed: {e}"))?;
    result?;
    ui_result.map_err(|e| anyhow::anyhow!("{e}"))
}

struct Controller {
    home: Home,
    events: mpsc::Sender<AppEvent>,
    client: Option<Client>,
    /// The same connection loop as `listen` and `bot run` (reconnects, outbox, key timer,
    /// deliveries), driven from this loop beside the person's actions.
    serve: Option<Serve<std::future::Pending<()>>>,
    unread: HashMap<ConversationId, u32>,
    open: Option<ConversationId>,
    init_options: InitOptions,
    /// Client extensions and the commands each offers.
    extensions: Vec<(std::sync::Arc<syncra_plugin_wasm::BotPlugin>, Vec<String>)>,
    options: Options,
    /// The last message of every log, for the conversation list. The list goes out after every
    /// message, sent or received; reading every log in full each time made one message cost
    /// the whole history, so the logs are read once and then only what was appended since.
    previews: LastMessages,
}

fn to_target(id: &ConversationId) -> Target {
    match id {
        ConversationId::Direct(u) => Target::Direct(*u),
        ConversationId::Group(g) => Target::Group(g.clone()),
    }
}

impl Controller {
    fn new(home: Home, events: mpsc::Sender<AppEvent>, options: Options) -> Self {
        Controller {
            home,
            events,
            client: None,
            serve: None,
            unread: HashMap::new(),
            open: None,
            init_options: InitOptions::default(),
            extensions: Vec::new(),
            options,
            previews: LastMessages::default(),
        }
    }

    async fn emit(&self, event: AppEvent) {
        let _ = self.events.send(event).await;
    }

    /// Hands a refused message's text back to the front end, which gives it to the person
    /// again: what was typed is never dropped, whatever refused it.
    async fn not_sent(&self, conversation: ConversationId, text: String, reason: String) {
        self.emit(AppEvent::NotSent {
            conversation,
            text,
            reason,
        })
        .await;
    }

    async fn run(&mut self, mut actions: mpsc::Receiver<UserAction>) -> anyhow::Result<()> {
        self.start().await?;
        loop {
            // Waiting borrows only the loop's state (cancel-safe); the client is used after.
            let session = self.client.as_ref().and_then(Client::session);
            let connected = self.client.as_ref().is_some_and(Client::is_connected);
            let serve = self.serve.as_mut();
            let wake = async {
                match serve {
                    Some(serve) => serve.wait(session, connected).await,
                    None => std::future::pending().await,
                }
            };
            let step = tokio::select! {
                action = actions.recv() => Err(action),
                wake = wake => Ok(wake),
            };
            match step {
                Err(None | Some(UserAction::Quit)) => break,
                Err(Some(action)) => self.on_action(action).await,
                Ok(wake) => self.on_wake(wake).await,
            }
        }
        if let Some(c) = self.client.as_mut() {
            c.disconnect().await;
        }
        let _ = self.events.send(AppEvent::Shutdown).await;
        Ok(())
    }

    /// Lets the connection loop do what woke it, then shows what came of it.
    async fn on_wake(&mut self, wake: Wake) {
        let (Some(serve), Some(client)) = (self.serve.as_mut(), self.client.as_mut()) else {
            return;
        };
        serve.handle(client, wake).await;
        let events: Vec<ServeEvent> = serve.take_events().collect();
        for event in events {
            self.on_serve_event(event).await;
        }
    }

    async fn on_serve_event(&mut self, event: ServeEvent) {
        match event {
            ServeEvent::Connecting { attempt } => {
                self.emit(AppEvent::Connection(ConnectionState::Connecting(attempt)))
                    .await
            }
            ServeEvent::Connected { sent } => {
                self.emit(AppEvent::Connection(ConnectionState::Online))
                    .await;
                if sent > 0 {
                    self.emit(AppEvent::Notice(format!(
                        "sent {sent} message(s) from the outbox"
                    )))
                    .await;
                    self.send_conversations().await;
                }
            }
            ServeEvent::Disconnected { reason, retry_in } => {
                self.emit(AppEvent::Connection(ConnectionState::Offline {
                    retry_in_secs: retry_in.as_secs().max(1),
                    reason,
                }))
                .await
            }
            ServeEvent::Incoming(incoming) => self.on_incoming(incoming).await,
            ServeEvent::Failed(message) => self.emit(AppEvent::Error(message)).await,
            ServeEvent::Backlog(count) => {
                let what = if count == 1 { "message" } else { "messages" };
                self.emit(AppEvent::Notice(format!(
                    "{count} {what} arrived while you were away"
                )))
                .await;
            }
            ServeEvent::Notice(code, message) => {
                let text = match code {
                    ErrorCode::QueueOverflow => format!("the relay dropped messages: {message}"),
                    _ => format!("relay: {message}"),
                };
                self.emit(AppEvent::Notice(text)).await;
            }
        }
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        if self.home.has_identity() {
            let file = KeyFile::read(&self.home.key_file())
                .map_err(|e| crate::keystore::explain(e, &self.home.key_file()))?;
            let user_id: UserId = file
                .public
                .get("user_id")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("the key file does not record a user id"))?;
            let handle = self.home.settings()?.handle;
            self.emit(AppEvent::Locked { user_id, handle }).await;
        } else {
            let relay = self
                .home
                .settings()
                .ok()
                .and_then(|s| s.relay)
                .unwrap_or_else(|| DEFAULT_RELAY.to_owned());
            self.emit(AppEvent::Onboarding {
                default_relay: relay,
            })
            .await;
        }
        Ok(())
    }

    fn me(&self) -> Option<Me> {
        let c = self.client.as_ref()?;
        Some(Me {
            user_id: c.user_id(),
            handle: c.settings().handle.clone(),
            relay: c.settings().relay.clone(),
            fingerprint: c.fingerprint(),
        })
    }

    /// Whether plaintext ws:// to a non-loopback relay is allowed (flag or setting).
    fn insecure(&self) -> bool {
        self.options.insecure_plaintext || self.home.settings().is_ok_and(|s| s.insecure_plaintext)
    }

    async fn unlocked(&mut self, mut client: Client) {
        if self.options.insecure_plaintext {
            client.allow_insecure_plaintext();
        }
        let serve = match Serve::new(&mut client, std::future::pending()) {
            Ok(serve) => serve,
            Err(e) => {
                self.emit(AppEvent::Error(format!("{e:#}"))).await;
                return;
            }
        };
        self.serve = Some(serve);
        self.client = Some(client);
        self.previews.clear();
        if let Some(me) = self.me() {
            self.emit(AppEvent::Ready(me)).await;
        }
        let commands = self.load_extensions().await;
        self.emit(AppEvent::Commands(commands)).await;
        self.send_conversations().await;
        // Connect now (registration may have connected already: then this says so).
        if let Some(serve) = self.serve.as_mut() {
            serve.connect_now();
        }
        self.on_wake(Wake::Connect).await;
    }

    async fn on_action(&mut self, action: UserAction) {
        match action {
            UserAction::Unlock(secret) => {
                let home = self.home.clone();
                let opened =
                    tokio::task::spawn_blocking(move || Client::open(home, secret.expose())).await;
                match opened {
                    Ok(Ok(client)) => self.unlocked(client).await,
                    Ok(Err(e)) => self.emit(AppEvent::UnlockFailed(format!("{e:#}"))).await,
                    Err(e) => self.emit(AppEvent::UnlockFailed(e.to_string())).await,
                }
            }
            UserAction::CheckRelay(url) => {
                let result = probe(&url, None, self.insecure())
                    .await
                    .map(|p| p.describe());
                self.emit(AppEvent::RelayCheck {
                    url,
                    result: result.map_err(|e| e.to_string()),
                })
                .await;
            }
            UserAction::CheckHandle { relay, handle } => {
                match probe(&relay, Some(&handle), self.insecure()).await {
                    Ok(p) => {
                        self.emit(AppEvent::HandleAvailability {
                            handle,
                            available: p.handle_free == Some(true),
                        })
                        .await
                    }
                    Err(e) => {
                        self.emit(AppEvent::Error(format!("checking the handle: {e}")))
                            .await
                    }
                }
            }
            UserAction::CreateIdentity {
                relay,
                handle,
                passphrase,
            } => {
                let home = self.home.clone();
                let options = self.init_options;
                let pass = passphrase.clone();
                // An identity made by an earlier attempt whose registration failed is reused.
                let made = tokio::task::spawn_blocking(move || {
                    if home.has_identity() {
                        Client::open(home, pass.expose())
                    } else {
                        Client::init(home, pass.expose(), options)
                    }
                })
                .await;
                let failed = |step, message| AppEvent::OnboardingFailed { step, message };
                let mut client = match made {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        self.emit(failed(OnboardingStep::Passphrase, format!("{e:#}")))
                            .await;
                        return;
                    }
                    Err(e) => {
                        self.emit(failed(OnboardingStep::Passphrase, e.to_string()))
                            .await;
                        return;
                    }
                };
                if self.options.insecure_plaintext {
                    client.allow_insecure_plaintext();
                }
                match client.register(&relay, &handle).await {
                    Ok(()) => self.unlocked(client).await,
                    Err(e) => {
                        // The step comes from the error's kind, never from its wording.
                        let step = match &e {
                            RegisterError::Handle(_) => OnboardingStep::Handle,
                            RegisterError::Relay(_) => OnboardingStep::Relay,
                            RegisterError::Local(_) => OnboardingStep::Passphrase,
                        };
                        self.emit(failed(step, e.to_string())).await
                    }
                }
            }
            UserAction::Refresh => {
                // Everything again, from the logs' first lines too.
                self.previews.clear();
                self.send_connection().await;
                self.send_conversations().await;
            }
            UserAction::Send { conversation, text } => self.send(conversation, text).await,
            UserAction::LoadHistory {
                conversation,
                limit,
            } => {
                self.open = Some(conversation.clone());
                let lines = self.history_lines(&conversation, limit);
                self.emit(AppEvent::History {
                    conversation,
                    lines,
                })
                .await;
            }
            UserAction::MarkRead(conversation) => {
                self.open = Some(conversation.clone());
                if self.unread.remove(&conversation).is_some() {
                    self.send_conversations().await;
                }
            }
            UserAction::AddContact(query) => self.add_contact(query).await,
            UserAction::Verify {
                contact,
                mark_verified,
            } => self.verify(contact, mark_verified).await,
            UserAction::Command { name, args } => self.run_extension(name, args).await,
            UserAction::Quit => {}
        }
    }

    /// Loads the client extensions named in the settings; returns their commands.
    async fn load_extensions(&mut self) -> Vec<CommandInfo> {
        let Some(client) = self.client.as_ref() else {
            return Vec::new();
        };
        let configs = client.settings().plugins.clone();
        let store_dir = client.home().root().join("plugins");
        let mut commands: Vec<CommandInfo> = BUILT_IN
            .iter()
            .map(|(name, help)| CommandInfo {
                name: (*name).to_owned(),
                help: (*help).to_owned(),
            })
            .collect();
        let mut names = std::collections::HashSet::new();
        for config in configs {
            let name = config.name();
            // One store per name: two extensions of one name would drop each other's keys.
            if !names.insert(name.clone()) {
                self.emit(AppEvent::Error(format!(
                    "extension {name}: another extension has this name; give one a `name` of \
                     its own"
                )))
                .await;
                continue;
            }
            let dir = store_dir.clone();
            let key = client.plugin_store_key();
            let loaded = tokio::task::spawn_blocking(move || {
                syncra_core::crypto::keyfile::create_private_dir(&dir)?;
                crate::bot::load(config, &dir, key)
            })
            .await;
            let plugin = match loaded {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    self.emit(AppEvent::Error(format!("extension {name}: {e:#}")))
                        .await;
                    continue;
                }
                Err(e) => {
                    self.emit(AppEvent::Error(format!("extension {name}: {e}")))
                        .await;
                    continue;
                }
            };
            match crate::bot::call(&plugin, |p| p.commands()).await {
                Ok(list) => {
                    let names = list.iter().map(|c| c.name.clone()).collect();
                    commands.extend(list.into_iter().map(|c| CommandInfo {
                        name: c.name,
                        help: format!("{} ({name})", c.help),
                    }));
                    self.extensions.push((plugin, names));
                }
                Err(e) => {
                    self.emit(AppEvent::Error(format!("extension {name}: {e:#}")))
                        .await
                }
            }
        }
        commands
    }

    /// Sends the open conversation's history and the conversation list again, after a command
    /// changed them.
    async fn show_again(&mut self, open: ConversationId) {
        let lines = self.history_lines(&open, 500);
        self.emit(AppEvent::History {
            conversation: open,
            lines,
        })
        .await;
        self.send_conversations().await;
    }

    /// A built-in group command on the open group ([`BUILT_IN`]): the MLS commit goes out
    /// now; the roster and the event show as for any other change.
    async fn run_group_command(&mut self, name: &str, args: &str) {
        let (Some(open), Some(client)) = (self.open.clone(), self.client.as_mut()) else {
            return;
        };
        let Target::Group(gid) = to_target(&open) else {
            self.emit(AppEvent::Error(format!("/{name} works in a group")))
                .await;
            return;
        };
        let Some(group) = client.book().groups.get(&gid).map(|g| g.name.clone()) else {
            return;
        };
        let handles: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
        let result = match name {
            "leave" => client.group_leave(&group).await.map(drop),
            "invite" => client.group_update(&group, &handles, &[]).await.map(drop),
            _ => client.group_update(&group, &[], &handles).await.map(drop),
        };
        if let Err(e) = result {
            self.emit(AppEvent::Error(format!("/{name}: {e}"))).await;
        }
        self.show_again(open).await;
    }

    /// Runs an extension's command in the open conversation.
    async fn run_extension(&mut self, name: String, args: String) {
        if BUILT_IN.iter().any(|(n, _)| *n == name) {
            return self.run_group_command(&name, &args).await;
        }
        let Some((plugin, _)) = self
            .extensions
            .iter()
            .find(|(_, names)| names.contains(&name))
            .cloned()
        else {
            self.emit(AppEvent::Error(format!(
                "unknown command {name:?}; F1 lists the keys, Ctrl-P the commands"
            )))
            .await;
            return;
        };
        let Some(open) = self.open.clone() else {
            self.emit(AppEvent::Error("open a conversation first".into()))
                .await;
            return;
        };
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let target = to_target(&open);
        let conversation = match &target {
            Target::Direct(id) => client.name_of(id),
            Target::Group(g) => client
                .book()
                .groups
                .get(g)
                .map(|g| format!("@{}", g.name))
                .unwrap_or_default(),
        };
        let (n, a) = (name.clone(), args);
        let actions =
            match crate::bot::call(&plugin, move |p| p.on_command(&n, &a, &conversation)).await {
                Ok(actions) => actions,
                Err(e) => {
                    self.emit(AppEvent::Error(format!("/{name}: {e:#}"))).await;
                    return;
                }
            };
        let Some(client) = self.client.as_mut() else {
            return;
        };
        for report in crate::bot::perform(client, &target, actions).await {
            if let Err(e) = report {
                self.emit(AppEvent::Error(format!("/{name}: {e:#}"))).await;
            }
        }
        self.show_again(open).await;
    }

    async fn add_contact(&mut self, query: String) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let result = client.add_contact(&query).await;
        match result {
            Ok((contact, crate::contacts::PinOutcome::KeyChanged(_))) => {
                self.emit(AppEvent::KeyChanged {
                    contact: contact.record.user_id,
                    handle: contact.handle,
                })
                .await
            }
            Ok((contact, _)) => {
                self.emit(AppEvent::Notice(format!(
                    "added {}; compare safety numbers with Ctrl-S",
                    contact.handle
                )))
                .await
            }
            Err(e) => self.emit(AppEvent::Error(format!("{e:#}"))).await,
        }
        self.send_conversations().await;
    }

    async fn verify(&mut self, contact: UserId, mark: bool) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let Some(handle) = client.book().by_id(&contact).map(|c| c.handle.clone()) else {
            self.emit(AppEvent::Error(
                "this conversation is not with a contact; add it first".into(),
            ))
            .await;
            return;
        };
        match client.verify(&handle, mark) {
            Ok(info) => {
                self.emit(AppEvent::SafetyNumber {
                    contact,
                    number: info.number,
                    verified: info.verified,
                })
                .await;
                if mark {
                    self.send_conversations().await;
                }
            }
            Err(e) => self.emit(AppEvent::Error(format!("{e:#}"))).await,
        }
    }

    async fn send(&mut self, conversation: ConversationId, text: String) {
        let Some(client) = self.client.as_mut() else {
            let reason = "not unlocked yet: nothing can be sent".to_owned();
            self.not_sent(conversation, text, reason).await;
            return;
        };
        let target = to_target(&conversation);
        let pending = match client.queue(&target, &text) {
            Ok(p) => p,
            Err(e) => {
                // Nothing of it was stored: the text goes back to the person with the reason.
                self.not_sent(conversation, text, format!("{e:#}")).await;
                return;
            }
        };
        let me = client.user_id();
        let line = ChatLine {
            conversation: conversation.clone(),
            message_id: pending.id.clone(),
            sender: me,
            sender_name: client.settings().handle.clone(),
            outgoing: true,
            timestamp_ms: pending.created_ms,
            text,
            delivery: Some(syncra_core::ui::DeliveryState::Sending),
        };
        self.emit(AppEvent::Message(line)).await;
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let report = client.send_queued(&pending).await;
        let state = match &report {
            Ok(r) => match &r.state {
                SendState::Delivered => syncra_core::ui::DeliveryState::Delivered,
                SendState::Offline => syncra_core::ui::DeliveryState::Offline,
                SendState::Stored => syncra_core::ui::DeliveryState::Stored,
                SendState::Failed(_) => syncra_core::ui::DeliveryState::Failed,
                SendState::Queued(_) => syncra_core::ui::DeliveryState::Sending,
            },
            Err(_) => syncra_core::ui::DeliveryState::Failed,
        };
        self.emit(AppEvent::Delivery {
            conversation,
            message_id: pending.id,
            state,
        })
        .await;
        match report {
            Ok(r) => {
                // A group message that did not reach every member live says what happened to
                // whom ("delivered to 1 of 2, held for 1"), not just one mark.
                let reach = crate::client::outcome_summary(&r.outcomes);
                if let SendState::Failed(why) = r.state {
                    self.emit(AppEvent::Error(why)).await;
                } else if !reach.is_empty() && r.state != SendState::Delivered {
                    self.emit(AppEvent::Notice(reach)).await;
                }
            }
            Err(e) => self.emit(AppEvent::Error(format!("{e:#}"))).await,
        }
        self.send_conversations().await;
    }

    /// A delivery, filed by the connection loop: shown, counted as unread, or explained.
    async fn on_incoming(&mut self, incoming: Incoming) {
        match incoming {
            Incoming::Message { .. } => {
                let lines = incoming.shown();
                for line in lines {
                    let conversation = line.target.to_ui();
                    if !line.event && self.open.as_ref() != Some(&conversation) {
                        *self.unread.entry(conversation.clone()).or_default() += 1;
                    }
                    self.emit(AppEvent::Message(ChatLine {
                        conversation,
                        message_id: line.id,
                        sender: line.from,
                        sender_name: Some(if line.event {
                            EVENT_MARK.into()
                        } else {
                            line.from_name
                        }),
                        outgoing: false,
                        timestamp_ms: line.timestamp_ms,
                        text: line.text,
                        delivery: None,
                    }))
                    .await;
                }
                self.send_conversations().await;
            }
            Incoming::Held { handle, from } => {
                self.emit(AppEvent::KeyChanged {
                    contact: from,
                    handle,
                })
                .await;
                self.send_conversations().await;
            }
            Incoming::Rejected { reason } => {
                self.emit(AppEvent::Notice(format!(
                    "a message did not open: {reason}"
                )))
                .await
            }
            Incoming::Notice(n) => self.emit(AppEvent::Notice(n)).await,
        }
    }

    async fn send_connection(&self) {
        let state = match self.client.as_ref() {
            Some(c) if c.is_connected() => ConnectionState::Online,
            _ => ConnectionState::Connecting(self.serve.as_ref().map_or(0, Serve::attempt)),
        };
        self.emit(AppEvent::Connection(state)).await;
    }

    fn to_line(&self, conversation: &ConversationId, m: StoredMessage) -> ChatLine {
        let name = if m.event {
            Some(EVENT_MARK.to_owned())
        } else {
            self.client.as_ref().map(|c| c.name_of(&m.sender))
        };
        ChatLine {
            conversation: conversation.clone(),
            message_id: m.id,
            sender: m.sender,
            sender_name: name,
            outgoing: m.outgoing,
            timestamp_ms: m.timestamp_ms,
            text: m.text,
            delivery: m.delivery.map(|d| d.to_ui()),
        }
    }

    fn history_lines(&self, conversation: &ConversationId, limit: usize) -> Vec<ChatLine> {
        let Some(client) = self.client.as_ref() else {
            return Vec::new();
        };
        let target = to_target(conversation);
        let (mut messages, _) = client
            .history()
            .read(&target.conversation())
            .unwrap_or_default();
        let accepted = match &target {
            Target::Direct(id) => client
                .book()
                .by_id(id)
                .is_some_and(|c| c.key_changed.is_none()),
            Target::Group(_) => true,
        };
        messages.retain(|m| !m.held || accepted);
        if messages.len() > limit {
            messages.drain(..messages.len() - limit);
        }
        messages
            .into_iter()
            .map(|m| self.to_line(conversation, m))
            .collect()
    }

    /// Sends the conversation list. Names, marks and unread counts come from the book and the
    /// counters each time; the last message of each log from [`Controller::previews`], which
    /// reads only what was appended since the last list (a log replaced since is read again).
    async fn send_conversations(&mut self) {
        let Some(client) = self.client.as_ref() else {
            return;
        };
        let previews = &mut self.previews;
        let mut list = Vec::new();
        let mut last = |target: &Target| -> (Option<String>, u64) {
            client
                .history()
                .last_message(&target.conversation(), previews)
                .ok()
                .flatten()
                .map_or((None, 0), |m| (Some(m.first_line), m.timestamp_ms))
        };
        for c in client.book().contacts.values() {
            let target = Target::Direct(c.record.user_id);
            let (preview, at) = last(&target);
            let id = target.to_ui();
            list.push(ConversationSummary {
                unread: self.unread.get(&id).copied().unwrap_or(0),
                id,
                name: c.handle.clone(),
                last_preview: preview,
                last_activity_ms: at.max(c.added_ms),
                verified: c.verified,
                key_changed: c.key_changed.is_some(),
                request: c.request,
            });
        }
        for g in client.book().groups.values() {
            let target = Target::Group(g.id.clone());
            let (preview, at) = last(&target);
            let id = target.to_ui();
            list.push(ConversationSummary {
                unread: self.unread.get(&id).copied().unwrap_or(0),
                id,
                name: format!("@{}", g.name),
                last_preview: preview,
                last_activity_ms: at.max(g.updated_ms),
                verified: false,
                key_changed: false,
                request: false,
            });
        }
        list.sort_by(|a, b| {
            b.last_activity_ms
                .cmp(&a.last_activity_ms)
                .then(a.name.cmp(&b.name))
        });
        self.emit(AppEvent::Conversations(list)).await;
    }
}

/// How long a relay check may take during onboarding.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

    use std::sync::atomic::Ordering::Relaxed;

    use syncra_core::crypto::keyfile::KdfParams;
    use syncra_test_relay::TestRelay;
    use syncra_test_support::DEADLINE;

    use super::*;
    use crate::history::LastMessage;
    use crate::net::Push;

    async fn user(dir: &std::path::Path, relay: &TestRelay, handle: &str) -> Client {
        let options = InitOptions {
            kdf: KdfParams::MINIMUM,
        };
        let mut c = Client::init(Home::at(dir.join(handle)), "pw for tests", options).unwrap();
        c.register(relay.url(), handle).await.unwrap();
        c
    }

    /// Receives until a delivery is something to show.
    async fn next_incoming(client: &mut Client, pushes: &mut mpsc::Receiver<Push>) -> Incoming {
        loop {
            let push = tokio::time::timeout(DEADLINE, pushes.recv())
                .await
                .unwrap()
                .unwrap();
            let (Push::Deliver(carriage) | Push::Pending(_, carriage)) = push else {
                continue;
            };
            if let Some(incoming) = client.receive(&carriage).await.unwrap() {
                return incoming;
            }
        }
    }

    /// (full reads, lines decrypted) of the controller's history so far.
    fn reads(controller: &Controller) -> (usize, usize) {
        let counts = &controller.client.as_ref().unwrap().history().counts;
        (
            counts.full_reads.load(Relaxed),
            counts.lines_opened.load(Relaxed),
        )
    }

    /// Lines in every log of the controller's history.
    fn lines_stored(controller: &Controller) -> usize {
        let history = controller.client.as_ref().unwrap().history();
        history
            .conversations()
            .unwrap()
            .iter()
            .map(|c| {
                let log = std::fs::read(history.dir().join(format!("{c}.log"))).unwrap();
                log.iter().filter(|&&b| b == b'\n').count()
            })
            .sum()
    }

    /// The last conversation list sent, with every event before it dropped.
    fn last_list(events: &mut mpsc::Receiver<AppEvent>) -> Vec<ConversationSummary> {
        let mut list = None;
        while let Ok(event) = events.try_recv() {
            if let AppEvent::Conversations(l) = event {
                list = Some(l);
            }
        }
        list.expect("a conversation list was sent")
    }

    /// Every summary's preview and time are what a full read of its log finds.
    fn assert_previews_as_full_reads(controller: &Controller, list: &[ConversationSummary]) {
        let client = controller.client.as_ref().unwrap();
        assert_eq!(list.len(), client.book().contacts.len());
        for summary in list {
            let ConversationId::Direct(id) = &summary.id else {
                panic!("only contacts here");
            };
            let target = to_target(&summary.id);
            let (messages, _) = client.history().read(&target.conversation()).unwrap();
            let last = LastMessage::of(&messages);
            let added = client.book().by_id(id).unwrap().added_ms;
            assert_eq!(
                (summary.last_preview.clone(), summary.last_activity_ms),
                last.map_or((None, added), |m| (
                    Some(m.first_line),
                    m.timestamp_ms.max(added)
                )),
                "{}",
                summary.name
            );
        }
    }

    /// A message the client refuses is handed back whole, with the reason, and nothing of it
    /// is kept: here a paste of control characters, within the limit as typed but over it once
    /// encoded (before, the front end had cleared it and only an error came back).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_message_comes_back_to_the_front_end() {
        let relay = TestRelay::start(|_| {}).await;
        let dir = tempfile::tempdir().unwrap();
        let mut alice = user(dir.path(), &relay, "alice").await;
        let _bob = user(dir.path(), &relay, "bob").await;
        alice.add_contact("bob").await.unwrap();
        let bob = ConversationId::Direct(alice.book().by_handle("bob").unwrap().record.user_id);
        let (tx, mut events) = mpsc::channel(64);
        let mut controller = Controller::new(alice.home().clone(), tx, Options::default());
        controller.client = Some(alice);

        let text = format!("keep this {}", "\u{1}".repeat(70_000));
        controller.send(bob.clone(), text.clone()).await;
        let Ok(AppEvent::NotSent {
            conversation,
            text: back,
            reason,
        }) = events.try_recv()
        else {
            panic!("no NotSent");
        };
        assert_eq!((conversation, back == text), (bob.clone(), true));
        assert!(reason.contains("over the"), "{reason}");
        assert!(events.try_recv().is_err(), "nothing else happened");
        let client = controller.client.as_ref().unwrap();
        assert_eq!(client.outbox_len(), 0);
        let conversation = to_target(&bob).conversation();
        assert!(client.history().read(&conversation).unwrap().0.is_empty());

        // Refused after the outbox took it (its history could not be written: here a
        // directory where the log goes): taken back from the outbox too, so the text given
        // back is not also sent.
        let log = client.history().dir().join(format!("{conversation}.log"));
        std::fs::create_dir_all(&log).unwrap();
        controller.send(bob.clone(), "hello".into()).await;
        assert!(matches!(
            events.try_recv(),
            Ok(AppEvent::NotSent { text, .. }) if text == "hello"
        ));
        assert_eq!(controller.client.as_ref().unwrap().outbox_len(), 0);

        // Without a client (not unlocked yet) it comes back too.
        controller.client = None;
        controller.send(bob.clone(), "early".into()).await;
        assert!(matches!(
            events.try_recv(),
            Ok(AppEvent::NotSent { text, .. }) if text == "early"
        ));
    }

    /// A long history, then 50 messages in and a few out: after the first conversation list,
    /// no log is read in full again and each line is decrypted once, while every list shows
    /// what a full read of each log would.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_costs_the_same_however_long_the_history() {
        let relay = TestRelay::start(|_| {}).await;
        let dir = tempfile::tempdir().unwrap();
        let mut alice = user(dir.path(), &relay, "alice").await;
        let mut bob = user(dir.path(), &relay, "bob").await;
        let mut carol = user(dir.path(), &relay, "carol").await;
        alice.add_contact("bob").await.unwrap();
        carol.add_contact("bob").await.unwrap();
        bob.add_contact("alice").await.unwrap();
        bob.add_contact("carol").await.unwrap();
        let mut pushes = bob.take_pushes().unwrap();
        // Bob already has a long history with alice.
        let alice_id = alice.user_id();
        let with_alice = Target::Direct(alice_id).conversation();
        for i in 0..200 {
            let text = format!("seeded {i}\nsecond line");
            let line = StoredMessage::received(format!("seed{i}"), alice_id, i, text);
            bob.history().append(&with_alice, &line).unwrap();
        }

        let (tx, mut events) = mpsc::channel(4096);
        let mut controller = Controller::new(bob.home().clone(), tx, Options::default());
        controller.client = Some(bob);
        controller.send_conversations().await;
        assert_previews_as_full_reads(&controller, &last_list(&mut events));

        // What the controller reads from here on (the checks' own full reads left out).
        let (mut full_reads, mut opened) = (0, 0);
        let stored = lines_stored(&controller);
        for i in 0..50 {
            let from = if i % 5 == 4 { &mut carol } else { &mut alice };
            let text = format!("message {i}\nmore");
            from.send_text("bob", &text).await.unwrap();
            let client = controller.client.as_mut().unwrap();
            let incoming = next_incoming(client, &mut pushes).await;
            let before = reads(&controller);
            controller.on_incoming(incoming).await;
            if i % 10 == 9 {
                let to = ConversationId::Direct(alice_id);
                controller.send(to, format!("reply {i}")).await;
            }
            let after = reads(&controller);
            full_reads += after.0 - before.0;
            opened += after.1 - before.1;
            assert_previews_as_full_reads(&controller, &last_list(&mut events));
        }
        let appended = lines_stored(&controller) - stored;
        assert_eq!(full_reads, 0, "the conversation list read a log in full");
        assert!(
            opened <= appended,
            "{opened} lines decrypted for {appended} appended: each should be read once"
        );
    }
}
