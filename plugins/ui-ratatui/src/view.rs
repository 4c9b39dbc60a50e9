//! Rendering: reads the [`Model`], draws a frame. No state changes here.

use std::collections::VecDeque;

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, Paragraph, Wrap};
use syncra_core::time::Civil;
use syncra_core::ui::{ChatLine, ConnectionState, ConversationId};

use crate::config::{KeyAction, Theme};
use crate::model::{
    HandleStatus, Main, Model, Onboarding, Overlay, Screen, Step, Unlock, conversation_name,
    delivery_mark, palette_matches, strength_hint,
};

/// Draws the whole interface.
pub fn view(model: &Model, theme: &Theme, frame: &mut Frame<'_>) {
    let area = frame.area();
    match &model.screen {
        Screen::Starting => {
            let p = Paragraph::new("starting…").alignment(Alignment::Center);
            frame.render_widget(p, centered(area, 30, 3));
        }
        Screen::Onboarding(o) => onboarding(o, theme, frame, area),
        Screen::Unlock(u) => unlock(u, theme, frame, area),
        Screen::Main(m) => main_screen(m, model, theme, frame, area),
    }
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

fn titled<'a>(title: &'a str, theme: &Theme) -> Block<'a> {
    Block::default().borders(Borders::ALL).title(Span::styled(
        format!(" {title} "),
        Style::default()
            .fg(theme.accent)
            .add_modifier(Modifier::BOLD),
    ))
}

