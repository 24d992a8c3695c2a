//! Streamed training data (`data.streaming = true`): records are read, rendered and batched as
//! the run goes, through a seeded shuffle buffer, so memory holds the buffer, not the dataset.
//!
//! An epoch is one pass over the files in order. Each record is rendered as it is read (with
//! its index in the pass, as metadata dropout needs), goes into a buffer of
//! `data.shuffle_buffer` samples, and a seeded draw from the buffer takes the next sample once it
//! is full (the shuffle of `tf.data` and `datasets`' `IterableDataset.shuffle`). Micro-batches
//! are `train.batch_size` samples, or with packing `train.batch_size` rows filled in order up to
//! the context length. Everything is a pure function of `(seed, epoch)` and the data, so a
//! resumed run replays its epoch up to the saved micro-batch (rendering, not training) and
//! continues bit-identically.

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use sft_data::{
    render_record, Format, InvalidPolicy, RecordStream, RenderOptions, RenderOutcome, Rendered,
    Selection, Template,
};
use sft_tokenizer::Tokenizer;

use crate::error::Result;
use crate::seeds::stream_seed;

/// The source of a streamed run's micro-batches.
pub(super) struct StreamFeed<'a> {
    files: Vec<PathBuf>,
    format: Option<Format>,
    policy: InvalidPolicy,
    template: &'a Template,
    tok: &'a Tokenizer,
    opts: RenderOptions,
    selection: Selection,
    batch_size: usize,
    /// Row length with packing; `None` without.
    pack_len: Option<usize>,
    buffer_size: usize,
    seed: u64,
    /// The epoch in progress.
    pub(super) epoch: u64,
    records: RecordStream,
    /// Records read in this epoch (the next one's index).
    read: usize,
    buffer: Vec<Rendered>,
    rng: ChaCha8Rng,
    /// A sample drawn for a packed row it did not fit, first in the next row.
    carry: Option<Rendered>,
    /// Micro-batches handed out in this epoch.
    pub(super) position: usize,
    /// What the stream read and left out, over this process's epochs (the current epoch's
    /// invalid lines are in `records.skipped` until it ends).
    counts: StreamCounts,
}

/// What a streamed run read and left out, counted as it goes (the preflight report covers only
/// the first buffer of records). A resumed run counts the epoch it replays too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StreamCounts {
    /// Valid records read.
    pub records: usize,
    /// Records `data.filter` left out.
    pub filtered_out: usize,
    /// Invalid lines skipped (`data.skip_invalid`).
    pub invalid_skipped: usize,
    /// Samples dropped while rendering: too long under `length_policy = "drop"`, or no target.
    pub dropped: usize,
}

/// One micro-batch: rows of samples (one sample a row without packing).
pub(super) type Rows = Vec<Vec<Rendered>>;

