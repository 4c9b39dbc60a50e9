//! Real relay processes: the `syncra-relay` binary started on a free port with its own data
//! directory, killed and restarted by tests that need a relay to go away and come back.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::DEADLINE;

/// A free loopback port (bound, then released for the process to take).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// The `syncra-relay` binary next to the running test's target directory. A workspace test
/// run builds it; a lone `cargo test -p syncra-client` may not, so it is built on demand.
pub fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/syncra-relay
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    let bin = dir.join(format!("syncra-relay{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "syncra-relay", "--bin", "syncra-relay"])
            .status()
            .expect("run cargo build for syncra-relay");
        assert!(status.success(), "building syncra-relay failed");
    }
    assert!(
        bin.exists(),
        "syncra-relay binary not found at {}",
        bin.display()
    );
    bin
}

/// A `syncra-relay` process.
#[derive(Debug)]
pub struct RelayProcess {
    child: Option<Child>,
    /// The port clients connect to.
    pub port: u16,
    /// The data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// The log file.
    pub log: PathBuf,
    extra_env: Vec<(String, String)>,
}

impl RelayProcess {
    /// Starts a relay with its data in `data_dir` on a free port.
    pub fn start(data_dir: &Path) -> RelayProcess {
        Self::start_with(data_dir, &[])
    }

    /// Starts a relay with extra `SYNCRA_*` settings.
    pub fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> RelayProcess {
        Self::start_on(data_dir, free_port(), env)
    }

    /// Starts a relay on a port chosen in advance (for settings that name its URL).
    pub fn start_on(data_dir: &Path, port: u16, env: &[(&str, &str)]) -> RelayProcess {
        let mut r = RelayProcess {
            child: None,
            port,
            data_dir: data_dir.to_path_buf(),
            log: data_dir.with_extension("log"),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        r.spawn();
        r
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open relay log");
        let mut cmd = Command::new(relay_binary());
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SYNCRA_DATA_DIR", &self.data_dir)
            .env("SYNCRA_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("SYNCRA_ADMIN_LISTEN", "")
            .env("SYNCRA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start syncra-relay"));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + DEADLINE;
        loop {
            // A probe from an ephemeral port equal to the target port connects to itself when
            // nothing listens (TCP simultaneous open): that is not the relay.
            if let Ok(probe) = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                && probe.local_addr().is_ok_and(|a| a.port() != self.port)
            {
                return;
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "syncra-relay exited with {status} before listening; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "syncra-relay did not listen on {addr} in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (SIGKILL: no drain) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The relay's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
