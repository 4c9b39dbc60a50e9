//! Real PostgreSQL servers for tests: Debian's `initdb` and `postgres`, started in a temp dir on
//! a free port, stopped and restarted by tests that need the database to go away and come back.
//!
//! Each server is a fresh cluster with one superuser, [`USER`], allowed in by `trust` on
//! loopback only, so tests never need a password (a password in a URL is accepted and ignored,
//! which the redaction tests use). [`PostgresServer::start_tls`] adds a throwaway CA and a
//! server certificate for the name `localhost` (not for `127.0.0.1`, so a test can show that
//! `verify-full` checks the name) and allows TLS connections only, which is how Neon and other
//! managed Postgres services are reached.
//!
//! Why `initdb`/`postgres` directly and not a system service: every test gets its own cluster,
//! can kill it, and leaves nothing behind. A missing binary is a panic that says how to install
//! it, never a skip: a store that was not tested must not look like one that passed.
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI does), the cluster's
//! directory is handed to the `postgres` system user (created by Debian's `postgresql` package)
//! and `initdb`/`postgres` are spawned with that user's uid and gid. The server is spawned
//! directly, not through `runuser` or `su`, so the child this struct holds is the postmaster
//! itself and signals reach it (`runuser` would stay in between as a watching parent that a
//! SIGKILL would remove while leaving the server running).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::free_port;

/// The superuser of every test cluster; URLs from [`PostgresServer::url`] log in as it.
pub const USER: &str = "syncra";

/// The database URLs point at (the one `initdb` creates).
pub const DATABASE: &str = "postgres";

/// How long a server may take to start or stop. Generous: a cold start on a loaded two-core CI
/// machine with several clusters starting at once can take seconds.
const SERVER_DEADLINE: Duration = Duration::from_secs(30);

/// How many free ports a new server tries before giving up.
const PORT_ATTEMPTS: u32 = 3;

/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(50);

const INSTALL_HINT: &str = "install the PostgreSQL server with `apt-get install postgresql` \
     (Debian/Ubuntu; scripts/test.sh does this) or put a directory with initdb and postgres on \
     PATH";

/// A PostgreSQL server of this test's own. Killed (and its files removed) on drop.
#[derive(Debug)]
pub struct PostgresServer {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    owner: Option<Owner>,
    ca_cert: Option<PathBuf>,
    child: Option<Child>,
    /// Frozen by [`PostgresServer::pause`].
    paused: bool,
}

