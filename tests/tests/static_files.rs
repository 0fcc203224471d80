//! `--static-dir`: a directory served at `/` next to `/ws` and `/log/` (the chat demo is served
//! this way), off when not configured.

use std::path::Path;

use ivy_tests::{Client, ServerProcess, TestServer, config, http_get, temp_dir};

/// A site in `root/site` and a secret file next to it, outside the served directory.
fn site(root: &Path) -> std::path::PathBuf {
    let site = root.join("site");
    std::fs::create_dir_all(site.join("assets")).unwrap();
    std::fs::create_dir_all(site.join("docs")).unwrap();
    std::fs::write(site.join("index.html"), "<!doctype html><title>chat</title>").unwrap();
    std::fs::write(site.join("assets/app.js"), "console.log('hi');").unwrap();
    std::fs::write(site.join("docs/index.html"), "docs").unwrap();
    // Names that collide with the protocol's endpoints must not shadow them.
    std::fs::write(site.join("ws"), "not the websocket").unwrap();
    std::fs::create_dir_all(site.join("log")).unwrap();
    std::fs::write(site.join("log/index.html"), "not the log").unwrap();
    std::fs::write(root.join("secret.txt"), "SECRET").unwrap();
    site
}

#[tokio::test]
async fn serves_index_files_and_404() {
    let data = temp_dir();
    let www = temp_dir();
    let mut cfg = config(data.path());
    cfg.static_dir = Some(site(www.path()));
    let server = TestServer::start(cfg).await;

    let r = http_get(server.addr, "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "<!doctype html><title>chat</title>");
    assert!(r.header("content-type").unwrap().starts_with("text/html"), "{:?}", r.header("content-type"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));

    let r = http_get(server.addr, "/index.html", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "<!doctype html><title>chat</title>"));

    let r = http_get(server.addr, "/assets/app.js", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "console.log('hi');");
    assert!(r.header("content-type").unwrap().contains("javascript"), "{:?}", r.header("content-type"));
    // Revalidation: the Last-Modified it sent gives a 304.
    let lm = r.header("last-modified").expect("last-modified").to_string();
    let r = http_get(server.addr, "/assets/app.js", &[("If-Modified-Since", &lm)]).await;
    assert_eq!(r.status, 304);

    let r = http_get(server.addr, "/docs/", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "docs"));

    for missing in ["/nope.html", "/assets/nope.js", "/assets/app.js/x"] {
        let r = http_get(server.addr, missing, &[]).await;
        assert_eq!(r.status, 404, "{missing}");
    }
    server.stop().await;
}

#[tokio::test]
async fn path_traversal_is_refused() {
    let data = temp_dir();
    let www = temp_dir();
    let mut cfg = config(data.path());
    cfg.static_dir = Some(site(www.path()));
    let server = TestServer::start(cfg).await;
    for target in [
        "/../secret.txt",
        "/assets/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/assets/..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
    ] {
        let r = http_get(server.addr, target, &[]).await;
        assert_ne!(r.status, 200, "{target} was served");
        assert!(!String::from_utf8_lossy(&r.body).contains("SECRET"), "{target} leaked the file");
    }
    server.stop().await;
}

/// Symbolic links that lead out of the directory, dot-files and scheme-relative redirects
/// (`GET //assets` once redirected to `//assets/`, another host) are refused.
#[tokio::test]
async fn symlinks_out_of_the_directory_dotfiles_and_open_redirects_are_refused() {
    let data = temp_dir();
    let www = temp_dir();
    let dir = site(www.path());
    std::os::unix::fs::symlink(www.path().join("secret.txt"), dir.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(www.path(), dir.join("up")).unwrap();
    std::os::unix::fs::symlink(dir.join("assets/app.js"), dir.join("app.js")).unwrap();
    std::fs::write(dir.join(".env"), "SECRET=1").unwrap();
    std::fs::create_dir_all(dir.join(".git")).unwrap();
    std::fs::write(dir.join(".git/config"), "SECRET").unwrap();
    let mut cfg = config(data.path());
    cfg.static_dir = Some(dir);
    let server = TestServer::start(cfg).await;
    for target in
        ["/leak.txt", "/up/secret.txt", "/.env", "/.git/config", "/%2eenv", "/assets/.hidden", "/%6cog/", "/%6Cog/index.html", "/%77s"]
    {
        let r = http_get(server.addr, target, &[]).await;
        assert_eq!(r.status, 404, "{target}");
        assert!(!String::from_utf8_lossy(&r.body).contains("SECRET"), "{target} leaked");
    }
    // A link that stays inside is fine.
    let r = http_get(server.addr, "/app.js", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "console.log('hi');"));
    for target in ["//assets", "//assets/", "///example.com/", "/assets"] {
        let r = http_get(server.addr, target, &[]).await;
        if let Some(location) = r.header("location") {
            assert!(location.starts_with('/') && !location.starts_with("//"), "{target} redirected to {location}");
        }
    }
    // Responses say what they are: no content sniffing.
    let r = http_get(server.addr, "/index.html", &[]).await;
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    server.stop().await;
}

#[tokio::test]
async fn ws_and_log_keep_precedence() {
    let data = temp_dir();
    let www = temp_dir();
    let mut cfg = config(data.path());
    cfg.static_dir = Some(site(www.path()));
    let server = TestServer::start(cfg).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let ts = c.publish("/chat/lobby", "hi").await;
    let r = http_get(server.addr, "/log/chat", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("@{ts}:/chat/lobby:hi"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let r = http_get(server.addr, "/log/", &[]).await;
    assert_eq!(r.text(), format!("@{ts}:/chat/lobby:hi"));
    // /ws without an upgrade is the WebSocket layer's refusal, not the file named `ws`.
    let r = http_get(server.addr, "/ws", &[]).await;
    assert!((400..500).contains(&r.status), "{}", r.status);
    assert!(!r.text().contains("not the websocket"));
    c.close().await;
    server.stop().await;
}

#[tokio::test]
async fn off_when_unset() {
    let data = temp_dir();
    let server = TestServer::start_in(data.path()).await;
    for target in ["/", "/index.html", "/assets/app.js"] {
        let r = http_get(server.addr, target, &[]).await;
        assert_eq!(r.status, 404, "{target}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_missing_directory_is_an_error_at_startup() {
    let data = temp_dir();
    let mut cfg = config(data.path());
    cfg.static_dir = Some(data.path().join("no-such-dir"));
    let err = cfg.builder().open().expect_err("a missing static directory must be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

#[tokio::test]
async fn the_binary_takes_the_flag() {
    let data = temp_dir();
    let www = temp_dir();
    let dir = site(www.path());
    let server = ServerProcess::start(data.path(), &["--static-dir", dir.to_str().unwrap()]).await;
    let r = http_get(server.addr, "/", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "<!doctype html><title>chat</title>"));
    server.terminate().await;
}
