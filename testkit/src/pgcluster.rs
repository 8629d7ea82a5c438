//! Throwaway PostgreSQL clusters for `citapulse demo`, tests and benchmarks.
//!
//! [`PgCluster::start`] runs the machine's `initdb` into a fresh temporary
//! directory and starts `postgres` directly on a free loopback port, with its
//! Unix socket in that same directory so nothing collides with a system
//! server. The default settings trade durability for speed (`fsync=off` and
//! friends). PostgreSQL refuses to run as root, so when we are root both
//! binaries run as the `postgres` system user. The postmaster is spawned from
//! one long-lived thread with `PR_SET_PDEATHSIG`, so it dies with this process
//! even if we crash; dropping a [`PgCluster`] shuts it down immediately and
//! removes the directory.

use std::ffi::CString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::process::{free_port, running_as_root, send_signal, set_parent_death_signal};

const HOST: &str = "127.0.0.1";
const SUPERUSER: &str = "postgres";
const PG_LIB_DIR: &str = "/usr/lib/postgresql";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const DROP_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const START_ATTEMPTS: u32 = 3;
const TAIL_LINES: usize = 30;
const TAIL_BYTES: u64 = 64 * 1024;

/// Server settings chosen for test speed; `ClusterOptions::settings` come after and override them.
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", HOST),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
    ("shared_buffers", "128MB"),
    // WAL capture tests stream logical slots (one per test database).
    ("wal_level", "logical"),
    ("max_replication_slots", "64"),
    ("max_wal_senders", "64"),
];

/// A running throwaway PostgreSQL server with its own data directory.
#[derive(Debug)]
pub struct PgCluster {
    postgres_bin: PathBuf,
    initdb_bin: PathBuf,
    run_as: Option<RunAs>,
    base_dir: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    settings: Vec<(String, String)>,
    keep: bool,
    child: Option<Child>,
}

/// Options for [`PgCluster::start`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra `-c name=value` server settings, e.g. ("fsync","off").
    pub settings: Vec<(String, String)>,
    /// Keep the data directory on drop (for debugging).
    pub keep: bool,
}

/// Errors from starting, stopping or using a throwaway cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The `postgres` and `initdb` server binaries could not be found.
    #[error(
        "PostgreSQL server binaries (`postgres` and `initdb`) not found: looked on PATH ({path}) \
         and in /usr/lib/postgresql/*/bin; install them with `apt-get install postgresql`"
    )]
    BinariesNotFound {
        /// The PATH that was searched.
        path: String,
    },
    /// We run as root but there is no `postgres` system user to run the server as.
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `postgres` \
         system user to run it as; install PostgreSQL with `apt-get install postgresql` \
         or create the user (e.g. `useradd --system --user-group postgres`)"
    )]
    NoPostgresUser,
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `initdb` exited unsuccessfully.
    #[error("initdb failed ({status}); output tail:\n{output_tail}")]
    InitdbFailed {
        /// Its exit status.
        status: String,
        /// The last lines of its stderr (or stdout if stderr was empty).
        output_tail: String,
    },
    /// The server exited or could not be spawned before accepting connections.
    #[error("postgres failed to start: {reason}; tail of {log_path}:\n{log_tail}")]
    StartFailed {
        /// Why we consider the start failed.
        reason: String,
        /// The server log file.
        log_path: String,
        /// The last lines the server wrote to its log during this start.
        log_tail: String,
    },
    /// Waiting for the server timed out.
    #[error("timed out after {secs} s waiting for {what}; log tail:\n{log_tail}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited, in seconds.
        secs: u64,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// A SQL command against the cluster failed.
    #[error("{context}: {detail}")]
    Sql {
        /// What we were doing.
        context: String,
        /// The error with its full cause chain.
        detail: String,
        /// The underlying error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ClusterError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }

    fn sql(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        ClusterError::Sql {
            context: context.into(),
            detail: error_chain(&source),
            source,
        }
    }

    /// Whether this is a start failure caused by the port being taken (a free-port race).
    fn is_bind_failure(&self) -> bool {
        match self {
            ClusterError::StartFailed { log_tail, .. } => {
                log_tail.contains("could not bind")
                    || log_tail.contains("could not create any TCP/IP sockets")
                    || log_tail.contains("Address already in use")
            }
            _ => false,
        }
    }
}

