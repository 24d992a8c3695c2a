//! The crate's one error type. Every message about data names the file and the 1-based line, and
//! the field when there is one, in the form editors and terminals turn into links:
//! ``data.jsonl:17: field `messages[2].role`: unknown role "bot"``.

use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A JSONL line that cannot become a record: invalid JSON, a missing or mistyped field, an
    /// empty assistant turn, an unknown role, no recognisable format.
    #[error("{}:{line}: {}{reason}", file.display(), field_prefix(field))]
    Record {
        file: Arc<Path>,
        line: usize,
        field: Option<String>,
        reason: String,
    },
    /// A conversation built in code that breaks the rules of [`crate::Conversation::new`].
    #[error("{}{reason}", field_prefix(field))]
    Conversation {
        field: Option<String>,
        reason: String,
    },
    /// A template that cannot be built, or cannot render this kind of sample.
    #[error("template: {reason}")]
    Template { reason: String },
    /// Rendering one record failed (the template raised an exception, a token is missing, ...).
    /// The inner error is part of the message rather than a `source`, so it is printed once.
    #[error("{}:{line}: {error}", file.display())]
    Render {
        file: Arc<Path>,
        line: usize,
        error: Box<Error>,
    },
    /// A rendered sample whose loss mask breaks a checked invariant (see `render`).
    #[error("{}:{line}: loss-mask invariant violated: {reason}", file.display())]
    Invariant {
        file: Arc<Path>,
        line: usize,
        reason: String,
    },
    /// A sample longer than `max_len` under `length_policy = "error"`.
    #[error("{}:{line}: {len} tokens is longer than max_len = {max} (length_policy = \"error\"; use \"drop\" or \"truncate\" to go on)", file.display())]
    TooLong {
        file: Arc<Path>,
        line: usize,
        len: usize,
        max: usize,
    },
    /// An option value outside its domain (a probability above 1, an unknown mode name, ...).
    #[error("invalid option: {reason}")]
    InvalidOption { reason: String },
    /// `Rendered::new` with ids and mask of different lengths.
    #[error("loss mask has {mask} entries for {ids} token ids")]
    MaskLength { ids: usize, mask: usize },
    /// A sample that does not fit the packing capacity; callers drop or truncate first.
    #[error("sample {index} has {len} tokens, more than the pack length {capacity}")]
    TooLongToPack {
        index: usize,
        len: usize,
        capacity: usize,
    },
    #[error(transparent)]
    Tokenizer(#[from] sft_tokenizer::Error),
}

fn field_prefix(field: &Option<String>) -> String {
    match field {
        Some(f) => format!("field `{f}`: "),
        None => String::new(),
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