fn onboarding(o: &Onboarding, theme: &Theme, frame: &mut Frame<'_>, area: Rect) {
    let step_no = match o.step {
        Step::Welcome => 0,
        Step::Relay => 1,
        Step::Handle => 2,
        Step::Passphrase => 3,
        Step::Creating | Step::Done => 4,
    };
    let title = format!("Welcome to Syncra — step {step_no} of 4");
    let outer = titled(&title, theme);
    let box_area = centered(area, 72, 18);
    frame.render_widget(Clear, box_area);
    let inner = outer.inner(box_area);
    frame.render_widget(outer, box_area);
    let muted = Style::default().fg(theme.muted);
    let [body, input, status, hint] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(3),
        Constraint::Length(2),
        Constraint::Length(1),
    ])
    .areas(inner);
    let error_line = |o: &Onboarding| {
        o.error
            .as_ref()
            .map(|e| Line::styled(e.clone(), Style::default().fg(theme.error)))
    };
    match o.step {
        Step::Welcome => {
            let text = Text::from(vec![
                Line::from("Syncra is end-to-end encrypted messaging for the terminal."),
                Line::from(""),
                Line::from("Your keys are made here and never leave this machine. The relay"),
                Line::from("only forwards sealed messages it cannot read."),
                Line::from(""),
                Line::from("We will pick a relay, a handle and a passphrase."),
            ]);
            frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), body);
            frame.render_widget(
                Paragraph::new(Line::styled("Enter: start   Ctrl-Q: quit", muted)),
                hint,
            );
        }
        Step::Relay => {
            frame.render_widget(
                Paragraph::new("Which relay? Use the one your contacts use. ws:// is for a relay on this machine; wss:// is checked with TLS.")
                    .wrap(Wrap { trim: true }),
                body,
            );
            let mut field = o.relay.clone();
            field.set_block(titled("relay address", theme));
            frame.render_widget(&field, input);
            let line = match &o.relay_status {
                Some(Ok(s)) => Line::styled(s.clone(), Style::default().fg(theme.ok)),
                Some(Err(e)) => Line::styled(e.clone(), Style::default().fg(theme.error)),
                None => error_line(o).unwrap_or_default(),
            };
            frame.render_widget(Paragraph::new(line).wrap(Wrap { trim: true }), status);
            frame.render_widget(
                Paragraph::new(Line::styled("Enter: check and continue   Esc: back", muted)),
                hint,
            );
        }
        Step::Handle => {
            frame.render_widget(
                Paragraph::new("Pick a handle: 3-32 characters, a-z, 0-9 and _, starting with a letter. Contacts find you by it; your keys, not your handle, prove who you are.")
                    .wrap(Wrap { trim: true }),
                body,
            );
            let mut field = o.handle.clone();
            field.set_block(titled("handle", theme));
            frame.render_widget(&field, input);
            let line = match &o.handle_status {
                HandleStatus::Unknown => Line::styled("…", muted),
                HandleStatus::Checking(h) => Line::styled(format!("checking {h}…"), muted),
                HandleStatus::Free(h) => {
                    Line::styled(format!("✓ {h} is free"), Style::default().fg(theme.ok))
                }
                HandleStatus::Unavailable(h, why) => {
                    Line::styled(format!("✗ {h}: {why}"), Style::default().fg(theme.error))
                }
            };
            let mut lines = vec![line];
            lines.extend(error_line(o));
            frame.render_widget(Paragraph::new(lines), status);
            frame.render_widget(
                Paragraph::new(Line::styled("Enter: continue   Esc: back", muted)),
                hint,
            );
        }
        Step::Passphrase => {
            let [a, b] =
                Layout::vertical([Constraint::Length(3), Constraint::Length(3)]).areas(body);
            let mut p1 = o.pass.clone();
            p1.set_block(titled("passphrase", theme));
            let mut p2 = o.pass2.clone();
            p2.set_block(titled("again", theme));
            if o.pass_focus == 0 {
                p2.set_cursor_style(Style::default());
            } else {
                p1.set_cursor_style(Style::default());
            }
            frame.render_widget(&p1, a);
            frame.render_widget(&p2, b);
            let (hint_text, level) = strength_hint(&o.pass.lines().join("\n"));
            let color = match level {
                0 | 1 => theme.error,
                2 => theme.warn,
                _ => theme.ok,
            };
            let mut lines = vec![Line::styled(
                format!("strength: {hint_text}"),
                Style::default().fg(color),
            )];
            lines.extend(error_line(o));
            frame.render_widget(Paragraph::new(lines), input);
            frame.render_widget(
                Paragraph::new(Line::styled(
                    "It protects your identity key and your message history on this machine. It cannot be recovered.",
                    muted,
                ))
                .wrap(Wrap { trim: true }),
                status,
            );
            frame.render_widget(
                Paragraph::new(Line::styled(
                    "Tab: switch field   Enter: create   Esc: back",
                    muted,
                )),
                hint,
            );
        }
        Step::Creating => {
            frame.render_widget(
                Paragraph::new("Creating your identity and registering…"),
                body,
            );
        }
        Step::Done => {
            if let Some(me) = &o.me {
                let text = Text::from(vec![
                    Line::from(vec![
                        Span::raw("You are "),
                        Span::styled(
                            me.handle.clone().unwrap_or_default(),
                            Style::default()
                                .fg(theme.accent)
                                .add_modifier(Modifier::BOLD),
                        ),
                    ]),
                    Line::from(""),
                    Line::from(format!("user id:     {}", me.user_id)),
                    Line::from(format!("fingerprint: {}", me.fingerprint)),
                    Line::from(""),
                    Line::from("Share your handle. Compare safety numbers with each contact"),
                    Line::from("(Ctrl-S) to be sure nobody is in the middle."),
                ]);
                frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), body);
            }
            frame.render_widget(
                Paragraph::new(Line::styled("Enter: start chatting", muted)),
                hint,
            );
        }
    }
}

