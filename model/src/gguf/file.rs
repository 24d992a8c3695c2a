//! The GGUF container: a validated view of a file (candle's `gguf_file::Content` after our own
//! checks) and a streaming writer.
//!
//! candle's reader trusts what it reads in ways a damaged file breaks: `general.alignment = 0`
//! divides by zero, dimensions whose product overflows give a tensor whose storage does not match
//! its shape, and its errors name neither key nor tensor. So [`GgufFile::open`] first walks the
//! whole header itself ([`scan`]): every length against the bytes left, every value type,
//! duplicate keys and tensor names (which ggml refuses and candle lets the last one win), the
//! alignment, each tensor's type, shape and data range. Only a file that passes is handed to
//! `Content::read`, and every error names the file and the key or tensor.
//!
//! candle's `gguf_file::write` needs every tensor in memory at once; [`write`] takes the header
//! first and then each tensor's bytes as they are produced, so an export holds one tensor at a
//! time.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value, ValueType};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::checkpoint::{checkpoint_error, io_error};
use crate::error::{Error, Result};
use crate::quant::QWeight;

const MAGIC: &[u8; 4] = b"GGUF";
/// What [`write`] produces; llama.cpp reads versions 2 and 3 (the same layout).
const VERSION: u32 = 3;
/// ggml's default, and the only alignment [`write`] uses.
pub(crate) const ALIGNMENT: u64 = 32;
/// Far above any real file (a tokenizer's token list has a few hundred thousand entries), low
/// enough that a corrupt count is refused before anything is allocated for it.
const MAX_COUNT: u64 = 1 << 30;
const MAX_DIMS: u32 = 4;

/// The ggml type ids candle can hold, with the names llama.cpp prints.
const TYPES: [(GgmlDType, u32, &str); 15] = [
    (GgmlDType::F32, 0, "F32"),
    (GgmlDType::F16, 1, "F16"),
    (GgmlDType::Q4_0, 2, "Q4_0"),
    (GgmlDType::Q4_1, 3, "Q4_1"),
    (GgmlDType::Q5_0, 6, "Q5_0"),
    (GgmlDType::Q5_1, 7, "Q5_1"),
    (GgmlDType::Q8_0, 8, "Q8_0"),
    (GgmlDType::Q8_1, 9, "Q8_1"),
    (GgmlDType::Q2K, 10, "Q2_K"),
    (GgmlDType::Q3K, 11, "Q3_K"),
    (GgmlDType::Q4K, 12, "Q4_K"),
    (GgmlDType::Q5K, 13, "Q5_K"),
    (GgmlDType::Q6K, 14, "Q6_K"),
    (GgmlDType::Q8K, 15, "Q8_K"),
    (GgmlDType::BF16, 30, "BF16"),
];

/// ggml's names of the types candle does not read, for the error that refuses them.
const OTHER_TYPES: [(u32, &str); 17] = [
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

/// The name llama.cpp prints for a ggml type.
pub fn type_name(dtype: GgmlDType) -> &'static str {
    TYPES
        .iter()
        .find(|(t, _, _)| *t == dtype)
        .map_or("?", |(_, _, n)| n)
}

fn type_id(dtype: GgmlDType) -> u32 {
    TYPES
        .iter()
        .find(|(t, _, _)| *t == dtype)
        .map_or(u32::MAX, |(_, id, _)| *id)
}

/// A ggml type id as a type this crate reads, or why not.
fn readable_type(id: u32) -> std::result::Result<GgmlDType, String> {
    match TYPES.iter().find(|(_, i, _)| *i == id) {
        // candle's GGUF reader has no decoder for these two (they only ever hold activations).
        Some((GgmlDType::Q8_1 | GgmlDType::Q8K, _, name)) => {
            Err(format!("has type {name} ({id}), which sft cannot read"))
        }
        Some((t, _, _)) => Ok(*t),
        None => Err(match OTHER_TYPES.iter().find(|(i, _)| *i == id) {
            Some((_, name)) => format!("has type {name} ({id}), which sft cannot read"),
            None => format!("has an unknown tensor type {id}"),
        }),
    }
}

