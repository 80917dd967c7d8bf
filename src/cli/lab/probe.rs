//! `wiremesh lab probe`: every lab pod probes every other lab pod's address on the given ports
//! and protocols, and the answers make reachability truth tables as the Kubernetes
//! network-policy e2e suite prints them: rows = from, columns = to, `.` reachable, `X`
//! blocked, `-` the pod itself (not scored, as upstream). Probes go to pod addresses: the lab
//! has no Services.
//!
//! - TCP: a connection, or a refusal (RST, no listener), is an answer; a timeout or an ICMP
//!   error is not.
//! - UDP: a datagram (sent again within the timeout) must come back from the pod's echo server;
//!   an ICMP port-unreachable also proves delivery and counts as reachable.
//!
//! Each probe runs on a thread that joined the source pod's network namespace, so its socket
//! lives there; all run at once with one timeout (1 s by default).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use serde::{Deserialize, Serialize};

use super::pods::PortProtocol;
use super::sys::NETNS_DIR;
use super::{Lab, LabError};
use wiremesh_core::model::Family;

/// Probes in flight at most (threads).
const MAX_WORKERS: usize = 256;
/// UDP probes send their datagram this many times within the timeout.
const UDP_TRIES: u32 = 3;

/// Which table: protocol, port and address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TableKey {
    pub protocol: PortProtocol,
    pub port: u16,
    /// None (in an expectation file): every family the lab probes.
    pub family: Option<Family>,
}

impl fmt::Display for TableKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol.name(), self.port)?;
        if let Some(family) = self.family {
            write!(f, " {family}")?;
        }
        Ok(())
    }
}

/// One reachability table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruthTable {
    #[serde(flatten)]
    pub key: TableKey,
    /// Rows: the probing pods (`namespace/name`).
    pub from: Vec<String>,
    /// Columns: the probed pods.
    pub to: Vec<String>,
    /// `reachable[row][column]`; null for a pod and itself (not probed, not scored).
    pub reachable: Vec<Vec<Option<bool>>>,
}

impl TruthTable {
    pub fn get(&self, from: &str, to: &str) -> Option<Option<bool>> {
        let row = self.from.iter().position(|f| f == from)?;
        let column = self.to.iter().position(|t| t == to)?;
        self.reachable.get(row)?.get(column).copied()
    }

