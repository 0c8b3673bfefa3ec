//! A loopback TCP proxy in front of a set of servers, for partitions: a test cuts
//! it (dropping or refusing traffic) and restores it. Each new connection goes to
//! the next upstream that accepts it, so a client behind the proxy fails over
//! between servers the way one behind a load balancer does.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Forwarded.
    Up,
    /// Black-holed: connections open, nothing goes through (packets dropped);
    /// they are closed when the link comes back.
    Drop,
    /// Refused: every connection is reset at once (the host is unreachable).
    Refuse,
    /// Flapping: each connection is forwarded, then reset this long after it
    /// was accepted (a peer that accepts work and drops it at once).
    Flap(Duration),
}

pub struct Proxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    link: watch::Sender<Link>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port, forwarding to `upstreams`.
    pub async fn start(upstreams: Vec<SocketAddr>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (link, rx) = watch::channel(Link::Up);
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                next += 1;
                let start = next;
                let (upstreams, rx) = (upstreams.clone(), rx.clone());
                tokio::spawn(connection(inbound, upstreams, start, rx));
            }
        });
        Proxy { url, link, task }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        // Ends every connection still open.
        self.link.send_replace(Link::Refuse);
    }
}

/// The upstream `SocketAddr` of `http://host:port`.
pub fn socket_addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

async fn connection(
    mut inbound: TcpStream,
    upstreams: Vec<SocketAddr>,
    start: usize,
    mut link: watch::Receiver<Link>,
) {
    let now = *link.borrow_and_update();
    let lifetime = match now {
        Link::Up => None,
        Link::Flap(lifetime) => Some(lifetime),
        Link::Drop => return hold(inbound, link).await,
        Link::Refuse => return reset(inbound),
    };
    let mut outbound = None;
    for k in 0..upstreams.len() {
        let to = upstreams[(start + k) % upstreams.len()];
        // A stopped (SIGSTOP) server still completes the handshake: its requests
        // time out on the client's side, which then opens another connection.
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(to)).await
        {
            outbound = Some(s);
            break;
        }
    }
    let Some(mut outbound) = outbound else {
        return reset(inbound);
    };
    let expiry = async {
        match lifetime {
            Some(lifetime) => tokio::time::sleep(lifetime).await,
            None => std::future::pending().await,
        }
    };
    let cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => None,
        l = link.wait_for(|l| *l != now) => l.ok().map(|l| *l),
        () = expiry => Some(Link::Refuse),
    };
    drop(outbound);
    match cut {
        Some(Link::Drop) => hold(inbound, link).await,
        Some(_) => reset(inbound),
        None => {}
    }
}

/// Keeps the connection open and silent until the link changes.
async fn hold(inbound: TcpStream, mut link: watch::Receiver<Link>) {
    let _ = link.wait_for(|l| *l != Link::Drop).await;
    drop(inbound);
}

/// Closes with a reset (linger 0), as a refused or unreachable peer looks.
fn reset(inbound: TcpStream) {
    // Deprecated because a non-zero linger blocks the runtime on close; zero
    // never waits, and it is the only way to send a reset.
    #[allow(deprecated)]
    let _ = inbound.set_linger(Some(Duration::ZERO));
    drop(inbound);
}
