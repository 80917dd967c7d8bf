//! A private etcd per test: free loopback ports, a temporary data dir, bounded health wait, and
//! a Drop guard that always kills the process (also on panic).

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions};

/// How long etcd may take to become healthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestEtcd {
    /// `http://127.0.0.1:<port>`, the client URL.
    pub endpoint: String,
    pub client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    child: Option<Child>,
}

/// A port that was free a moment ago (bind port 0 on loopback and release it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn distinct_ports<const N: usize>() -> [u16; N] {
    loop {
        let ports: [u16; N] = std::array::from_fn(|_| free_port());
        let mut sorted = ports.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() == N {
            return ports;
        }
    }
}

impl TestEtcd {
    /// Starts etcd on fresh ports, retrying with new ports if one was taken meanwhile.
    pub async fn start() -> TestEtcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data-0");
        let mut etcd = TestEtcd {
            endpoint: String::new(),
            client_port: 0,
            peer_port: 0,
            metrics_port: 0,
            dir,
            data_dir,
            child: None,
        };
        let mut last_error = String::new();
        for attempt in 0..5 {
            let [client_port, peer_port, metrics_port] = distinct_ports::<3>();
            etcd.endpoint = format!("http://127.0.0.1:{client_port}");
            etcd.client_port = client_port;
            etcd.peer_port = peer_port;
            etcd.metrics_port = metrics_port;
            etcd.data_dir = etcd.dir.path().join(format!("data-{attempt}"));
            match etcd.spawn(client_port).await {
                Ok(()) => return etcd,
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    /// The etcd log so far (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn spawn(&mut self, client_port: u16) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd already running");
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("etcd")
            .arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("default={peer}"))
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", self.metrics_port))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("spawning etcd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("etcd exited with {status}: {}", self.log_tail()));
            }
            if healthy(&client).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "etcd not healthy within {HEALTH_TIMEOUT:?}: {}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills etcd (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data dir and client port.
    pub async fn restart(&mut self) {
        self.stop();
        let port = self.client_port;
        if let Err(e) = self.spawn(port).await {
            panic!("etcd restart failed: {e}");
        }
    }

    /// Starts etcd on the same data dir but another client port (where agents cannot see it);
    /// returns that endpoint.
    pub async fn restart_elsewhere(&mut self) -> String {
        self.stop();
        for _ in 0..5 {
            let port = free_port();
            if port != self.client_port && port != self.peer_port && port != self.metrics_port {
                match self.spawn(port).await {
                    Ok(()) => return format!("http://127.0.0.1:{port}"),
                    Err(e) => eprintln!("retrying side etcd: {e}"),
                }
            }
        }
        panic!("etcd did not start on a side port");
    }
}

/// Whether etcd at `endpoint` answers a read within a second.
pub async fn healthy(endpoint: &str) -> bool {
    let probe = async {
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_millis(500));
        let mut client = Client::connect([endpoint], Some(options)).await.ok()?;
        client
            .get("health", Some(GetOptions::new().with_keys_only()))
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), probe).await,
        Ok(Some(_))
    )
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}
