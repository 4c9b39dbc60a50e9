//! An echo bot: answers every message with the same text. The smallest useful Syncra bot.

wit_bindgen::generate!({ path: "../../../plugin-sdk/wit", world: "bot" });

use exports::syncra::plugin::handler::Guest;
use syncra::plugin::host::log;
use syncra::plugin::types::{Action, CommandInfo, Level, Message};

struct Echo;

impl Guest for Echo {
    fn commands() -> Vec<CommandInfo> {
        vec![CommandInfo {
            name: "echo".into(),
            help: "echo TEXT — say TEXT back".into(),
        }]
    }

    fn on_message(msg: Message) -> Vec<Action> {
        let who = msg.sender_handle.clone().unwrap_or(msg.sender.clone());
        log(Level::Info, &format!("echoing {} bytes for {who}", msg.text.len()));
        vec![Action::Reply(format!("echo: {}", msg.text))]
    }

    fn on_command(_name: String, args: String, _conversation: String) -> Vec<Action> {
        vec![Action::Reply(args)]
    }
}

export!(Echo);
