//! A dice bot: `/roll 2d6` (or `roll 3d20+2`) answers with the throws and the total. It keeps a
//! count of rolls per person in its private key-value store.

wit_bindgen::generate!({ path: "../../../plugin-sdk/wit", world: "bot" });

use exports::syncra::plugin::handler::Guest;
use syncra::plugin::host::{kv_get, kv_set, now_ms};
use syncra::plugin::types::{Action, CommandInfo, Message};

struct Dice;

/// A small xorshift generator seeded from the host clock and a counter: dice, not crypto.
fn next(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Parses `NdM` or `NdM+K` (N ≤ 20, M ≤ 1000).
fn parse(spec: &str) -> Option<(u32, u32, i64)> {
    let spec = spec.trim().to_ascii_lowercase();
    let (count, rest) = spec.split_once('d')?;
    let count: u32 = if count.is_empty() { 1 } else { count.parse().ok()? };
    let (sides, bonus) = match rest.split_once('+') {
        Some((s, b)) => (s.parse().ok()?, b.parse().ok()?),
        None => match rest.split_once('-') {
            Some((s, b)) => (s.parse().ok()?, -b.parse::<i64>().ok()?),
            None => (rest.parse().ok()?, 0),
        },
    };
    if count == 0 || count > 20 || sides < 2 || sides > 1000 {
        return None;
    }
    Some((count, sides, bonus))
}

fn roll(spec: &str, who: &str) -> String {
    let Some((count, sides, bonus)) = parse(spec) else {
        return format!("I roll dice like 2d6 or 1d20+3 (at most 20 dice); not {spec:?}");
    };
    let key = format!("rolls/{who}");
    let n = kv_get(&key)
        .and_then(|v| v.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
        + 1;
    let _ = kv_set(&key, &n.to_le_bytes());
    let mut state = now_ms() ^ (n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    let throws: Vec<u64> = (0..count).map(|_| next(&mut state) % u64::from(sides) + 1).collect();
    let total: i64 = throws.iter().map(|t| *t as i64).sum::<i64>() + bonus;
    let list: Vec<String> = throws.iter().map(u64::to_string).collect();
    format!("🎲 {spec}: [{}] = {total} (roll #{n} for {who})", list.join(", "))
}

impl Guest for Dice {
    fn commands() -> Vec<CommandInfo> {
        vec![CommandInfo {
            name: "roll".into(),
            help: "roll 2d6 — roll dice (NdM, NdM+K)".into(),
        }]
    }

    fn on_message(msg: Message) -> Vec<Action> {
        let text = msg.text.trim();
        let spec = text
            .strip_prefix("/roll")
            .or_else(|| text.strip_prefix("roll"))
            .map(str::trim);
        let who = msg.sender_handle.unwrap_or(msg.sender);
        match spec {
            Some(spec) if !spec.is_empty() => vec![Action::Reply(roll(spec, &who))],
            Some(_) => vec![Action::Reply(roll("1d6", &who))],
            None => vec![Action::Reply("send /roll 2d6 to roll dice".into())],
        }
    }

    fn on_command(_name: String, args: String, _conversation: String) -> Vec<Action> {
        let spec = if args.trim().is_empty() { "1d6" } else { args.trim() };
        vec![Action::Reply(roll(spec, "you"))]
    }
}

export!(Dice);