impl PgCluster {
    /// Finds binaries, runs initdb into a fresh temp dir, starts postgres on a free loopback port, waits until it accepts connections.
    pub async fn start(opts: ClusterOptions) -> Result<PgCluster, ClusterError> {
        let started = Instant::now();
        let (postgres_bin, initdb_bin) = find_binaries()?;
        let run_as = if running_as_root() {
            Some(lookup_user(SUPERUSER)?.ok_or(ClusterError::NoPostgresUser)?)
        } else {
            None
        };
        let base_dir = create_temp_dir(run_as)?;
        // From here on `cluster`'s Drop cleans up the directory (and server) on any error.
        let mut cluster = PgCluster {
            postgres_bin,
            initdb_bin,
            run_as,
            data_dir: base_dir.join("data"),
            log_path: base_dir.join("postgres.log"),
            base_dir,
            port: 0,
            settings: opts.settings,
            keep: opts.keep,
            child: None,
        };
        debug!(dir = %cluster.base_dir.display(), postgres = %cluster.postgres_bin.display(), "pgcluster: running initdb");
        cluster.initdb().await?;
        debug!(
            elapsed_ms = started.elapsed().as_millis(),
            "pgcluster: initdb done"
        );

        let mut attempt = 1;
        loop {
            cluster.port = free_port()
                .map_err(|e| ClusterError::io("binding 127.0.0.1:0 to find a free port", e))?;
            match cluster.launch().await {
                Ok(()) => break,
                Err(e) if attempt < START_ATTEMPTS && e.is_bind_failure() => {
                    debug!(
                        port = cluster.port,
                        attempt, "pgcluster: port taken, retrying on another port"
                    );
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
        debug!(
            port = cluster.port,
            dir = %cluster.base_dir.display(),
            elapsed_ms = started.elapsed().as_millis(),
            "pgcluster: server ready"
        );
        Ok(cluster)
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host the server listens on (always `127.0.0.1`).
    pub fn host(&self) -> &str {
        HOST
    }

    /// A libpq-style URL: postgres://postgres@127.0.0.1:PORT/DBNAME.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{HOST}:{}/{}",
            self.port,
            percent_encode(dbname)
        )
    }

    /// Keeps the cluster for the rest of the process (one shared by a test binary's tests),
    /// then shuts it down and removes its directory when the process exits normally. A
    /// cluster held in a `static` is never dropped: its postmaster dies with the process, but
    /// its directory (~300 MB after a test binary's databases) would stay in `$TMPDIR`.
    #[allow(unsafe_code)]
    pub fn drop_at_exit(self) {
        static REGISTER: std::sync::Once = std::sync::Once::new();
        AT_EXIT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self);
        REGISTER.call_once(|| {
            // SAFETY: registers a plain `extern "C"` function with no preconditions; it runs
            // once, from `exit`, after `main` has returned.
            if unsafe { libc::atexit(drop_clusters_at_exit) } != 0 {
                warn!("pgcluster: could not register the at-exit cleanup");
            }
        });
    }

    /// The cluster's data directory (inside the temporary directory).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file (stdout and stderr of the postmaster).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Stops the server (fast shutdown, terminating client sessions) and starts it again on the same port and data dir; waits until ready.
    pub async fn restart(&mut self) -> Result<(), ClusterError> {
        let started = Instant::now();
        self.stop().await?;
        self.launch().await?;
        debug!(
            port = self.port,
            elapsed_ms = started.elapsed().as_millis(),
            "pgcluster: restarted"
        );
        Ok(())
    }

    /// Stops the server (fast shutdown), waits for exit.
    pub async fn stop(&mut self) -> Result<(), ClusterError> {
        self.terminate(libc::SIGINT, STOP_TIMEOUT).await
    }

    /// Creates a database with the given name, connecting as the superuser to `postgres`.
    pub async fn create_database(&self, name: &str) -> Result<(), ClusterError> {
        let (client, conn) = connect(self.port, "postgres")
            .await
            .map_err(|e| ClusterError::sql(format!("connecting to {}", self.url("postgres")), e))?;
        let result = client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .map_err(|e| ClusterError::sql(format!("CREATE DATABASE {}", quote_ident(name)), e));
        drop(client);
        let _ = conn.await;
        result?;
        debug!(name, port = self.port, "pgcluster: created database");
        Ok(())
    }

    async fn initdb(&self) -> Result<(), ClusterError> {
        let mut cmd = Command::new(&self.initdb_bin);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args([
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .current_dir(&self.base_dir)
            .env("LC_ALL", "C");
        if let Some(u) = self.run_as {
            cmd.uid(u.uid).gid(u.gid);
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let out = cmd
            .output()
            .await
            .map_err(|e| ClusterError::io(format!("running {}", self.initdb_bin.display()), e))?;
        if !out.status.success() {
            let stream = if out.stderr.iter().all(u8::is_ascii_whitespace) {
                &out.stdout
            } else {
                &out.stderr
            };
            return Err(ClusterError::InitdbFailed {
                status: out.status.to_string(),
                output_tail: tail_lines(&String::from_utf8_lossy(stream)),
            });
        }
        Ok(())
    }

    /// Spawns the postmaster on `self.port` and waits until it accepts connections.
    async fn launch(&mut self) -> Result<(), ClusterError> {
        let log_offset = self.spawn_postmaster().await?;
        match self.wait_ready(log_offset).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Err(kill_err) = self.terminate(libc::SIGQUIT, KILL_TIMEOUT).await {
                    warn!(error = %kill_err, "pgcluster: could not stop failed server");
                }
                Err(e)
            }
        }
    }

    /// Spawns the postmaster; returns the log file length before the spawn.
    async fn spawn_postmaster(&mut self) -> Result<u64, ClusterError> {
        let log_ctx = || format!("opening {}", self.log_path.display());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| ClusterError::io(log_ctx(), e))?;
        let log_offset = log
            .metadata()
            .map_err(|e| ClusterError::io(log_ctx(), e))?
            .len();
        let log_err = log
            .try_clone()
            .map_err(|e| ClusterError::io(log_ctx(), e))?;

        let mut cmd = Command::new(&self.postgres_bin);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.base_dir);
        let defaults = DEFAULT_SETTINGS.iter().map(|&(k, v)| (k, v));
        let extra = self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (name, value) in defaults.chain(extra) {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .current_dir(&self.base_dir)
            .env("LC_ALL", "C")
            // Own process group: a terminal Ctrl-C reaches us, and we decide how the server stops.
            .process_group(0);
        if let Some(u) = self.run_as {
            cmd.uid(u.uid).gid(u.gid);
        }
        // Immediate shutdown when the spawner thread (alive as long as we are) dies.
        set_parent_death_signal(&mut cmd, libc::SIGQUIT);

        let child =
            spawn_from_spawner_thread(cmd)
                .await
                .map_err(|e| ClusterError::StartFailed {
                    reason: format!("could not spawn {}: {e}", self.postgres_bin.display()),
                    log_path: self.log_path.display().to_string(),
                    log_tail: String::new(),
                })?;
        debug!(
            pid = child.id(),
            port = self.port,
            "pgcluster: spawned postmaster"
        );
        self.child = Some(child);
        Ok(log_offset)
    }

    async fn wait_ready(&mut self, log_offset: u64) -> Result<(), ClusterError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(self.start_failed("server is not running".to_owned(), log_offset));
            };
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Err(
                        self.start_failed(format!("postgres exited with {status}"), log_offset)
                    );
                }
                Ok(None) => {}
                Err(e) => return Err(ClusterError::io("waiting for postgres", e)),
            }
            match tokio::time::timeout(CONNECT_TIMEOUT, connect(self.port, "postgres")).await {
                Ok(Ok((client, conn))) => {
                    drop(client);
                    let _ = conn.await;
                    return Ok(());
                }
                Ok(Err(e)) => debug!(error = %error_chain(&e), "pgcluster: not ready yet"),
                Err(_) => debug!("pgcluster: connection attempt timed out"),
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout {
                    what: format!("postgres to accept connections on port {}", self.port),
                    secs: READY_TIMEOUT.as_secs(),
                    log_tail: read_log_tail(&self.log_path, log_offset),
                });
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
    }

    fn start_failed(&self, reason: String, log_offset: u64) -> ClusterError {
        ClusterError::StartFailed {
            reason,
            log_path: self.log_path.display().to_string(),
            log_tail: read_log_tail(&self.log_path, log_offset),
        }
    }

    /// Sends `signal` to the postmaster and waits for it to exit, escalating to SIGKILL after `timeout`.
    async fn terminate(
        &mut self,
        signal: libc::c_int,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = child.id();
        if let Err(e) = send_signal(pid, signal) {
            debug!(pid, error = %e, "pgcluster: could not signal postmaster");
        }
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    debug!(pid, %status, "pgcluster: postmaster exited");
                    self.child = None;
                    return Ok(());
                }
                Ok(None) => {}
                Err(e) => return Err(ClusterError::io(format!("waiting for postmaster {pid}"), e)),
            }
            if Instant::now() >= deadline {
                warn!(
                    pid,
                    secs = timeout.as_secs(),
                    "pgcluster: postmaster did not exit in time; killing it"
                );
                let _ = child.kill();
                let result = child.wait();
                self.child = None;
                return result.map(|_| ()).map_err(|e| {
                    ClusterError::io(format!("waiting for killed postmaster {pid}"), e)
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Clusters handed to [`PgCluster::drop_at_exit`].
static AT_EXIT: Mutex<Vec<PgCluster>> = Mutex::new(Vec::new());

extern "C" fn drop_clusters_at_exit() {
    let clusters = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(PoisonError::into_inner));
    drop(clusters);
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            // Immediate shutdown: the postmaster kills its backends and exits without a checkpoint.
            if let Err(e) = send_signal(pid, libc::SIGQUIT) {
                debug!(pid, error = %e, "pgcluster: could not signal postmaster");
            }
            let deadline = Instant::now() + DROP_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        warn!(pid, "pgcluster: postmaster ignored SIGQUIT; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(POLL_INTERVAL),
                }
            }
        }
        if self.keep {
            debug!(dir = %self.base_dir.display(), "pgcluster: keeping cluster directory");
            return;
        }
        let mut result = std::fs::remove_dir_all(&self.base_dir);
        if result.is_err() {
            // A straggling backend may still have been writing; try once more.
            std::thread::sleep(Duration::from_millis(100));
            result = std::fs::remove_dir_all(&self.base_dir);
        }
        match result {
            Ok(()) => {
                debug!(dir = %self.base_dir.display(), "pgcluster: removed cluster directory")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %self.base_dir.display(), error = %e, "pgcluster: could not remove cluster directory")
            }
        }
    }
}

