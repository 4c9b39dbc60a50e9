//! Helpers shared by the end-to-end tests: users with their own SYNCRA_HOME driving real
//! `syncra` processes.
#![allow(dead_code)] // Each test file uses a different part.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use syncra_test_support::DEADLINE;

pub const PASS: &str = "correct horse battery staple";

pub struct User {
    pub home: PathBuf,
    pub handle: String,
}

pub struct Listener {
    pub child: Child,
    pub lines: mpsc::Receiver<serde_json::Value>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Listener {
    /// Waits for a message with this text, skipping others.
    pub fn expect_text(&self, text: &str) -> serde_json::Value {
        self.expect_text_within(text, DEADLINE)
    }

    /// [`Listener::expect_text`] with its own deadline: for a listener that may be in its
    /// reconnect backoff (which doubles up to 30 s) when the message arrives.
    pub fn expect_text_within(&self, text: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no message {text:?} in time"));
            if line["text"] == text {
                return line;
            }
        }
    }

    /// Waits for a line that `matches`, skipping others.
    pub fn expect(
        &self,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what} in time"));
            if matches(&line) {
                return line;
            }
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn expect_nothing_for(&self, d: Duration) {
        if let Ok(line) = self.lines.recv_timeout(d) {
            panic!("unexpected line: {line}");
        }
    }
}

/// `syncra --line` for `user`, asking for the passphrase on its terminal (stdin): the process,
/// its stdin, and the lines it prints, as they come.
#[allow(dead_code)] // Not every test binary drives line mode.
pub fn line_mode(user: &User) -> (Child, std::process::ChildStdin, mpsc::Receiver<String>) {
    let mut line = user
        .cmd(&["--line"])
        .env_remove("SYNCRA_PASSPHRASE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = line.stdin.take().unwrap();
    let stdout = line.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    (line, stdin, rx)
}

pub fn syncra() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_syncra"));
    c.env_remove("SYNCRA_HOME")
        .env_remove("SYNCRA_PASSPHRASE")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

/// Alice and bob, both registered on `relay`, and bob a contact of alice: how most tests start.
pub fn alice_and_bob(root: &std::path::Path, relay: &str) -> (User, User) {
    let alice = User::new(root, "alice");
    let bob = User::new(root, "bob");
    alice.onboard(relay);
    bob.onboard(relay);
    alice.ok(&["contact", "add", "bob"]);
    (alice, bob)
}

impl User {
    pub fn new(root: &std::path::Path, handle: &str) -> User {
        User {
            home: root.join(handle),
            handle: handle.to_owned(),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = syncra();
        c.env("SYNCRA_HOME", &self.home)
            .env("SYNCRA_PASSPHRASE", PASS)
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run syncra")
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "syncra {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and expects failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "syncra {args:?} should have failed:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn send(&self, to: &str, text: &str) -> (i32, String) {
        let out = self.run(&["send", to, text]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    pub fn onboard(&self, relay: &str) {
        self.ok(&["init"]);
        self.ok(&["register", "--relay", relay, "--handle", &self.handle]);
    }

    pub fn listen(&self) -> Listener {
        let mut child = self
            .cmd(&["listen"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn syncra listen");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("listen printed a non-JSON line {line:?}: {e}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        // Wait until it is connected: it says so on stderr.
        let stderr = child.stderr.take().expect("stderr");
        let (ctx, crx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = ctx.send(line);
            }
        });
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match crx.recv_timeout(left) {
                Ok(line) if line.contains("connected") && !line.contains("dis") => break,
                Ok(_) => continue,
                Err(_) => panic!("syncra listen did not connect in time"),
            }
        }
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || while crx.recv().is_ok() {});
        Listener { child, lines: rx }
    }

    pub fn history_json(&self, with: &str) -> Vec<serde_json::Value> {
        self.ok(&["history", with, "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).expect("history JSON line"))
            .collect()
    }
}
