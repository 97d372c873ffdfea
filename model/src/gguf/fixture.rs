//! Small GGUF files built byte by byte, for the tests of this module (tests that need files made by
//! an independent writer use the Python `gguf` package from the e2e crate).
//!
//! [`Gguf`] holds metadata and tensors and serialises them in the layout of llama.cpp's
//! `gguf_write_to_buf`: header, metadata, tensor infos, padding to the alignment, tensor data each
//! padded to the alignment. Fields are public so a test can break one thing before writing.

use super::GgmlType;

/// A metadata value to write.
#[derive(Clone, Debug)]
pub enum Value {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

/// A tensor to write.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    /// Innermost first, as GGUF stores them.
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
    /// Written instead of the real offset when set.
    pub offset_override: Option<u64>,
}

/// A GGUF file being built.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub alignment: usize,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<Tensor>,
}

impl Gguf {
    pub fn new() -> Gguf {
        Gguf { version: 3, alignment: 32, kvs: Vec::new(), tensors: Vec::new() }
    }

    pub fn kv(&mut self, key: &str, value: Value) -> &mut Self {
        self.kvs.push((key.into(), value));
        self
    }

    /// Replaces the value of `key` (which must be there).
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        let kv = self.kvs.iter_mut().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no key {key}"));
        kv.1 = value;
        self
    }

    pub fn remove_key(&mut self, key: &str) -> &mut Self {
        self.kvs.retain(|(k, _)| k != key);
        self
    }

    pub fn tensor_raw(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: &[u8]) -> &mut Self {
        self.tensors.push(Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            type_id: ty.id(),
            data: data.to_vec(),
            offset_override: None,
        });
        self
    }

    /// An F32 tensor; `dims` innermost first.
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        assert_eq!(dims.iter().product::<u64>() as usize, values.len(), "{name}");
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor_raw(name, dims, GgmlType::F32, &data)
    }

    pub fn remove_tensor(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|t| t.name != name);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        for (key, value) in &self.kvs {
            string(&mut out, key);
            match value {
                Value::U32(v) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::I32(v) => {
                    out.extend_from_slice(&5u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::U64(v) => {
                    out.extend_from_slice(&10u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::F32(v) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::Bool(v) => {
                    out.extend_from_slice(&7u32.to_le_bytes());
                    out.push(u8::from(*v));
                }
                Value::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    string(&mut out, s);
                }
                Value::StrArray(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for s in items {
                        string(&mut out, s);
                    }
                }
                Value::I32Array(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&5u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for v in items {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
                Value::F32Array(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for v in items {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        let pad = |n: usize| n.next_multiple_of(self.alignment);
        let mut offset = 0usize;
        for t in &self.tensors {
            string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&t.offset_override.unwrap_or(offset as u64).to_le_bytes());
            offset += pad(t.data.len());
        }
        if !self.tensors.is_empty() {
            out.resize(pad(out.len()), 0);
        }
        for (i, t) in self.tensors.iter().enumerate() {
            out.extend_from_slice(&t.data);
            if i + 1 < self.tensors.len() {
                out.resize(pad(out.len()), 0);
            }
        }
        out
    }
}

/// A GGUF holding only a tokenizer: the 256 byte tokens (id = byte value), three merged tokens
/// (`Ġt` 256, `he` 257, `Ġthe` 258), three control tokens (`<|endoftext|>` 259, `<|im_start|>` 260,
/// `<|im_end|>` 261) and one user-defined token (`<tool>` 262); BOS 260, EOS 261.
pub fn with_vocab(pre: &str) -> Gguf {
    let mut tokens: Vec<String> = crate::synthetic::byte_level_vocab();
    tokens.extend(["Ġt", "he", "Ġthe"].map(String::from));
    tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"].map(String::from));
    let mut types = vec![1; tokens.len()];
    let n = types.len();
    types[n - 4..n - 1].fill(3);
    types[n - 1] = 4;
    let mut g = Gguf::new();
    g.kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::Str(pre.into()))
        .kv("tokenizer.ggml.tokens", Value::StrArray(tokens))
        .kv("tokenizer.ggml.token_type", Value::I32Array(types))
        .kv("tokenizer.ggml.merges", Value::StrArray(["Ġ t", "h e", "Ġt he"].map(String::from).to_vec()))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(n as u32 - 3))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(n as u32 - 2))
        .kv("tokenizer.chat_template", Value::Str("{{ messages }}".into()));
    g
}

/// A GGUF holding only a SentencePiece-style tokenizer (`tokenizer.ggml.model = llama`), laid out
/// as Gemma's: control tokens `<pad>` 0, `<eos>` 1, `<bos>` 2, the unknown token `<unk>` 3, the 256
/// byte pieces `<0x00>`.. (4 + byte), then `▁` 260, `t` 261, `h` 262, `e` 263, `▁t` 264, `he` 265,
/// `th` 266, `the` 267, `▁the` 268, the control token `<start_of_turn>` 269, the user-defined token
/// `"\n\n"` 270 and `a` 271. The merged pieces' scores are not in id order (`th` -2 ranks before
/// `▁t` -3, which has the smaller id), so a tokenizer that ranked merges by id would split " th"
/// differently. BOS 2 added, no space prefix.
pub fn with_spm_vocab() -> Gguf {
    let mut tokens: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>"].map(String::from).to_vec();
    let mut types = vec![3, 3, 3, 2];
    let mut scores = vec![0.0; 4];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.extend([6; 256]);
    scores.extend([0.0; 256]);
    for (piece, ty, score) in [
        ("\u{2581}", 1, -100.0),
        ("t", 1, -100.0),
        ("h", 1, -100.0),
        ("e", 1, -100.0),
        ("\u{2581}t", 1, -3.0),
        ("he", 1, -5.0),
        ("th", 1, -2.0),
        ("the", 1, -4.0),
        ("\u{2581}the", 1, -6.0),
        ("<start_of_turn>", 3, 0.0),
        ("\n\n", 4, -1000.0),
        ("a", 1, -100.0),
    ] {
        tokens.push(piece.into());
        types.push(ty);
        scores.push(score);
    }
    let mut g = Gguf::new();
    g.kv("tokenizer.ggml.model", Value::Str("llama".into()))
        .kv("tokenizer.ggml.pre", Value::Str("default".into()))
        .kv("tokenizer.ggml.tokens", Value::StrArray(tokens))
        .kv("tokenizer.ggml.scores", Value::F32Array(scores))
        .kv("tokenizer.ggml.token_type", Value::I32Array(types))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(2))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.unknown_token_id", Value::U32(3))
        .kv("tokenizer.ggml.padding_token_id", Value::U32(0))
        .kv("tokenizer.ggml.add_bos_token", Value::Bool(true))
        .kv("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    g
}