fn unlock(u: &Unlock, theme: &Theme, frame: &mut Frame<'_>, area: Rect) {
    let outer = titled("Unlock Syncra", theme);
    let box_area = centered(area, 64, 10);
    frame.render_widget(Clear, box_area);
    let inner = outer.inner(box_area);
    frame.render_widget(outer, box_area);
    let [who, field, status] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(3),
        Constraint::Min(1),
    ])
    .areas(inner);
    let name = u.handle.clone().unwrap_or_else(|| u.user_id.short());
    frame.render_widget(
        Paragraph::new(vec![
            Line::from(format!("identity: {name}")),
            Line::styled(u.user_id.to_string(), Style::default().fg(theme.muted)),
        ]),
        who,
    );
    let mut pass = u.pass.clone();
    pass.set_block(titled("passphrase", theme));
    frame.render_widget(&pass, field);
    let line = match (&u.error, u.busy) {
        (_, true) => Line::styled("unlocking…", Style::default().fg(theme.muted)),
        (Some(e), _) => Line::styled(e.clone(), Style::default().fg(theme.error)),
        (None, _) => Line::styled(
            "Enter: unlock   Ctrl-Q: quit",
            Style::default().fg(theme.muted),
        ),
    };
    frame.render_widget(Paragraph::new(line).wrap(Wrap { trim: true }), status);
}

fn main_screen(m: &Main, model: &Model, theme: &Theme, frame: &mut Frame<'_>, area: Rect) {
    let [body, status_bar] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(area);
    // Narrow terminals show the conversation only; the list is one key away (Tab).
    let narrow = area.width < 60;
    let list_width = if narrow {
        0
    } else {
        (area.width / 4).clamp(20, 32)
    };
    let [left, right] =
        Layout::horizontal([Constraint::Length(list_width), Constraint::Min(20)]).areas(body);
    if !narrow || m.focus == crate::model::Focus::List || m.focus == crate::model::Focus::Filter {
        let target = if narrow { body } else { left };
        conversation_list(m, theme, frame, target);
        if narrow {
            status_line(m, theme, frame, status_bar);
            return overlays(m, model, theme, frame, area);
        }
    }
    conversation_view(m, theme, frame, right);
    status_line(m, theme, frame, status_bar);
    overlays(m, model, theme, frame, area);
}

fn conversation_list(m: &Main, theme: &Theme, frame: &mut Frame<'_>, area: Rect) {
    let filter = m.filter.lines().join("");
    let focused = matches!(
        m.focus,
        crate::model::Focus::List | crate::model::Focus::Filter
    );
    let title = if filter.is_empty() {
        "Conversations".to_string()
    } else {
        format!("Conversations /{filter}")
    };
    let mut block = titled(&title, theme);
    if focused {
        block = block.border_style(Style::default().fg(theme.accent));
    }
    let inner_width = area.width.saturating_sub(2) as usize;
    let items: Vec<ListItem<'_>> = m
        .conversations
        .iter()
        .filter(|c| filter.is_empty() || c.name.to_lowercase().contains(&filter.to_lowercase()))
        .map(|c| {
            let selected = m.selected.as_ref() == Some(&c.id);
            let mut name_style = Style::default();
            if selected {
                name_style = name_style.fg(theme.accent).add_modifier(Modifier::BOLD);
            }
            let prefix = match (&c.id, c.key_changed, c.request) {
                (_, true, _) => Span::styled("! ", Style::default().fg(theme.error)),
                (_, _, true) => Span::styled("? ", Style::default().fg(theme.warn)),
                (ConversationId::Group(_), _, _) => Span::raw("  "),
                _ if c.verified => Span::styled("✓ ", Style::default().fg(theme.ok)),
                _ => Span::raw("  "),
            };
            let unread = if c.unread > 0 {
                Span::styled(
                    format!(" ({})", c.unread),
                    Style::default().fg(theme.warn).add_modifier(Modifier::BOLD),
                )
            } else {
                Span::raw("")
            };
            let preview: String = c
                .last_preview
                .clone()
                .unwrap_or_default()
                .chars()
                .take(inner_width.saturating_sub(2))
                .collect();
            ListItem::new(vec![
                Line::from(vec![
                    prefix,
                    Span::styled(c.name.clone(), name_style),
                    unread,
                ]),
                Line::styled(format!("  {preview}"), Style::default().fg(theme.muted)),
            ])
        })
        .collect();
    let list = if items.is_empty() {
        List::new(vec![ListItem::new(Line::styled(
            "no conversations yet — Ctrl-P, add HANDLE",
            Style::default().fg(theme.muted),
        ))])
    } else {
        List::new(items)
    };
    frame.render_widget(list.block(block), area);
}