/// The OS user the server binaries run as when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// Finds `postgres` and `initdb`: on PATH first, else in the newest `/usr/lib/postgresql/*/bin`.
fn find_binaries() -> Result<(PathBuf, PathBuf), ClusterError> {
    if let (Some(postgres), Some(initdb)) = (find_on_path("postgres"), find_on_path("initdb")) {
        return Ok((postgres, initdb));
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(PG_LIB_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            (is_executable(&bin.join("postgres")) && is_executable(&bin.join("initdb")))
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok((bin.join("postgres"), bin.join("initdb"))),
        None => Err(ClusterError::BinariesNotFound {
            path: std::env::var("PATH").unwrap_or_default(),
        }),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Creates `$TMPDIR/citapulse-pg-<pid>-<counter>-<random>` (mode 0700), owned by `run_as` if given.
fn create_temp_dir(run_as: Option<RunAs>) -> Result<PathBuf, ClusterError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let tmp = std::env::temp_dir();
    let mut last_err = None;
    for _ in 0..16 {
        let name = format!(
            "citapulse-pg-{}-{}-{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let dir = tmp.join(name);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                if let Some(u) = run_as
                    && let Err(e) = std::os::unix::fs::chown(&dir, Some(u.uid), Some(u.gid))
                {
                    let _ = std::fs::remove_dir(&dir);
                    return Err(ClusterError::io(
                        format!("chown {} to the postgres user", dir.display()),
                        e,
                    ));
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(ClusterError::io(format!("creating {}", dir.display()), e)),
        }
    }
    Err(ClusterError::io(
        format!("creating a temporary directory in {}", tmp.display()),
        last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)),
    ))
}

async fn connect(
    port: u16,
    dbname: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(HOST)
        .port(port)
        .user(SUPERUSER)
        .dbname(dbname)
        .application_name("citapulse-pgcluster")
        .connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    let handle = tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "pgcluster: admin connection ended with an error");
        }
    });
    Ok((client, handle))
}

