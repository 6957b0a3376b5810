//! Highly available Redis topologies on loopback, for the failover tests: a master with
//! replicas watched by three Sentinels, and a Redis Cluster of masters. Real `redis-server`
//! children on TCP ports the test picks (never 6379), killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Sentinel name of the monitored master.
pub const MASTER_NAME: &str = "mrp";

/// A free loopback port whose `port + 10000` (the cluster bus) is free too.
pub fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p == 6379 || p > 55_000 {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

/// Runs `redis-cli -p <port> <args>` and returns its stdout.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A field of `INFO` output (`role`, `master_link_status` …).
pub fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    cli(port, &["INFO", section]).lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

fn try_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn wait_until(what: &str, limit: Duration, ok: impl FnMut() -> bool) {
    assert!(try_until(limit, ok), "timed out waiting for {what}");
}

/// One `redis-server` process (a data node or a Sentinel).
pub struct Node {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn spawn(dir: &Path, name: &str, port: u16, args: Vec<String>) -> Self {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut n = Node {
            port,
            dir,
            args,
            child: None,
        };
        n.start();
        n
    }

    fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        self.child = Some(child);
        let port = self.port;
        wait_until(
            &format!("redis on port {port}"),
            Duration::from_secs(10),
            || cli(port, &["PING"]).trim() == "PONG",
        );
    }

    /// SIGKILLs the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again with the same arguments and directory (a Sentinel keeps its rewritten
    /// configuration; a killed master comes back and is turned into a replica by Sentinel).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The node's log file (`redis.log` or `sentinel.log`), for failure messages.
    pub fn log(&self) -> String {
        ["redis.log", "sentinel.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Arguments every data node gets: no persistence, immediate diskless replication (a replica
/// syncs in milliseconds, so a failover right after start-up can promote it).
fn data_node_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
        "--dir",
        &dir.display().to_string(),
        "--logfile",
        "redis.log",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A master, its replicas and three Sentinels (quorum 2, `down-after-milliseconds` 1000).
pub struct SentinelSetup {
    /// `nodes[0]` is the first master; which node is master changes on failover.
    pub nodes: Vec<Node>,
    pub sentinels: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl SentinelSetup {
    pub fn start(replicas: usize) -> Self {
        let root = tempfile::tempdir().unwrap();
        let master_port = free_port();
        let mut nodes = Vec::new();
        let d = root.path().join("n0");
        std::fs::create_dir_all(&d).unwrap();
        nodes.push(Node::spawn(
            root.path(),
            "n0",
            master_port,
            data_node_args(master_port, &d),
        ));
        for i in 1..=replicas {
            let p = free_port();
            let d = root.path().join(format!("n{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let mut args = data_node_args(p, &d);
            args.extend(["--replicaof".into(), format!("127.0.0.1 {master_port}")]);
            nodes.push(Node::spawn(root.path(), &format!("n{i}"), p, args));
        }
        for n in &nodes[1..] {
            let port = n.port;
            let synced = try_until(Duration::from_secs(20), || {
                info_field(port, "replication", "master_link_status").as_deref() == Some("up")
            });
            assert!(
                synced,
                "replica {port} not in sync; its log:\n{}\nmaster log:\n{}",
                n.log(),
                nodes[0].log()
            );
        }
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let p = free_port();
            let d = root.path().join(format!("s{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let conf = d.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {p}\nbind 127.0.0.1\ndir {}\nlogfile sentinel.log\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 3000\n\
                     sentinel parallel-syncs {MASTER_NAME} 2\n",
                    d.display()
                ),
            )
            .unwrap();
            let args = vec![conf.display().to_string(), "--sentinel".to_owned()];
            sentinels.push(Node::spawn(root.path(), &format!("s{i}"), p, args));
        }
        let s = SentinelSetup {
            nodes,
            sentinels,
            _dir: root,
        };
        s.wait_sentinels_agree(replicas);
        s
    }

    /// Waits until every Sentinel sees the others and the replicas (a failover needs both).
    fn wait_sentinels_agree(&self, replicas: usize) {
        for s in &self.sentinels {
            let port = s.port;
            wait_until(
                "sentinels to discover each other",
                Duration::from_secs(15),
                || {
                    let out = cli(port, &["SENTINEL", "MASTER", MASTER_NAME]);
                    let v: Vec<&str> = out.lines().collect();
                    let field = |name: &str| {
                        v.iter()
                            .position(|l| *l == name)
                            .and_then(|i| v.get(i + 1))
                            .and_then(|x| x.parse::<usize>().ok())
                    };
                    field("num-other-sentinels") == Some(2) && field("num-slaves") == Some(replicas)
                },
            );
        }
    }

    /// `host:port` of every Sentinel (the proxy's `redis.sentinel.nodes`).
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(Node::addr).collect()
    }

    /// The port Sentinel names as master now.
    pub fn master_port(&self) -> u16 {
        let out = cli(
            self.sentinels[0].port,
            &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
        );
        out.lines().nth(1).and_then(|p| p.parse().ok()).unwrap()
    }

    /// Each data node's view of replication (role, link, replicas with their acknowledged
    /// offsets, its own offset) and the master Sentinel names: printed when a test sees a
    /// store failure it did not expect.
    pub fn replication_report(&self) -> String {
        let mut out = format!(
            "sentinel names master {}\n",
            cli(
                self.sentinels[0].port,
                &["SENTINEL", "get-master-addr-by-name", MASTER_NAME]
            )
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(":")
        );
        for n in &self.nodes {
            let info = cli(n.port, &["INFO", "replication"]);
            let fields: Vec<&str> = info
                .lines()
                .map(str::trim)
                .filter(|l| {
                    [
                        "role:",
                        "master_port:",
                        "master_link_status:",
                        "connected_slaves:",
                        "slave",
                        "master_repl_offset:",
                        "master_replid:",
                    ]
                    .iter()
                    .any(|p| l.starts_with(p))
                })
                .collect();
            out.push_str(&format!("node {}: {}\n", n.port, fields.join(" ")));
        }
        // Each Sentinel's failover events, in its own order (its log).
        for (i, sentinel) in self.sentinels.iter().enumerate() {
            let log = sentinel.log();
            let events: Vec<&str> = log
                .lines()
                .filter(|l| {
                    [
                        "+switch-master",
                        "+elected-leader",
                        "+promoted-slave",
                        "+failover-end",
                        "-failover-abort",
                        "+convert-to-slave",
                        "+try-failover",
                        "+odown",
                        "+reboot",
                    ]
                    .iter()
                    .any(|e| l.contains(e))
                })
                .collect();
            out.push_str(&format!(
                "sentinel {i} events:\n  {}\n",
                events[events.len().saturating_sub(12)..].join("\n  ")
            ));
        }
        out
    }

    /// Whether the master Sentinel names has a replica online, so that a write which must be
    /// acknowledged by one (`redis.min_replicas_acked: 1`) can succeed. False between a failover
    /// and the moment the new master has a replica again, which includes Sentinel's own wait
    /// (about 8 s, four times its publish period) before it turns a stale master it finds still
    /// answering as master into a replica.
    pub fn master_has_replica(&self) -> bool {
        let out = cli(
            self.sentinels[0].port,
            &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
        );
        let Some(port) = out
            .lines()
            .nth(1)
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            return false;
        };
        cli(port, &["INFO", "replication"])
            .lines()
            .any(|l| l.starts_with("slave") && l.contains("state=online"))
    }

    /// The data node that Sentinel names as master.
    pub fn master(&mut self) -> &mut Node {
        let p = self.master_port();
        self.nodes.iter_mut().find(|n| n.port == p).unwrap()
    }

    /// `SENTINEL FAILOVER`: a planned switch to a replica.
    pub fn failover(&self) {
        let out = cli(
            self.sentinels[0].port,
            &["SENTINEL", "FAILOVER", MASTER_NAME],
        );
        assert_eq!(out.trim(), "OK", "SENTINEL FAILOVER: {out}");
    }

    /// Waits until the Sentinels name a master other than `old` and it answers as master.
    pub fn wait_new_master(&self, old: u16, limit: Duration) -> u16 {
        let mut new = 0;
        wait_until("a new master", limit, || {
            new = self.master_port();
            new != old && info_field(new, "replication", "role").as_deref() == Some("master")
        });
        new
    }

    /// Waits until `node` replicates from the current master again (after a restart).
    pub fn wait_replica_synced(&self, port: u16, limit: Duration) {
        wait_until("old master to rejoin as replica", limit, || {
            info_field(port, "replication", "role").as_deref() == Some("slave")
                && info_field(port, "replication", "master_link_status").as_deref() == Some("up")
        });
    }
}

/// A Redis Cluster of masters without replicas (slots spread by `redis-cli --cluster create`).
pub struct ClusterSetup {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl ClusterSetup {
    pub fn start(masters: usize) -> Self {
        let root = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..masters {
            let p = free_port();
            let d = root.path().join(format!("c{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let mut args = data_node_args(p, &d);
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            nodes.push(Node::spawn(root.path(), &format!("c{i}"), p, args));
        }
        let addrs: Vec<String> = nodes.iter().map(Node::addr).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = ClusterSetup { nodes, _dir: root };
        c.wait_ok();
        c
    }

    /// Waits until every node reports `cluster_state:ok` and knows every other node.
    pub fn wait_ok(&self) {
        let n = self.nodes.len().to_string();
        for node in &self.nodes {
            let port = node.port;
            wait_until("cluster_state:ok", Duration::from_secs(15), || {
                let info = cli(port, &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{n}"))
                    && info.contains("cluster_slots_ok:16384")
            });
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(Node::addr).collect()
    }

    /// The node id of the node on `port`.
    pub fn node_id(&self, port: u16) -> String {
        cli(port, &["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// The port of the master serving `key`'s slot (asked of the first node).
    pub fn owner_of(&self, key: &str) -> u16 {
        let slot: u16 = cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        self.owner_of_slot(slot)
    }

    /// The port of the master serving `slot` (asked of the first node).
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        // CLUSTER SLOTS, flattened by redis-cli: start, end, ip, port, id, … per range.
        let slots = cli(self.nodes[0].port, &["CLUSTER", "SLOTS"]);
        let lines: Vec<&str> = slots.lines().collect();
        let mut i = 0;
        while i + 3 < lines.len() {
            if let (Ok(start), Ok(end)) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>())
                && lines[i + 2].starts_with("127.")
                && let Ok(port) = lines[i + 3].parse::<u16>()
            {
                if (start..=end).contains(&slot) {
                    return port;
                }
                i += 4;
                continue;
            }
            i += 1;
        }
        panic!("no owner for slot {slot}: {slots}");
    }

    /// Keys the node on `port` holds in `slots` (one `redis-cli` fed a pipeline of
    /// `CLUSTER COUNTKEYSINSLOT`).
    pub fn keys_in_slots(&self, port: u16, slots: std::ops::Range<u16>) -> u64 {
        use std::io::Write;
        let mut child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("redis-cli");
        let mut input = String::new();
        for s in slots {
            input.push_str(&format!("CLUSTER COUNTKEYSINSLOT {s}\n"));
        }
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum()
    }

    /// The first slot range the node on `port` serves (`start..end+1`).
    pub fn first_range(&self, port: u16) -> std::ops::Range<u16> {
        let slots = cli(self.nodes[0].port, &["CLUSTER", "SLOTS"]);
        let lines: Vec<&str> = slots.lines().collect();
        for i in 0..lines.len().saturating_sub(3) {
            if let (Ok(start), Ok(end), Ok(p)) = (
                lines[i].parse::<u16>(),
                lines[i + 1].parse::<u16>(),
                lines[i + 3].parse::<u16>(),
            ) && lines[i + 2].starts_with("127.")
                && p == port
            {
                return start..end + 1;
            }
        }
        panic!("node {port} serves no slots: {slots}");
    }

    /// Moves `slots` slots from the node on `from` to the node on `to` with
    /// `redis-cli --cluster reshard` (keys migrated with MIGRATE while clients keep going).
    pub fn reshard(&self, from: u16, to: u16, slots: u32) -> std::process::Output {
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &self.node_id(from)])
            .args(["--cluster-to", &self.node_id(to)])
            .args(["--cluster-slots", &slots.to_string()])
            .args(["--cluster-yes", "--cluster-pipeline", "100"])
            .output()
            .expect("redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "reshard: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}