/// Word-wraps to `width` columns (counting characters), breaking words longer than a line.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut out = Vec::new();
    for raw in text.split('\n') {
        let mut line = String::new();
        let mut len = 0usize;
        for word in raw.split(' ') {
            let mut chars: Vec<char> = word.chars().collect();
            let gap = usize::from(len > 0);
            if len + gap + chars.len() <= width {
                if gap == 1 {
                    line.push(' ');
                }
                line.extend(&chars);
                len += gap + chars.len();
                continue;
            }
            if len > 0 {
                out.push(std::mem::take(&mut line));
            }
            while chars.len() > width {
                out.push(chars.drain(..width).collect());
            }
            line.extend(&chars);
            len = chars.len();
        }
        out.push(line);
    }
    out
}

/// The rendered lines of the newest messages of `lines`, oldest first: at least `want` of
/// them, or all there are. Only these are wrapped, so a redraw costs what the view shows (plus
/// what it is scrolled up by), not the whole conversation.
fn message_lines<'a>(
    m: &Main,
    lines: &'a VecDeque<ChatLine>,
    theme: &Theme,
    width: usize,
    want: usize,
) -> Vec<Line<'a>> {
    let mut blocks = Vec::new();
    let mut count = 0;
    for i in (0..lines.len()).rev() {
        if count >= want {
            break;
        }
        let previous = i.checked_sub(1).map(|p| &lines[p]);
        let block = message_block(m, &lines[i], previous, theme, width);
        count += block.len();
        blocks.push(block);
    }
    blocks.into_iter().rev().flatten().collect()
}

/// One message as lines: a day rule first when its day is not the previous message's.
fn message_block<'a>(
    m: &Main,
    l: &'a ChatLine,
    previous: Option<&ChatLine>,
    theme: &Theme,
    width: usize,
) -> Vec<Line<'a>> {
    let mut out = Vec::new();
    let t = Civil::from_ms(l.timestamp_ms);
    let day = t.date();
    if previous.is_none_or(|p| Civil::from_ms(p.timestamp_ms).date() != day) {
        let label = format!(" {day} ");
        let side = width.saturating_sub(label.len()) / 2;
        out.push(Line::styled(
            format!("{}{label}{}", "─".repeat(side), "─".repeat(side)),
            Style::default().fg(theme.muted),
        ));
    }
    let who = if l.outgoing {
        m.me.handle.clone().unwrap_or_else(|| "me".into())
    } else {
        l.sender_name.clone().unwrap_or_else(|| l.sender.short())
    };
    let who_style = if l.outgoing {
        Style::default().fg(theme.accent)
    } else {
        Style::default().add_modifier(Modifier::BOLD)
    };
    let head = format!("{} {who}: ", t.hm());
    let mark = delivery_mark(l.delivery);
    let text_width = width.saturating_sub(head.chars().count()).max(8);
    let wrapped = wrap(&l.text, text_width);
    for (i, part) in wrapped.into_iter().enumerate() {
        let mut spans = if i == 0 {
            vec![
                Span::styled(t.hm(), Style::default().fg(theme.muted)),
                Span::raw(" "),
                Span::styled(format!("{who}: "), who_style),
            ]
        } else {
            vec![Span::raw(" ".repeat(head.chars().count()))]
        };
        spans.push(Span::raw(part));
        out.push(Line::from(spans));
    }
    if !mark.is_empty()
        && let Some(last) = out.last_mut()
    {
        let color = match l.delivery {
            Some(syncra_core::ui::DeliveryState::Delivered) => theme.ok,
            Some(syncra_core::ui::DeliveryState::Failed) => theme.error,
            Some(syncra_core::ui::DeliveryState::Offline) => theme.warn,
            _ => theme.muted,
        };
        last.spans
            .push(Span::styled(format!(" {mark}"), Style::default().fg(color)));
    }
    out
}

