//! The server as a library embedded in a larger axum application.

use std::sync::Arc;

use ivy_server::engine::SledEngine;
use ivy_server::{Config, Ivy, PublishError};
use ivy_tests::{Client, config, http_get, temp_dir};

#[tokio::test]
async fn nested_under_a_prefix_next_to_the_apps_own_routes() {
    let dir = temp_dir();
    let ivy = Arc::new(Ivy::builder(Config::default()).engine(SledEngine::new(dir.path())).open().unwrap());
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" })).nest("/ivy", ivy.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = ivy.stop_signal();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await.unwrap();
    });

    assert_eq!(http_get(addr, "/health", &[]).await.text(), "ok");
    let mut sub = Client::connect(&format!("ws://{addr}/ivy/ws")).await;
    sub.subscribe("/app").await;
    // The application publishes directly; no sender is excluded.
    let t1 = ivy.publish("app/news", "from the app").await.unwrap();
    assert_eq!(sub.recv().await, format!("@{t1}:/app/news:from the app"));
    let t2 = ivy.publish("/app", "2").await.unwrap();
    assert!(t2 > t1);
    assert!(matches!(ivy.publish("/Bad", "x").await, Err(PublishError::InvalidPath(_))));

    let r = http_get(addr, "/ivy/log/app?limit=1", &[]).await;
    assert_eq!(r.text(), format!("@{t1}:/app/news:from the app"));
    assert_eq!(r.header("link"), Some(format!("</ivy/log/app?after={t1}&limit=1>; rel=\"next\"").as_str()));

    ivy.stop_signal().cancel();
    task.await.unwrap();
    ivy.shutdown().await;
    assert!(matches!(ivy.publish("/app", "late").await, Err(PublishError::ShuttingDown)));
}

#[tokio::test]
async fn restricted_origins_vary_and_cors_on_errors() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.allowed_origins = vec!["http://good.example".into()];
    let server = ivy_tests::TestServer::start(cfg).await;
    // Vary: Origin whenever the answer depends on it, with or without an Origin header.
    for h in [&[][..], &[("Origin", "http://good.example")][..]] {
        let r = http_get(server.addr, "/log/x", h).await;
        assert_eq!(r.header("vary"), Some("Origin"), "{h:?}");
    }
    // Error responses carry CORS headers too, so a browser can read the reason.
    let r = http_get(server.addr, "/log/x?n=0", &[("Origin", "http://good.example")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("access-control-allow-origin"), Some("http://good.example"));
    // A non-ASCII Origin is not waved through.
    let (status, _) = ivy_tests::raw_handshake(server.addr, &[("Origin", "http://g\u{f6}od.example")]).await;
    assert_eq!(status, 403);
    server.stop().await;
}

#[tokio::test]
async fn open_origins_send_a_wildcard_and_no_vary() {
    let dir = temp_dir();
    let server = ivy_tests::TestServer::start(config(dir.path())).await;
    let r = http_get(server.addr, "/log/x?n=0", &[("Origin", "http://anything.example")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("vary"), None);
    let mut c = Client::connect(&server.ws_url()).await;
    c.subscribe("/x").await;
    server.stop().await;
}