/// Bytes of `elems` elements of `dtype` (whole blocks).
pub(crate) fn byte_size(dtype: GgmlDType, elems: usize) -> usize {
    elems / dtype.block_size() * dtype.type_size()
}

/// One tensor of a file: its name, shape (row-major, as candle and Hugging Face write it: GGUF
/// lists the dimensions innermost first) and type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

/// A GGUF file whose header has been read and checked: metadata and tensor list in file order;
/// tensors are read one at a time.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    keys: Vec<String>,
    tensors: Vec<TensorEntry>,
}

impl GgufFile {
    /// Reads and checks the header of `path` (the whole file's extent: a tensor that runs past
    /// the end is an error here, before anything is loaded).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(io_error(path))?;
        let size = file.metadata().map_err(io_error(path))?.len();
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let scanned = scan(&mut reader, size).map_err(|e| match e {
            ScanError::Io(source) if source.kind() != std::io::ErrorKind::UnexpectedEof => {
                Error::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
            ScanError::Io(_) => {
                checkpoint_error(path, "the file ends inside its header: it is truncated")
            }
            ScanError::Bad(reason) => checkpoint_error(path, reason),
        })?;
        reader.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
        let content = Content::read(&mut reader)
            .map_err(|e| checkpoint_error(path, format!("reading the header: {e}")))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            keys: scanned.keys,
            tensors: scanned.tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Metadata keys in file order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// Tensors in file order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor dequantized to f32 on the CPU, in its row-major shape (a matrix in parallel
    /// chunks of rows, as [`QWeight`] dequantizes; candle's `dequantize` runs on one thread).
    pub fn read_f32(&self, name: &str) -> Result<Tensor> {
        let q = self.qtensor(name)?;
        let fail = |e: Error| checkpoint_error(&self.path, format!("tensor {name}: {e}"));
        match q.shape().rank() {
            2 => QWeight::from_qtensor(q)
                .and_then(|w| w.dequantize())
                .map_err(fail),
            _ => q.dequantize(&Device::Cpu).map_err(|e| fail(e.into())),
        }
    }

    /// A matrix as its stored blocks.
    pub(crate) fn read_blocks(&self, name: &str) -> Result<QWeight> {
        QWeight::from_qtensor(self.qtensor(name)?)
            .map_err(|e| checkpoint_error(&self.path, format!("tensor {name}: {e}")))
    }

    /// A tensor as candle reads it.
    fn qtensor(&self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let file = File::open(&self.path).map_err(io_error(&self.path))?;
        let mut reader = BufReader::new(file);
        self.content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| checkpoint_error(&self.path, format!("tensor {name}: {e}")))
    }

    /// An error about this file.
    pub(crate) fn error(&self, reason: impl Into<String>) -> Error {
        checkpoint_error(&self.path, reason)
    }

    /// A metadata value that must be a string.
    pub fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, v, "a string")),
        }
    }

    /// A metadata value that must be a non-negative integer (of any integer type: llama.cpp's
    /// converter writes u32, other tools u64 or i32).
    pub fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_uint(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "a non-negative integer")),
        }
    }

    /// A metadata value that must be a number.
    pub fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_f64(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "a number")),
        }
    }

    pub fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, v, "a bool")),
        }
    }

    /// The error of a metadata value of the wrong type.
    pub fn wrong_type(&self, key: &str, v: &Value, expected: &str) -> Error {
        self.error(format!(
            "metadata key {key} is {}, expected {expected}",
            describe(v)
        ))
    }
}

/// A value as an unsigned integer, when it is an integer of any width that is not negative.
pub fn value_uint(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// A value as a number. An f32 is read as the decimal that prints it (`1e-5`, not
/// `9.999999747378752e-6`), so a config written from it says what the file's writer meant and
/// rounds back to the same f32.
pub fn value_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => x.to_string().parse().ok(),
        Value::F64(x) => Some(x),
        _ => value_uint(v).map(|x| x as f64),
    }
}

