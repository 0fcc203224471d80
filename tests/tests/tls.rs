//! TLS end to end (issue 13): a CA and a server certificate for `localhost` and `127.0.0.1`
//! made here with rcgen, written to a temporary directory; the real `ivy-server` binary with
//! `--tls-cert` and `--tls-key` on port 0; the native client over `wss://` and `https://` with
//! the CA file, the `ivy` CLI with `--ca-file`, the refusals (an unknown CA, a wrong host name,
//! a bad CA file), what the accept loop does with clients that stall or speak plain HTTP, a
//! raw rustls client, and the server's startup errors.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ivy_client_native::{Client, Error as ClientErr, LogQuery, LogReader, Start, TlsError, TlsErrorKind};
use ivy_tests::{ServerProcess, ivy_bin, server_bin, temp_dir};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

/// The files of one test PKI.
struct Pki {
    /// The CA's certificate (what clients trust).
    ca: PathBuf,
    /// The server's certificate, signed by the CA, and its key.
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and a server certificate for `names`, signed by it, written to `dir` as PEM.
fn make_pki(dir: &Path, names: &[&str]) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: a CA of the same name would be taken for it (and fail as BadSignature).
    let tag = dir.file_name().unwrap().to_string_lossy().into_owned();
    ca_params.distinguished_name.push(DnType::CommonName, format!("Ivy test CA {tag}"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let files = Pki { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `ivy-server` with TLS on, and `extra` flags.
async fn tls_server(dir: &Path, pki: &Pki, extra: &[&str]) -> ServerProcess {
    let mut flags = vec!["--tls-cert", s(&pki.cert), "--tls-key", s(&pki.key)];
    flags.extend_from_slice(extra);
    ServerProcess::start(&dir.join("data"), &flags).await
}

/// Runs `ivy` with `args` and environment `env`: its exit code, stdout and stderr.
async fn ivy(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let child = tokio::process::Command::new(ivy_bin())
        .args(args)
        .env_remove("IVY_CA_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ivy");
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("ivy finished").expect("output");
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_client_over_wss_and_log_over_https() {
    let dir = temp_dir();
    let pki = make_pki(dir.path(), &["localhost", "127.0.0.1"]);
    let server = tls_server(dir.path(), &pki, &[]).await;
    let port = server.addr.port();
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("wss://{host}:{port}");
        let client = Client::builder(&url).ca_file(&pki.ca).connect().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let path = format!("/chat/{}", host.replace('.', "-"));
        let mut sub = client.subscribe_from(&path, Start::Beginning).await.unwrap();
        let ts = client.send(&path, "hello over TLS").await.unwrap();
        let event = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap().unwrap();
        assert_eq!((event.ts, &*event.path, &*event.data), (ts, path.as_str(), &b"hello over TLS"[..]));
        // The log over https://, by the client and by a reader alone.
        let page = client.log(&path, LogQuery::All).await.unwrap();
        assert_eq!(page.len(), 1);
        let reader = LogReader::new(&format!("https://{host}:{port}")).unwrap().ca_file(&pki.ca).unwrap();
        let page = reader.log(&path, LogQuery::All).await.unwrap();
        assert_eq!((page.len(), page[0].ts), (1, ts));
        client.close().await;
    }
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificates_and_wrong_names_are_clear_errors_not_retried() {
    let dir = temp_dir();
    let pki = make_pki(dir.path(), &["localhost", "127.0.0.1"]);
    let server = tls_server(dir.path(), &pki, &[]).await;
    let url = format!("wss://localhost:{}", server.addr.port());

    // No CA file: the system's roots do not know the test CA. Not retried, even when the
    // client is told to keep trying.
    for retry in [false, true] {
        let e = tokio::time::timeout(WAIT, Client::builder(&url).retry_initial_connect(retry).connect())
            .await
            .expect("a refused certificate is not retried")
            .unwrap_err();
        match &e {
            ClientErr::Tls(TlsError { kind: TlsErrorKind::Certificate, message }) => {
                assert!(message.contains("not signed by a trusted certificate authority") && message.contains("localhost"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    let e = LogReader::new(&url).unwrap().log("/chat", LogQuery::All).await.unwrap_err();
    assert!(matches!(&e, ClientErr::Tls(TlsError { kind: TlsErrorKind::Certificate, .. })), "{e:?}");

    // Another CA's certificate in the CA file does not help either.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let other = make_pki(&other, &["localhost"]);
    let e = Client::builder(&url).ca_file(&other.ca).connect().await.unwrap_err();
    assert!(matches!(&e, ClientErr::Tls(TlsError { kind: TlsErrorKind::Certificate, .. })), "{e:?}");

    // A CA file that cannot be used: named, nothing attempted.
    let missing = dir.path().join("missing.pem");
    let e = Client::builder(&url).ca_file(&missing).connect().await.unwrap_err();
    match &e {
        ClientErr::Tls(TlsError { kind: TlsErrorKind::CaFile, message }) => assert!(message.contains(s(&missing)), "{message}"),
        other => panic!("{other:?}"),
    }
    let e = LogReader::new(&url).unwrap().ca_file(&pki.key).unwrap_err();
    assert!(
        matches!(&e, ClientErr::Tls(TlsError { kind: TlsErrorKind::CaFile, message }) if message.contains("no PEM certificate")),
        "{e:?}"
    );

    // A certificate for another name, signed by a trusted CA.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let elsewhere = make_pki(&elsewhere, &["elsewhere.invalid"]);
    let second = tls_server(&dir.path().join("second"), &elsewhere, &[]).await;
    let e = Client::builder(format!("wss://localhost:{}", second.addr.port())).ca_file(&elsewhere.ca).connect().await.unwrap_err();
    match &e {
        ClientErr::Tls(TlsError { kind: TlsErrorKind::Certificate, message }) => {
            assert!(message.contains("not valid for the host name localhost"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    second.kill().await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_over_wss_and_https_with_ca_file() {
    let dir = temp_dir();
    let pki = make_pki(dir.path(), &["localhost", "127.0.0.1"]);
    let server = tls_server(dir.path(), &pki, &[]).await;
    let url = format!("wss://localhost:{}", server.addr.port());
    let https = format!("https://127.0.0.1:{}", server.addr.port());
    let ca = s(&pki.ca);

    let sub = tokio::process::Command::new(ivy_bin())
        .args(["--url", &url, "--ca-file", ca, "sub", "/chat", "--from-beginning", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (code, ts1, err) = ivy(&["--url", &url, "--ca-file", ca, "send", "/chat/a", "one"], &[]).await;
    assert_eq!(code, 0, "{err}");
    // The CA file from the environment, and the https:// form of the URL.
    let (code, ts2, err) = ivy(&["--url", &https, "send", "/chat/b", "two"], &[("IVY_CA_FILE", ca)]).await;
    assert_eq!(code, 0, "{err}");
    let out = tokio::time::timeout(WAIT, sub.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8(out.stdout).unwrap();
    assert_eq!(lines, format!("@{}:/chat/a:one\n@{}:/chat/b:two\n", ts1.trim(), ts2.trim()));
    let (code, log, err) = ivy(&["--url", &https, "--ca-file", ca, "log", "/chat"], &[]).await;
    assert_eq!((code, log.as_str()), (0, lines.as_str()), "{err}");

    // Without the CA: a clear message and exit code 3 (cannot connect), for each command.
    for args in [&["sub", "/chat"][..], &["send", "/chat", "x"], &["log", "/chat"], &["time"]] {
        let mut all = vec!["--url", &url];
        all.extend_from_slice(args);
        let (code, out, err) = ivy(&all, &[]).await;
        assert_eq!((code, out.as_str()), (3, ""), "{args:?}: {err}");
        assert!(err.contains("not signed by a trusted certificate authority") && err.contains("--ca-file"), "{args:?}: {err}");
    }
    // A CA file that cannot be read: bad usage (2), nothing attempted.
    let (code, _, err) = ivy(&["--url", &url, "--ca-file", "/nonexistent/ca.pem", "send", "/chat", "x"], &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    server.kill().await;
}

/// A rustls client of the tests' own, with only the test CA as root.
fn raw_tls(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// `GET target` over TLS with a raw rustls client: the whole response.
async fn raw_get(ca: &Path, addr: std::net::SocketAddr, target: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(raw_tls(ca)).connect(name, tcp).await.unwrap();
    tls.write_all(format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut response)).await.expect("response in time");
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accept_loop_bounds_stalled_and_plain_clients_and_serves_everything_over_tls() {
    let dir = temp_dir();
    let pki = make_pki(dir.path(), &["localhost", "127.0.0.1"]);
    let site = dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    std::fs::write(site.join("index.html"), "<h1>over TLS</h1>\n").unwrap();
    let server = tls_server(dir.path(), &pki, &["--first-byte-timeout", "500ms", "--header-timeout", "1s", "--static-dir", s(&site)]).await;
    let addr = server.addr;

    // A TCP client that sends nothing is closed by the first-byte timeout.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let n = tokio::time::timeout(WAIT, idle.read(&mut [0u8; 64])).await.expect("closed, not left hanging");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // One that starts a TLS handshake and stalls is closed by the header timeout.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[22, 3, 1]).await.unwrap();
    let n = tokio::time::timeout(WAIT, stalled.read(&mut [0u8; 64])).await.expect("closed, not left hanging");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // A plain ws:// client against the TLS port: refused with a 400 that says why.
    let e = Client::connect(format!("ws://127.0.0.1:{}", addr.port())).await.unwrap_err();
    match &e {
        ClientErr::Connect(c) => {
            assert_eq!(c.status, Some(400), "{c}");
            assert!(c.message.contains("speaks TLS"), "{c}");
        }
        other => panic!("{other:?}"),
    }
    let e = LogReader::new(&format!("http://127.0.0.1:{}", addr.port())).unwrap().log("/chat", LogQuery::All).await.unwrap_err();
    assert!(matches!(&e, ClientErr::Log(l) if l.status == Some(400) && l.message.contains("https://")), "{e:?}");

    // And the server keeps serving: an unmodified tokio-tungstenite client over rustls...
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("wss://localhost:{}/ws", addr.port()))
            .unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "ivy1".parse().unwrap());
    let (mut ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(tokio_tungstenite::Connector::Rustls(raw_tls(&pki.ca))))
            .await
            .unwrap();
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text("#k#:/chat:raw")).await.unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let reply = reply.into_text().unwrap();
    assert!(reply.starts_with("#k#@"), "{reply}");
    // ...a raw rustls client reading the log and a static file...
    let log = raw_get(&pki.ca, addr, "/log/chat").await;
    assert!(log.starts_with("HTTP/1.1 200") && log.contains(":/chat:raw"), "{log}");
    let page = raw_get(&pki.ca, addr, "/").await;
    assert!(page.starts_with("HTTP/1.1 200") && page.contains("<h1>over TLS</h1>\n"), "{page}");
    // ...and the native client.
    let client = Client::builder(format!("wss://127.0.0.1:{}", addr.port())).ca_file(&pki.ca).connect().await.unwrap();
    assert_eq!(client.log("/chat", LogQuery::All).await.unwrap().len(), 1);
    client.close().await;
    server.kill().await;
}

/// `ivy-server` with `args`, expected to fail at startup: its exit code and stderr.
async fn failed_start(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(server_bin())
        .args(["--memory", "--listen", "127.0.0.1:0", "--data", s(dir)])
        .args(args)
        .env_remove("IVY_TLS_CERT")
        .env_remove("IVY_TLS_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out).await.expect("exits").unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_name_the_flag_or_the_file() {
    let dir = temp_dir();
    let pki = make_pki(dir.path(), &["localhost"]);
    // A key without a certificate, and the other way round.
    let (code, err) = failed_start(dir.path(), &["--tls-key", s(&pki.key)]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-cert"), "{err}");
    let (code, err) = failed_start(dir.path(), &["--tls-cert", s(&pki.cert)]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-key"), "{err}");
    // A missing key file.
    let missing = dir.path().join("missing-key.pem");
    let (code, err) = failed_start(dir.path(), &["--tls-cert", s(&pki.cert), "--tls-key", s(&missing)]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(s(&missing)) && err.contains("cannot read"), "{err}");
    // Files swapped: the certificate file holds no key, the key file no certificate.
    let (code, err) = failed_start(dir.path(), &["--tls-cert", s(&pki.key), "--tls-key", s(&pki.cert)]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(s(&pki.key)) && err.contains("no PEM certificate"), "{err}");
    // A key that is not the certificate's.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let other = make_pki(&other, &["localhost"]);
    let (code, err) = failed_start(dir.path(), &["--tls-cert", s(&pki.cert), "--tls-key", s(&other.key)]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used together"), "{err}");
}

/// The library: `Config::tls_cert` and `Config::tls_key` make `ivy_server::run` (and
/// `serve`) terminate TLS, and a bad file fails `open` with the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_serves_tls_from_its_config() {
    let dir = temp_dir();
    let pki = make_pki(dir.path(), &["localhost", "127.0.0.1"]);
    let mut setup = ivy_tests::config(&dir.path().join("data"));
    setup.config = setup.config.clone().tls_cert(Some(pki.cert.clone())).tls_key(Some(pki.key.clone()));
    let server = ivy_tests::TestServer::start(setup).await;
    let client = Client::builder(format!("wss://localhost:{}", server.addr.port())).ca_file(&pki.ca).connect().await.unwrap();
    let ts = client.send("/lib", "embedded").await.unwrap();
    assert_eq!(client.log("/lib", LogQuery::All).await.unwrap()[0].ts, ts);
    client.close().await;
    server.stop().await;

    let missing = dir.path().join("nope.pem");
    let mut setup = ivy_tests::config(&dir.path().join("data2"));
    setup.config = setup.config.clone().tls_cert(Some(pki.cert.clone())).tls_key(Some(missing.clone()));
    let e = setup.builder().open().unwrap_err();
    assert!(e.to_string().contains(s(&missing)), "{e}");
}

/// `ivy-server` with TLS on `port`, in memory: the child, once it listens.
async fn server_on(port: u16, pki: &Pki) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(server_bin())
        .args(["--memory", "--listen", &format!("127.0.0.1:{port}"), "--tls-cert", s(&pki.cert), "--tls-key", s(&pki.key)])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
    assert_eq!(line, format!("ivy-server listening on https://127.0.0.1:{port}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// A server that comes back with a certificate the client does not trust: `ivy sub` does not
/// retry it forever but ends with the reason and exit code 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_refused_on_reconnecting_ends_the_subscriber() {
    let dir = temp_dir();
    let trusted = make_pki(dir.path(), &["localhost", "127.0.0.1"]);
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let untrusted = make_pki(&other, &["localhost", "127.0.0.1"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut first = server_on(port, &trusted).await;
    let url = format!("wss://localhost:{port}");
    let mut sub = tokio::process::Command::new(ivy_bin())
        .args(["--url", &url, "--ca-file", s(&trusted.ca), "sub", "/chat"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(sub.stdout.take().unwrap());
    // Connected once an event sent after it started arrives.
    let mut line = String::new();
    let sent = async {
        loop {
            let _ = ivy(&["--url", &url, "--ca-file", s(&trusted.ca), "send", "/chat", "up"], &[]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        r = tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line) => { r.unwrap(); }
        () = sent => {}
        () = tokio::time::sleep(WAIT) => panic!("ivy sub received nothing"),
    }
    assert!(line.ends_with(":/chat:up\n"), "{line:?}");
    first.kill().await.unwrap();
    let _ = first.wait().await;
    let mut second = server_on(port, &untrusted).await;
    let out = tokio::time::timeout(WAIT * 3, sub.wait_with_output()).await.expect("ivy sub ends instead of retrying").unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("not signed by a trusted certificate authority"), "{err}");
    second.kill().await.unwrap();
}
