//! nginx in front of a relay cluster, end to end: Debian's `nginx` terminates TLS with a
//! certificate from a CA this test makes, and balances over two real `syncra-relay` processes
//! that share a NATS broker, a SQLite identity store and a token key. Two people use the client
//! library through `wss://localhost:PORT/`, land on different relays and talk across them.
//!
//! The nginx configuration is `examples/deploy/nginx.conf` itself, with only ports, file paths
//! and the temp prefix templated, so the example cannot rot without this test failing. Two
//! test-only additions model a proxy on its own host: `proxy_bind 127.0.0.2` (the relays see
//! the proxy as 127.0.0.2 and trust only that address, so the proxy's address and the clients'
//! 127.0.0.1 differ), and a plaintext loopback listener on the same server block, through which
//! a raw WebSocket probe sends a forged `X-Forwarded-For` header.
//!
//! The relay does not log client addresses, so the test observes the address it used through
//! the per-address connection limit: once the direct connections from 127.0.0.1 fill a relay's
//! budget, a proxied connection from 127.0.0.1 is refused (`too_many_connections`) even with a
//! forged header, while a proxied connection from 127.0.0.3 is served.
#![allow(clippy::unwrap_used)] // Test helpers fail loudly: that is how a test reports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use syncra_client::home::Settings;
use syncra_client::net::Push;
use syncra_client::{Client, Home, Incoming, InitOptions, SendState};
use syncra_core::crypto::keyfile::{KdfParams, write_private};
use syncra_core::transport::{Connection, Transport};
use syncra_core::wire::{DEFAULT_MAX_FRAME, ErrorCode, Frame};
use syncra_test_support::DEADLINE;
use syncra_test_support::process::{RelayProcess, free_port};
use syncra_test_support::servers::NatsServer;
use syncra_transport_ws::{WsConfig, WsTransport};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const PASS: &str = "pw for tests";
/// The example this test runs.
const EXAMPLE: &str = include_str!("../../examples/deploy/nginx.conf");
/// Where nginx connects to the relays from (`proxy_bind`): "another host" on loopback.
const PROXY_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Connections per client address each relay accepts here: room for the two people's
/// sessions, small enough to fill quickly.
const CONNECTIONS_PER_ADDRESS: usize = 4;

/// Certificate files for "localhost", signed by a CA of this test's own.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_certs(dir: &Path) -> Certs {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Syncra nginx test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let certs = Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("fullchain.pem"),
        key: dir.join("privkey.pem"),
    };
    std::fs::write(&certs.ca, ca_cert.pem()).unwrap();
    std::fs::write(&certs.cert, cert.pem()).unwrap();
    write_private(&certs.key, key.serialize_pem().as_bytes()).unwrap();
    certs
}

/// What the test fills into the example.
struct Template<'a> {
    prefix: &'a Path,
    certs: &'a Certs,
    relays: [u16; 2],
    tls_port: u16,
    plain_port: u16,
    as_root: bool,
}