/// A value's type for messages: `u32 7`, `a string`, `an array of 3 u32`.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::String(_) => "a string".into(),
        Value::Array(items) => format!(
            "an array of {} {}",
            items.len(),
            items.first().map_or("values".into(), describe)
        ),
        Value::Bool(b) => format!("bool {b}"),
        Value::F32(x) => format!("f32 {x}"),
        Value::F64(x) => format!("f64 {x}"),
        other => format!(
            "{} {}",
            value_type_name(other.value_type()),
            value_uint(other).map_or("<negative>".into(), |x| x.to_string())
        ),
    }
}

fn value_type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::U8 => "u8",
        ValueType::I8 => "i8",
        ValueType::U16 => "u16",
        ValueType::I16 => "i16",
        ValueType::U32 => "u32",
        ValueType::I32 => "i32",
        ValueType::U64 => "u64",
        ValueType::I64 => "i64",
        ValueType::F32 => "f32",
        ValueType::F64 => "f64",
        ValueType::Bool => "bool",
        ValueType::String => "string",
        ValueType::Array => "array",
    }
}

enum ScanError {
    Io(std::io::Error),
    Bad(String),
}

impl From<std::io::Error> for ScanError {
    fn from(e: std::io::Error) -> ScanError {
        ScanError::Io(e)
    }
}

fn bad<T>(reason: String) -> std::result::Result<T, ScanError> {
    Err(ScanError::Bad(reason))
}

struct Scanned {
    keys: Vec<String>,
    tensors: Vec<TensorEntry>,
}

/// A reader that knows how far it is into the file, so every length can be checked against
/// what is left before it is believed.
struct Cursor<'a, R> {
    r: &'a mut R,
    pos: u64,
    size: u64,
}

