//! The HTTP log endpoint: the original's format, subtree logs, `n`, cursor paging, caching
//! headers and errors.

use ivy_tests::{Client, TestServer, config, http_get, log_text, temp_dir};

async fn seed(server: &TestServer, events: &[(&str, &str)]) -> Vec<String> {
    let mut c = Client::connect(&server.ws_url()).await;
    let mut lines = Vec::new();
    for (path, data) in events {
        let ts = c.publish(path, data).await;
        lines.push(format!("@{ts}:{path}:{data}"));
    }
    lines
}

#[tokio::test]
async fn original_format_subtree_and_n() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let l = seed(&server, &[("/a", "1"), ("/a/b", "2"), ("/ab", "3"), ("/a/b/c", "4"), ("/z", "5")]).await;
    let r = http_get(server.addr, "/log/a", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    // Its own events and all descendants', ascending, joined by \n, no trailing newline.
    assert_eq!(r.text(), format!("{}\n{}\n{}", l[0], l[1], l[3]));
    assert_eq!(log_text(server.addr, "/log/a/b").await, format!("{}\n{}", l[1], l[3]));
    assert_eq!(log_text(server.addr, "/log/a/b/").await, format!("{}\n{}", l[1], l[3]));
    assert_eq!(log_text(server.addr, "/log/ab").await, l[2]);
    assert_eq!(log_text(server.addr, "/log/").await, l.join("\n"));
    // n=K: the last K.
    assert_eq!(log_text(server.addr, "/log/a?n=1").await, l[3]);
    assert_eq!(log_text(server.addr, "/log/a?n=2").await, format!("{}\n{}", l[1], l[3]));
    assert_eq!(log_text(server.addr, "/log/a?n=100").await, format!("{}\n{}\n{}", l[0], l[1], l[3]));
    assert_eq!(log_text(server.addr, "/log/?n=1").await, l[4]);
    // Unknown path: 200, empty.
    let r = http_get(server.addr, "/log/nobody/here", &[]).await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    assert_eq!(r.header("etag"), Some("\"empty\""));
    server.stop().await;
}

#[tokio::test]
async fn bad_parameters_are_400_with_a_one_line_reason() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let cases = [
        ("/log/a?n=0", "invalid line count"),
        ("/log/a?n=-3", "invalid line count"),
        ("/log/a?n=x", "invalid line count"),
        ("/log/a?n=", "invalid line count"),
        ("/log/a?limit=0", "invalid limit: must be an integer >= 1"),
        ("/log/a?limit=ten", "invalid limit: must be an integer >= 1"),
        ("/log/a?after=yesterday", "invalid after timestamp: timestamp must be SECONDS.NANOSECONDS with 9 nanosecond digits"),
        ("/log/a?n=1&after=1.000000000", "n cannot be combined with after or limit"),
        ("/log/a?limit=1&limit=2", "parameter limit given more than once"),
        ("/log/A", "invalid path: invalid character 'A' at byte 1 of path (allowed: a-z 0-9 . - /)"),
        ("/log/a%20b", "invalid path: invalid character '%' at byte 2 of path (allowed: a-z 0-9 . - /)"),
        ("/log/a//", "invalid path: path must not end with '/' (only one trailing '/' is removed)"),
    ];
    for (target, reason) in cases {
        let r = http_get(server.addr, target, &[]).await;
        assert_eq!(r.status, 400, "{target}");
        assert_eq!(r.text(), format!("{reason}\n"), "{target}");
    }
    // Unknown parameters are ignored.
    assert_eq!(http_get(server.addr, "/log/a?cachebust=1", &[]).await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn cursor_paging_with_link_and_cache_headers() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let events: Vec<(String, String)> = (0..7).map(|i| ("/p/x".to_string(), i.to_string())).collect();
    let refs: Vec<(&str, &str)> = events.iter().map(|(p, d)| (p.as_str(), d.as_str())).collect();
    let l = seed(&server, &refs).await;
    let ts = |i: usize| l[i][1..21].to_string();

    // A full page: Link to the next, immutable.
    let r = http_get(server.addr, "/log/p?limit=3", &[]).await;
    assert_eq!(r.text(), l[0..3].join("\n"));
    assert_eq!(r.header("link"), Some(format!("</log/p?after={}&limit=3>; rel=\"next\"", ts(2)).as_str()));
    assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(r.header("etag"), Some(format!("\"{}\"", ts(2)).as_str()));
    assert!(r.header("last-modified").is_some());
    // Follow the links to the end; the last page is partial: no Link, no-cache.
    let r2 = http_get(server.addr, &format!("/log/p?after={}&limit=3", ts(2)), &[]).await;
    assert_eq!(r2.text(), l[3..6].join("\n"));
    assert_eq!(r2.header("cache-control"), Some("public, max-age=31536000, immutable"));
    let r3 = http_get(server.addr, &format!("/log/p?after={}&limit=3", ts(5)), &[]).await;
    assert_eq!(r3.text(), l[6]);
    assert_eq!(r3.header("link"), None);
    assert_eq!(r3.header("cache-control"), Some("no-cache"));
    // Caught up: empty page.
    let r4 = http_get(server.addr, &format!("/log/p?after={}&limit=3", ts(6)), &[]).await;
    assert_eq!((r4.status, r4.body.len()), (200, 0));
    assert_eq!(r4.header("cache-control"), Some("no-cache"));
    // `after` accepts a leading @, raw or percent-encoded.
    assert_eq!(log_text(server.addr, &format!("/log/p?after=@{}&limit=3", ts(5))).await, l[6]);
    assert_eq!(log_text(server.addr, &format!("/log/p?after=%40{}&limit=3", ts(5))).await, l[6]);
    // `after` alone: the rest, up to the server's page limit, not immutable.
    let r5 = http_get(server.addr, &format!("/log/p?after={}", ts(3)), &[]).await;
    assert_eq!(r5.text(), l[4..].join("\n"));
    assert_eq!(r5.header("cache-control"), Some("no-cache"));
    // Whole-log and n=K responses are never immutable.
    for target in ["/log/p", "/log/p?n=2"] {
        assert_eq!(http_get(server.addr, target, &[]).await.header("cache-control"), Some("no-cache"), "{target}");
    }
    server.stop().await;
}

