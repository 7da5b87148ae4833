//! `ballast lab serve` (hidden): a backend's real server. Bound to the VIPs on the backend's
//! loopback, it answers every TCP connection with the backend's name and closes it, and every
//! UDP datagram with the name. The replies leave from the VIP straight to the client
//! (direct server return): the load balancer never sees them.
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, UdpSocket};

use anyhow::Context as _;

use crate::netns;

/// Printed on stdout once every socket is bound: `up` waits for it.
pub const READY: &str = "ready";

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The backend's network namespace.
    #[arg(long)]
    pub netns: String,
    /// The name to answer with.
    #[arg(long)]
    pub name: String,
    /// A TCP address to listen on (repeatable).
    #[arg(long = "tcp")]
    pub tcp: Vec<SocketAddr>,
    /// A UDP address to answer on (repeatable).
    #[arg(long = "udp")]
    pub udp: Vec<SocketAddr>,
}

pub fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    // Threads spawned after this inherit the namespace.
    netns::enter(&args.netns)?;
    let listeners = args
        .tcp
        .iter()
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("listening on TCP {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sockets = args
        .udp
        .iter()
        .map(|addr| UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{READY}").and_then(|()| stdout.flush()).context("signalling readiness")?;
    drop(stdout);
    let reply = format!("{}\n", args.name);
    std::thread::scope(|s| {
        for listener in &listeners {
            s.spawn(|| answer_tcp(listener, reply.as_bytes()));
        }
        for socket in &sockets {
            s.spawn(|| answer_udp(socket, reply.as_bytes()));
        }
    });
    Ok(())
}

/// Writes the name and closes: the server closes first, so the client's end of the flow is
/// free again at once and the same source port can be used for the next connection.
fn answer_tcp(listener: &TcpListener, reply: &[u8]) {
    for stream in listener.incoming() {
        let answered = stream.and_then(|mut stream| stream.write_all(reply));
        if let Err(err) = answered {
            eprintln!("tcp: {err}");
        }
    }
}

fn answer_udp(socket: &UdpSocket, reply: &[u8]) {
    let mut buf = [0u8; 2048];
    loop {
        let answered = socket.recv_from(&mut buf).and_then(|(_, client)| socket.send_to(reply, client));
        if let Err(err) = answered {
            eprintln!("udp: {err}");
        }
    }
}