impl<R: Read> Cursor<'_, R> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }
    fn skip(&mut self, n: u64) -> std::result::Result<(), ScanError> {
        if n > self.left() {
            return Err(ScanError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        std::io::copy(&mut (&mut *self.r).take(n), &mut std::io::sink())?;
        self.pos += n;
        Ok(())
    }
    /// A length-prefixed string; `what` names it in errors.
    fn string(&mut self, what: &dyn Fn() -> String) -> std::result::Result<String, ScanError> {
        let len = self.u64()?;
        if len > self.left() {
            return bad(format!(
                "{}: a string of {len} bytes runs past the end of the file ({} bytes left)",
                what(),
                self.left()
            ));
        }
        let mut v = vec![0u8; len as usize];
        self.r.read_exact(&mut v)?;
        self.pos += len;
        String::from_utf8(v).or_else(|_| bad(format!("{}: a string that is not UTF-8", what())))
    }
}

/// Value types by id, as GGUF numbers them.
fn value_type(id: u32) -> Option<ValueType> {
    Some(match id {
        0 => ValueType::U8,
        1 => ValueType::I8,
        2 => ValueType::U16,
        3 => ValueType::I16,
        4 => ValueType::U32,
        5 => ValueType::I32,
        6 => ValueType::F32,
        7 => ValueType::Bool,
        8 => ValueType::String,
        9 => ValueType::Array,
        10 => ValueType::U64,
        11 => ValueType::I64,
        12 => ValueType::F64,
        _ => return None,
    })
}

fn value_type_id(t: ValueType) -> u32 {
    match t {
        ValueType::U8 => 0,
        ValueType::I8 => 1,
        ValueType::U16 => 2,
        ValueType::I16 => 3,
        ValueType::U32 => 4,
        ValueType::I32 => 5,
        ValueType::F32 => 6,
        ValueType::Bool => 7,
        ValueType::String => 8,
        ValueType::Array => 9,
        ValueType::U64 => 10,
        ValueType::I64 => 11,
        ValueType::F64 => 12,
    }
}

fn fixed_size(t: ValueType) -> Option<u64> {
    match t {
        ValueType::U8 | ValueType::I8 | ValueType::Bool => Some(1),
        ValueType::U16 | ValueType::I16 => Some(2),
        ValueType::U32 | ValueType::I32 | ValueType::F32 => Some(4),
        ValueType::U64 | ValueType::I64 | ValueType::F64 => Some(8),
        ValueType::String | ValueType::Array => None,
    }
}

/// Walks a GGUF header and checks everything candle's reader takes on trust.
fn scan<R: Read>(r: &mut R, size: u64) -> std::result::Result<Scanned, ScanError> {
    let mut c = Cursor { r, pos: 0, size };
    let magic = c.bytes::<4>()?;
    if &magic != MAGIC {
        return bad(format!(
            "not a GGUF file (it starts with {magic:02x?}, not \"GGUF\")"
        ));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return bad(format!(
            "GGUF version {version} is not supported (versions 2 and 3 are)"
        ));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // The smallest key-value pair and tensor entry take 13 and 24 bytes.
    for (count, min, what) in [(n_kv, 13, "metadata entries"), (n_tensors, 24, "tensors")] {
        if count > MAX_COUNT || count.saturating_mul(min) > c.left() {
            return bad(format!(
                "the header declares {count} {what}, more than the file's {size} bytes can hold: \
                 the file is truncated or damaged"
            ));
        }
    }
    let mut keys = Vec::with_capacity(n_kv as usize);
    let mut seen = HashSet::new();
    let mut alignment = ALIGNMENT;
    for i in 0..n_kv {
        let key = c.string(&|| format!("metadata entry {i}'s key"))?;
        if key.is_empty() {
            return bad(format!("metadata entry {i} has an empty key"));
        }
        if !seen.insert(key.clone()) {
            return bad(format!("metadata key {key} appears twice"));
        }
        let what = || format!("metadata key {key}");
        let t = c.u32()?;
        let Some(t) = value_type(t) else {
            return bad(format!("{}: unknown value type {t}", what()));
        };
        if key == "general.alignment" {
            if t != ValueType::U32 {
                return bad(format!(
                    "{}: type {}, expected u32",
                    what(),
                    value_type_name(t)
                ));
            }
            let a = c.u32()?;
            if a == 0 || !a.is_power_of_two() {
                return bad(format!("{}: {a} is not a power of two", what()));
            }
            alignment = a.into();
        } else {
            scan_value(&mut c, t, &what)?;
        }
        keys.push(key);
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut offsets = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = c.string(&|| format!("tensor entry {i}'s name"))?;
        if !names.insert(name.clone()) {
            return bad(format!("tensor {name} appears twice"));
        }
        let n_dims = c.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return bad(format!(
                "tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64()?);
        }
        let type_id = c.u32()?;
        let dtype = readable_type(type_id).or_else(|why| bad(format!("tensor {name} {why}")))?;
        let offset = c.u64()?;
        // The data range is checked against the file below, before candle computes anything
        // from these dimensions.
        let Some(elems) = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)) else {
            return bad(format!(
                "tensor {name}: the element count of shape {dims:?} (innermost first) overflows"
            ));
        };
        let block = dtype.block_size() as u64;
        let bytes = (elems / block).saturating_mul(dtype.type_size() as u64);
        if !dims[0].is_multiple_of(dtype.block_size() as u64) {
            return bad(format!(
                "tensor {name}: rows of {} elements are not whole {} blocks of {}",
                dims[0],
                type_name(dtype),
                dtype.block_size()
            ));
        }
        if !offset.is_multiple_of(alignment) {
            return bad(format!(
                "tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"
            ));
        }
        offsets.push((offset, bytes));
        let shape = dims.iter().rev().map(|&d| d as usize).collect();
        tensors.push(TensorEntry { name, shape, dtype });
    }
    let data_start = c.pos.next_multiple_of(alignment);
    for (t, (offset, bytes)) in tensors.iter().zip(offsets) {
        let end = data_start
            .checked_add(offset)
            .and_then(|s| s.checked_add(bytes));
        if end.is_none_or(|e| e > size) {
            return bad(format!(
                "tensor {}: its {bytes} bytes at offset {offset} run past the end of the file \
                 ({size} bytes): the file is truncated or damaged",
                t.name
            ));
        }
    }
    Ok(Scanned { keys, tensors })
}

/// Checks one value and moves past it. Arrays of arrays are refused, as ggml does.
fn scan_value<R: Read>(
    c: &mut Cursor<'_, R>,
    t: ValueType,
    what: &dyn Fn() -> String,
) -> std::result::Result<(), ScanError> {
    match t {
        ValueType::Bool => {
            let [b] = c.bytes::<1>()?;
            if b > 1 {
                return bad(format!("{}: bool byte {b} (0 or 1)", what()));
            }
        }
        ValueType::String => {
            c.string(what)?;
        }
        ValueType::Array => {
            let et = c.u32()?;
            let Some(et) = value_type(et) else {
                return bad(format!("{}: array of unknown value type {et}", what()));
            };
            let n = c.u64()?;
            let min = fixed_size(et).unwrap_or(8);
            if n > MAX_COUNT || n.saturating_mul(min) > c.left() {
                return bad(format!(
                    "{}: an array of {n} elements runs past the end of the file",
                    what()
                ));
            }
            match et {
                ValueType::Array => {
                    return bad(format!(
                        "{}: an array of arrays (ggml refuses those)",
                        what()
                    ))
                }
                ValueType::String => {
                    for i in 0..n {
                        c.string(&|| format!("{}[{i}]", what()))?;
                    }
                }
                ValueType::Bool => {
                    for i in 0..n {
                        let [b] = c.bytes::<1>()?;
                        if b > 1 {
                            return bad(format!("{}[{i}]: bool byte {b} (0 or 1)", what()));
                        }
                    }
                }
                fixed => c.skip(n * fixed_size(fixed).unwrap_or(0))?,
            }
        }
        fixed => c.skip(fixed_size(fixed).unwrap_or(0))?,
    }
    Ok(())
}

/// One tensor of a file being written: its name, row-major shape and type.
#[derive(Debug, Clone)]
pub(crate) struct TensorHeader {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: GgmlDType,
}

impl TensorHeader {
    pub(crate) fn bytes(&self) -> usize {
        byte_size(self.dtype, self.shape.iter().product())
    }
}

/// Writes a GGUF file: the header (`metadata` in order, then the tensor list), then each
/// tensor's bytes as `data(i)` produces them, each padded to [`ALIGNMENT`]. The file is written
/// under a temporary name beside `path` and renamed into place when complete.
pub(crate) fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorHeader],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut names = HashSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(checkpoint_error(path, format!("tensor {} twice", t.name)));
        }
    }
    let mut keys = HashSet::new();
    for (k, _) in metadata {
        if !keys.insert(k.as_str()) {
            return Err(checkpoint_error(path, format!("metadata key {k} twice")));
        }
    }
    let tmp = {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    };
    let written = write_to(&tmp, metadata, tensors, &mut data);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

