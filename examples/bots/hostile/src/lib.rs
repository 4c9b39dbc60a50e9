//! A deliberately hostile bot for the sandbox tests. The message text picks the misbehaviour:
//! `loop` spins forever, `hog` allocates until memory runs out, `trap` panics, `fs [PATH]` tries to
//! read a host file, `net ADDR` tries to open a TCP connection, `sleep` sleeps for five minutes
//! (WASI `subscribe-duration` and a blocking wait, through `std::thread::sleep`, burning no
//! fuel), `flood N` answers with N replies, `kv N` sets the key `counter` in its store N times
//! (0 to N-1) and `kv N trap` then panics; anything else is echoed, so a test can check the
//! plugin still works after being restarted.

wit_bindgen::generate!({ path: "../../../plugin-sdk/wit", world: "bot" });

use exports::syncra::plugin::handler::Guest;
use syncra::plugin::host::kv_set;
use syncra::plugin::types::{Action, CommandInfo, Message};

struct Hostile;

impl Guest for Hostile {
    fn commands() -> Vec<CommandInfo> {
        Vec::new()
    }

    fn on_message(msg: Message) -> Vec<Action> {
        let text = msg.text.trim().to_owned();
        let reply = match text.split_whitespace().next().unwrap_or("") {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "hog" => {
                let mut chunks: Vec<Vec<u8>> = Vec::new();
                loop {
                    chunks.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&chunks);
                }
            }
            "trap" => panic!("asked to trap"),
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(300));
                "slept for five minutes".to_owned()
            }
            "fs" => {
                let path = text.split_whitespace().nth(1).unwrap_or("/etc/hostname");
                match std::fs::read_to_string(path) {
                    Ok(s) => format!("read a host file: {}", s.trim()),
                    Err(e) => format!("fs denied: {e}"),
                }
            }
            "net" => {
                let addr = text.split_whitespace().nth(1).unwrap_or("127.0.0.1:9");
                match std::net::TcpStream::connect(addr) {
                    Ok(_) => format!("connected to {addr}"),
                    Err(e) => format!("net denied: {e}"),
                }
            }
            "flood" => {
                let n: usize = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1000);
                return (0..n)
                    .map(|i| Action::Reply(format!("flood {i}")))
                    .collect();
            }
            "kv" => {
                let mut words = text.split_whitespace().skip(1);
                let n: u32 = words.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
                for i in 0..n {
                    if let Err(e) = kv_set("counter", &i.to_le_bytes()) {
                        return vec![Action::Reply(format!("kv failed: {e}"))];
                    }
                }
                if words.next() == Some("trap") {
                    panic!("asked to trap after setting the counter {n} times");
                }
                format!("set the counter {n} times")
            }
            _ => format!("still alive: {text}"),
        };
        vec![Action::Reply(reply)]
    }

    fn on_command(_name: String, _args: String, _conversation: String) -> Vec<Action> {
        Vec::new()
    }
}

export!(Hostile);