/// `examples/deploy/nginx.conf` with ports, paths and the test-only lines filled in. Every
/// replaced line must be in the example: if the example changes, this fails and says which.
fn derive_config(t: &Template<'_>) -> String {
    let p = t.prefix.display();
    let mut conf = EXAMPLE.to_owned();
    let mut swap = |from: &str, to: String| {
        assert!(
            conf.contains(from),
            "examples/deploy/nginx.conf no longer contains {from:?}; update \
             host-client/tests/nginx.rs along with it"
        );
        conf = conf.replacen(from, &to, 1);
    };
    // As root, workers would otherwise run as www-data and could not use the temp prefix (0700,
    // owned by root). As another user nginx cannot switch users at all.
    swap(
        "user www-data;",
        if t.as_root { "user root;" } else { "" }.into(),
    );
    swap("pid /run/nginx.pid;", format!("pid {p}/nginx.pid;"));
    swap(
        "error_log /var/log/nginx/error.log warn;",
        format!("error_log {p}/error.log info;"),
    );
    swap(
        "access_log /var/log/nginx/access.log syncra;",
        format!(
            "access_log {p}/access.log syncra;\n    \
             client_body_temp_path {p}/tmp/body;\n    \
             proxy_temp_path {p}/tmp/proxy;\n    \
             fastcgi_temp_path {p}/tmp/fastcgi;\n    \
             uwsgi_temp_path {p}/tmp/uwsgi;\n    \
             scgi_temp_path {p}/tmp/scgi;"
        ),
    );
    swap("relay1:7443", format!("127.0.0.1:{}", t.relays[0]));
    swap("relay2:7443", format!("127.0.0.1:{}", t.relays[1]));
    swap(
        "include /etc/nginx/syncra-relays.d/*.conf;",
        format!("include {p}/relays.d/*.conf;"),
    );
    swap(
        "listen 443 ssl;",
        format!(
            "listen 127.0.0.1:{} ssl;\n        \
             # Test only: plaintext on loopback, for the raw X-Forwarded-For probe.\n        \
             listen 127.0.0.1:{};",
            t.tls_port, t.plain_port
        ),
    );
    swap("listen [::]:443 ssl;", String::new());
    swap(
        "/etc/nginx/tls/fullchain.pem",
        t.certs.cert.display().to_string(),
    );
    swap(
        "/etc/nginx/tls/privkey.pem",
        t.certs.key.display().to_string(),
    );
    swap(
        "proxy_pass http://syncra_relays;",
        format!(
            "proxy_pass http://syncra_relays;\n            \
             # Test only: connect to the relays from another loopback address.\n            \
             proxy_bind {PROXY_ADDR};"
        ),
    );
    conf
}

/// `nginx` from `PATH`, else Debian's `/usr/sbin/nginx` (not on a normal user's `PATH`).
fn nginx_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("nginx").is_file()))
        .unwrap_or(false);
    let sbin = Path::new("/usr/sbin/nginx");
    if !on_path && sbin.is_file() {
        sbin.to_path_buf()
    } else {
        PathBuf::from("nginx")
    }
}

/// A running `nginx` (master and workers), stopped when dropped.
struct Nginx {
    child: Child,
    prefix: PathBuf,
    tls_port: u16,
    plain_port: u16,
}

