//! `--static-dir`: the files of one directory served at `/` (a web app such as the chat demo),
//! next to `/ws` and `/log/`, which take precedence.

use std::io;
use std::path::Path;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::Response;
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
/// 404 for anything missing or outside `dir` (`..` is refused). Responses say `no-cache`:
/// browsers revalidate (`Last-Modified`, 304), so a rebuilt app is picked up at once.
pub(crate) fn router(dir: &Path) -> Router {
    Router::new().fallback_service(ServeDir::new(dir)).layer(axum::middleware::map_response(no_cache))
}

async fn no_cache(mut resp: Response) -> Response {
    resp.headers_mut().entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-cache"));
    resp
}