/// A spawn request for the spawner thread.
struct SpawnRequest {
    cmd: Command,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// Sender to the one spawner thread, created on first use; the thread lives as long as the process.
static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

/// Spawns `cmd` from a dedicated thread that never exits.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, and
/// runtime and test threads come and go, so the postmaster must be forked from a
/// thread that lives as long as the process.
async fn spawn_from_spawner_thread(cmd: Command) -> io::Result<Child> {
    let (reply, response) = oneshot::channel();
    {
        let mut guard = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = match guard.as_ref() {
            Some(sender) => sender.clone(),
            None => {
                let (sender, receiver) = mpsc::channel::<SpawnRequest>();
                std::thread::Builder::new()
                    .name("pgcluster-spawner".to_owned())
                    .spawn(move || spawner_loop(receiver))?;
                *guard = Some(sender.clone());
                sender
            }
        };
        if sender.send(SpawnRequest { cmd, reply }).is_err() {
            *guard = None;
            return Err(io::Error::other("the pgcluster spawner thread is gone"));
        }
    }
    response
        .await
        .map_err(|_| io::Error::other("the pgcluster spawner thread dropped the request"))?
}

fn spawner_loop(requests: mpsc::Receiver<SpawnRequest>) {
    // The sender lives in a static, so this loop only ends when the process does.
    while let Ok(SpawnRequest { mut cmd, reply }) = requests.recv() {
        if let Err(Ok(mut child)) = reply.send(cmd.spawn()) {
            // The caller went away (cancelled); don't leave an orphan server behind.
            let _ = send_signal(child.id(), libc::SIGQUIT);
            let _ = child.wait();
        }
    }
}

/// Looks up a system user's uid and gid; `Ok(None)` if there is no such user.
#[allow(unsafe_code)]
fn lookup_user(name: &str) -> Result<Option<RunAs>, ClusterError> {
    let c_name = CString::new(name)
        .map_err(|e| ClusterError::io(format!("looking up user {name:?}"), io::Error::other(e)))?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: `passwd` is plain old data, so all-zero is a valid value.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: all pointers are valid for the call; getpwnam_r writes only into
        // `pwd` and the `buf.len()` bytes of `buf`, and we read only the integer
        // fields of `pwd` afterwards.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &raw mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &raw mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(ClusterError::io(
                format!("looking up user {name:?}"),
                io::Error::from_raw_os_error(rc),
            ));
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some(RunAs {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

/// The last lines the server wrote to its log since `offset`.
fn read_log_tail(path: &Path, offset: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let start = offset.max(len.saturating_sub(TAIL_BYTES));
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(tail_lines(&String::from_utf8_lossy(&bytes)))
    };
    read().unwrap_or_else(|e| format!("<could not read {}: {e}>", path.display()))
}

fn tail_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// An error and its full cause chain (tokio-postgres's Display omits the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
