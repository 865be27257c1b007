//! The credential listener's request path, fed raw bytes: hyper's HTTP/1
//! parser and the agent's handler (attribution off, a fixed upstream), over
//! an in-memory connection. Any input gets an answer or a closed connection;
//! nothing panics, nothing hangs.
#![no_main]

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use agent::{
    caller::{attribution::Accepted, syn::SavedSyn},
    credentials::{CacheOptions, CredentialCache},
    serving::admission::{Connection, ConnectionBudget},
    serving::client::ClientKey,
    serving::handler::{self, AppState},
    telemetry::audit::{Auditor, Peer},
    telemetry::metrics::Metrics,
    upstream::{Assumed, Upstream, UpstreamFuture},
};
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// EKS Auth that always answers at once.
struct Fixed;

impl Upstream for Fixed {
    fn assume(&self, token: String) -> UpstreamFuture {
        Box::pin(async move {
            Ok(Assumed {
                answer: agent::upstream::SdkAnswer {
                    access_key_id: "ASIAFUZZ",
                    secret_access_key: "secret",
                    session_token: &format!("session-{}", token.len()),
                    account_id: Some("111122223333"),
                    expiration: SystemTime::now() + Duration::from_secs(3600),
                }
                .encode(),
                expiration: SystemTime::now() + Duration::from_secs(3600),
                association_id: "a-fuzz".into(),
                role_arn: "arn:aws:sts::111122223333:assumed-role/r/s".into(),
                subject: "default/app".into(),
            })
        })
    }
}

struct World {
    runtime: tokio::runtime::Runtime,
    state: Arc<AppState>,
    budget: ConnectionBudget,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let metrics = Arc::new(Metrics::new());
        let credentials = runtime.block_on(async {
            CredentialCache::new(
                Arc::new(Fixed),
                metrics.clone(),
                CacheOptions {
                    max_entries: 64,
                    retention: Duration::from_secs(3600),
                    max_service_qps: 1.0,
                },
            )
        });
        let state = Arc::new(AppState {
            cluster_name: "fuzz".into(),
            served_hosts: vec!["169.254.170.23".parse().expect("ip")],
            credentials,
            metrics: metrics.clone(),
            auditor: Auditor::new("fuzz", None, metrics).expect("auditor").into(),
            verification: None,
            identifier: None,
            limiter: None,
            global_limiter: None,
            tokens: agent::token::Recent::new(handler::RECENT_TOKENS),
        });
        World {
            runtime,
            state,
            budget: ConnectionBudget::new(1024, 1024),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let peer: SocketAddr = "198.18.0.2:40000".parse().expect("addr");
    let info = Accepted {
        peer,
        local: "169.254.170.23:80".parse().expect("addr"),
        syn: SavedSyn::Kept(None),
    };
    let Ok((admitted, _)) = world.budget.admit(ClientKey::Source(peer.ip())) else {
        return;
    };
    let conn = Arc::new(Connection {
        peer: Peer::new(peer),
        info,
        identified: None,
        admitted,
        token: Default::default(),
    });
    let state = world.state.clone();
    world.runtime.block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service = service_fn(move |req| {
            let (state, conn) = (state.clone(), conn.clone());
            async move { Ok::<_, std::convert::Infallible>(handler::handle(state, conn, req).await) }
        });
        let serving = tokio::spawn(
            http1::Builder::new()
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(server), service),
        );
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer));
        assert!(read.await.is_ok(), "no answer and no close within 5 s");
        let _ = serving.await;
    });
});
