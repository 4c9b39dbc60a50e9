//! Snapshot tests of every screen (ratatui's `TestBackend` + insta), driven only through
//! `Model::update` as the real UI is, plus `update` tests for every message that changes state.
//!
//! Review snapshot changes with `cargo insta review` (or `INSTA_UPDATE=always cargo test`).
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseEvent, MouseEventKind};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use syncra_core::UserId;
use syncra_core::ui::{
    AppEvent, ChatLine, CommandInfo, ConnectionState, ConversationId, ConversationSummary,
    DeliveryState, Me, OnboardingStep, UserAction,
};
use syncra_ui_ratatui::config::{Keymap, Theme};
use syncra_ui_ratatui::model::{Focus, HandleStatus, Message, Model, Overlay, Screen, Step};
use syncra_ui_ratatui::view::view;

const T0: u64 = 1_795_600_000_000; // 2026-11-25 08:26:40 UTC

fn uid(n: u8) -> UserId {
    UserId::from_identity_key(&[n; 32])
}

fn render(model: &Model, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| view(model, &Theme::default(), f)).unwrap();
    t.backend().to_string()
}

fn key(code: KeyCode) -> Message {
    Message::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn ctrl(c: char) -> Message {
    Message::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

fn alt(code: KeyCode) -> Message {
    Message::Key(KeyEvent::new(code, KeyModifiers::ALT))
}

fn typed(m: &mut Model, s: &str) -> Vec<UserAction> {
    let mut out = Vec::new();
    for c in s.chars() {
        out.extend(m.update(key(KeyCode::Char(c))));
    }
    out
}

fn onboarding() -> Model {
    let mut m = Model::new(Keymap::default(), true);
    m.update(Message::App(AppEvent::Onboarding {
        default_relay: "ws://127.0.0.1:7443/".into(),
    }));
    m
}

fn me() -> Me {
    Me {
        user_id: uid(1),
        handle: Some("alice".into()),
        relay: Some("wss://relay.example/".into()),
        fingerprint: "12345 67890 13579 24680 11111 22222".into(),
    }
}

fn summary(n: u8, name: &str, unread: u32, preview: &str, at: u64) -> ConversationSummary {
    ConversationSummary {
        id: ConversationId::Direct(uid(n)),
        name: name.into(),
        unread,
        last_preview: Some(preview.into()),
        last_activity_ms: at,
        verified: false,
        key_changed: false,
        request: false,
    }
}

fn line(
    n: u8,
    conv: u8,
    outgoing: bool,
    at: u64,
    text: &str,
    d: Option<DeliveryState>,
) -> ChatLine {
    ChatLine {
        conversation: ConversationId::Direct(uid(conv)),
        message_id: format!("m{n}"),
        sender: if outgoing { uid(1) } else { uid(conv) },
        sender_name: Some(if outgoing {
            "alice".into()
        } else {
            "bob".into()
        }),
        outgoing,
        timestamp_ms: at,
        text: text.into(),
        delivery: d,
    }
}

/// A main screen with three conversations and a bob conversation spanning two days.
fn main_model() -> Model {
    let mut m = Model::new(Keymap::default(), true);
    m.update(Message::App(AppEvent::Ready(me())));
    m.update(Message::App(AppEvent::Connection(ConnectionState::Online)));
    let mut carol = summary(3, "carol", 3, "are we still on for friday?", T0 - 1000);
    carol.verified = true;
    let mut group = summary(4, "@team", 0, "ship it", T0 - 5000);
    group.id = ConversationId::Group("00ff".into());
    m.update(Message::App(AppEvent::Conversations(vec![
        summary(2, "bob", 0, "see you tomorrow", T0),
        carol,
        group,
    ])));
    let lines = vec![
        line(
            1,
            2,
            false,
            T0 - 86_400_000,
            "hi alice, long time no see",
            None,
        ),
        line(
            2,
            2,
            true,
            T0 - 86_000_000,
            "hi bob! yes, too long",
            Some(DeliveryState::Delivered),
        ),
        line(
            3,
            2,
            false,
            T0 - 1000,
            "lunch tomorrow? there is a new place near the station that does very good noodles",
            None,
        ),
        line(
            4,
            2,
            true,
            T0 - 500,
            "great, noon works",
            Some(DeliveryState::Delivered),
        ),
        line(
            5,
            2,
            true,
            T0 - 200,
            "shall I book?",
            Some(DeliveryState::Offline),
        ),
        line(
            6,
            2,
            true,
            T0,
            "see you tomorrow",
            Some(DeliveryState::Sending),
        ),
    ];
    m.update(Message::App(AppEvent::History {
        conversation: ConversationId::Direct(uid(2)),
        lines,
    }));
    m
}

fn main_of(m: &Model) -> &syncra_ui_ratatui::model::Main {
    match &m.screen {
        Screen::Main(main) => main,
        other => panic!("not the main screen: {other:?}"),
    }
}

// ---- snapshots ----

#[test]
fn onboarding_screens() {
    let mut m = onboarding();
    insta::assert_snapshot!("onboarding_1_welcome", render(&m, 80, 24));
    m.update(key(KeyCode::Enter));
    let actions = m.update(key(KeyCode::Enter));
    assert_eq!(
        actions,
        vec![UserAction::CheckRelay("ws://127.0.0.1:7443/".into())]
    );
    insta::assert_snapshot!("onboarding_2_relay_checking", render(&m, 80, 24));
    m.update(Message::App(AppEvent::RelayCheck {
        url: "ws://127.0.0.1:7443/".into(),
        result: Ok(
            "✓ reachable: relay \"syncra-local\", plain WebSocket (only safe on this machine)"
                .into(),
        ),
    }));
    typed(&mut m, "Alice");
    let actions = m.update(Message::Tick);
    assert_eq!(
        actions,
        vec![UserAction::CheckHandle {
            relay: "ws://127.0.0.1:7443/".into(),
            handle: "alice".into()
        }]
    );
    m.update(Message::App(AppEvent::HandleAvailability {
        handle: "alice".into(),
        available: true,
    }));
    insta::assert_snapshot!("onboarding_3_handle_free", render(&m, 80, 24));
    m.update(key(KeyCode::Enter));
    typed(&mut m, "correct horse");
    insta::assert_snapshot!("onboarding_4_passphrase", render(&m, 80, 24));
    m.update(key(KeyCode::Tab));
    typed(&mut m, "correct horse");
    let actions = m.update(key(KeyCode::Enter));
    assert!(
        matches!(&actions[..], [UserAction::CreateIdentity { handle, .. }] if handle == "alice")
    );
    m.update(Message::App(AppEvent::Ready(me())));
    insta::assert_snapshot!("onboarding_5_done", render(&m, 80, 24));
}

#[test]
fn onboarding_taken_handle() {
    let mut m = onboarding();
    m.update(key(KeyCode::Enter));
    m.update(key(KeyCode::Enter));
    m.update(Message::App(AppEvent::RelayCheck {
        url: "ws://127.0.0.1:7443/".into(),
        result: Ok("ok".into()),
    }));
    typed(&mut m, "bob");
    m.update(Message::Tick);
    m.update(Message::App(AppEvent::HandleAvailability {
        handle: "bob".into(),
        available: false,
    }));
    m.update(key(KeyCode::Enter));
    insta::assert_snapshot!("onboarding_handle_taken", render(&m, 80, 24));
}

#[test]
fn unlock_screen_and_error() {
    let mut m = Model::new(Keymap::default(), true);
    m.update(Message::App(AppEvent::Locked {
        user_id: uid(1),
        handle: Some("alice".into()),
    }));
    insta::assert_snapshot!("unlock", render(&m, 80, 24));
    typed(&mut m, "wrong");
    let actions = m.update(key(KeyCode::Enter));
    assert!(matches!(&actions[..], [UserAction::Unlock(s)] if s.expose() == "wrong"));
    m.update(Message::App(AppEvent::UnlockFailed(
        "wrong passphrase for /home/alice/.syncra/identity.key; nothing was changed, try again"
            .into(),
    )));
    insta::assert_snapshot!("unlock_failed", render(&m, 80, 24));
}

#[test]
fn main_screen_with_unread_counts_and_delivery_marks() {
    let m = main_model();
    insta::assert_snapshot!("main", render(&m, 100, 24));
}

#[test]
fn scrollback_with_new_messages_below() {
    let mut m = main_model();
    m.update(Message::Mouse(MouseEvent {
        kind: MouseEventKind::ScrollUp,
        column: 50,
        row: 5,
        modifiers: KeyModifiers::NONE,
    }));
    m.update(Message::App(AppEvent::Message(line(
        7,
        2,
        false,
        T0 + 1000,
        "one more thing",
        None,
    ))));
    assert!(main_of(&m).new_below);
    insta::assert_snapshot!("scrolled_new_below", render(&m, 100, 12));
}

/// Messages in the open conversation with bob, `count` of them a few minutes apart from
/// `from` on (so they cross a day), every fifth too long for one line.
fn many_messages(m: &mut Model, from: u64, count: usize) {
    for i in 0..count {
        let text = if i % 5 == 0 {
            format!("message {i} is a long one that wraps over more than a single line of the view")
        } else {
            format!("message {i}")
        };
        let mut l = line(0, 2, i % 3 == 0, from + i as u64 * 300_000, &text, None);
        l.message_id = format!("many{i}");
        m.update(Message::App(AppEvent::Message(l)));
    }
}

#[test]
fn a_long_conversation_scrolls_to_its_first_line_and_back() {
    let mut m = main_model();
    many_messages(&mut m, T0, 400);
    let bottom = render(&m, 100, 12);
    assert!(bottom.contains("message 399"), "{bottom}");
    // Far past the top: the scroll stops at the first line, the day rule of the first message.
    for _ in 0..300 {
        m.update(Message::Key(KeyEvent::new(
            KeyCode::PageUp,
            KeyModifiers::NONE,
        )));
    }
    let top = render(&m, 100, 12);
    assert!(top.contains("2026-11-24"), "{top}");
    assert!(top.contains("hi alice, long time no see"), "{top}");
    for _ in 0..300 {
        m.update(Message::Key(KeyEvent::new(
            KeyCode::PageDown,
            KeyModifiers::NONE,
        )));
    }
    assert_eq!(render(&m, 100, 12), bottom);
}

#[test]
fn a_conversation_keeps_its_newest_lines_each_once() {
    use syncra_ui_ratatui::model::MAX_LINES_KEPT;
    let mut m = main_model();
    let bob = ConversationId::Direct(uid(2));
    many_messages(&mut m, T0, MAX_LINES_KEPT + 10);
    let ids = |m: &Model| -> Vec<String> {
        let lines = main_of(m).messages[&bob].lines();
        lines.iter().map(|l| l.message_id.clone()).collect()
    };
    let kept = ids(&m);
    assert_eq!(kept.len(), MAX_LINES_KEPT);
    // The oldest went first: the 6 loaded lines, then the first 10 new ones.
    assert_eq!(kept[0], "many10");
    // A message delivered again is not shown twice.
    for i in [10, 2000, MAX_LINES_KEPT + 9] {
        let mut l = line(0, 2, false, T0, "again", None);
        l.message_id = format!("many{i}");
        m.update(Message::App(AppEvent::Message(l)));
    }
    assert_eq!(ids(&m), kept);
    // A delivery mark still finds its line.
    m.update(Message::App(AppEvent::Delivery {
        conversation: bob.clone(),
        message_id: format!("many{}", MAX_LINES_KEPT + 9),
        state: DeliveryState::Failed,
    }));
    let lines = main_of(&m).messages[&bob].lines();
    assert_eq!(lines.back().unwrap().delivery, Some(DeliveryState::Failed));
    // A loaded history longer than that keeps its newest lines too.
    let long: Vec<ChatLine> = (0..MAX_LINES_KEPT + 1)
        .map(|i| {
            let mut l = line(0, 2, false, T0, "old", None);
            l.message_id = format!("h{i}");
            l
        })
        .collect();
    m.update(Message::App(AppEvent::History {
        conversation: bob.clone(),
        lines: long,
    }));
    let lines = main_of(&m).messages[&bob].lines();
    assert_eq!(lines.len(), MAX_LINES_KEPT);
    assert_eq!(lines[0].message_id, "h1");
}

#[test]
fn key_changed_banner_and_request() {
    let mut m = main_model();
    let mut bob = summary(2, "bob", 0, "see you tomorrow", T0);
    bob.key_changed = true;
    m.update(Message::App(AppEvent::Conversations(vec![bob])));
    insta::assert_snapshot!("key_changed", render(&m, 100, 16));
    let mut stranger = summary(2, "mallory", 1, "hi there", T0);
    stranger.request = true;
    m.update(Message::App(AppEvent::Conversations(vec![stranger])));
    insta::assert_snapshot!("message_request", render(&m, 100, 16));
}

#[test]
fn overlays() {
    let mut m = main_model();
    m.update(Message::Key(KeyEvent::new(
        KeyCode::F(1),
        KeyModifiers::NONE,
    )));
    insta::assert_snapshot!("help", render(&m, 100, 30));
    m.update(key(KeyCode::Esc));
    m.update(Message::App(AppEvent::Commands(vec![CommandInfo {
        name: "roll".into(),
        help: "roll 2d6 — roll dice (dice bot)".into(),
    }])));
    m.update(ctrl('p'));
    typed(&mut m, "r");
    insta::assert_snapshot!("palette", render(&m, 100, 24));
    m.update(key(KeyCode::Esc));
    m.update(Message::App(AppEvent::SafetyNumber {
        contact: uid(2),
        number: "11111 22222 33333 44444 55555 66666 77777 88888 99999 00000 12345 67890".into(),
        verified: false,
    }));
    insta::assert_snapshot!("safety_number", render(&m, 100, 24));
}

#[test]
fn narrow_and_wide_terminals() {
    let m = main_model();
    insta::assert_snapshot!("narrow_40x12", render(&m, 40, 12));
    insta::assert_snapshot!("wide_160x48", render(&m, 160, 48));
}

// ---- update: every message that changes state ----

#[test]
fn enter_sends_and_clears_alt_enter_adds_a_line() {
    let mut m = main_model();
    typed(&mut m, "first line");
    m.update(alt(KeyCode::Enter));
    typed(&mut m, "second");
    let actions = m.update(key(KeyCode::Enter));
    assert_eq!(
        actions,
        vec![UserAction::Send {
            conversation: ConversationId::Direct(uid(2)),
            text: "first line\nsecond".into()
        }]
    );
    assert_eq!(main_of(&m).composer.lines(), [""]);
    // An empty message sends nothing.
    assert!(m.update(key(KeyCode::Enter)).is_empty());
}

#[test]
fn sending_to_a_changed_key_is_blocked_and_the_text_kept() {
    let mut m = main_model();
    let mut bob = summary(2, "bob", 0, "", T0);
    bob.key_changed = true;
    m.update(Message::App(AppEvent::Conversations(vec![bob])));
    typed(&mut m, "hello?");
    assert!(m.update(key(KeyCode::Enter)).is_empty());
    assert_eq!(main_of(&m).composer.lines(), ["hello?"]);
    assert!(main_of(&m).status.as_ref().unwrap().0.contains("blocked"));
}

/// A text over the limit for one message is not sent, and stays in the composer (nothing
/// typed is lost; the client would refuse it, and it could never leave the outbox).
#[test]
fn a_message_over_the_limit_stays_in_the_composer() {
    let mut m = main_model();
    let line = "x".repeat(1000);
    let text = vec![line.as_str(); 210].join("\n");
    m.update(Message::Paste(text.clone()));
    m.update(key(KeyCode::Char('y')));
    assert!(m.update(key(KeyCode::Enter)).is_empty());
    let main = main_of(&m);
    assert!(
        main.status
            .as_ref()
            .unwrap()
            .0
            .contains("over the 200 KiB limit")
    );
    assert_eq!(main.composer.lines().join("\n"), text);
}

/// A message the client refused (`AppEvent::NotSent`: its key changed meanwhile, the outbox
/// could not be written…) comes back into the composer of the conversation it was written in,
/// after what was given back before it and before anything typed since, with the reason —
/// and only there: if the person moved on, it waits for that conversation to be opened, so
/// Enter cannot send it elsewhere nor carry what is typed for another. Nothing typed is lost.
#[test]
fn a_message_the_client_refuses_comes_back_where_it_was_written() {
    let mut m = main_model();
    let bob = ConversationId::Direct(uid(2));
    let carol = ConversationId::Direct(uid(3));
    let refused = |m: &mut Model, conversation: &ConversationId, text: &str| {
        m.update(Message::App(AppEvent::NotSent {
            conversation: conversation.clone(),
            text: text.into(),
            reason: "the outbox could not be written: \x1b[2Jdisk full".into(),
        }))
    };
    // Two sent in a row, both refused, and something typed meanwhile.
    m.update(Message::Paste("for bob\nsecond line".into()));
    let sent = m.update(key(KeyCode::Enter));
    assert_eq!(
        sent,
        [UserAction::Send {
            conversation: bob.clone(),
            text: "for bob\nsecond line".into()
        }]
    );
    assert_eq!(main_of(&m).composer.lines(), [""]);
    typed(&mut m, "and more");
    m.update(key(KeyCode::Enter));
    typed(&mut m, "typed since");
    assert!(refused(&mut m, &bob, "for bob\nsecond line").is_empty());
    assert!(refused(&mut m, &bob, "and more").is_empty());
    let main = main_of(&m);
    assert_eq!(main.selected, Some(bob.clone()));
    assert_eq!(
        main.composer.lines(),
        ["for bob", "second line", "and more", "typed since"]
    );
    assert_eq!(main.composer.cursor(), (3, "typed since".len()));
    let (status, is_error) = main.status.clone().unwrap();
    assert!(is_error);
    assert!(status.starts_with("not sent: the outbox could not be written"));
    assert!(!status.contains('\x1b'), "{status:?}");

    // Refused after the person moved on to carol and started writing to her: her composer
    // keeps only her text; bob's comes back when bob is opened.
    let mut m = main_model();
    typed(&mut m, "to bob");
    m.update(key(KeyCode::Enter));
    m.update(alt(KeyCode::Down));
    assert_eq!(main_of(&m).selected, Some(carol.clone()));
    typed(&mut m, "hi carol");
    assert!(refused(&mut m, &bob, "to bob").is_empty());
    let main = main_of(&m);
    assert_eq!(main.selected, Some(carol));
    assert_eq!(main.composer.lines(), ["hi carol"]);
    let status = &main.status.as_ref().unwrap().0;
    assert!(status.starts_with("not sent to bob: "), "{status}");
    assert!(status.contains("when you open bob"), "{status}");
    m.update(key(KeyCode::Enter)); // hi carol goes to carol
    let actions = m.update(alt(KeyCode::Up));
    assert_eq!(
        actions[0],
        UserAction::LoadHistory {
            conversation: bob,
            limit: 500
        }
    );
    assert_eq!(main_of(&m).composer.lines(), ["to bob"]);
    assert!(render(&m, 80, 24).contains("to bob"));
}

#[test]
fn a_long_paste_asks_first() {
    let mut m = main_model();
    let text = "a\nb\nc\nd\ne\nf\ng";
    m.update(Message::Paste(text.into()));
    assert!(matches!(
        main_of(&m).overlay,
        Some(Overlay::ConfirmPaste(_))
    ));
    m.update(key(KeyCode::Char('y')));
    assert_eq!(main_of(&m).composer.lines().len(), 7);
    let mut m = main_model();
    m.update(Message::Paste(text.into()));
    m.update(key(KeyCode::Char('n')));
    assert_eq!(main_of(&m).composer.lines(), [""]);
    // A short paste goes straight in.
    m.update(Message::Paste("one\ntwo".into()));
    assert_eq!(main_of(&m).composer.lines(), ["one", "two"]);
}

#[test]
fn conversation_navigation_filter_and_next_unread() {
    let mut m = main_model();
    let actions = m.update(alt(KeyCode::Char('a')));
    assert_eq!(
        actions,
        vec![
            UserAction::LoadHistory {
                conversation: ConversationId::Direct(uid(3)),
                limit: 500
            },
            UserAction::MarkRead(ConversationId::Direct(uid(3)))
        ]
    );
    m.update(alt(KeyCode::Down));
    assert_eq!(
        main_of(&m).selected,
        Some(ConversationId::Group("00ff".into()))
    );
    m.update(key(KeyCode::Tab));
    assert_eq!(main_of(&m).focus, Focus::List);
    m.update(key(KeyCode::Char('/')));
    assert_eq!(main_of(&m).focus, Focus::Filter);
    typed(&mut m, "bo");
    m.update(key(KeyCode::Enter));
    assert_eq!(main_of(&m).selected, Some(ConversationId::Direct(uid(2))));
    assert_eq!(main_of(&m).focus, Focus::List);
    m.update(key(KeyCode::Tab));
    assert_eq!(main_of(&m).focus, Focus::Composer);
}

#[test]
fn incoming_messages_ring_the_bell_only_in_the_background() {
    let mut m = main_model();
    let actions = m.update(Message::App(AppEvent::Message(line(
        9,
        2,
        false,
        T0,
        "open convo",
        None,
    ))));
    assert_eq!(
        actions,
        vec![UserAction::MarkRead(ConversationId::Direct(uid(2)))]
    );
    assert!(!main_of(&m).bell);
    m.update(Message::App(AppEvent::Message(line(
        10,
        3,
        false,
        T0,
        "background",
        None,
    ))));
    assert!(main_of(&m).bell);
}

#[test]
fn delivery_updates_change_the_mark() {
    let mut m = main_model();
    m.update(Message::App(AppEvent::Delivery {
        conversation: ConversationId::Direct(uid(2)),
        message_id: "m6".into(),
        state: DeliveryState::Delivered,
    }));
    let msgs = main_of(&m).messages[&ConversationId::Direct(uid(2))].lines();
    assert_eq!(
        msgs.back().unwrap().delivery,
        Some(DeliveryState::Delivered)
    );
}

#[test]
fn palette_commands_become_actions() {
    let mut m = main_model();
    m.update(key(KeyCode::Char(':')));
    typed(&mut m, "add carol");
    assert_eq!(
        m.update(key(KeyCode::Enter)),
        vec![UserAction::AddContact("carol".into())]
    );
    m.update(ctrl('p'));
    typed(&mut m, "verif");
    m.update(key(KeyCode::Down));
    assert_eq!(
        m.update(key(KeyCode::Enter)),
        vec![UserAction::Verify {
            contact: uid(2),
            mark_verified: true
        }]
    );
    // Slash commands typed in the composer work too: plugin commands pass through, other
    // slash text is an ordinary message.
    m.update(Message::App(AppEvent::Commands(vec![CommandInfo {
        name: "roll".into(),
        help: "roll dice".into(),
    }])));
    typed(&mut m, "/shrug");
    assert_eq!(
        m.update(key(KeyCode::Enter)),
        vec![UserAction::Send {
            conversation: ConversationId::Direct(uid(2)),
            text: "/shrug".into()
        }]
    );
    typed(&mut m, "/roll 2d6");
    assert_eq!(
        m.update(key(KeyCode::Enter)),
        vec![UserAction::Command {
            name: "roll".into(),
            args: "2d6".into()
        }]
    );
    assert_eq!(
        m.update(ctrl('s')),
        vec![UserAction::Verify {
            contact: uid(2),
            mark_verified: false
        }]
    );
}

#[test]
fn safety_overlay_marks_verified_with_v() {
    let mut m = main_model();
    m.update(Message::App(AppEvent::SafetyNumber {
        contact: uid(2),
        number: "1 2 3".into(),
        verified: false,
    }));
    assert_eq!(
        m.update(key(KeyCode::Char('v'))),
        vec![UserAction::Verify {
            contact: uid(2),
            mark_verified: true
        }]
    );
    assert!(main_of(&m).overlay.is_none());
}

#[test]
fn quit_from_every_screen() {
    for mut m in [onboarding(), main_model()] {
        assert_eq!(m.update(ctrl('q')), vec![UserAction::Quit]);
        assert!(m.quit);
    }
    let mut m = main_model();
    m.update(Message::App(AppEvent::Shutdown));
    assert!(m.quit);
}

#[test]
fn onboarding_validates_as_you_type() {
    let mut m = onboarding();
    m.update(key(KeyCode::Enter));
    m.update(Message::App(AppEvent::RelayCheck {
        url: "ws://127.0.0.1:7443/".into(),
        result: Err("connection refused".into()),
    }));
    match &m.screen {
        Screen::Onboarding(o) => assert_eq!(o.step, Step::Relay),
        _ => panic!(),
    }
    m.update(key(KeyCode::Enter));
    m.update(Message::App(AppEvent::RelayCheck {
        url: "ws://127.0.0.1:7443/".into(),
        result: Ok("ok".into()),
    }));
    typed(&mut m, "1ab");
    match &m.screen {
        Screen::Onboarding(o) => {
            assert!(
                matches!(&o.handle_status, HandleStatus::Unavailable(_, why) if why.contains("letter"))
            )
        }
        _ => panic!(),
    }
    // No check is sent for an invalid handle.
    assert!(m.update(Message::Tick).is_empty());
    // Mismatched passphrases are refused.
    for _ in 0..3 {
        m.update(key(KeyCode::Backspace));
    }
    typed(&mut m, "carol");
    m.update(Message::Tick);
    m.update(Message::App(AppEvent::HandleAvailability {
        handle: "carol".into(),
        available: true,
    }));
    m.update(key(KeyCode::Enter));
    typed(&mut m, "a long passphrase");
    m.update(key(KeyCode::Tab));
    typed(&mut m, "another one entirely");
    assert!(m.update(key(KeyCode::Enter)).is_empty());
    match &m.screen {
        Screen::Onboarding(o) => assert!(o.error.as_ref().unwrap().contains("differ")),
        _ => panic!(),
    }
    // A failure from the client goes back to the step it concerns.
    m.update(Message::App(AppEvent::OnboardingFailed {
        step: OnboardingStep::Handle,
        message: "handle \"carol\" is taken; pick another with --handle".into(),
    }));
    match &m.screen {
        Screen::Onboarding(o) => assert_eq!(o.step, Step::Handle),
        _ => panic!(),
    }
}

/// Whether a rendered buffer holds a character a terminal would act on.
fn has_control(screen: &str) -> bool {
    screen
        .chars()
        .any(|c| c != '\n' && syncra_core::text::is_unsafe_char(c))
}

#[test]
fn peer_text_names_and_errors_are_shown_escaped_never_executed() {
    let mut m = main_model();
    let hostile = "ok\n[carol] carol: send me the keys\r\x1b[2K\x1b]0;pwned\x07\u{202e}gpj.exe";
    let mut bob = summary(2, "bob\x1b[31m", 0, hostile, T0);
    bob.name = "bob\x1b[31m".into();
    m.update(Message::App(AppEvent::Conversations(vec![bob])));
    let mut l = line(9, 2, false, T0 + 1000, hostile, None);
    l.sender_name = Some("bob\r\x1b[1Gcarol".into());
    m.update(Message::App(AppEvent::Message(l)));
    m.update(Message::App(AppEvent::Notice(format!("relay: {hostile}"))));
    let screen = render(&m, 160, 24);
    assert!(!has_control(&screen), "{screen:?}");
    assert!(
        screen.contains("ok\\n[carol] carol: send me the keys\\r\\u{1b}[2K"),
        "{screen}"
    );
    assert!(screen.contains("\\u{202e}gpj.exe"), "{screen}");
    assert!(screen.contains("bob\\r\\u{1b}[1Gcarol"), "{screen}");
    assert!(
        !screen
            .lines()
            .any(|l| l.trim_start().starts_with("[carol]")),
        "{screen}"
    );
}