/// The unprivileged user the server runs as when the tests run as root.
#[derive(Clone, Copy, Debug)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl PostgresServer {
    /// A fresh cluster accepting plain TCP connections from loopback.
    ///
    /// # Panics
    ///
    /// If the PostgreSQL binaries are missing (the message says how to install them), or the
    /// server does not start; the panic carries the server's log.
    pub fn start() -> PostgresServer {
        Self::start_with(false)
    }

    /// A fresh cluster that accepts TLS connections only (`hostssl` in `pg_hba.conf`), with a
    /// server certificate for the name `localhost` (only) issued by a throwaway CA, whose
    /// certificate is at [`PostgresServer::ca_cert`]. [`PostgresServer::url`] asks for
    /// `sslmode=verify-full`.
    ///
    /// # Panics
    ///
    /// As [`PostgresServer::start`].
    pub fn start_tls() -> PostgresServer {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> PostgresServer {
        let bin = server_bindir();
        let dir = tempfile::Builder::new()
            .prefix("syncra-pg-")
            .tempdir()
            .expect("create a temp dir for the test cluster");
        let owner = unprivileged_owner(dir.path());
        if let Some(owner) = owner {
            chown(dir.path(), owner);
        }
        let mut server = PostgresServer {
            dir,
            bin,
            port: free_port(),
            owner,
            ca_cert: None,
            child: None,
            paused: false,
        };
        server.initdb();
        if tls {
            server.ca_cert = Some(server.write_certificates());
        }
        server.configure();
        // The free port is only free until someone takes it; another test's server starting at
        // the same moment may. Then pick another one rather than fail.
        for attempt in 1.. {
            match server.try_spawn() {
                Ok(()) => break,
                Err(log) if attempt < PORT_ATTEMPTS && log.contains("could not bind") => {
                    server.port = free_port();
                    append(
                        &server.data_dir().join("postgresql.conf"),
                        &format!("port = {}\n", server.port),
                    );
                }
                Err(log) => panic!("{log}"),
            }
        }
        server
    }

    /// The URL of the test database, for the trust-authenticated [`USER`]: plain TCP to
    /// `127.0.0.1` with `sslmode=disable`, or for a TLS server `localhost` (a name, as a managed
    /// service has) with `sslmode=verify-full`; pass [`PostgresServer::ca_cert`] as the root.
    pub fn url(&self) -> String {
        if self.ca_cert.is_some() {
            format!(
                "postgres://{USER}@localhost:{}/{DATABASE}?sslmode=verify-full",
                self.port
            )
        } else {
            format!(
                "postgres://{USER}@127.0.0.1:{}/{DATABASE}?sslmode=disable",
                self.port
            )
        }
    }

    /// The port the server listens on (the same across [`PostgresServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA certificate (PEM) that issued a TLS server's certificate; `None` without TLS.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the server with a fast shutdown (running sessions are ended, data is kept) and
    /// waits for it to exit. Does nothing if it is not running.
    ///
    /// # Panics
    ///
    /// If the server cannot be signalled.
    pub fn stop(&mut self) {
        self.shut_down("INT");
    }

    /// Crashes the server: an immediate shutdown (SIGQUIT), in which the postmaster and its
    /// backends exit at once without a checkpoint and without writing what is still in their
    /// buffers; the next start runs crash recovery from the WAL on disk. This is what a crash
    /// of the database process looks like (a bare SIGKILL of the postmaster would leave its
    /// backends running and the data directory in use).
    ///
    /// The test cluster runs with `synchronous_commit = off`, so only a write that asked for
    /// a synchronous commit itself is sure to survive this.
    pub fn crash(&mut self) {
        self.shut_down("QUIT");
    }

    /// Starts the server again on the same port with the same data, waiting until it accepts
    /// connections. Stops it first if it is running.
    ///
    /// # Panics
    ///
    /// As [`PostgresServer::start`].
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes the server and every backend (SIGSTOP): connections stay open and every query
    /// waits, as with a database that hangs. [`PostgresServer::resume`] undoes it (and so does
    /// drop).
    ///
    /// # Panics
    ///
    /// If the server is not running or cannot be signalled.
    pub fn pause(&mut self) {
        self.signal_all("STOP");
        self.paused = true;
    }

    /// Lets a [`PostgresServer::pause`]d server run again (SIGCONT).
    ///
    /// # Panics
    ///
    /// If the server cannot be signalled.
    pub fn resume(&mut self) {
        self.signal_all("CONT");
        self.paused = false;
    }

    /// Sends `signal` to the postmaster and every process it started (the backends).
    fn signal_all(&mut self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is running").id();
        let mut pids = vec![pid.to_string()];
        for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
            let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...: the fields after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .args(&pids)
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "could not send SIG{signal} to the test PostgreSQL server"
        );
    }

    /// The server's log so far (both runs, across restarts).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command for a server binary, run as the unprivileged owner when we are root, in the
    /// cluster's directory (a root-only working directory would make the server warn).
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        if let Some(owner) = self.owner {
            // std also drops root's supplementary groups when it changes the uid.
            cmd.uid(owner.uid).gid(owner.gid);
        }
        cmd
    }

    fn initdb(&self) {
        let log = self.dir.path().join("initdb.log");
        let out = fs::File::create(&log).expect("create initdb.log");
        let status = self
            .command("initdb")
            .arg("--pgdata")
            .arg(self.data_dir())
            .args(["--username", USER, "--auth", "trust"])
            .args(["--encoding", "UTF8", "--locale", "C", "--no-sync"])
            .stdout(out.try_clone().expect("clone initdb.log handle"))
            .stderr(out)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.join("initdb").display()));
        assert!(
            status.success(),
            "initdb failed with {status}; output:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Writes a CA, a server certificate and its key into the cluster's directory and returns
    /// the CA certificate's path.
    fn write_certificates(&self) -> PathBuf {
        let ca_key = rcgen::KeyPair::generate().expect("generate the test CA key");
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("test CA parameters");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Syncra test CA");
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .expect("self-sign the test CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let key = rcgen::KeyPair::generate().expect("generate the test server key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("test server certificate parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let cert = params
            .signed_by(&key, &issuer)
            .expect("sign the test server certificate");

        let ca_path = self.dir.path().join("ca.crt");
        fs::write(&ca_path, ca_cert.pem()).expect("write ca.crt");
        let cert_path = self.dir.path().join("server.crt");
        fs::write(&cert_path, cert.pem()).expect("write server.crt");
        // PostgreSQL refuses a key that others can read, and wants it owned by its own user.
        let key_path = self.dir.path().join("server.key");
        fs::write(&key_path, key.serialize_pem()).expect("write server.key");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))
            .expect("make server.key private");
        if let Some(owner) = self.owner {
            for path in [&ca_path, &cert_path, &key_path] {
                chown(path, owner);
            }
        }
        ca_path
    }

    /// Settings for a disposable loopback cluster, appended to `postgresql.conf` so they hold
    /// across restarts, and a `pg_hba.conf` that lets [`USER`] in from loopback only (over TLS
    /// only, for a TLS server).
    fn configure(&self) {
        let data = self.data_dir();
        let mut conf = format!(
            "\n# Added by syncra-test-support.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = ''\n\
             shared_buffers = 16MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
            port = self.port
        );
        let hba_type = if self.ca_cert.is_some() {
            let dir = self.dir.path();
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                dir.join("server.crt").display(),
                dir.join("server.key").display()
            ));
            "hostssl"
        } else {
            "host"
        };
        append(&data.join("postgresql.conf"), &conf);
        // Writing over the existing files keeps their owner.
        fs::write(
            data.join("pg_hba.conf"),
            format!(
                "# TYPE DATABASE USER ADDRESS METHOD\n\
                 {hba_type} all all 127.0.0.1/32 trust\n\
                 {hba_type} all all ::1/128 trust\n"
            ),
        )
        .expect("write pg_hba.conf");
    }

    fn spawn(&mut self) {
        if let Err(why) = self.try_spawn() {
            panic!("{why}");
        }
    }

    /// Starts the server and waits until it accepts connections; if it exits first, says why
    /// with its log.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open postgres.log");
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .stdout(log.try_clone().expect("clone postgres.log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.join("postgres").display()));
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls `pg_isready` until the server accepts connections, failing early with the log if
    /// the server exits.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + SERVER_DEADLINE;
        let port = self.port.to_string();
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "postgres exited with {status} before accepting connections; log:\n{}",
                    self.log_text()
                ));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["--host", "127.0.0.1", "--port", &port])
                .args(["--username", USER, "--dbname", DATABASE, "--timeout", "1"])
                .arg("--quiet")
                .stdin(Stdio::null())
                .status()
                .unwrap_or_else(|e| {
                    panic!("cannot run {}: {e}", self.bin.join("pg_isready").display())
                });
            if ready.success() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections on port {port} within {SERVER_DEADLINE:?}; \
                 log:\n{}",
                self.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` to the postmaster and waits for it to exit; SIGKILL if it takes too long.
    /// INT is PostgreSQL's fast shutdown, QUIT its immediate shutdown.
    fn shut_down(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        // std can only SIGKILL; `kill` sends the signal that lets the postmaster end its
        // backends and release shared memory, so a restart on the same data starts cleanly.
        let signalled = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + SERVER_DEADLINE;
        while signalled && Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.paused {
            self.signal_all("CONT");
        }
        self.shut_down("QUIT");
    }
}

/// The directory with `initdb`, `postgres` and `pg_isready`: `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/<version>/bin` (Debian's layout, not on PATH), else PATH.
fn server_bindir() -> PathBuf {
    let has_server = |dir: &Path| {
        ["initdb", "postgres", "pg_isready"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    let mut looked = Vec::new();

    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return dir;
        }
        looked.push(dir);
    }

    let debian = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(debian)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return dir;
    }
    looked.push(debian.join("<version>/bin"));

    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if has_server(&dir) {
            return dir;
        }
    }
    looked.push("PATH".into());

    panic!(
        "PostgreSQL server binaries (initdb, postgres, pg_isready) not found in {}; {INSTALL_HINT}",
        looked
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// `None` when we are not root; when we are (the temp dir we just made is owned by uid 0), the
/// `postgres` system user to run the server as.
fn unprivileged_owner(our_dir: &Path) -> Option<Owner> {
    let ours = fs::metadata(our_dir).expect("stat the temp dir").uid();
    if ours != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run `id` to find the postgres user");
        assert!(
            out.status.success(),
            "the tests run as root, which PostgreSQL refuses, and there is no `postgres` user to \
             run it as; {INSTALL_HINT} (the package creates the user)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("`id` prints a number")
    };
    Some(Owner {
        uid: id("-u"),
        gid: id("-g"),
    })
}

fn chown(path: &Path, owner: Owner) {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
        .unwrap_or_else(|e| panic!("chown {} to the postgres user: {e}", path.display()));
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
