//! `wiremesh lab serve` (hidden): the server in each lab pod's namespace, so probes of the
//! pod's container ports find a listener. TCP: accept and close (a completed handshake is the
//! answer). UDP: echo each datagram. Every socket is bound before the ready file is written;
//! then the process serves until it is killed (`lab down`, `lab apply --delete`).
//!
//! SCTP is not served: the standard library has no SCTP sockets, and the lab uses no unsafe
//! code (see docs/lab.md).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::thread;

use tracing::{debug, info, warn};

use super::LabError;

/// Binds `[::]:port` (both families on Linux' default `bindv6only=0`), or `0.0.0.0:port`
/// where IPv6 is off.
fn bind<T>(port: u16, f: impl Fn(SocketAddr) -> io::Result<T>) -> io::Result<T> {
    f(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| f(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
}

fn bind_error(what: &str, port: u16) -> impl FnOnce(io::Error) -> LabError {
    let object = format!("{what} port {port}");
    move |source| LabError::Spawn {
        step: "binding".into(),
        object,
        source,
    }
}

fn serve_tcp(listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            // Dropping it closes the connection: the handshake was the answer.
            Ok(stream) => debug!(peer = ?stream.peer_addr().ok(), "tcp connection"),
            Err(e) => warn!(error = %e, "accept"),
        }
    }
}

fn serve_udp(socket: UdpSocket) {
    let mut buffer = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buffer) {
            Ok((n, peer)) => {
                if let Err(e) = socket.send_to(&buffer[..n], peer) {
                    warn!(%peer, error = %e, "udp echo");
                }
            }
            Err(e) => warn!(error = %e, "udp receive"),
        }
    }
}

/// Binds every port, writes `ready` (if given), then serves until killed.
pub fn serve(tcp: &[u16], udp: &[u16], ready: Option<&Path>) -> Result<(), LabError> {
    let mut workers = Vec::new();
    for &port in tcp {
        let listener = bind(port, TcpListener::bind).map_err(bind_error("TCP", port))?;
        workers.push(thread::spawn(move || serve_tcp(listener)));
    }
    for &port in udp {
        let socket = bind(port, UdpSocket::bind).map_err(bind_error("UDP", port))?;
        workers.push(thread::spawn(move || serve_udp(socket)));
    }
    if let Some(path) = ready {
        std::fs::write(path, b"").map_err(|source| LabError::Io {
            step: "writing the ready file".into(),
            path: path.to_path_buf(),
            source,
        })?;
    }
    info!(?tcp, ?udp, "serving");
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_and_answers_on_loopback() {
        // Free ports from the kernel, released and then served.
        let tcp_port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("tcp port")
            .port();
        let udp_port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("udp port")
            .port();
        thread::spawn(move || serve(&[tcp_port], &[udp_port], None));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let client = UdpSocket::bind("127.0.0.1:0").expect("client");
        client
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        let mut echoed = false;
        while !echoed && std::time::Instant::now() < deadline {
            let _ = client.send_to(b"hi", ("127.0.0.1", udp_port));
            let mut buf = [0u8; 8];
            echoed = client.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"hi");
        }
        assert!(echoed, "udp echo");
        assert!(std::net::TcpStream::connect(("127.0.0.1", tcp_port)).is_ok());
    }
}
