//! A GGUF file as parts, for tests that damage one part and put the file back together: the
//! header's version, each key-value pair's type and raw value bytes, the tensor list and the
//! data section. Written by hand (not through candle's writer) so that a test can write what no
//! writer would: duplicate keys, wrong types, bad offsets.

/// A GGUF file as parts.
#[derive(Debug, Clone)]
pub struct RawGguf {
    pub version: u32,
    /// (key, value type id, the value's bytes).
    pub kv: Vec<(String, u32, Vec<u8>)>,
    /// (name, dims innermost first, ggml type id, offset into the data section).
    pub tensors: Vec<(String, Vec<u64>, u32, u64)>,
    pub data: Vec<u8>,
}

/// A GGUF string: its length as a u64, then its bytes.
pub fn gguf_string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

impl RawGguf {
    /// The file's bytes, the data section aligned to 32 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = b"GGUF".to_vec();
        v.extend_from_slice(&self.version.to_le_bytes());
        v.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        v.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, t, value) in &self.kv {
            v.extend(gguf_string(k));
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(value);
        }
        for (name, dims, t, offset) in &self.tensors {
            v.extend(gguf_string(name));
            v.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                v.extend_from_slice(&d.to_le_bytes());
            }
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&offset.to_le_bytes());
        }
        v.resize(v.len().next_multiple_of(32), 0);
        v.extend_from_slice(&self.data);
        v
    }
}
