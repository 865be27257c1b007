//! Waiting for the agent's ports when nothing was handed over: an agent
//! that offers no handover (no pinned programs, so no key to prove a
//! successor with), or whose handover failed, still holds them. Exiting
//! instead would stall a surge update: the old pod is removed only once
//! this one is ready, and the kubelet's probe of this pod's port is
//! answered by the old agent meanwhile.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tracing::{info, warn};

/// A port the agent serves, and what for (named while it is held).
#[derive(Clone, Copy, Debug)]
pub struct Port {
    pub addr: SocketAddr,
    pub role: Role,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Credentials,
    Probe,
    Metrics,
}

impl Role {
    fn describe(self) -> &'static str {
        match self {
            Role::Credentials => "credentials",
            Role::Probe => "probe (--probe-port)",
            Role::Metrics => "metrics (--metrics-port)",
        }
    }
}

/// How often the ports are tried, and how often the wait is said again.
const POLL: Duration = Duration::from_millis(100);
const NOTICE: Duration = Duration::from_secs(30);

/// The credential addresses free but the probe or metrics port held: an
/// agent closing its last listeners, or another program on that port,
/// which binding it then names. How long the first is given.
const OTHERS_GRACE: Duration = Duration::from_secs(2);

/// Returns once none of `ports` is held, waiting as long as a credential
/// address is (only the agent binds those: the link is its own). All of
/// them: the agent that holds them closes them one by one as it stops, and
/// one still held when this agent binds would be missing for good. A port
/// failing otherwise than being held (no link has the address yet, say) is
/// left to binding it to report.
pub async fn wait_until_released(ports: &[Port]) {
    let started = Instant::now();
    let mut said: Option<Instant> = None;
    let mut only_others_since: Option<Instant> = None;
    loop {
        let held: Vec<&Port> = ports.iter().filter(|port| in_use(port.addr)).collect();
        let Some(first) = held.first() else {
            break;
        };
        if held.iter().any(|port| port.role == Role::Credentials) {
            only_others_since = None;
        } else if only_others_since.get_or_insert_with(Instant::now).elapsed() >= OTHERS_GRACE {
            break;
        }
        if said.is_none_or(|at| at.elapsed() >= NOTICE) {
            warn!(
                addr = %first.addr,
                port = first.role.describe(),
                waited_s = started.elapsed().as_secs(),
                "the agent's ports are held and nothing was handed over (an agent without a handover, or another program): waiting for them to be released"
            );
            said = Some(Instant::now());
        }
        tokio::time::sleep(POLL).await;
    }
    if said.is_some() {
        info!(
            waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "the agent's ports were released; binding"
        );
    }
}

/// Whether another socket holds `addr`. Bound, never listened on: a SYN
/// meanwhile finds no listener of this agent's to be reset by. With
/// `SO_REUSEADDR`, as the agent's own listeners: a connection in
/// `TIME_WAIT` holds nothing.
fn in_use(addr: SocketAddr) -> bool {
    let Ok(socket) = Socket::new(Domain::for_address(addr), Type::STREAM, None) else {
        return false;
    };
    let _ = socket.set_reuse_address(true);
    socket
        .bind(&addr.into())
        .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_port_is_held_and_a_closed_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert!(in_use(addr));
        drop(listener);
        assert!(!in_use(addr));
    }

    #[tokio::test]
    async fn only_a_probe_or_metrics_port_held_is_waited_for_a_moment() {
        let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let ports = [Port {
            addr: other.local_addr().expect("addr"),
            role: Role::Metrics,
        }];
        let started = Instant::now();
        tokio::time::timeout(OTHERS_GRACE * 5, wait_until_released(&ports))
            .await
            .expect("a foreign program on the metrics port is not waited for forever");
        assert!(started.elapsed() >= OTHERS_GRACE);
    }
}
