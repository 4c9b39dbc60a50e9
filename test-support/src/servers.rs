//! Real Redis and NATS servers for tests: `redis-server` and `nats-server` started on a free
//! loopback port in a temp dir of their own, stopped and restarted on the same port (and, for a
//! durable Redis or a JetStream NATS, on the same data) by tests that need the backend to go
//! away and come back, and killed when dropped.
//!
//! A missing binary is a panic that says how to install it, never a skip: a broker test that
//! silently does not run is worse than one that fails (see the design brief, "Tests and
//! measurement"). Readiness is a TCP connect polled against a deadline, never a fixed sleep.

use std::fmt;
use std::fs::File;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::DEADLINE;
use crate::process::free_port;

/// A backend server that a test can take away and bring back, on the same address, to check
/// that a client recovers by itself.
pub trait Restartable {
    /// Kills the server (SIGKILL: connections drop without a goodbye) and waits for it to exit.
    fn stop(&mut self);
    /// Starts it again on the same port and waits until it accepts connections.
    fn restart(&mut self);
}

/// How to launch one kind of server.
struct Recipe {
    /// The binary, looked up on `PATH`.
    binary: &'static str,
    /// What to tell a developer who does not have it.
    install: &'static str,
    /// The arguments for a port and a working directory.
    args: fn(u16, &Path) -> Vec<String>,
}

/// One spawned server process and the directory it lives in.
struct Spawned {
    recipe: &'static Recipe,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

/// How many fresh ports [`Spawned::start`] tries: another test may take a free port between
/// our probe and the server's bind, and the server then exits at once.
const START_ATTEMPTS: usize = 3;

impl Spawned {
    fn start(recipe: &'static Recipe) -> Spawned {
        Spawned::start_prepared(recipe, |_| {})
    }

    /// [`Spawned::start`], with `prepare` given the server's directory before it first starts
    /// (to write a configuration file its arguments name).
    fn start_prepared(recipe: &'static Recipe, prepare: impl FnOnce(&Path)) -> Spawned {
        let dir = tempfile::Builder::new()
            .prefix(&format!("syncra-{}-", recipe.binary))
            .tempdir()
            .unwrap_or_else(|e| panic!("create a temp dir for {}: {e}", recipe.binary));
        prepare(dir.path());
        let mut server = Spawned {
            recipe,
            port: 0,
            dir,
            child: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            server.spawn();
            match server.wait_ready() {
                Ok(()) => return server,
                Err(why) if attempt < START_ATTEMPTS => {
                    eprintln!("{} on port {}: {why}; retrying", recipe.binary, server.port);
                }
                Err(why) => panic!("{why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("open the {} log: {e}", self.recipe.binary));
        let stderr = log
            .try_clone()
            .unwrap_or_else(|e| panic!("clone the {} log handle: {e}", self.recipe.binary));
        let child = Command::new(self.recipe.binary)
            .args((self.recipe.args)(self.port, self.dir.path()))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn();
        match child {
            Ok(child) => self.child = Some(child),
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "`{}` was not found on PATH; {} (tests that need a real server never skip)",
                self.recipe.binary, self.recipe.install
            ),
            Err(e) => panic!("start {}: {e}", self.recipe.binary),
        }
    }

    /// Polls a TCP connect until the server accepts, it exits, or [`DEADLINE`] passes.
    fn wait_ready(&mut self) -> Result<(), String> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "{} exited with {status} before accepting connections on {addr}; log:\n{}",
                    self.recipe.binary,
                    self.log_text()
                ));
            }
            if let Ok(probe) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                // A connect from an ephemeral port equal to the target port connects the socket
                // to itself when nothing listens (TCP simultaneous open): not our server.
                let self_connect = probe.local_addr().is_ok_and(|a| a.port() == self.port);
                drop(probe);
                // Another process may hold the port (two free_port() calls can return the same
                // number): then ours fails to bind and exits within moments. Look again.
                std::thread::sleep(Duration::from_millis(50));
                let exited = self
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                if !self_connect && !exited {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.stop();
                panic!(
                    "{} did not accept connections on {addr} within {DEADLINE:?}; log:\n{}",
                    self.recipe.binary,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.stop();
        self.spawn();
        if let Err(why) = self.wait_ready() {
            panic!("restarting on the same port: {why}");
        }
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Sends `signal` to the process with `kill(1)` (this crate has no unsafe code for libc).
    fn signal(&self, signal: &str) {
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.recipe.binary));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("run kill -{signal}: {e}"));
        assert!(status.success(), "kill -{signal} failed: {status}");
    }

    fn freeze(&mut self) {
        self.signal("STOP");
    }

    fn thaw(&mut self) {
        self.signal("CONT");
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SIGKILL ends a frozen process too.
        self.stop();
    }
}