fn write_to(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorHeader],
    data: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let file = File::create(path).map_err(io_error(path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend_from_slice(&value_type_id(value.value_type()).to_le_bytes());
        put_value(&mut header, value, true)
            .map_err(|e| checkpoint_error(path, format!("metadata key {key}: {e}")))?;
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&type_id(t.dtype).to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset += (t.bytes() as u64).next_multiple_of(ALIGNMENT);
    }
    header.resize(header.len().next_multiple_of(ALIGNMENT as usize), 0);
    w.write_all(&header).map_err(io_error(path))?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() != t.bytes() {
            return Err(checkpoint_error(
                path,
                format!(
                    "tensor {}: {} bytes produced, its header says {}",
                    t.name,
                    bytes.len(),
                    t.bytes()
                ),
            ));
        }
        w.write_all(&bytes).map_err(io_error(path))?;
        let pad = bytes.len().next_multiple_of(ALIGNMENT as usize) - bytes.len();
        w.write_all(&[0u8; ALIGNMENT as usize][..pad])
            .map_err(io_error(path))?;
    }
    w.into_inner()
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(io_error(path))
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A value's bytes after its type id; an array's elements share one type and are no arrays
/// (what ggml reads).
fn put_value(out: &mut Vec<u8>, v: &Value, top: bool) -> std::result::Result<(), String> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            if !top {
                return Err("an array inside an array".into());
            }
            let t = items.first().map_or(ValueType::U32, Value::value_type);
            if items.iter().any(|i| i.value_type() != t) {
                return Err("an array whose elements differ in type".into());
            }
            out.extend_from_slice(&value_type_id(t).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item, false)?;
            }
        }
    }
    Ok(())
}
