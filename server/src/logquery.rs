//! Parsing of the log endpoint's query string (`n`, `after`, `limit`). The format has one
//! definition, in the protocol core, which the clients use to write it.

pub use ivy_client_core::http::{LogQuery, LogQueryError};

/// Parses a raw query string (see [`LogQuery::parse`]). Unknown parameters are ignored; the
/// error's `Display` is the one-line reason sent with status 400.
pub fn parse(raw: Option<&str>) -> Result<LogQuery, LogQueryError> {
    LogQuery::parse(raw)
}