/// A loopback Redis on `port` in `dir`, with no RDB snapshots, and `persistence` (the
/// append-only file settings).
fn redis_args(port: u16, dir: &Path, persistence: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--port".into(),
        port.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--save".into(),
        String::new(),
        "--dir".into(),
        dir.display().to_string(),
    ];
    args.extend(persistence.iter().map(|a| a.to_string()));
    args
}

static REDIS: Recipe = Recipe {
    binary: "redis-server",
    install: "install redis-server: apt-get install redis-server",
    args: |port, dir| redis_args(port, dir, &["--appendonly", "no"]),
};

/// Redis that keeps what it acknowledged: an append-only file, fsynced before every answer
/// (`appendfsync always`), in the server's directory, which a restart reads again. This is the
/// setting docs/SCALING.md asks of a Redis that holds the mailbox.
static REDIS_DURABLE: Recipe = Recipe {
    binary: "redis-server",
    install: "install redis-server: apt-get install redis-server",
    args: |port, dir| {
        redis_args(
            port,
            dir,
            &["--appendonly", "yes", "--appendfsync", "always"],
        )
    },
};

/// A loopback NATS on `port`, with `extra` arguments.
fn nats_args(port: u16, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ];
    args.extend_from_slice(extra);
    args
}

static NATS: Recipe = Recipe {
    binary: "nats-server",
    install: "install nats-server: apt-get install nats-server",
    args: |port, _dir| nats_args(port, &[]),
};

/// NATS with JetStream, its store in the server's directory, which a restart reads again.
static NATS_JETSTREAM: Recipe = Recipe {
    binary: "nats-server",
    install: "install nats-server: apt-get install nats-server",
    args: |port, dir| {
        nats_args(
            port,
            &[
                "-js".into(),
                "-sd".into(),
                dir.join("jetstream").display().to_string(),
            ],
        )
    },
};

/// A member of a NATS cluster: its routes and JetStream settings are in `cluster.conf` in the
/// server's directory, written by [`NatsCluster::start`] before the server starts.
static NATS_CLUSTER_MEMBER: Recipe = Recipe {
    binary: "nats-server",
    install: "install nats-server: apt-get install nats-server",
    args: |port, dir| {
        nats_args(
            port,
            &["-c".into(), dir.join("cluster.conf").display().to_string()],
        )
    },
};

/// What every spawned server wrapper offers on top of its own `start` functions: its URL
/// (`url_format` with the port), the port, running state and log, stop and restart (on the same
/// port and data), freeze and thaw (SIGSTOP/SIGCONT: connections stay open but nothing answers,
/// as in a network partition), [`Restartable`] and `Debug`.
macro_rules! spawned_server {
    ($server:ident, $url_format:literal) => {
        impl $server {
            /// The URL clients connect to.
            pub fn url(&self) -> String {
                format!($url_format, self.server.port)
            }

            /// The port it listens on (kept across restarts).
            pub fn port(&self) -> u16 {
                self.server.port
            }

            /// Whether the process is running (not stopped).
            pub fn is_running(&self) -> bool {
                self.server.is_running()
            }

            /// The server's log so far.
            pub fn log_text(&self) -> String {
                self.server.log_text()
            }

            /// Kills the server and waits for it to exit.
            pub fn stop(&mut self) {
                self.server.stop();
            }

            /// Starts it again on the same port (with the same data, if it keeps any).
            pub fn restart(&mut self) {
                self.server.restart();
            }

            /// Freezes the process (SIGSTOP). [`thaw`](Self::thaw) resumes it.
            pub fn freeze(&mut self) {
                self.server.freeze();
            }

            /// Resumes a frozen process (SIGCONT).
            pub fn thaw(&mut self) {
                self.server.thaw();
            }
        }

        impl Restartable for $server {
            fn stop(&mut self) {
                $server::stop(self);
            }

            fn restart(&mut self) {
                $server::restart(self);
            }
        }

        impl fmt::Debug for $server {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($server))
                    .field("url", &self.url())
                    .field("running", &self.is_running())
                    .finish()
            }
        }
    };
}