fn conversation_view(m: &Main, theme: &Theme, frame: &mut Frame<'_>, area: Rect) {
    let summary = m
        .selected
        .as_ref()
        .and_then(|id| m.conversations.iter().find(|c| &c.id == id));
    let banner = summary.is_some_and(|s| s.key_changed);
    let request = summary.is_some_and(|s| s.request);
    let composer_height = (m.composer.lines().len() as u16 + 2).clamp(3, 8);
    let banner_height = if banner || request { 2 } else { 0 };
    let [banner_area, messages_area, composer_area] = Layout::vertical([
        Constraint::Length(banner_height),
        Constraint::Min(1),
        Constraint::Length(composer_height),
    ])
    .areas(area);
    let title = match &m.selected {
        Some(id) => conversation_name(m, id),
        None => "Syncra".to_string(),
    };
    if banner {
        let p = Paragraph::new(vec![
            Line::styled(
                format!(
                    "⚠ {title}'s identity key CHANGED. Messages are held and sending is blocked."
                ),
                Style::default()
                    .fg(theme.error)
                    .add_modifier(Modifier::BOLD),
            ),
            Line::styled(
                "Compare safety numbers (Ctrl-S) before trusting it again.",
                Style::default().fg(theme.error),
            ),
        ])
        .wrap(Wrap { trim: true });
        frame.render_widget(p, banner_area);
    } else if request {
        let p = Paragraph::new(vec![
            Line::styled(
                format!("{title} is not in your contacts: this is a message request."),
                Style::default().fg(theme.warn),
            ),
            Line::styled(
                "Reply or Ctrl-P, add to accept; compare safety numbers with Ctrl-S.",
                Style::default().fg(theme.muted),
            ),
        ])
        .wrap(Wrap { trim: true });
        frame.render_widget(p, banner_area);
    }
    let block = titled(&title, theme);
    let inner = block.inner(messages_area);
    frame.render_widget(block, messages_area);
    let height = inner.height as usize;
    // Rendered from the newest message back, as far as the view reaches. When that is not
    // every message, `total` undercounts, but it is still at least `m.scroll + height`: the
    // scroll is not clamped and the same bottom lines are shown.
    let lines = m
        .selected
        .as_ref()
        .and_then(|id| m.messages.get(id))
        .map(|t| {
            let want = m.scroll.saturating_add(height);
            message_lines(m, t.lines(), theme, inner.width as usize, want)
        })
        .unwrap_or_default();
    let total = lines.len();
    let max_scroll = total.saturating_sub(height);
    let scroll = m.scroll.min(max_scroll);
    let end = total - scroll;
    let start = end.saturating_sub(height);
    let visible: Vec<Line<'_>> = lines[start..end].to_vec();
    frame.render_widget(Paragraph::new(visible), inner);
    if m.new_below && scroll > 0 {
        let hint = " ↓ new messages below (PgDn) ";
        let w = hint.chars().count() as u16;
        let r = Rect {
            x: inner.x + inner.width.saturating_sub(w) / 2,
            y: inner.y + inner.height.saturating_sub(1),
            width: w.min(inner.width),
            height: 1,
        };
        frame.render_widget(
            Paragraph::new(Line::styled(
                hint,
                Style::default()
                    .fg(theme.warn)
                    .add_modifier(Modifier::REVERSED),
            )),
            r,
        );
    }
    let mut composer = m.composer.clone();
    let mut cblock = titled("message", theme);
    if m.focus == crate::model::Focus::Composer && m.overlay.is_none() {
        cblock = cblock.border_style(Style::default().fg(theme.accent));
    } else {
        composer.set_cursor_style(Style::default());
    }
    composer.set_block(cblock);
    frame.render_widget(&composer, composer_area);
}

