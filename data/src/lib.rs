//! JSONL records -> conversations -> rendered token ids with loss masks -> padded or packed
//! batches, for `sft`.
//!
//! The pipeline, one module per arrow:
//! - [`record`]: a JSONL line -> [`Record`] (`messages`, ShareGPT, Alpaca, prompt/completion,
//!   instruct/label, text, poem), validated once, every reject counted and named by file:line.
//! - [`parquet`] (and `.json` arrays): the same [`Record`]s from other file kinds; [`dataset`]:
//!   hub dataset directories and one entry point for any path ([`read_records`]).
//! - [`template`]: a [`Sample`] -> text and ids: the checkpoint's Jinja chat template (rendered
//!   byte-identically to `transformers`), built-in ChatML, plain text, or the nanopoet markers.
//! - [`render`]: a [`Record`] -> [`Rendered`] `{ ids, loss_mask }` under a [`TrainOn`] mode, with
//!   per-sample invariants checked (targets decode to exactly the assistant turns).
//! - [`report`]: every record rendered in parallel, plus the preflight [`Report`].
//! - [`batch`]: the one-token shift, padding, packing and the per-epoch batch plan.
//!
//! No tensors here: everything is plain `Vec`s, so the whole data path is testable without candle.

pub mod batch;
pub mod dataset;
mod error;
mod json;
pub mod mixture;
pub mod parquet;
pub mod prompt;
mod pyjson;
pub mod record;
pub mod render;
pub mod report;
pub mod select;
pub mod stream;
pub mod template;

pub use crate::batch::{
    collate, pack_bins, plan_epoch, shift_labels, split_train_val, Batch, BatchPlanOptions,
    IGNORE_INDEX,
};
pub use crate::dataset::{dataset_files, read_dataset, read_records};
pub use crate::error::{Error, Result};
pub use crate::json::read_json_array;
pub use crate::mixture::{mixture_epoch, Share};
pub use crate::parquet::read_parquet;
pub use crate::prompt::{prompt_ids, Prompt};
pub use crate::record::{
    read_jsonl, Conversation, Format, InvalidPolicy, Message, Poem, ReadOutcome, Record, Role,
    Sample, Source,
};
pub use crate::render::{
    metadata_keep, render_record, DropReason, LengthPolicy, RenderOptions, RenderOutcome, Rendered,
    TrainOn,
};
pub use crate::report::{
    bracket_targets, prepare, token_views, Example, LengthStats, Prepared, Report, TokenView,
};
pub use crate::select::Selection;
pub use crate::stream::RecordStream;
pub use crate::template::{Template, TemplateChoice, TemplateKind, TemplateOptions};