    /// The table as text: a title line, a header row led by `-`, then one row per source.
    pub fn text(&self) -> String {
        let mut out = format!(
            "{}: rows = from, columns = to (lab pods, namespace/name); . reachable, X blocked, - self\n",
            self.key
        );
        let width = self
            .from
            .iter()
            .chain(&self.to)
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(1)
            .max(1);
        let cell = |text: &str| format!("{text:<width$}");
        let mut header = vec![cell("-")];
        header.extend(self.to.iter().map(|t| cell(t)));
        out.push_str(header.join("  ").trim_end());
        out.push('\n');
        for (from, row) in self.from.iter().zip(&self.reachable) {
            let mut line = vec![cell(from)];
            line.extend(row.iter().map(|r| cell(mark(*r))));
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

fn mark(reachable: Option<bool>) -> &'static str {
    match reachable {
        Some(true) => ".",
        Some(false) => "X",
        None => "-",
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {reason}")]
pub struct ParseError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// `TCP/80` → (TCP, 80).
fn table_title(word: &str) -> Option<(PortProtocol, Option<u16>)> {
    let (protocol, port) = word.split_once('/')?;
    let protocol = PortProtocol::parse(protocol)?;
    Some((protocol, port.parse::<u16>().ok().filter(|p| *p > 0)))
}

/// Reads tables in the format [`TruthTable::text`] prints: a title line starting
/// `PROTOCOL/PORT` (optionally `IPv4` or `IPv6` next; text after that is ignored), a header
/// row starting `-` with the columns, one row per source with one mark each (`.`, `X`, `-`
/// for self). Blank lines and `#` comments are skipped.
pub fn parse_tables(file: &str, text: &str) -> Result<Vec<TruthTable>, ParseError> {
    let err = |line: usize, reason: String| ParseError {
        file: file.to_string(),
        line,
        reason,
    };
    let mut tables: Vec<TruthTable> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let words: Vec<&str> = raw.split_whitespace().collect();
        let Some(first) = words.first() else {
            continue;
        };
        if first.starts_with('#') {
            continue;
        }
        let first_word = first.trim_end_matches(':');
        if let Some((protocol, port)) = table_title(first_word) {
            let port =
                port.ok_or_else(|| err(line, format!("{first_word:?}: the port is not 1-65535")))?;
            let family = match words.get(1).map(|w| w.trim_end_matches(':')) {
                Some("IPv4") => Some(Family::V4),
                Some("IPv6") => Some(Family::V6),
                _ => None,
            };
            let key = TableKey {
                protocol,
                port,
                family,
            };
            if tables.iter().any(|t| t.key == key) {
                return Err(err(line, format!("a second table {key}")));
            }
            tables.push(TruthTable {
                key,
                from: Vec::new(),
                to: Vec::new(),
                reachable: Vec::new(),
            });
            continue;
        }
        let Some(table) = tables.last_mut() else {
            return Err(err(
                line,
                format!(
                    "{raw:?} is outside a table (a table starts with a line such as \"TCP/80\")"
                ),
            ));
        };
        if table.to.is_empty() {
            if *first != "-" {
                return Err(err(
                    line,
                    "the header row starts with \"-\" and lists the columns".into(),
                ));
            }
            table.to = words[1..].iter().map(|w| w.to_string()).collect();
            if table.to.is_empty() {
                return Err(err(line, "the header row has no columns".into()));
            }
            let unique: BTreeSet<&String> = table.to.iter().collect();
            if unique.len() != table.to.len() {
                return Err(err(line, "a column appears twice".into()));
            }
            continue;
        }
        let from = first.to_string();
        if table.from.contains(&from) {
            return Err(err(line, format!("row {from} appears twice")));
        }
        let marks = &words[1..];
        if marks.len() != table.to.len() {
            return Err(err(
                line,
                format!(
                    "row {from} has {} marks for {} columns",
                    marks.len(),
                    table.to.len()
                ),
            ));
        }
        let mut row = Vec::new();
        for (to, m) in table.to.iter().zip(marks) {
            row.push(match (*m, *to == from) {
                (_, true) => None,
                (".", false) => Some(true),
                ("X" | "x", false) => Some(false),
                (other, false) => {
                    return Err(err(
                        line,
                        format!("{from} -> {to}: {other:?} is not . (reachable) or X (blocked)"),
                    ));
                }
            });
        }
        table.from.push(from);
        table.reachable.push(row);
    }
    if let Some(t) = tables.iter().find(|t| t.to.is_empty() || t.from.is_empty()) {
        return Err(err(
            text.lines().count(),
            format!("table {} has no rows", t.key),
        ));
    }
    Ok(tables)
}

/// A cell (or table) that is not as expected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// The table, as its title names it (`TCP/80 IPv4`).
    pub table: String,
    /// Empty when the whole table differs (missing).
    pub from: String,
    pub to: String,
    /// `.`, `X`, or a reason such as `no such table`.
    pub expected: String,
    pub actual: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.from.is_empty() {
            write!(
                f,
                "{}: expected {}, got {}",
                self.table, self.expected, self.actual
            )
        } else {
            write!(
                f,
                "{}  {} -> {}: expected {}, got {}",
                self.table, self.from, self.to, self.expected, self.actual
            )
        }
    }
}

/// Every difference between the probed tables and the expected ones. A table is matched by
/// protocol, port and family (an expected table without a family stands for every family
/// probed); a probed table nobody expected, an expected one not probed, and a pod only one side
/// names are differences too. Self cells are never compared.
pub fn compare(actual: &[TruthTable], expected: &[TruthTable]) -> Vec<Difference> {
    let mut out = Vec::new();
    let matches = |e: &TableKey, a: &TableKey| {
        e.protocol == a.protocol && e.port == a.port && (e.family.is_none() || e.family == a.family)
    };
    for e in expected {
        let probed: Vec<&TruthTable> = actual.iter().filter(|a| matches(&e.key, &a.key)).collect();
        if probed.is_empty() {
            out.push(Difference {
                table: e.key.to_string(),
                from: String::new(),
                to: String::new(),
                expected: "a table".into(),
                actual: "none probed".into(),
            });
        }
        for a in probed {
            compare_table(a, e, &mut out);
        }
    }
    for a in actual {
        if !expected.iter().any(|e| matches(&e.key, &a.key)) {
            out.push(Difference {
                table: a.key.to_string(),
                from: String::new(),
                to: String::new(),
                expected: "none".into(),
                actual: "a probed table".into(),
            });
        }
    }
    out
}

fn compare_table(actual: &TruthTable, expected: &TruthTable, out: &mut Vec<Difference>) {
    let table = actual.key.to_string();
    let rows: BTreeSet<&String> = actual.from.iter().chain(&expected.from).collect();
    let columns: BTreeSet<&String> = actual.to.iter().chain(&expected.to).collect();
    let text = |cell: Option<Option<bool>>| match cell {
        None => "no such pod".to_string(),
        Some(m) => mark(m).to_string(),
    };
    for from in &rows {
        for to in &columns {
            if from == to {
                continue;
            }
            let (a, e) = (actual.get(from, to), expected.get(from, to));
            if a != e {
                out.push(Difference {
                    table: table.clone(),
                    from: from.to_string(),
                    to: to.to_string(),
                    expected: text(e),
                    actual: text(a),
                });
            }
        }
    }
}

/// A lab pod as a probe source and target.
#[derive(Debug, Clone)]
pub struct ProbePod {
    /// `namespace/name`.
    pub name: String,
    pub netns: String,
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl ProbePod {
    fn address(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.v4.map(IpAddr::from),
            Family::V6 => self.v6.map(IpAddr::from),
        }
    }
}

#[derive(Debug, Clone)]
struct Job {
    table: usize,
    row: usize,
    column: usize,
    netns: String,
    target: SocketAddr,
    protocol: PortProtocol,
}

/// Joins `ns` on this thread (its sockets are created there from then on).
fn enter(ns: &str) -> Result<(), LabError> {
    let path = Path::new(NETNS_DIR).join(ns);
    let handle = File::open(&path).map_err(|source| LabError::Io {
        step: "opening a pod namespace".into(),
        path: path.clone(),
        source,
    })?;
    setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Netns {
        step: "entering a pod namespace".into(),
        ns: ns.to_string(),
        source,
    })
}