fn status_line(m: &Main, theme: &Theme, frame: &mut Frame<'_>, area: Rect) {
    let (conn, color) = match &m.connection {
        ConnectionState::Online => ("● online".to_string(), theme.ok),
        ConnectionState::Connecting(n) => (format!("◌ connecting ({n})"), theme.warn),
        ConnectionState::Offline { retry_in_secs, .. } => {
            (format!("○ offline, retry in {retry_in_secs}s"), theme.error)
        }
    };
    let me = m.me.handle.clone().unwrap_or_else(|| m.me.user_id.short());
    let fp: String = m.me.fingerprint.chars().take(11).collect();
    let mut spans = vec![
        Span::styled(conn, Style::default().fg(color)),
        Span::raw("  "),
        Span::styled(me, Style::default().fg(theme.accent)),
        Span::styled(format!(" [{fp}]"), Style::default().fg(theme.muted)),
        Span::raw("  "),
        Span::styled(
            m.me.relay.clone().unwrap_or_default(),
            Style::default().fg(theme.muted),
        ),
    ];
    if let Some((text, is_error)) = &m.status {
        spans.push(Span::raw("  "));
        spans.push(Span::styled(
            text.clone(),
            Style::default().fg(if *is_error { theme.error } else { theme.warn }),
        ));
    } else {
        spans.push(Span::styled("  F1 help", Style::default().fg(theme.muted)));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn overlays(m: &Main, model: &Model, theme: &Theme, frame: &mut Frame<'_>, area: Rect) {
    let Some(overlay) = &m.overlay else { return };
    match overlay {
        Overlay::Help => {
            let mut lines: Vec<Line<'_>> = KeyAction::ALL
                .iter()
                .map(|a| {
                    Line::from(vec![
                        Span::styled(
                            format!("{:>10}  ", model.keymap.key(*a)),
                            Style::default().fg(theme.accent),
                        ),
                        Span::raw(a.describe()),
                    ])
                })
                .collect();
            for (k, d) in [
                ("Enter", "send the message"),
                ("Tab", "move between the message and the conversation list"),
                (
                    "Up/Down",
                    "previous/next conversation (in an empty message)",
                ),
                ("wheel", "scroll the messages"),
                (
                    "/cmd",
                    "run a command from the message box (e.g. /add bob, /roll 2d6)",
                ),
            ] {
                lines.push(Line::from(vec![
                    Span::styled(format!("{k:>10}  "), Style::default().fg(theme.accent)),
                    Span::raw(d),
                ]));
            }
            lines.push(Line::from(""));
            lines.push(Line::styled(
                "any key closes this help",
                Style::default().fg(theme.muted),
            ));
            let h = lines.len() as u16 + 2;
            let r = centered(area, 72, h);
            frame.render_widget(Clear, r);
            frame.render_widget(Paragraph::new(lines).block(titled("Keys", theme)), r);
        }
        Overlay::Palette { input, selected } => {
            let typed = input.lines().join("");
            let matches = palette_matches(m, &typed);
            let sel = (*selected).min(matches.len().saturating_sub(1));
            let r = centered(area, 64, (matches.len() as u16 + 5).min(area.height));
            frame.render_widget(Clear, r);
            let block = titled("Command", theme);
            let inner = block.inner(r);
            frame.render_widget(block, r);
            let [field, list] =
                Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(inner);
            frame.render_widget(
                Paragraph::new(Line::from(vec![
                    Span::styled(": ", Style::default().fg(theme.accent)),
                    Span::raw(typed.clone()),
                    Span::styled("█", Style::default().fg(theme.muted)),
                ])),
                field,
            );
            let items: Vec<ListItem<'_>> = matches
                .iter()
                .enumerate()
                .map(|(i, (name, help))| {
                    let style = if i == sel {
                        Style::default()
                            .fg(theme.accent)
                            .add_modifier(Modifier::REVERSED)
                    } else {
                        Style::default()
                    };
                    ListItem::new(Line::from(vec![
                        Span::styled(format!("{name:<10}"), style),
                        Span::styled(format!(" {help}"), Style::default().fg(theme.muted)),
                    ]))
                })
                .collect();
            frame.render_widget(List::new(items), list);
        }
        Overlay::Safety {
            contact,
            number,
            verified,
        } => {
            let name = conversation_name(m, &ConversationId::Direct(*contact));
            let groups: Vec<&str> = number.split(' ').collect();
            let mut lines = vec![
                Line::from(format!("Safety number with {name}:")),
                Line::from(""),
            ];
            for row in groups.chunks(4) {
                lines.push(Line::styled(
                    format!("   {}", row.join("  ")),
                    Style::default().add_modifier(Modifier::BOLD),
                ));
            }
            lines.push(Line::from(""));
            lines.push(Line::from(
                "Compare it with what they see, in person or on a call.",
            ));
            lines.push(if *verified {
                Line::styled("✓ verified", Style::default().fg(theme.ok))
            } else {
                Line::styled(
                    "v: they match, mark verified   any other key: close",
                    Style::default().fg(theme.muted),
                )
            });
            let r = centered(area, 60, lines.len() as u16 + 2);
            frame.render_widget(Clear, r);
            frame.render_widget(Paragraph::new(lines).block(titled("Verify", theme)), r);
        }
        Overlay::ConfirmPaste(text) => {
            let n = text.lines().count();
            let lines = vec![
                Line::from(format!("Paste {n} lines into the message?")),
                Line::styled(
                    "y / Enter: paste   any other key: cancel",
                    Style::default().fg(theme.muted),
                ),
            ];
            let r = centered(area, 50, 4);
            frame.render_widget(Clear, r);
            frame.render_widget(Paragraph::new(lines).block(titled("Paste", theme)), r);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

    use std::collections::VecDeque;

    use syncra_core::UserId;
    use syncra_core::ui::{AppEvent, ChatLine, ConversationId, Me};

    use super::{message_lines, wrap};
    use crate::config::{Keymap, Theme};
    use crate::model::{Message, Model, Screen};

    /// 2026-11-25 08:26:40 UTC.
    const T0: u64 = 1_795_600_000_000;

    #[test]
    fn only_the_newest_messages_are_rendered_and_as_the_whole_would_be() {
        let mut model = Model::new(Keymap::default(), false);
        model.update(Message::App(AppEvent::Ready(Me {
            user_id: UserId::from_identity_key(&[1; 32]),
            handle: Some("alice".into()),
            relay: None,
            fingerprint: String::new(),
        })));
        let Screen::Main(m) = &model.screen else {
            panic!("not the main screen");
        };
        // Three hours apart, so the day changes every eighth message; every third wraps.
        let lines: VecDeque<ChatLine> = (0..2000u64)
            .map(|i| ChatLine {
                conversation: ConversationId::Direct(UserId::from_identity_key(&[2; 32])),
                message_id: i.to_string(),
                sender: UserId::from_identity_key(&[2; 32]),
                sender_name: Some("bob".into()),
                outgoing: i % 2 == 0,
                timestamp_ms: T0 + i * 3 * 3_600_000,
                text: "word ".repeat(if i % 3 == 0 { 30 } else { 2 }),
                delivery: None,
            })
            .collect();
        let theme = Theme::default();
        let all = message_lines(m, &lines, &theme, 60, usize::MAX);
        for want in [0, 1, 7, 20, 100, 1000] {
            let newest = message_lines(m, &lines, &theme, 60, want);
            assert!(newest.len() >= want.min(all.len()));
            // Past `want` by at most one message (its day rule and up to three wrapped lines).
            assert!(newest.len() < want + 5, "{want}: {}", newest.len());
            assert_eq!(newest[..], all[all.len() - newest.len()..], "{want}");
        }
    }

    #[test]
    fn wraps_on_words_and_breaks_long_words() {
        assert_eq!(wrap("hello big world", 9), ["hello big", "world"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("a\n\nb", 5), ["a", "", "b"]);
        assert_eq!(wrap("", 5), [""]);
    }
}
