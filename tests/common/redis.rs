//! A private `redis-server` child process on a Unix socket, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
    aof: bool,
    /// TLS port and PEM files (`start_tls`); the Unix socket stays plain for `cli`.
    tls: Option<(u16, PathBuf, PathBuf)>,
}

impl RedisServer {
    /// A throwaway Redis (no persistence).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A Redis with an append-only file, so a kill and restart keeps the data.
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = RedisServer {
            dir,
            child: None,
            aof,
            tls: None,
        };
        r.spawn();
        r
    }

    /// A throwaway Redis that also listens with TLS on 127.0.0.1 (`rediss_url`), serving the
    /// PEM certificate and key given (clients are not asked for certificates).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        // A free port (redis-server cannot report the one it picked for --tls-port 0).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = RedisServer {
            dir,
            child: None,
            aof: false,
            tls: Some((port, cert, key)),
        };
        r.spawn();
        r.wait_for_tls_port();
        r
    }

    /// `rediss://127.0.0.1:<port>` of a `start_tls` server.
    pub fn rediss_url(&self) -> String {
        let (port, ..) = self.tls.as_ref().expect("started with start_tls");
        format!("rediss://127.0.0.1:{port}")
    }

    fn wait_for_tls_port(&self) {
        let (port, ..) = self.tls.as_ref().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not listen on TLS port {port}");
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// The URL the proxy uses.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    fn spawn(&mut self) {
        let sock = self.socket();
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&sock)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--save")
            .arg("")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"));
        if let Some((port, cert, key)) = &self.tls {
            cmd.arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .args(["--tls-auth-clients", "no"]);
        }
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        wait_for_socket(&sock);
    }

    /// SIGKILLs the server (no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same socket and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs a redis-cli command against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every key and its full contents, as text: to assert that nothing changed.
    pub fn dump(&self) -> String {
        let mut keys: Vec<String> = self.cli(&["--scan"]).lines().map(str::to_owned).collect();
        keys.sort();
        let mut out = String::new();
        for k in keys {
            let t = self.cli(&["TYPE", &k]);
            let v = match t.trim() {
                "hash" => self.cli(&["HGETALL", &k]),
                "zset" => self.cli(&["ZRANGE", &k, "0", "-1", "WITHSCORES"]),
                "string" => self.cli(&["GET", &k]),
                other => other.to_owned(),
            };
            out.push_str(&format!("{k} {t} {v}\n"));
        }
        out
    }
}

fn wait_for_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if p.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server did not create {}", p.display());
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
