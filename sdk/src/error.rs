//! The error a plugin returns. It crosses the boundary as the WIT `plugin-error` variant.

use arrow_schema::ArrowError;

/// What went wrong inside a plugin, classified so the host can route it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The plugin's config table is wrong: the user fixes the pipeline file.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The input holds something the plugin refuses; `row` is the row within the batch.
    #[error("invalid input{}{}: {message}", row.map(|r| format!(" at row {r}")).unwrap_or_default(), column.as_ref().map(|c| format!(" in column `{c}`")).unwrap_or_default())]
    InvalidInput {
        /// Row index within the batch handed to `process`.
        row: Option<u64>,
        /// Column name, when one column is at fault.
        column: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// Anything else: a bug or an unexpected state in the plugin.
    #[error("internal plugin error: {0}")]
    Internal(String),
}

/// `Result` with the plugin [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidConfig`].
    pub fn config(message: impl Into<String>) -> Self {
        Error::InvalidConfig(message.into())
    }

    /// An [`Error::InvalidInput`] about one row of one column.
    pub fn input(row: usize, column: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput { row: Some(row as u64), column: Some(column.into()), message: message.into() }
    }

    /// An [`Error::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }

    /// Shift the row index of an input error by `offset` rows (used when one call carried
    /// several batches).
    pub fn offset_row(self, offset: u64) -> Self {
        match self {
            Error::InvalidInput { row, column, message } => {
                Error::InvalidInput { row: row.map(|r| r + offset), column, message }
            }
            other => other,
        }
    }
}

impl From<ArrowError> for Error {
    fn from(e: ArrowError) -> Self {
        Error::Internal(format!("arrow: {e}"))
    }
}
