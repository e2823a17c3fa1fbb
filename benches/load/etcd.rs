//! etcd, single member on loopback, for `etcdctl lock`: the hand-off between two `etcdctl lock`
//! processes and `etcdctl lock NAME true` as a command. Its data directory is on tmpfs
//! (/dev/shm) when there is one, so its write-ahead log's fsync costs next to nothing: etcd's
//! best case.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{Ready, Server, TempDir, command_output, free_port, on_path};

pub struct Etcd {
    pub etcd: PathBuf,
    pub etcdctl: PathBuf,
}

impl Etcd {
    pub fn find() -> Result<Etcd, String> {
        Ok(Etcd {
            etcd: on_path("etcd", "etcd-server")?,
            etcdctl: on_path("etcdctl", "etcd-client")?,
        })
    }

    pub fn version(&self) -> String {
        let first = |bin: &Path| {
            command_output(Command::new(bin).arg("--version"))
                .and_then(|v| v.lines().next().map(str::to_owned))
                .and_then(|l| l.rsplit(' ').next().map(str::to_owned))
                .unwrap_or_else(|| "?".into())
        };
        format!(
            "etcd {}, etcdctl {}",
            first(&self.etcd),
            command_output(Command::new(&self.etcdctl).arg("version"))
                .and_then(|v| v.lines().next().map(str::to_owned))
                .and_then(|l| l.rsplit(' ').next().map(str::to_owned))
                .unwrap_or_else(|| "?".into())
        )
    }

    pub fn command_line() -> &'static str {
        "etcd --name bench --data-dir TMPDIR --listen-client-urls http://127.0.0.1:PORT \
         --advertise-client-urls http://127.0.0.1:PORT --listen-peer-urls http://127.0.0.1:PORT2 \
         --initial-advertise-peer-urls http://127.0.0.1:PORT2 \
         --initial-cluster bench=http://127.0.0.1:PORT2 --logger zap --log-level error"
    }

    /// A fresh single-member cluster on two free loopback ports, with a fresh data directory.
    pub fn start(&self) -> Result<Server, String> {
        let dir = TempDir::new("etcd").map_err(|e| format!("temp dir: {e}"))?;
        let no_port = |e| format!("no free port: {e}");
        let (client, peer) = (free_port().map_err(no_port)?, free_port().map_err(no_port)?);
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(&self.etcd);
        cmd.args(["--name", "bench", "--data-dir"])
            .arg(dir.0.join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args(["--logger", "zap", "--log-level", "error"]);
        let addr = SocketAddr::from(([127, 0, 0, 1], client));
        let mut server = Server::spawn(cmd, Ready::Probe(addr, healthy))?;
        server.dir = Some(dir);
        Ok(server)
    }

    /// `etcdctl --endpoints ADDR lock NAME [COMMAND...]`, as argv.
    pub fn lock_argv(&self, addr: SocketAddr, name: &str, command: &[&str]) -> Vec<String> {
        let mut argv = vec![
            self.etcdctl.display().to_string(),
            "--endpoints".into(),
            addr.to_string(),
            "lock".into(),
            name.into(),
        ];
        argv.extend(command.iter().map(|s| s.to_string()));
        argv
    }
}

fn healthy(addr: SocketAddr) -> bool {
    http(addr, "GET", "/health", "").is_ok_and(|body| body.contains("\"health\":\"true\""))
}

/// How many keys start with `prefix`: `etcdctl lock NAME` holds or queues with one key under
/// `NAME/` each. Asked over etcd's JSON gateway so that no process is started for it.
pub fn count_prefix(addr: SocketAddr, prefix: &str) -> Result<u64, String> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let body = format!(
        "{{\"key\":\"{}\",\"range_end\":\"{}\",\"count_only\":true}}",
        base64(prefix.as_bytes()),
        base64(&end)
    );
    let reply = http(addr, "POST", "/v3/kv/range", &body)?;
    // {"header":{...},"count":"2"}; no "count" at all when it is 0.
    Ok(reply
        .split("\"count\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// One HTTP/1.0 request; Ok(body) for a 200.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    // No half-close after the request: etcd's gateway cancels a request whose client did.
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") {
        Ok(body.to_owned())
    } else {
        Err(format!("{path}: {}", head.lines().next().unwrap_or("")))
    }
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
