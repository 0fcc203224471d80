//! The typed errors against a real server: a refused handshake carries its HTTP status, a
//! refused log read its status and reason, a refused subscription the server's code.

use std::num::NonZeroU64;

use futures_util::StreamExt;
use ivy_client_native::{Client, ClientError, Error, ErrorCode, LogQuery, ServerCode, SubscriptionError};

struct Server {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn server(configure: impl FnOnce(&mut ivy_server::Config)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ivy_server::Config::default();
    configure(&mut config);
    let ivy = ivy_server::Ivy::builder(config).engine(ivy_server::engine::MemoryEngine::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ivy_server::run(ivy, listener, async {
        let _ = stopped.await;
    }));
    Server { url, stop, task, _dir: dir }
}

impl Server {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_carries_its_status() {
    let s = server(|c| c.max_connections = 0).await;
    match Client::connect(&s.url).await {
        Err(Error::Connect(e)) => {
            assert_eq!(e.status, Some(503), "{e}");
            assert!(Error::Connect(e).to_string().starts_with("cannot connect: "));
        }
        other => panic!("{other:?}"),
    }
    let url = s.url.clone();
    s.stop().await;
    // Nothing listens: no status.
    match Client::connect(&url).await {
        Err(Error::Connect(e)) => assert_eq!(e.status, None, "{e}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_the_servers_status_or_code() {
    let s = server(|c| {
        c.max_path_length = 8;
        c.max_subscriptions = 1;
    })
    .await;
    let client = Client::connect(&s.url).await.unwrap();
    // The server refuses a path longer than its limit (the client has none of its own).
    match client.log("/abcdefghijk", LogQuery::Last(NonZeroU64::MIN)).await {
        Err(Error::Log(e)) => {
            assert_eq!(e.status, Some(400));
            assert_eq!(e.message, "invalid path: path is 12 bytes long, the limit is 8");
        }
        other => panic!("{other:?}"),
    }
    let refused = client.send("/abcdefghijk", "x").await;
    assert!(
        matches!(refused, Err(Error::Request(ClientError::Server { code: ServerCode::Known(ErrorCode::PathTooLong), .. }))),
        "{refused:?}"
    );
    let _one = client.subscribe("/a").await.unwrap();
    let mut two = client.subscribe("/b").await.unwrap();
    match two.next().await {
        Some(Err(SubscriptionError::Refused(e @ ClientError::Server { .. }))) => {
            let ClientError::Server { code, .. } = &e else { unreachable!() };
            assert_eq!(*code, ErrorCode::TooManySubscriptions);
            assert_eq!(code.as_str(), "too-many-subscriptions");
            assert!(!Error::Request(e.clone()).is_uncertain());
        }
        other => panic!("{other:?}"),
    }
    client.close().await;
    s.stop().await;
}