/// A `redis-server` of this test's own, loopback only, on a free port: without persistence
/// ([`RedisServer::start`]) or with an fsynced append-only file ([`RedisServer::start_durable`]).
pub struct RedisServer {
    server: Spawned,
}

impl RedisServer {
    /// Starts a server without persistence and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// If `redis-server` is not installed (the message says how to install it) or does not
    /// start in time (the message carries its log).
    pub fn start() -> RedisServer {
        RedisServer {
            server: Spawned::start(&REDIS),
        }
    }

    /// Starts a server that keeps what it acknowledged across a kill and a
    /// [`restart`](Self::restart): `appendonly yes` with `appendfsync always`.
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn start_durable() -> RedisServer {
        RedisServer {
            server: Spawned::start(&REDIS_DURABLE),
        }
    }
}

spawned_server!(RedisServer, "redis://127.0.0.1:{}/");

/// A `nats-server` of this test's own, loopback only, on a free port: core NATS
/// ([`NatsServer::start`]) or with JetStream ([`NatsServer::start_jetstream`]).
pub struct NatsServer {
    server: Spawned,
}

impl NatsServer {
    /// Starts a core NATS server (no JetStream) and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// If `nats-server` is not installed (the message says how to install it) or does not
    /// start in time (the message carries its log).
    pub fn start() -> NatsServer {
        NatsServer {
            server: Spawned::start(&NATS),
        }
    }

    /// Starts a server with JetStream (`-js`), its store in the server's own directory
    /// (`-sd`), which a [`restart`](Self::restart) reads again.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`].
    pub fn start_jetstream() -> NatsServer {
        NatsServer {
            server: Spawned::start(&NATS_JETSTREAM),
        }
    }
}

spawned_server!(NatsServer, "nats://127.0.0.1:{}");