impl<'a> StreamFeed<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        files: Vec<PathBuf>,
        format: Option<Format>,
        policy: InvalidPolicy,
        template: &'a Template,
        tok: &'a Tokenizer,
        opts: RenderOptions,
        batch_size: usize,
        pack_len: Option<usize>,
        buffer_size: usize,
        seed: u64,
        selection: Selection,
    ) -> StreamFeed<'a> {
        let records = RecordStream::new(files.clone(), format, policy);
        StreamFeed {
            files,
            format,
            policy,
            template,
            tok,
            opts,
            selection,
            batch_size: batch_size.max(1),
            pack_len,
            buffer_size: buffer_size.max(1),
            seed,
            epoch: 0,
            records,
            read: 0,
            buffer: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(stream_seed(seed, 0)),
            carry: None,
            position: 0,
            counts: StreamCounts::default(),
        }
    }

    /// Goes to micro-batch `position` of `epoch`, replaying the epoch up to it.
    pub(super) fn seek(&mut self, epoch: u64, position: usize) -> Result<()> {
        self.start_epoch(epoch);
        while self.position < position {
            if self.next_micro_batch()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.counts.invalid_skipped += self.records.skipped.len();
        self.epoch = epoch;
        self.records = RecordStream::new(self.files.clone(), self.format, self.policy);
        self.read = 0;
        self.buffer.clear();
        self.rng = ChaCha8Rng::seed_from_u64(stream_seed(self.seed, epoch));
        self.carry = None;
        self.position = 0;
    }

    /// The next sample of the epoch: the buffer is topped up from the files, then one of its
    /// samples drawn. `None` once the epoch's records are all used.
    fn next_sample(&mut self) -> Result<Option<Rendered>> {
        while self.buffer.len() < self.buffer_size {
            let Some(mut record) = self.records.next().transpose()? else {
                break;
            };
            self.counts.records += 1;
            if !self.selection.apply(&mut record)? {
                self.counts.filtered_out += 1;
                continue;
            }
            let index = self.read;
            self.read += 1;
            match render_record(
                &record,
                self.template,
                self.tok,
                &self.opts,
                self.epoch,
                index,
            )? {
                RenderOutcome::Kept { rendered, .. } => self.buffer.push(rendered),
                RenderOutcome::Dropped(_) => self.counts.dropped += 1,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let k = self.rng.random_range(0..self.buffer.len());
        Ok(Some(self.buffer.swap_remove(k)))
    }

    /// The epoch's next micro-batch and how many samples it holds; `None` at the end of the
    /// epoch (call [`StreamFeed::next_epoch`]).
    pub(super) fn next_micro_batch(&mut self) -> Result<Option<(Rows, usize)>> {
        let mut rows: Rows = Vec::with_capacity(self.batch_size);
        let mut samples = 0;
        match self.pack_len {
            None => {
                while rows.len() < self.batch_size {
                    let Some(s) = self.next_sample()? else { break };
                    rows.push(vec![s]);
                    samples += 1;
                }
            }
            Some(cap) => {
                while rows.len() < self.batch_size {
                    let mut row = Vec::new();
                    let mut used = 0;
                    loop {
                        let next = match self.carry.take() {
                            Some(s) => Some(s),
                            None => self.next_sample()?,
                        };
                        let Some(s) = next else { break };
                        if used + s.len() > cap && !row.is_empty() {
                            // First in the next row (or the next micro-batch's first row).
                            self.carry = Some(s);
                            break;
                        }
                        used += s.len();
                        row.push(s);
                        samples += 1;
                    }
                    if row.is_empty() {
                        break;
                    }
                    rows.push(row);
                }
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        self.position += 1;
        Ok(Some((rows, samples)))
    }

    /// Starts the next epoch.
    pub(super) fn next_epoch(&mut self) {
        self.start_epoch(self.epoch + 1);
    }

    /// What was read and left out so far.
    pub(super) fn counts(&self) -> StreamCounts {
        StreamCounts {
            invalid_skipped: self.counts.invalid_skipped + self.records.skipped.len(),
            ..self.counts
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sft_data::TemplateChoice;
    use sft_tokenizer::{CharRoles, CharTokenizer, CHATML_SPECIALS};

    /// 23 one-character texts; each sample's first id says which record it came from.
    fn setup(dir: &std::path::Path) -> (PathBuf, Tokenizer) {
        let chars: Vec<char> = ('a'..='w').collect();
        let path = dir.join("texts.jsonl");
        let lines: Vec<String> = chars
            .iter()
            .map(|c| format!("{{\"text\": \"{c}{c}\"}}"))
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let text: String = chars.iter().collect();
        let roles = CharRoles {
            bos_token: None,
            eos_token: Some("<|im_end|>".into()),
            pad_token: Some("<|pad|>".into()),
            unk_token: "<|unk|>".into(),
        };
        let tok = Tokenizer::from_char(
            CharTokenizer::from_corpus([text.as_str()], &CHATML_SPECIALS, roles).unwrap(),
        );
        (path, tok)
    }

    fn drain(feed: &mut StreamFeed<'_>) -> Vec<Vec<Vec<u32>>> {
        let mut out = vec![];
        while let Some((rows, _)) = feed.next_micro_batch().unwrap() {
            out.push(
                rows.iter()
                    .map(|r| r.iter().map(|s| s.ids()[0]).collect())
                    .collect(),
            );
        }
        out
    }

    #[test]
    fn each_epoch_takes_every_record_once_shuffled_and_resumes_by_replay() {
        let dir = std::env::temp_dir().join(format!("sft-streamfeed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, tok) = setup(&dir);
        let template = Template::new(TemplateChoice::Auto, &tok).unwrap();
        let opts = RenderOptions::default();
        let selection = Selection::default();
        for pack in [None, Some(7)] {
            let feed = |buffer| {
                StreamFeed::new(
                    vec![path.clone()],
                    None,
                    InvalidPolicy::Error,
                    &template,
                    &tok,
                    opts.clone(),
                    3,
                    pack,
                    buffer,
                    42,
                    selection.clone(),
                )
            };
            let mut f = feed(5);
            let e0 = drain(&mut f);
            f.next_epoch();
            let e1 = drain(&mut f);
            let mut ids: Vec<u32> = e0.iter().flatten().flatten().copied().collect();
            assert_eq!(ids.len(), 23, "{pack:?}");
            let in_order = ids.clone();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), 23, "every record once");
            assert_ne!(in_order, ids, "shuffled");
            assert_ne!(e0, e1, "another order each epoch");
            if let Some(cap) = pack {
                // Rows of 3-token samples ("xx" + end of text) packed into 7 positions: 2 a row.
                assert!(e0.iter().flatten().all(|row| row.len() * 3 <= cap));
            }
            // Replaying to micro-batch 4 of epoch 1 continues as the uninterrupted feed did.
            let mut g = feed(5);
            g.seek(1, 4).unwrap();
            assert_eq!(drain(&mut g), e1[4..].to_vec());
            // A buffer of one is no shuffle at all.
            let mut h = feed(1);
            let plain: Vec<u32> = drain(&mut h).into_iter().flatten().flatten().collect();
            let mut sorted = plain.clone();
            sorted.sort();
            assert_eq!(plain, sorted);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every record read, filtered out, skipped as invalid or dropped while rendering is
    /// counted, over epochs.
    #[test]
    fn what_the_stream_leaves_out_is_counted() {
        let dir = std::env::temp_dir().join(format!("sft-streamcounts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, tok) = setup(&dir);
        // 23 records "xx"; 2 invalid lines; 3 records of 9 characters, too long for max_len 5.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("\n{\"text\": 7}\nnot json\n");
        for c in ['a', 'b', 'c'] {
            text.push_str(&format!("{{\"text\": \"{}\"}}\n", c.to_string().repeat(9)));
        }
        std::fs::write(&path, text).unwrap();
        let template = Template::new(TemplateChoice::Auto, &tok).unwrap();
        let opts = RenderOptions {
            max_len: Some(5),
            ..RenderOptions::default()
        };
        let mut feed = StreamFeed::new(
            vec![path.clone()],
            None,
            InvalidPolicy::Skip,
            &template,
            &tok,
            opts,
            4,
            None,
            8,
            7,
            Selection::default(),
        );
        assert_eq!(drain(&mut feed).into_iter().flatten().count(), 23);
        let one = StreamCounts {
            records: 26,
            filtered_out: 0,
            invalid_skipped: 2,
            dropped: 3,
        };
        assert_eq!(feed.counts(), one);
        feed.next_epoch();
        drain(&mut feed);
        let two = StreamCounts {
            records: 52,
            invalid_skipped: 4,
            dropped: 6,
            ..one
        };
        assert_eq!(feed.counts(), two);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