impl Nginx {
    fn start(prefix: &Path, certs: &Certs, relays: [u16; 2]) -> Nginx {
        std::fs::create_dir_all(prefix.join("tmp")).unwrap();
        std::fs::create_dir_all(prefix.join("relays.d")).unwrap();
        let as_root = std::fs::metadata(prefix).unwrap().uid() == 0;
        // Another test may take a free port between our probe and nginx's bind: try again.
        for attempt in 1..=3 {
            let (tls_port, plain_port) = (free_port(), free_port());
            let conf = derive_config(&Template {
                prefix,
                certs,
                relays,
                tls_port,
                plain_port,
                as_root,
            });
            let conf_path = prefix.join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let log = std::fs::File::create(prefix.join("stderr.log")).unwrap();
            let child = Command::new(nginx_binary())
                .arg("-p")
                .arg(prefix)
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(prefix.join("error.log"))
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn();
            let child = match child {
                Ok(child) => child,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "`nginx` was not found on PATH; apt-get install nginx-light \
                     (scripts/test.sh installs it; tests that need a real server never skip)"
                ),
                Err(e) => panic!("start nginx: {e}"),
            };
            let mut nginx = Nginx {
                child,
                prefix: prefix.to_path_buf(),
                tls_port,
                plain_port,
            };
            match nginx.wait_ready() {
                Ok(()) => return nginx,
                Err(why) if attempt < 3 => eprintln!("nginx: {why}; retrying on other ports"),
                Err(why) => panic!("{why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "nginx exited with {status} before listening; logs:\n{}",
                    self.logs()
                ));
            }
            let ready = [self.tls_port, self.plain_port].iter().all(|port| {
                let addr: SocketAddr = ([127, 0, 0, 1], *port).into();
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            if ready {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen in time; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("wss://localhost:{}/", self.tls_port)
    }

    fn logs(&self) -> String {
        ["stderr.log", "error.log", "access.log"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.prefix.join(name)).unwrap_or_default();
                format!("--- {name}\n{text}")
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits. SIGKILL only if it hangs, since
        // killing the master alone would leave the workers behind.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two relays with a shared broker, store and token key, behind a proxy at [`PROXY_ADDR`].
fn start_relays(root: &Path, nats: &NatsServer) -> [RelayProcess; 2] {
    let shared = root.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    // One token signing key for the cluster, made before either node starts.
    let key_file = shared.join("token-signing.key");
    let mut seed = [0u8; 32];
    syncra_core::crypto::fill_random(&mut seed);
    write_private(
        &key_file,
        format!("{}\n", data_encoding::BASE64.encode(&seed)).as_bytes(),
    )
    .unwrap();
    let store = shared.join("identities.db").display().to_string();
    let key_file = key_file.display().to_string();
    let broker = nats.url();
    let trusted = format!("[\"{PROXY_ADDR}\"]");
    let limit = CONNECTIONS_PER_ADDRESS.to_string();
    let env: Vec<(&str, &str)> = vec![
        ("SYNCRA_RELAY_ID", "nginx-test-cluster"),
        ("SYNCRA_BROKER__KIND", "nats"),
        ("SYNCRA_BROKER__URL", &broker),
        ("SYNCRA_STORE__KIND", "sqlite"),
        ("SYNCRA_STORE__PATH", &store),
        ("SYNCRA_AUTH__TOKEN_KEY_FILE", &key_file),
        ("SYNCRA_TRANSPORT__BEHIND_TLS_PROXY", "true"),
        ("SYNCRA_TRANSPORT__TRUSTED_PROXIES", &trusted),
        ("SYNCRA_LIMITS__CONNECTIONS_PER_ADDRESS", &limit),
        // The address check holds unauthenticated connections open for a moment.
        ("SYNCRA_LIMITS__HANDSHAKE_TIMEOUT_SECS", "60"),
        // "session started user=…" lines tell which relay served whom.
        ("SYNCRA_LOG", "info,syncra_relay=debug"),
        // Plain log lines, without colour sequences between a field's name and its value.
        ("NO_COLOR", "1"),
    ];
    [
        RelayProcess::start_with(&root.join("relay-a"), &env),
        RelayProcess::start_with(&root.join("relay-b"), &env),
    ]
}

/// How many sessions of `user` this relay has started so far.
fn sessions_of(relay: &RelayProcess, user: &Client) -> usize {
    let needle = format!("user={}", user.user_id().short());
    relay
        .log_text()
        .lines()
        .filter(|l| l.contains("session started") && l.contains(&needle))
        .count()
}

/// Which relay served the session `user` just started, given the counts from before.
async fn landed_on(relays: &[RelayProcess; 2], user: &Client, before: [usize; 2]) -> usize {
    let deadline = Instant::now() + DEADLINE;
    loop {
        for (i, relay) in relays.iter().enumerate() {
            if sessions_of(relay, user) > before[i] {
                return i;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no relay logged a new session for {}",
            user.user_id().short()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn counts(relays: &[RelayProcess; 2], user: &Client) -> [usize; 2] {
    [sessions_of(&relays[0], user), sessions_of(&relays[1], user)]
}

/// A person whose settings point at nginx and trust the test CA; registered, connected.
async fn person(root: &Path, handle: &str, url: &str, ca: &Path) -> Client {
    let home = Home::at(root.join(handle));
    home.ensure().unwrap();
    home.save_settings(&Settings {
        relay: Some(url.to_owned()),
        ca_file: Some(ca.to_path_buf()),
        ..Settings::default()
    })
    .unwrap();
    let mut client = Client::init(
        home,
        PASS,
        InitOptions {
            kdf: KdfParams::MINIMUM,
        },
    )
    .unwrap();
    client.register(url, handle).await.unwrap();
    client
}

/// Sends until the relay reports the message delivered: right after a login the other node's
/// broker subscription may still be settling, and the relay then truthfully says offline.
async fn send_delivered(from: &mut Client, to: &str, text: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let report = from.send_text(to, text).await.unwrap();
        if report.state == SendState::Delivered {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{text:?} to {to} was never delivered: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for a message with this text and returns its sender's name.
async fn expect_text(
    me: &mut Client,
    pushes: &mut tokio::sync::mpsc::Receiver<Push>,
    text: &str,
) -> String {
    loop {
        let push = tokio::time::timeout(DEADLINE, pushes.recv())
            .await
            .unwrap_or_else(|_| panic!("no message {text:?} in time"))
            .unwrap();
        let Push::Deliver(envelope) = push else {
            continue;
        };
        match me.receive(&envelope).await.unwrap() {
            Some(Incoming::Message {
                text: got,
                from_name,
                ..
            }) if got == text => return from_name,
            _ => continue,
        }
    }
}

/// What the first frame of a connection said.
#[derive(Debug, PartialEq, Eq)]
enum FirstWord {
    /// The relay sent its challenge: the connection was accepted.
    Challenge,
    /// The connection was closed at once with this error code.
    Refused(ErrorCode),
}

/// Connects with the WebSocket transport (TLS through nginx, or plaintext straight to a relay)
/// and reads the first frame. Returns the connection too, so the caller can hold it open.
async fn first_word(transport: &WsTransport, url: &str) -> (FirstWord, Connection) {
    let mut conn = transport.connect(url).await.unwrap();
    let word = match tokio::time::timeout(DEADLINE, conn.stream.recv())
        .await
        .unwrap()
    {
        Some(Ok(bytes)) => match Frame::decode(&bytes, DEFAULT_MAX_FRAME).unwrap() {
            Frame::Challenge { .. } => FirstWord::Challenge,
            other => panic!("expected a challenge, got {}", other.kind()),
        },
        Some(Err(e)) => panic!("{url}: {e}"),
        None => match conn.stream.close_reason().and_then(|r| r.code) {
            Some(code) => FirstWord::Refused(code),
            None => panic!("{url}: closed without a code"),
        },
    };
    (word, conn)
}

/// A hand-written WebSocket handshake through nginx's plaintext test listener, from a chosen
/// loopback source address, optionally with a forged `X-Forwarded-For`; reads the first frame.
async fn raw_probe(from: Ipv4Addr, port: u16, forged: Option<&str>) -> FirstWord {
    let probe = async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
        let stream = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        let mut stream = BufReader::new(stream);
        let mut request = format!(
            "GET / HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n"
        );
        if let Some(forged) = forged {
            request.push_str(&format!("X-Forwarded-For: {forged}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut status = String::new();
        stream.read_line(&mut status).await.unwrap();
        assert!(status.contains(" 101 "), "handshake answered {status:?}");
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            assert!(!line.is_empty(), "the response head ended early");
        }
        // One server frame: FIN/opcode, then an unmasked length.
        let opcode = stream.read_u8().await.unwrap() & 0x0f;
        let len = match stream.read_u8().await.unwrap() & 0x7f {
            126 => u64::from(stream.read_u16().await.unwrap()),
            127 => stream.read_u64().await.unwrap(),
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len).unwrap()];
        stream.read_exact(&mut payload).await.unwrap();
        match opcode {
            0x2 => match Frame::decode(&Bytes::from(payload), DEFAULT_MAX_FRAME).unwrap() {
                Frame::Challenge { .. } => FirstWord::Challenge,
                other => panic!("expected a challenge, got {}", other.kind()),
            },
            0x8 => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                assert!((4000..5000).contains(&code), "close code {code}");
                FirstWord::Refused(ErrorCode::from_u16(code - 4000))
            }
            other => panic!("unexpected WebSocket opcode {other:#x}"),
        }
    };
    tokio::time::timeout(DEADLINE, probe).await.unwrap()
}

#[test]
fn two_people_chat_through_nginx_over_two_relays() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let certs = make_certs(root);
    let nats = NatsServer::start();
    let relays = start_relays(root, &nats);
    let nginx = Nginx::start(
        &root.join("nginx"),
        &certs,
        [relays[0].port, relays[1].port],
    );
    let url = nginx.url();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Alice registers through nginx and stays connected.
        let mut alice = person(root, "alice", &url, &certs.ca).await;
        let alice_on = landed_on(&relays, &alice, [0, 0]).await;
        let mut alice_pushes = alice.take_pushes().unwrap();

        // Bob registers, then reconnects (resuming with his token through nginx, on whichever
        // node it picks) until he is on the other relay than Alice.
        let mut bob = person(root, "bob", &url, &certs.ca).await;
        let mut bob_pushes = bob.take_pushes().unwrap();
        let mut bob_on = landed_on(&relays, &bob, [0, 0]).await;
        let mut reconnects = 0;
        while bob_on == alice_on {
            reconnects += 1;
            assert!(
                reconnects <= 8,
                "nginx sent every connection to relay {alice_on}; access log:\n{}",
                nginx.logs()
            );
            let before = counts(&relays, &bob);
            bob.disconnect().await;
            bob.connect().await.unwrap();
            bob_on = landed_on(&relays, &bob, before).await;
        }
        eprintln!("alice on relay {alice_on}, bob on relay {bob_on} ({reconnects} reconnects)");

        // Messages cross from one relay to the other through NATS, both ways.
        alice.add_contact("bob").await.unwrap();
        bob.add_contact("alice").await.unwrap();
        send_delivered(&mut alice, "bob", "hello bob, via nginx").await;
        assert_eq!(
            expect_text(&mut bob, &mut bob_pushes, "hello bob, via nginx").await,
            "alice"
        );
        send_delivered(&mut bob, "alice", "hi alice, other relay").await;
        assert_eq!(
            expect_text(&mut alice, &mut alice_pushes, "hi alice, other relay").await,
            "bob"
        );

        // A reconnect through nginx (token resume on either node) keeps working.
        let before = counts(&relays, &bob);
        bob.disconnect().await;
        bob.connect().await.unwrap();
        let again = landed_on(&relays, &bob, before).await;
        send_delivered(&mut alice, "bob", "still there?").await;
        expect_text(&mut bob, &mut bob_pushes, "still there?").await;
        eprintln!("bob reconnected to relay {again}");

        // The relays saw ciphertext only.
        for relay in &relays {
            let log = relay.log_text();
            assert!(!log.contains("hello bob"), "{log}");
            assert!(!log.contains("other relay"), "{log}");
        }

        // Which address do the relays charge a proxied connection to? Fill each relay's budget
        // for 127.0.0.1 with direct connections (the relay does not trust 127.0.0.1, so these
        // count as 127.0.0.1 whatever they send).
        let plain = WsTransport::new(WsConfig::default()).unwrap();
        let mut held = Vec::new();
        for relay in &relays {
            let mut filled = false;
            for _ in 0..=CONNECTIONS_PER_ADDRESS {
                let (word, conn) = first_word(&plain, &relay.url()).await;
                match word {
                    FirstWord::Challenge => held.push(conn),
                    FirstWord::Refused(code) => {
                        assert_eq!(code, ErrorCode::TooManyConnections);
                        filled = true;
                        break;
                    }
                }
            }
            assert!(filled, "relay on port {} never refused", relay.port);
        }
        // Through nginx (TLS, the example's listener) from 127.0.0.1: the relays take the
        // address nginx appended to X-Forwarded-For, 127.0.0.1, which is full. Had they
        // charged the proxy's own address (127.0.0.2) these would be served.
        let tls = syncra_client::net::transport(Some(certs.ca.clone())).unwrap();
        for _ in 0..2 {
            let (word, _conn) = first_word(&tls, &url).await;
            assert_eq!(
                word,
                FirstWord::Refused(ErrorCode::TooManyConnections),
                "a proxied connection from 127.0.0.1 must count as 127.0.0.1"
            );
        }
        // A forged header does not help: nginx appends the real address on the same line,
        // and the relay reads the right-most entry.
        assert_eq!(
            raw_probe(Ipv4Addr::LOCALHOST, nginx.plain_port, Some("198.51.100.7")).await,
            FirstWord::Refused(ErrorCode::TooManyConnections),
            "a forged X-Forwarded-For entry must be ignored"
        );
        // Another real client address has its own budget: the forwarded address is what the
        // relay uses, not the proxy's.
        assert_eq!(
            raw_probe(Ipv4Addr::new(127, 0, 0, 3), nginx.plain_port, None).await,
            FirstWord::Challenge,
            "a proxied connection from 127.0.0.3 must be served; nginx logs:\n{}",
            nginx.logs()
        );
        drop(held);
        alice.disconnect().await;
        bob.disconnect().await;
    });
}