/// A cluster of `nats-server`s of this test's own on loopback: full-mesh routes between them
/// and JetStream enabled on each (a JetStream cluster, its store in each server's directory).
/// A test can stop and restart each member; the others keep serving.
pub struct NatsCluster {
    /// The members, in the order of [`NatsCluster::urls`].
    pub servers: Vec<NatsServer>,
    /// Each member's HTTP monitoring port (`/healthz`), in the same order.
    monitor_ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts `n` servers that route to each other, and waits until each accepts clients
    /// (routes form within moments after that; a client that needs them retries).
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`].
    pub fn start(n: usize) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let monitor_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let servers = cluster_ports
            .iter()
            .enumerate()
            .map(|(i, cluster_port)| {
                let monitor_port = monitor_ports[i];
                let server = Spawned::start_prepared(&NATS_CLUSTER_MEMBER, |dir| {
                    let conf = format!(
                        "server_name: syncra-test-{i}\n\
                         http: \"127.0.0.1:{monitor_port}\"\n\
                         jetstream {{\n  store_dir: \"{}\"\n}}\n\
                         cluster {{\n  name: syncra-test\n  listen: \"127.0.0.1:{cluster_port}\"\n  \
                         routes: [{routes}]\n}}\n",
                        dir.join("jetstream").display()
                    );
                    std::fs::write(dir.join("cluster.conf"), conf)
                        .unwrap_or_else(|e| panic!("write the nats cluster config: {e}"));
                });
                NatsServer { server }
            })
            .collect();
        NatsCluster {
            servers,
            monitor_ports,
        }
    }

    /// Every member's URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Waits until every running member reports JetStream ready on its `/healthz` (the servers
    /// elected a meta leader and each is current with it), so that a stream with replicas can
    /// be created. Members accept clients well before that.
    ///
    /// # Panics
    ///
    /// If a running member is not ready within [`DEADLINE`] (the message carries its answer
    /// and its log).
    pub fn wait_jetstream_ready(&self) {
        let deadline = Instant::now() + DEADLINE;
        for (server, port) in self.servers.iter().zip(&self.monitor_ports) {
            if !server.is_running() {
                continue;
            }
            loop {
                let answer = http_get_loopback(*port, "/healthz");
                if answer.contains("\"status\":\"ok\"") {
                    break;
                }
                if Instant::now() >= deadline {
                    panic!(
                        "nats-server on port {} did not report JetStream ready within \
                         {DEADLINE:?}: /healthz said {answer:?}; log:\n{}",
                        server.port(),
                        server.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl NatsCluster {
    /// The index (in [`NatsCluster::servers`]) of the member that leads JetStream stream
    /// `stream`, once one does, as the running members' `/jsz` report it.
    ///
    /// # Panics
    ///
    /// If no running member names a leader for the stream within [`DEADLINE`].
    pub fn stream_leader(&self, stream: &str) -> usize {
        let deadline = Instant::now() + DEADLINE;
        let mut last = String::new();
        loop {
            for (server, port) in self.servers.iter().zip(&self.monitor_ports) {
                if !server.is_running() {
                    continue;
                }
                last = http_get_loopback(*port, "/jsz?accounts=true&streams=true");
                if let Some(leader) = stream_leader_in(&last, stream) {
                    return leader;
                }
            }
            if Instant::now() >= deadline {
                panic!("no nats-server names a leader for stream {stream} in /jsz: {last}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The member index in the leader's name (`syncra-test-<i>`) of `stream` in a `/jsz` answer:
/// the first `leader` after the stream's name and before its `state` (the stream's own
/// cluster section; the meta cluster's comes before every stream).
fn stream_leader_in(jsz: &str, stream: &str) -> Option<usize> {
    let compact: String = jsz.chars().filter(|c| !c.is_whitespace()).collect();
    let at = compact.find(&format!("\"name\":\"{stream}\""))?;
    let rest = &compact[at..];
    let rest = &rest[..rest.find("\"state\":").unwrap_or(rest.len())];
    let (_, after) = rest.split_once("\"leader\":\"syncra-test-")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The body of `GET path` on `127.0.0.1:port` (HTTP/1.0, read to the end), or what went wrong,
/// for polling a server's monitoring endpoint.
fn http_get_loopback(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    };
    attempt().unwrap_or_else(|e| format!("no answer: {e}"))
}

impl fmt::Debug for NatsCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsCluster")
            .field("servers", &self.servers)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(port: u16) -> bool {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
    }

    #[test]
    fn redis_starts_stops_and_restarts_on_the_same_port() {
        let mut redis = RedisServer::start();
        let port = redis.port();
        assert!(redis.url().starts_with("redis://127.0.0.1:"));
        assert!(accepts(port));
        redis.stop();
        assert!(!redis.is_running());
        assert!(!accepts(port), "a stopped server must not accept");
        redis.restart();
        assert_eq!(redis.port(), port);
        assert!(accepts(port));
    }

    #[test]
    fn nats_starts_stops_and_restarts_on_the_same_port() {
        let mut nats = NatsServer::start();
        let port = nats.port();
        assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
        assert!(accepts(port));
        nats.stop();
        assert!(!accepts(port), "a stopped server must not accept");
        nats.restart();
        assert!(accepts(port));
    }

    #[test]
    fn a_stream_leader_is_read_from_its_own_cluster_section() {
        let jsz = r#"{ "meta_cluster": { "name": "syncra-test", "leader": "syncra-test-0" },
          "account_details": [ { "stream_detail": [
            { "name": "OTHER", "cluster": { "name": "syncra-test", "leader": "syncra-test-2" },
              "state": {} },
            { "name": "SYNCRA_MAILBOX", "cluster": { "name": "syncra-test",
              "leader": "syncra-test-1", "replicas": [ { "name": "syncra-test-0" } ] },
              "state": { "messages": 0 } },
            { "name": "NO_LEADER", "cluster": { "name": "syncra-test" }, "state": {} } ] } ] }"#;
        assert_eq!(stream_leader_in(jsz, "SYNCRA_MAILBOX"), Some(1));
        assert_eq!(stream_leader_in(jsz, "OTHER"), Some(2));
        assert_eq!(stream_leader_in(jsz, "NO_LEADER"), None);
        assert_eq!(stream_leader_in(jsz, "ABSENT"), None);
    }

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        static MISSING: Recipe = Recipe {
            binary: "syncra-no-such-server",
            install: "install it: apt-get install syncra-no-such-server",
            args: |_, _| Vec::new(),
        };
        let panic = std::panic::catch_unwind(|| Spawned::start(&MISSING))
            .err()
            .expect("a missing binary must panic");
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            message.contains("apt-get install syncra-no-such-server"),
            "{message}"
        );
    }
}
