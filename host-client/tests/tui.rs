//! Two real `syncra` full-screen UIs in tmux against a real relay: both onboard, add each
//! other, exchange messages and read them on the screen (capture-pane).
//!
//! tmux is a test requirement (`scripts/test.sh` installs it); without it this test fails
//! rather than skipping.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use syncra_test_support::DEADLINE;
use syncra_test_support::process::RelayProcess;

struct Tmux {
    socket: String,
    session: String,
}

fn tmux(socket: &str, args: &[&str]) -> String {
    let out = Command::new("tmux")
        .arg("-L")
        .arg(socket)
        .args(args)
        .output()
        .expect("tmux is installed (scripts/test.sh installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Tmux {
    fn start(socket: &str, session: &str, home: &Path) -> Tmux {
        let cmd = format!(
            "env SYNCRA_HOME={} TERM=xterm-256color {} 2>{}.err",
            home.display(),
            env!("CARGO_BIN_EXE_syncra"),
            home.display()
        );
        tmux(
            socket,
            &[
                "new-session",
                "-d",
                "-s",
                session,
                "-x",
                "100",
                "-y",
                "30",
                &cmd,
            ],
        );
        Tmux {
            socket: socket.into(),
            session: session.into(),
        }
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        tmux(&self.socket, &args);
    }

    fn text(&self, text: &str) {
        tmux(
            &self.socket,
            &["send-keys", "-t", &self.session, "-l", text],
        );
    }

    fn screen(&self) -> String {
        tmux(&self.socket, &["capture-pane", "-p", "-t", &self.session])
    }

    /// Waits until the screen shows `needle`.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let s = self.screen();
            if s.contains(needle) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} never showed {needle:?}; screen:\n{s}",
                self.session
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn onboard(&self, handle: &str) {
        self.wait_for("Welcome to Syncra");
        self.keys(&["Enter"]);
        self.wait_for("relay address");
        self.keys(&["Enter"]);
        self.wait_for("Pick a handle");
        self.text(handle);
        self.wait_for(&format!("{handle} is free"));
        self.keys(&["Enter"]);
        self.wait_for("strength");
        self.text("correct horse battery");
        self.keys(&["Tab"]);
        self.text("correct horse battery");
        self.keys(&["Enter"]);
        self.wait_for("fingerprint:");
        self.keys(&["Enter"]);
        self.wait_for("● online");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        tmux(&self.socket, &["kill-server"]);
    }
}

#[test]
fn two_tuis_onboard_and_chat() {
    let dir = tempfile::tempdir().unwrap();
    // The UIs offer ws://127.0.0.1:7443/ by default; give them this relay instead by writing
    // the relay into each home's settings before first start, as a returning user would have.
    let relay = RelayProcess::start(&dir.path().join("relay"));
    let socket = format!("syncra-test-{}", std::process::id());
    let homes: Vec<_> = ["alice", "bob"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for home in &homes {
        std::fs::create_dir_all(home).unwrap();
        std::fs::write(
            home.join("settings.toml"),
            format!("relay = \"{}\"\n", relay.url()),
        )
        .unwrap();
    }
    let alice = Tmux::start(&socket, "alice", &homes[0]);
    let bob = Tmux::start(&socket, "bob", &homes[1]);
    alice.onboard("alice");
    bob.onboard("bob");

    // Alice adds Bob through the command palette and writes.
    alice.keys(&["C-p"]);
    alice.wait_for("Command");
    alice.text("add bob");
    alice.keys(&["Enter"]);
    alice.wait_for("added bob");
    alice.text("hello bob, from the terminal");
    alice.keys(&["Enter"]);
    alice.wait_for("hello bob, from the terminal ✓");

    // Bob sees it as a message request, adds Alice and answers.
    let screen = bob.wait_for("hello bob, from the terminal");
    assert!(screen.contains("message request"), "{screen}");
    bob.keys(&["C-p"]);
    bob.wait_for("Command");
    bob.text("add alice");
    bob.keys(&["Enter"]);
    bob.wait_for("added alice");
    bob.text("hi alice!");
    bob.keys(&["Enter"]);
    alice.wait_for("bob: hi alice!");

    // Quitting restores the terminal and ends the program.
    alice.keys(&["C-q"]);
    let deadline = Instant::now() + DEADLINE;
    while tmux(&socket, &["list-sessions"]).contains("alice:") {
        assert!(Instant::now() < deadline, "syncra did not quit on Ctrl-Q");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A message the client refuses goes back into the composer with the reason, in the real
/// program: here a paste of 70 000 control characters and a few words, 70 KB as typed but over
/// the limit once encoded. Before, the composer was cleared when Enter handed the text over,
/// the client refused it, and only the error was left on the screen.
#[test]
fn a_message_the_client_refuses_goes_back_into_the_composer() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("relay"));
    common::User::new(dir.path(), "bob").onboard(&relay.url());
    let home = dir.path().join("alice");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join("settings.toml"),
        format!("relay = \"{}\"\n", relay.url()),
    )
    .unwrap();
    let socket = format!("syncra-test-refused-{}", std::process::id());
    let alice = Tmux::start(&socket, "alice", &home);
    alice.onboard("alice");
    alice.keys(&["C-p"]);
    alice.wait_for("Command");
    alice.text("add bob");
    alice.keys(&["Enter"]);
    alice.wait_for("added bob");

    // Pasted (bracketed, as a terminal pastes), the words last so the composer shows them.
    let paste = dir.path().join("paste");
    std::fs::write(
        &paste,
        format!("{} keep this draft", "\u{1}".repeat(70_000)),
    )
    .unwrap();
    tmux(
        &socket,
        &["load-buffer", "-b", "blob", paste.to_str().unwrap()],
    );
    tmux(
        &socket,
        &["paste-buffer", "-p", "-b", "blob", "-t", "alice"],
    );
    alice.wait_for("keep this draft");
    alice.keys(&["Enter"]);
    let screen = alice.wait_for("not sent:");
    assert!(screen.contains("keep this draft"), "{screen}");
    assert!(!screen.contains("write a message"), "{screen}");
}