fn probe_tcp(target: SocketAddr, timeout: Duration) -> bool {
    match TcpStream::connect_timeout(&target, timeout) {
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
    }
}

fn probe_udp(target: SocketAddr, timeout: Duration) -> Result<bool, io::Error> {
    let local: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(target)?;
    let payload = b"wiremesh-lab-probe";
    let deadline = Instant::now() + timeout;
    let slice = timeout / UDP_TRIES;
    let mut buffer = [0u8; 64];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        match socket.send(payload) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(true),
            Err(_) => {}
        }
        socket.set_read_timeout(Some(slice.min(left).max(Duration::from_millis(1))))?;
        match socket.recv(&mut buffer) {
            Ok(n) if &buffer[..n] == payload => return Ok(true),
            Ok(_) => {}
            // ICMP port unreachable: the datagram got there, nothing listens.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(true),
            Err(_) => {}
        }
    }
    Ok(false)
}

/// Probes every ordered pair of `pods` (not a pod and itself) for every key, all at once.
pub fn probe(
    pods: &[ProbePod],
    keys: &[TableKey],
    timeout: Duration,
) -> Result<Vec<TruthTable>, LabError> {
    let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
    let mut tables: Vec<TruthTable> = keys
        .iter()
        .map(|key| TruthTable {
            key: *key,
            from: names.clone(),
            to: names.clone(),
            reachable: vec![vec![None; names.len()]; names.len()],
        })
        .collect();
    let mut jobs = Vec::new();
    for (t, key) in keys.iter().enumerate() {
        let Some(family) = key.family else { continue };
        for (row, from) in pods.iter().enumerate() {
            for (column, to) in pods.iter().enumerate() {
                let Some(address) = to.address(family).filter(|_| row != column) else {
                    continue;
                };
                jobs.push(Job {
                    table: t,
                    row,
                    column,
                    netns: from.netns.clone(),
                    target: SocketAddr::new(address, key.port),
                    protocol: key.protocol,
                });
            }
        }
    }
    // Grouped by source, so a worker changes namespace rarely.
    jobs.sort_by(|a, b| a.netns.cmp(&b.netns));
    let queue = Arc::new(Mutex::new(jobs.clone()));
    let results: Arc<Mutex<Vec<(Job, bool)>>> = Arc::new(Mutex::new(Vec::new()));
    let workers = jobs.len().clamp(1, MAX_WORKERS);
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (queue, results) = (Arc::clone(&queue), Arc::clone(&results));
        let spawned = thread::Builder::new()
            .name("lab-probe".into())
            .spawn(move || -> Result<(), LabError> {
                let mut joined: Option<String> = None;
                loop {
                    let job = match queue.lock() {
                        Ok(mut q) => q.pop(),
                        Err(_) => None,
                    };
                    let Some(job) = job else { return Ok(()) };
                    if joined.as_deref() != Some(job.netns.as_str()) {
                        enter(&job.netns)?;
                        joined = Some(job.netns.clone());
                    }
                    let reachable = match job.protocol {
                        PortProtocol::Tcp => probe_tcp(job.target, timeout),
                        PortProtocol::Udp => {
                            probe_udp(job.target, timeout).map_err(|source| LabError::Spawn {
                                step: "a UDP probe".into(),
                                object: job.target.to_string(),
                                source,
                            })?
                        }
                        PortProtocol::Sctp => false,
                    };
                    if let Ok(mut r) = results.lock() {
                        r.push((job, reachable));
                    }
                }
            })
            .map_err(|source| LabError::Spawn {
                step: "starting a probe thread".into(),
                object: "lab probe".into(),
                source,
            })?;
        handles.push(spawned);
    }
    let mut first_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(LabError::Timeout {
                    step: "probing (a probe thread panicked)".into(),
                    object: "lab probe".into(),
                });
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let results = results.lock().map(|r| r.clone()).unwrap_or_default();
    if results.len() != jobs.len() {
        return Err(LabError::Timeout {
            step: format!("probing ({} of {} probes done)", results.len(), jobs.len()),
            object: "lab probe".into(),
        });
    }
    for (job, reachable) in results {
        if let Some(cell) = tables
            .get_mut(job.table)
            .and_then(|t| t.reachable.get_mut(job.row))
            .and_then(|r| r.get_mut(job.column))
        {
            *cell = Some(reachable);
        }
    }
    Ok(tables)
}

