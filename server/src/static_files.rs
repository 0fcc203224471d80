//! `--static-dir`: the files of one directory served at `/` (a web app such as the chat demo),
//! next to `/ws` and `/log/`, which take precedence.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::services::ServeDir;

/// Refuses a static directory that does not exist, so that a typo fails at startup rather
/// than as 404s.
pub(crate) fn check(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::NotFound, format!("static directory {} is not a directory", dir.display())))
    }
}

/// A router whose fallback serves `dir`: `GET`/`HEAD` of a file, `index.html` for a directory,
/// 404 for anything missing or outside `dir`. Responses say `no-cache`: browsers revalidate
/// (`Last-Modified`, 304), so a rebuilt app is picked up at once; and `nosniff`.
///
/// Refused with 404 before the file is looked at: `/ws` or `/log` spelled with percent
/// escapes (the protocol's names, which the routes above match only unescaped), a path with a segment starting with `.`
/// (dot-files such as `.env` or `.git/`, and `..`), a backslash or an empty segment (`//x`,
/// whose directory redirect would be the scheme-relative `//x/`, another host), and a path
/// that resolves, through symbolic links, outside the directory.
pub(crate) fn router(dir: &Path) -> io::Result<Router> {
    let root = Arc::new(dir.canonicalize()?);
    let serve = ServeDir::new(&*root);
    Ok(Router::new()
        .fallback_service(serve)
        .layer(axum::middleware::map_response(no_cache))
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| guard(root.clone(), req, next))))
}

async fn guard(root: Arc<PathBuf>, req: Request, next: Next) -> Response {
    match allowed(&root, req.uri().path()).await {
        true => next.run(req).await,
        false => (StatusCode::NOT_FOUND, [(header::X_CONTENT_TYPE_OPTIONS, "nosniff")]).into_response(),
    }
}

/// Whether the request path may be served from `root` (see [`router`]).
async fn allowed(root: &Path, raw: &str) -> bool {
    let Ok(path) = percent_encoding::percent_decode_str(raw).decode_utf8() else { return false };
    let Some(rel) = path.strip_prefix('/') else { return false };
    // `/ws` and `/log` reached the file fallback only if they were spelled encoded (`/%6cog/`):
    // those names are the protocol's, never a file's.
    if matches!(rel.split('/').next(), Some("ws" | "log")) {
        return false;
    }
    let mut segments = rel.split('/').peekable();
    while let Some(seg) = segments.next() {
        // An empty segment is allowed only last (`/docs/`).
        if seg.starts_with('.') || seg.contains('\\') || (seg.is_empty() && segments.peek().is_some()) {
            return false;
        }
    }
    // Missing files are ServeDir's 404; existing ones must resolve inside the root.
    match tokio::fs::canonicalize(root.join(rel)).await {
        Ok(real) => real.starts_with(root),
        Err(_) => true,
    }
}

async fn no_cache(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}
