//! The harness's one error type: what failed, with the cause kept.

use std::io;

use tokio_tungstenite::tungstenite;

/// Why a scenario (or the harness set-up) failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file, socket or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A PostgreSQL command failed (the detail carries the server's message).
    #[error("{context}: {detail}")]
    Pg {
        /// What we were doing.
        context: String,
        /// The error and its causes, rendered.
        detail: String,
    },
    /// A WebSocket handshake or frame failed.
    #[error("{context}: {source}")]
    Ws {
        /// What we were doing.
        context: String,
        /// The cause.
        #[source]
        source: Box<tungstenite::Error>,
    },
    /// The throwaway cluster could not start.
    #[error(transparent)]
    Cluster(#[from] citapulse_testkit::ClusterError),
    /// Anything else, already explained.
    #[error("{0}")]
    Failed(String),
}

/// The harness's result type.
pub type Result<T> = std::result::Result<T, BenchError>;

/// Attaches what we were doing to a library error.
pub trait Context<T> {
    /// Wraps the error with `context` (converted only on failure).
    fn ctx(self, context: impl Into<String>) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, io::Error> {
    fn ctx(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| BenchError::Io {
            context: context.into(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, tokio_postgres::Error> {
    fn ctx(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| BenchError::Pg {
            context: context.into(),
            detail: pg_detail(&e),
        })
    }
}

impl<T> Context<T> for std::result::Result<T, tungstenite::Error> {
    fn ctx(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| BenchError::Ws {
            context: context.into(),
            source: Box::new(source),
        })
    }
}

/// The server's message when there is one, else the error and its causes.
pub fn pg_detail(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return db.message().to_string();
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Shorthand for [`BenchError::Failed`].
pub fn failed(message: impl Into<String>) -> BenchError {
    BenchError::Failed(message.into())
}