impl Lab {
    /// The lab's pods (from `lab apply`) as probe sources and targets.
    pub fn probe_pods(&self) -> Vec<ProbePod> {
        self.state
            .pods
            .values()
            .map(|p| ProbePod {
                name: p.key(),
                netns: p.netns.clone(),
                v4: p.ipv4,
                v6: p.ipv6,
            })
            .collect()
    }

    /// One table per family of the lab, protocol and port, in that order.
    pub fn probe_keys(&self, protocols: &[PortProtocol], ports: &[u16]) -> Vec<TableKey> {
        let mut out = Vec::new();
        for family in self.state.ip_family.families() {
            for protocol in protocols {
                for port in ports {
                    out.push(TableKey {
                        protocol: *protocol,
                        port: *port,
                        family: Some(family),
                    });
                }
            }
        }
        out
    }

    /// Probes every ordered pair of the lab's pods for each of `keys` (see [`probe`]).
    pub async fn probe(
        &self,
        keys: Vec<TableKey>,
        timeout: Duration,
    ) -> Result<Vec<TruthTable>, LabError> {
        if keys.iter().any(|k| k.protocol == PortProtocol::Sctp) {
            return Err(LabError::InvalidArgument {
                what: "--protocols".into(),
                reason: "SCTP probes are not supported yet (the lab has no SCTP sockets)".into(),
            });
        }
        let pods = self.probe_pods();
        tokio::task::spawn_blocking(move || probe(&pods, &keys, timeout))
            .await
            .map_err(|e| LabError::Timeout {
                step: format!("probing ({e})"),
                object: "lab probe".into(),
            })?
    }
}

/// What `lab probe` prints.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeReport {
    pub tables: Vec<TruthTable>,
    /// With `--expect`: the file, and every difference from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub differences: Option<Vec<Difference>>,
    pub ok: bool,
}

impl ProbeReport {
    pub fn text(&self) -> String {
        match &self.differences {
            None => self
                .tables
                .iter()
                .map(TruthTable::text)
                .collect::<Vec<_>>()
                .join("\n"),
            Some(diffs) if diffs.is_empty() => {
                let cells: usize = self
                    .tables
                    .iter()
                    .map(|t| t.reachable.iter().flatten().filter(|c| c.is_some()).count())
                    .sum();
                format!(
                    "as expected: {cells} probes in {} tables match {}\n",
                    self.tables.len(),
                    self.expect.as_deref().unwrap_or("")
                )
            }
            Some(diffs) => {
                let mut out = format!(
                    "{} differences from {}:\n",
                    diffs.len(),
                    self.expect.as_deref().unwrap_or("")
                );
                for d in diffs {
                    out.push_str(&format!("  {d}\n"));
                }
                out
            }
        }
    }
}

