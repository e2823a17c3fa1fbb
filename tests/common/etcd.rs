//! A real etcd cluster for the tests: N members of apt's `etcd-server` on loopback ports, data on
//! tmpfs, stopped and removed on drop. The tests kill, freeze and restart members through it.
//!
//! Self-contained (std, libc, serde_json) so any test file can mount it with
//! `#[path = "common/etcd.rs"] mod etcd_cluster;` or as `common::etcd`. etcd's own tool,
//! `etcdctl`, answers the harness's questions (health, leader, auth setup), so the harness does
//! not depend on the client under test.
#![allow(dead_code)]

use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a fresh cluster may take to elect a leader and serve, on a loaded 2-core machine.
const START_LIMIT: Duration = Duration::from_secs(30);

/// Certificates for an https cluster: a throwaway CA, a server certificate for 127.0.0.1 and
/// localhost, and a client certificate, all made by `openssl` for this run.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Generates the files in `dir` (ECDSA P-256, valid one day).
    pub fn generate(dir: &Path) -> TlsFiles {
        fs::create_dir_all(dir).unwrap();
        let p = |name: &str| dir.join(name);
        let files = TlsFiles {
            ca: p("ca.crt"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            Command::new("openssl")
                .args(["req", "-x509"])
                .args(key)
                .args(["-days", "1", "-subj", "/CN=tcpnetlock test CA"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(p("ca.key"))
                .arg("-out")
                .arg(&files.ca),
        );
        let leaf = |name: &str, cn: &str, ext: &str| {
            let ext_file = p(&format!("{name}.ext"));
            fs::write(&ext_file, ext).unwrap();
            openssl(
                Command::new("openssl")
                    .arg("req")
                    .args(key)
                    .args(["-subj", &format!("/CN={cn}")])
                    .arg("-keyout")
                    .arg(p(&format!("{name}.key")))
                    .arg("-out")
                    .arg(p(&format!("{name}.csr"))),
            );
            openssl(
                Command::new("openssl")
                    .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
                    .arg("-in")
                    .arg(p(&format!("{name}.csr")))
                    .arg("-CA")
                    .arg(&files.ca)
                    .arg("-CAkey")
                    .arg(p("ca.key"))
                    .arg("-extfile")
                    .arg(&ext_file)
                    .arg("-out")
                    .arg(p(&format!("{name}.crt"))),
            );
        };
        leaf(
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
        leaf("client", "tcpnetlock", "extendedKeyUsage=clientAuth\n");
        files
    }
}

fn openssl(cmd: &mut Command) {
    let out = cmd.output().expect("run openssl (apt package openssl)");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What to start.
pub struct ClusterOptions {
    pub members: usize,
    /// Serve clients over https with client-certificate auth (peers stay on http).
    pub tls: bool,
    /// etcd's `--auth-token-ttl` (seconds an idle simple token stays valid).
    pub auth_token_ttl: Option<u32>,
    /// Another address the members also take clients on (same ports as on 127.0.0.1): the end
    /// of a veth pair a test created, for a client in a network namespace of its own.
    pub also_listen: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            members: 3,
            tls: false,
            auth_token_ttl: None,
            also_listen: None,
        }
    }
}

pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster; every member is killed and the directory removed on drop.
pub struct EtcdCluster {
    pub dir: PathBuf,
    pub members: Vec<EtcdMember>,
    pub tls: Option<TlsFiles>,
    initial_cluster: String,
    cluster_token: String,
    auth_token_ttl: Option<u32>,
    also_listen: Option<String>,
    /// Set once auth is on, so the harness's own etcdctl calls log in.
    root_password: Option<String>,
}

static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// Free loopback ports, all bound at once before any is released, so one call never returns the
/// same port twice. Another process may still take one before etcd binds it: `start` retries.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl EtcdCluster {
    /// A 3-member http cluster, healthy.
    pub fn start3() -> EtcdCluster {
        EtcdCluster::start(ClusterOptions::default())
    }

    /// Starts the members and waits until every one reports healthy; tries again with new ports
    /// if a member could not bind (a port taken between choosing and binding).
    pub fn start(options: ClusterOptions) -> EtcdCluster {
        let mut last = String::new();
        for _ in 0..3 {
            match EtcdCluster::try_start(&options) {
                Ok(cluster) => return cluster,
                Err(why) => last = why,
            }
        }
        panic!("cannot start an etcd cluster: {last}");
    }

    fn try_start(options: &ClusterOptions) -> Result<EtcdCluster, String> {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let id = CLUSTERS.fetch_add(1, Ordering::SeqCst);
        let dir = base.join(format!("tcpnetlock-etcd-{}-{id}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let tls = options.tls.then(|| TlsFiles::generate(&dir.join("tls")));
        let ports = free_ports(2 * options.members);
        let members: Vec<EtcdMember> = (0..options.members)
            .map(|i| EtcdMember {
                name: format!("e{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.join(format!("e{i}.data")),
                log: dir.join(format!("e{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            cluster_token: format!("tcpnetlock-{}-{id}", std::process::id()),
            dir,
            members,
            tls,
            initial_cluster,
            auth_token_ttl: options.auth_token_ttl,
            also_listen: options.also_listen.clone(),
            root_password: None,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new");
        }
        cluster.wait_healthy(START_LIMIT)?;
        Ok(cluster)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let url = format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[i].client_port
        );
        let m = &self.members[i];
        let listen = match &self.also_listen {
            Some(ip) => format!("{url},{}://{ip}:{}", self.scheme(), m.client_port),
            None => url.clone(),
        };
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        for (key, _) in std::env::vars() {
            if key.starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.cluster_token])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        if let Some(ttl) = self.auth_token_ttl {
            cmd.args(["--auth-token-ttl", &ttl.to_string()]);
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = cmd.spawn().expect("start etcd (apt package etcd-server)");
        self.members[i].child = Some(child);
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[i].client_port
        )
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL on the [`ClusterOptions::also_listen`] address.
    pub fn endpoint_at(&self, ip: &str, i: usize) -> String {
        format!("{}://{ip}:{}", self.scheme(), self.members[i].client_port)
    }

    pub fn pid(&self, i: usize) -> Option<i32> {
        self.members[i].child.as_ref().map(|c| c.id() as i32)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// kill -9, and reap it: its ports are closed when this returns.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process keeps its sockets (the kernel still accepts connections) but
    /// answers nothing, like a paused VM.
    pub fn freeze(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    pub fn thaw(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, sig: i32) {
        let pid = self.pid(i).expect("member is running");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// Starts a killed member again on its data dir (it rejoins with its old identity).
    pub fn restart(&mut self, i: usize) {
        assert!(!self.is_running(i), "member {i} is running");
        self.spawn(i, "existing");
    }

    /// etcdctl against member `i`, with the cluster's certificates and the root login if auth
    /// is on.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> Output {
        self.etcdctl_on(&[self.endpoint(i)], args)
    }

    fn etcdctl_on(&self, endpoints: &[String], args: &[&str]) -> Output {
        let mut cmd = Command::new("etcdctl");
        for (key, _) in std::env::vars() {
            if key.starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--dial-timeout=1s", "--command-timeout=2s"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key);
        }
        if let Some(password) = &self.root_password {
            cmd.arg(format!("--user=root:{password}"));
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run etcdctl (apt package etcd-client)")
    }

    /// Waits until every running member reports healthy (a linearizable read through it works).
    pub fn wait_healthy(&self, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let live: Vec<String> = (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.endpoint(i))
            .collect();
        loop {
            let out = self.etcdctl_on(&live, &["endpoint", "health"]);
            if out.status.success() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "not healthy after {limit:?}: {}{}\nlogs:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tails()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the member that is leader, as the running members see it (they must agree).
    pub fn leader(&self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for i in 0..self.members.len() {
            if !self.is_running(i) {
                ids.push(None);
                continue;
            }
            let out = self.etcdctl(i, &["endpoint", "status", "-w", "json"]);
            let status = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v.get(0).and_then(|e| e.get("Status")).cloned());
            let id = status
                .as_ref()
                .and_then(|s| s["header"]["member_id"].as_u64());
            ids.push(id);
            if let Some(leader) = status.as_ref().and_then(|s| s["leader"].as_u64()) {
                leaders.push(leader);
            }
        }
        let leader = *leaders.first()?;
        if leader == 0 || leaders.iter().any(|&l| l != leader) {
            return None;
        }
        ids.iter().position(|&id| id == Some(leader))
    }

    /// Polls until the running members agree on a leader.
    pub fn wait_leader(&self, limit: Duration) -> usize {
        let start = Instant::now();
        loop {
            if let Some(leader) = self.leader() {
                return leader;
            }
            assert!(
                start.elapsed() < limit,
                "no leader after {limit:?}\n{}",
                self.log_tails()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates `root` with `password` and turns auth on.
    pub fn enable_auth(&mut self, password: &str) {
        for args in [
            vec!["user", "add", &format!("root:{password}")],
            vec!["user", "grant-role", "root", "root"],
            vec!["auth", "enable"],
        ] {
            let args: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
            let out = self.etcdctl(0, &args);
            assert!(
                out.status.success(),
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.root_password = Some(password.to_owned());
    }

    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    fn log_tails(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                let log = self.log(i);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                format!("--- {}:\n{tail}", self.members[i].name)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