#[tokio::test]
async fn limit_is_capped_by_the_server_and_capped_pages_are_not_immutable() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    cfg.log_page_limit = 2;
    let server = TestServer::start(cfg).await;
    let l = seed(&server, &[("/c", "1"), ("/c", "2"), ("/c", "3")]).await;
    let r = http_get(server.addr, "/log/c?limit=100", &[]).await;
    assert_eq!(r.text(), l[0..2].join("\n"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    assert_eq!(r.header("link"), Some(format!("</log/c?after={}&limit=2>; rel=\"next\"", &l[1][1..21]).as_str()));
    let r = http_get(server.addr, "/log/c?limit=2", &[]).await;
    assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    // Whole-log reads are not capped (streamed).
    assert_eq!(log_text(server.addr, "/log/c").await, l.join("\n"));
    server.stop().await;
}

#[tokio::test]
async fn etag_and_if_none_match() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let l = seed(&server, &[("/e", "1"), ("/e", "2")]).await;
    let r = http_get(server.addr, "/log/e", &[]).await;
    let tag = r.header("etag").unwrap().to_string();
    assert_eq!(tag, format!("\"{}\"", &l[1][1..21]));
    let r = http_get(server.addr, "/log/e", &[("If-None-Match", &tag)]).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(tag.as_str()));
    let r = http_get(server.addr, "/log/e", &[("If-None-Match", "\"other\", W/".to_string().as_str())]).await;
    assert_eq!(r.status, 200);
    // A new event changes the tag.
    seed(&server, &[("/e/sub", "3")]).await;
    let r = http_get(server.addr, "/log/e", &[("If-None-Match", &tag)]).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.header("etag"), Some(tag.as_str()));
    server.stop().await;
}

#[tokio::test]
async fn large_logs_stream_completely() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let mut c = Client::connect(&server.ws_url()).await;
    let data = "d".repeat(1000);
    for i in 0..300 {
        c.send(&format!("#{i}#:/big/x:{data}")).await;
    }
    for _ in 0..300 {
        c.recv().await;
    }
    // 300 KB: several 64 KiB chunks.
    let r = http_get(server.addr, "/log/big", &[]).await;
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let body = r.text();
    assert_eq!(body.lines().count(), 300);
    assert!(body.lines().all(|l| l.ends_with(&data)));
    assert!(!body.ends_with('\n'));
    let last = log_text(server.addr, "/log/big?n=120").await;
    assert_eq!(last.lines().collect::<Vec<_>>(), body.lines().skip(180).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn cors_for_browsers() {
    let dir = temp_dir();
    let server = TestServer::start_in(dir.path()).await;
    let r = http_get(server.addr, "/log/x", &[("Origin", "http://localhost:5173")]).await;
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("Link, ETag, Last-Modified, Location, Ivy-Horizon, Ivy-Extensions, WWW-Authenticate, Idempotent-Replayed")
    );
    server.stop().await;
}