/// The expected tables' keys in `expect`, each family a table stands for made explicit.
pub fn keys_of(expected: &[TruthTable], families: &[Family]) -> Vec<TableKey> {
    let mut out: BTreeMap<TableKey, ()> = BTreeMap::new();
    for t in expected {
        let fams: Vec<Family> = match t.key.family {
            Some(f) => vec![f],
            None => families.to_vec(),
        };
        for family in fams {
            out.insert(
                TableKey {
                    family: Some(family),
                    ..t.key
                },
                (),
            );
        }
    }
    out.into_keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(protocol: PortProtocol, port: u16) -> TableKey {
        TableKey {
            protocol,
            port,
            family: Some(Family::V4),
        }
    }

    fn table() -> TruthTable {
        let names: Vec<String> = ["x/a", "x/b", "y/a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        TruthTable {
            key: key(PortProtocol::Tcp, 80),
            from: names.clone(),
            to: names,
            reachable: vec![
                vec![None, Some(false), Some(true)],
                vec![Some(false), None, Some(true)],
                vec![Some(true), Some(true), None],
            ],
        }
    }

    #[test]
    fn a_printed_table_parses_back() {
        let t = table();
        let text = t.text();
        assert!(text.starts_with("TCP/80 IPv4: rows = from"), "{text}");
        assert!(text.contains("\nx/a  -    X    .\n"), "{text}");
        assert_eq!(parse_tables("t", &text), Ok(vec![t]));
    }

    #[test]
    fn hand_written_tables_parse() {
        let text = "# default deny in x
UDP/81
-   x/a x/b
x/a -   x
x/b X   .
x/b_wrong_row_is_fine_later

";
        let err = parse_tables("e.txt", text).expect_err("a row with no marks");
        assert_eq!(err.line, 6, "{err}");
        let tables =
            parse_tables("e.txt", "UDP/81\n-   x/a x/b\nx/a -   x\nx/b X   .\n").expect("parses");
        let [t] = tables.as_slice() else {
            panic!("{tables:?}")
        };
        assert_eq!(t.key.family, None);
        assert_eq!(t.key.protocol, PortProtocol::Udp);
        // The self cell is ignored whatever it says.
        assert_eq!(t.get("x/b", "x/b"), Some(None));
        assert_eq!(t.get("x/a", "x/b"), Some(Some(false)));
        for (bad, line, needle) in [
            ("x/a . .\n", 1, "outside a table"),
            ("TCP/0\n", 1, "not 1-65535"),
            ("TCP/80\nx/a .\n", 2, "header row"),
            ("TCP/80\n- x/a x/b\nx/a - ?\n", 3, "\"?\" is not"),
            ("TCP/80\n- x/a\n", 2, "no rows"),
            ("TCP/80\n- x/a\nx/a -\nTCP/80\n", 4, "second table"),
        ] {
            let err = parse_tables("f", bad).expect_err(bad);
            assert_eq!(err.line, line, "{bad}: {err}");
            assert!(err.reason.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn compare_reports_cells_tables_and_pods() {
        let actual = vec![table()];
        assert!(compare(&actual, &actual).is_empty());
        // Without a family, an expectation stands for every family.
        let mut any = table();
        any.key.family = None;
        assert!(compare(&actual, &[any.clone()]).is_empty());

        let mut expected = table();
        expected.reachable[0][1] = Some(true);
        expected.reachable[2][2] = Some(true); // self: never compared
        let diffs = compare(&actual, &[expected]);
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert_eq!(
            diffs[0].to_string(),
            "TCP/80 IPv4  x/a -> x/b: expected ., got X"
        );

        let mut fewer = table();
        fewer.from.pop();
        fewer.reachable.pop();
        let diffs = compare(&actual, &[fewer]);
        assert_eq!(diffs.len(), 2, "y/a's row is missing: {diffs:?}");
        assert!(
            diffs
                .iter()
                .all(|d| d.from == "y/a" && d.expected == "no such pod")
        );

        let diffs = compare(&actual, &[]);
        assert_eq!(diffs.len(), 1);
        assert_eq!(diffs[0].expected, "none");
        let mut udp = table();
        udp.key = key(PortProtocol::Udp, 80);
        let diffs = compare(&actual, &[table(), udp]);
        assert_eq!(diffs.len(), 1);
        assert_eq!(
            diffs[0].to_string(),
            "UDP/80 IPv4: expected a table, got none probed"
        );
    }

    #[test]
    fn expected_keys_expand_families() {
        let mut any = table();
        any.key.family = None;
        let keys = keys_of(&[any], &[Family::V4, Family::V6]);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].family, Some(Family::V6));
    }
}
