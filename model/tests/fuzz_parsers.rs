//! Fuzzing the model files a user hands us (issue 20, "Bad input"): the safetensors header, the
//! GGUF reader and `awq import gguf`, config.json, tokenizer.json and tokenizer_config.json. Each
//! target starts from valid files, mutates bytes, lengths and fields, truncates, and generates
//! files whose length fields lie (a safetensors header length, GGUF counts, string and array
//! lengths, tensor dims and offsets claiming gigabytes); what opens must then read back
//! consistently. Budgets and replay: the `awq-fuzz` crate docs (`AWQ_FUZZ_SECONDS`, ...).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use awq_fuzz::{json, Outcome, Rng, Target, INTERESTING};
use awq_kernels::{Device, HostStaging};
use awq_model::gguf::{dequant, import, GgmlType, GgufFile, ImportOptions};
use awq_model::safetensors::{self, RawTensor, SafetensorsFile, StDtype};
use awq_model::synthetic::{byte_level_tokenizer_json, write_checkpoint, SyntheticSpec};
use awq_model::writer::Overwrite;
use awq_model::{Checkpoint, ModelConfig, Tokenizer, TokenizerConfig};
use serde_json::{json, Value};

#[global_allocator]
static ALLOC: awq_fuzz::TrackingAllocator = awq_fuzz::TrackingAllocator;

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len())]
}

/// A number that breaks size checks, most of the time; else a small one.
fn lying(rng: &mut Rng) -> u64 {
    if rng.below(3) == 0 {
        rng.below(64) as u64
    } else {
        *pick(rng, INTERESTING)
    }
}

// ---- safetensors ----------------------------------------------------------------------------------

const ST_DTYPES: &[&str] =
    &["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "f16", ""];

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let path = Path::new("seed.safetensors");
    let f16: Vec<u8> = (0..6u16).flat_map(|i| half::f16::from_f32(i as f32 * 0.5).to_le_bytes()).collect();
    let tensors = vec![
        RawTensor { name: "a.weight".into(), dtype: StDtype::F16, shape: vec![2, 3], data: f16 },
        RawTensor::from_i32("b.qweight", &[2, 2], &[1, -2, 3, i32::MAX]),
        RawTensor { name: "c".into(), dtype: StDtype::BF16, shape: vec![1, 1], data: vec![0x80, 0x3f] },
        RawTensor { name: "d.scalar".into(), dtype: StDtype::F32, shape: vec![], data: 1.5f32.to_le_bytes().to_vec() },
        RawTensor { name: "e.empty".into(), dtype: StDtype::F32, shape: vec![0, 4], data: vec![] },
    ];
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    vec![
        safetensors::serialize(path, &tensors, &metadata).unwrap(),
        safetensors::serialize(path, &tensors[..1], &BTreeMap::new()).unwrap(),
        safetensors::serialize(path, &[], &BTreeMap::new()).unwrap(),
    ]
}

/// A safetensors file from scratch: a header of random entries whose shapes, offsets and header
/// length may lie, and a data section of any length.
fn safetensors_generated(rng: &mut Rng) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for i in 0..rng.below(5) {
        let dtype = *pick(rng, ST_DTYPES);
        let shape: Vec<u64> =
            (0..rng.below(4)).map(|_| if rng.below(4) == 0 { lying(rng) } else { rng.below(5) as u64 }).collect();
        let size = [8u64, 4, 2, 1][rng.below(4)];
        let n = shape.iter().fold(size, |a, &d| a.wrapping_mul(d));
        let (begin, end) = match rng.below(5) {
            0 => (lying(rng), lying(rng)),
            1 => (offset, offset.wrapping_add(lying(rng))),
            _ => (offset, offset.wrapping_add(n)),
        };
        offset = end;
        let mut entry = json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, end]});
        if rng.below(6) == 0 {
            entry = json::mutate(&entry, rng, &["dtype", "shape", "data_offsets"]);
        }
        header.insert(format!("t{i}"), entry);
    }
    if rng.below(3) == 0 {
        header.insert("__metadata__".into(), json!({"format": "pt"}));
    }
    let text = serde_json::to_vec(&Value::Object(header)).unwrap();
    let header_len = match rng.below(4) {
        0 => lying(rng),
        1 => (text.len() as u64).wrapping_add(rng.below(16) as u64).wrapping_sub(8),
        _ => text.len() as u64,
    };
    let mut out = header_len.to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    let data_len = if rng.below(2) == 0 { offset.min(4096) as usize } else { rng.below(256) };
    out.extend((0..data_len).map(|_| rng.next_u64() as u8));
    out
}

/// What a file that opened must satisfy: every tensor's bytes are dtype x shape, inside the file,
/// and read back through every accessor.
fn read_back(file: &SafetensorsFile, staged: bool) {
    let len = file.contents().len();
    for (name, info) in file.tensors() {
        let want = info.shape.iter().product::<usize>() * info.dtype.size_bytes();
        let bytes = file.bytes(name).expect("a listed tensor");
        assert_eq!((bytes.len(), info.byte_len()), (want, want), "{name}: {info:?}");
        assert!(want <= len, "{name}: {want} bytes in a file of {len}");
        match info.dtype.float() {
            Some(_) => {
                let t = file.tensor(name).expect("a float tensor reads");
                assert_eq!(t.shape(), &info.shape[..]);
                if staged {
                    // Non-finite values are refused by name; finite ones come back as they are.
                    let _ = file.tensor_staged(name, &mut HostStaging::new(Device::Cpu));
                }
            }
            None if info.dtype == StDtype::I32 => assert_eq!(file.i32_values(name).unwrap().len(), want / 4),
            None => assert!(file.tensor(name).is_err(), "{name}: a {} tensor is not a float tensor", info.dtype.name()),
        }
    }
    assert_eq!(file.raw_tensors().len(), file.tensors().len());
}

#[test]
fn fuzz_safetensors_header() {
    let mut target = Target::new("safetensors_header").generator(safetensors_generated);
    for seed in safetensors_seeds() {
        target = target.seed(seed);
    }
    target.run(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.safetensors");
        let mut n = 0u64;
        move |input: &[u8]| {
            let _scratch = &dir;
            n += 1;
            // Every 16th input also goes through a file (mapped, and read with pread when staged).
            let opened = if n % 16 == 0 {
                std::fs::write(&path, input).unwrap();
                SafetensorsFile::open(&path).map(|f| (f, true))
            } else {
                SafetensorsFile::from_bytes("fuzz.safetensors", input.to_vec()).map(|f| (f, false))
            };
            match &opened {
                Ok((file, staged)) => read_back(file, *staged),
                Err(e) => assert!(e.to_string().contains("fuzz.safetensors"), "the error names the file: {e}"),
            }
            Outcome::of(&opened)
        }
    });
}

#[test]
fn regress_safetensors_header_length_of_gigabytes() {
    for claim in [1u64 << 30, 1 << 40, u64::MAX, (100 << 20) + 1] {
        let mut bytes = claim.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let err = SafetensorsFile::from_bytes("lie.safetensors", bytes).unwrap_err().to_string();
        assert!(err.contains("lie.safetensors") && err.contains("header"), "{err}");
    }
}

// ---- GGUF -----------------------------------------------------------------------------------------

/// A GGUF metadata value, with lies its encoding may tell (a string's or an array's length).
#[derive(Clone, Debug)]
enum Val {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(u8),
    Str(Vec<u8>, Option<u64>),
    Arr(u32, Vec<Val>, Option<u64>),
    U64(u64),
    I64(i64),
    F64(f64),
    /// A value type id and the bytes after it, as they are.
    Raw(u32, Vec<u8>),
}

impl Val {
    fn str(s: &str) -> Val {
        Val::Str(s.as_bytes().to_vec(), None)
    }

    fn type_id(&self) -> u32 {
        match self {
            Val::U8(_) => 0,
            Val::I8(_) => 1,
            Val::U16(_) => 2,
            Val::I16(_) => 3,
            Val::U32(_) => 4,
            Val::I32(_) => 5,
            Val::F32(_) => 6,
            Val::Bool(_) => 7,
            Val::Str(..) => 8,
            Val::Arr(..) => 9,
            Val::U64(_) => 10,
            Val::I64(_) => 11,
            Val::F64(_) => 12,
            Val::Raw(ty, _) => *ty,
        }
    }

    /// The value's bytes (without its type id).
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Val::U8(v) => out.push(*v),
            Val::I8(v) => out.extend(v.to_le_bytes()),
            Val::U16(v) => out.extend(v.to_le_bytes()),
            Val::I16(v) => out.extend(v.to_le_bytes()),
            Val::U32(v) => out.extend(v.to_le_bytes()),
            Val::I32(v) => out.extend(v.to_le_bytes()),
            Val::F32(v) => out.extend(v.to_le_bytes()),
            Val::Bool(v) => out.push(*v),
            Val::Str(s, len) => {
                out.extend(len.unwrap_or(s.len() as u64).to_le_bytes());
                out.extend_from_slice(s);
            }
            Val::Arr(item, items, count) => {
                out.extend(item.to_le_bytes());
                out.extend(count.unwrap_or(items.len() as u64).to_le_bytes());
                for i in items {
                    i.encode(out);
                }
            }
            Val::U64(v) => out.extend(v.to_le_bytes()),
            Val::I64(v) => out.extend(v.to_le_bytes()),
            Val::F64(v) => out.extend(v.to_le_bytes()),
            Val::Raw(_, bytes) => out.extend_from_slice(bytes),
        }
    }
}

/// A tensor info and its data.
#[derive(Clone, Debug)]
struct GgufTensorSpec {
    name: Val,
    dims: Vec<u64>,
    n_dims: Option<u32>,
    ty: u32,
    offset: Option<u64>,
    data: Vec<u8>,
}

/// A GGUF file as a list of parts, each of which may lie; [`Gguf::encode`] lays it out as
/// llama.cpp does (header, metadata, tensor infos, padding, data at aligned offsets).
#[derive(Clone, Debug)]
struct Gguf {
    version: u32,
    n_tensors: Option<u64>,
    n_kvs: Option<u64>,
    kvs: Vec<(Val, Val)>,
    tensors: Vec<GgufTensorSpec>,
    alignment: usize,
}

impl Gguf {
    fn new() -> Gguf {
        Gguf { version: 3, n_tensors: None, n_kvs: None, kvs: Vec::new(), tensors: Vec::new(), alignment: 32 }
    }

    fn kv(&mut self, key: &str, value: Val) -> &mut Gguf {
        self.kvs.push((Val::str(key), value));
        self
    }

    fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Gguf {
        self.tensors.push(GgufTensorSpec {
            name: Val::str(name),
            dims: dims.to_vec(),
            n_dims: None,
            ty: ty.id(),
            offset: None,
            data,
        });
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kvs.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            key.encode(&mut out);
            out.extend(value.type_id().to_le_bytes());
            value.encode(&mut out);
        }
        let pad = |n: usize| n.next_multiple_of(self.alignment.max(1));
        let mut offset = 0usize;
        for t in &self.tensors {
            t.name.encode(&mut out);
            out.extend(t.n_dims.unwrap_or(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ty.to_le_bytes());
            out.extend(t.offset.unwrap_or(offset as u64).to_le_bytes());
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

fn f32_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).flat_map(|_| (rng.normal() * 0.05).to_le_bytes()).collect()
}

/// Q8_0 blocks of small random values (f16 scale, 32 int8 values).
fn q8_0_bytes(rng: &mut Rng, n_blocks: usize) -> Vec<u8> {
    (0..n_blocks)
        .flat_map(|_| {
            let mut b = half::f16::from_f32(0.001).to_le_bytes().to_vec();
            b.extend((0..32).map(|_| rng.next_u64() as u8));
            b
        })
        .collect()
}

/// A GGUF of every metadata value type and several tensor types (what the reader sees).
fn gguf_reader_seed() -> Gguf {
    let mut rng = Rng::new(11);
    let mut g = Gguf::new();
    g.kv("general.architecture", Val::str("llama"))
        .kv("u8", Val::U8(7))
        .kv("i8", Val::I8(-7))
        .kv("u16", Val::U16(700))
        .kv("i16", Val::I16(-700))
        .kv("u32", Val::U32(70000))
        .kv("i32", Val::I32(-70000))
        .kv("f32", Val::F32(1e-5))
        .kv("bool", Val::Bool(1))
        .kv("u64", Val::U64(1 << 40))
        .kv("i64", Val::I64(-(1 << 40)))
        .kv("f64", Val::F64(0.25))
        .kv("strings", Val::Arr(8, vec![Val::str("a"), Val::str("bc")], None))
        .kv("ints", Val::Arr(5, vec![Val::I32(1), Val::I32(-2)], None))
        .kv("general.alignment", Val::U32(32));
    g.tensor("f32.weight", &[4, 3], GgmlType::F32, f32_bytes(&mut rng, 12))
        .tensor("f16.weight", &[2], GgmlType::F16, vec![0, 0x3c, 0, 0xbc])
        .tensor("q8.weight", &[32, 2], GgmlType::Q8_0, q8_0_bytes(&mut rng, 2))
        .tensor("q4k.weight", &[256], GgmlType::Q4_K, (0..144).map(|_| rng.next_u64() as u8).collect())
        .tensor("q6k.weight", &[256], GgmlType::Q6_K, (0..210).map(|_| rng.next_u64() as u8).collect());
    g
}

/// The byte tokens of a byte-level BPE vocabulary, in id order.
fn byte_tokens() -> Vec<String> {
    let tokenizer: Value = serde_json::from_str(&byte_level_tokenizer_json()).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap();
    let mut tokens: Vec<(u64, String)> = vocab.iter().map(|(t, id)| (id.as_u64().unwrap(), t.clone())).collect();
    tokens.sort();
    tokens.into_iter().map(|(_, t)| t).collect()
}

const HIDDEN: u64 = 32;
const HEADS: u64 = 4;
const KV_HEADS: u64 = 2;
const FFN: u64 = 64;
const BLOCKS: u64 = 2;

/// A tiny model llama.cpp's converter could have written (`arch` llama or qwen2): what
/// `awq import gguf` accepts.
fn importable(arch: &str, seed: u64) -> Gguf {
    let mut rng = Rng::new(seed);
    let mut tokens = byte_tokens();
    tokens.extend(["Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    let n = tokens.len() as u64;
    let mut types = vec![Val::I32(1); tokens.len()];
    for t in &mut types[tokens.len() - 3..] {
        *t = Val::I32(3);
    }
    let k = |s: &str| format!("{arch}.{s}");
    let mut g = Gguf::new();
    g.kv("general.architecture", Val::str(arch))
        .kv("general.name", Val::str("fuzz"))
        .kv(&k("block_count"), Val::U32(BLOCKS as u32))
        .kv(&k("context_length"), Val::U32(256))
        .kv(&k("embedding_length"), Val::U32(HIDDEN as u32))
        .kv(&k("feed_forward_length"), Val::U32(FFN as u32))
        .kv(&k("attention.head_count"), Val::U32(HEADS as u32))
        .kv(&k("attention.head_count_kv"), Val::U32(KV_HEADS as u32))
        .kv(&k("rope.freq_base"), Val::F32(10000.0))
        .kv(&k("attention.layer_norm_rms_epsilon"), Val::F32(1e-5))
        .kv(&k("rope.dimension_count"), Val::U32((HIDDEN / HEADS) as u32))
        .kv("tokenizer.ggml.model", Val::str("gpt2"))
        .kv("tokenizer.ggml.pre", Val::str(if arch == "qwen2" { "qwen2" } else { "smollm" }))
        .kv("tokenizer.ggml.tokens", Val::Arr(8, tokens.iter().map(|t| Val::str(t)).collect(), None))
        .kv("tokenizer.ggml.token_type", Val::Arr(5, types, None))
        .kv("tokenizer.ggml.merges", Val::Arr(8, ["Ġ t", "h e", "Ġt he"].map(Val::str).to_vec(), None))
        .kv("tokenizer.ggml.bos_token_id", Val::U32(n as u32 - 2))
        .kv("tokenizer.ggml.eos_token_id", Val::U32(n as u32 - 1))
        .kv("tokenizer.chat_template", Val::str("{% for m in messages %}{{ m.content }}{% endfor %}"));
    g.tensor("token_embd.weight", &[HIDDEN, n], GgmlType::Q8_0, q8_0_bytes(&mut rng, n as usize));
    let head_dim = HIDDEN / HEADS;
    for b in 0..BLOCKS {
        let mut f32_tensor = |g: &mut Gguf, stem: &str, dims: &[u64]| {
            let n: u64 = dims.iter().product();
            g.tensor(&format!("blk.{b}.{stem}"), dims, GgmlType::F32, f32_bytes(&mut rng, n as usize));
        };
        f32_tensor(&mut g, "attn_norm.weight", &[HIDDEN]);
        f32_tensor(&mut g, "ffn_norm.weight", &[HIDDEN]);
        f32_tensor(&mut g, "attn_q.weight", &[HIDDEN, HEADS * head_dim]);
        f32_tensor(&mut g, "attn_k.weight", &[HIDDEN, KV_HEADS * head_dim]);
        f32_tensor(&mut g, "attn_v.weight", &[HIDDEN, KV_HEADS * head_dim]);
        f32_tensor(&mut g, "attn_output.weight", &[HEADS * head_dim, HIDDEN]);
        f32_tensor(&mut g, "ffn_gate.weight", &[HIDDEN, FFN]);
        f32_tensor(&mut g, "ffn_up.weight", &[HIDDEN, FFN]);
        f32_tensor(&mut g, "ffn_down.weight", &[FFN, HIDDEN]);
        if arch == "qwen2" {
            f32_tensor(&mut g, "attn_q.bias", &[HEADS * head_dim]);
            f32_tensor(&mut g, "attn_k.bias", &[KV_HEADS * head_dim]);
            f32_tensor(&mut g, "attn_v.bias", &[KV_HEADS * head_dim]);
        }
    }
    let norm = f32_bytes(&mut rng, HIDDEN as usize);
    g.tensor("output_norm.weight", &[HIDDEN], GgmlType::F32, norm);
    if arch == "llama" {
        let head = f32_bytes(&mut rng, (HIDDEN * n) as usize);
        g.tensor("output.weight", &[HIDDEN, n], GgmlType::F32, head);
    }
    g
}

/// A random metadata value of any type, often one whose length or count lies.
fn random_val(rng: &mut Rng, depth: usize) -> Val {
    match rng.below(if depth > 0 { 13 } else { 15 }) {
        0 => Val::U8(rng.next_u64() as u8),
        1 => Val::I8(rng.next_u64() as i8),
        2 => Val::U16(lying(rng) as u16),
        3 => Val::I16(rng.next_u64() as i16),
        4 => Val::U32(lying(rng) as u32),
        5 => Val::I32(lying(rng) as i32),
        6 => Val::F32(*pick(rng, &[0.0, -1.0, 1e-5, f32::NAN, f32::INFINITY, 1e30, 0.5])),
        7 => Val::Bool(rng.next_u64() as u8),
        8 => Val::U64(lying(rng)),
        9 => Val::I64(lying(rng) as i64),
        10 => Val::F64(*pick(rng, &[0.0, -1.0, f64::NAN, 1e300])),
        11 => Val::Str(b"x".repeat(rng.below(40)), if rng.below(3) == 0 { Some(lying(rng)) } else { None }),
        12 => Val::Raw(lying(rng) as u32, (0..rng.below(16)).map(|_| rng.next_u64() as u8).collect()),
        _ => {
            let item = random_val(rng, depth + 1);
            let items = (0..rng.below(6)).map(|_| random_val_of(rng, item.type_id())).collect();
            let ty = if rng.below(8) == 0 { lying(rng) as u32 } else { item.type_id() };
            Val::Arr(ty, items, if rng.below(3) == 0 { Some(lying(rng)) } else { None })
        }
    }
}

/// A value of type `ty` (or anything, for the types that are not scalars).
fn random_val_of(rng: &mut Rng, ty: u32) -> Val {
    for _ in 0..64 {
        let v = random_val(rng, 1);
        if v.type_id() == ty {
            return v;
        }
    }
    Val::U8(0)
}

/// A GGUF built from a valid one with a few parts replaced by lies: counts, string and array
/// lengths, value types, tensor dims, types, offsets, the alignment, the version.
fn gguf_generated(base: &Gguf, rng: &mut Rng) -> Vec<u8> {
    let mut g = base.clone();
    for _ in 0..1 + rng.below(3) {
        match rng.below(12) {
            0 => g.n_tensors = Some(lying(rng)),
            1 => g.n_kvs = Some(lying(rng)),
            2 if !g.kvs.is_empty() => {
                let i = rng.below(g.kvs.len());
                g.kvs[i].1 = random_val(rng, 0);
            }
            3 if !g.kvs.is_empty() => {
                let i = rng.below(g.kvs.len());
                if let Val::Str(s, _) = &g.kvs[i].0 {
                    g.kvs[i].0 = Val::Str(s.clone(), Some(lying(rng)));
                }
            }
            4 => {
                let key = pick(
                    rng,
                    &["general.alignment", "general.architecture", "llama.block_count", "tokenizer.ggml.tokens"],
                );
                g.kv(key, random_val(rng, 0));
            }
            5 if !g.tensors.is_empty() => {
                let i = rng.below(g.tensors.len());
                let d = rng.below(g.tensors[i].dims.len().max(1));
                if let Some(dim) = g.tensors[i].dims.get_mut(d) {
                    *dim = lying(rng);
                }
            }
            6 if !g.tensors.is_empty() => {
                let i = rng.below(g.tensors.len());
                g.tensors[i].ty = if rng.below(2) == 0 {
                    lying(rng) as u32
                } else {
                    pick(rng, &GgmlType::all().collect::<Vec<_>>()).id()
                };
            }
            7 if !g.tensors.is_empty() => {
                let i = rng.below(g.tensors.len());
                g.tensors[i].offset = Some(if rng.below(2) == 0 { lying(rng) } else { 32 * rng.below(8) as u64 });
            }
            8 if !g.tensors.is_empty() => {
                let i = rng.below(g.tensors.len());
                match rng.below(3) {
                    0 => g.tensors[i].n_dims = Some(lying(rng) as u32),
                    1 => g.tensors[i].dims.push(lying(rng)),
                    _ => g.tensors[i].name = Val::Str(b"t".to_vec(), Some(lying(rng))),
                }
            }
            9 if !g.tensors.is_empty() => {
                let i = rng.below(g.tensors.len());
                let keep = rng.below(g.tensors[i].data.len() + 1);
                g.tensors[i].data.truncate(keep);
            }
            10 => {
                let lie = lying(rng) as u32;
                g.version = *pick(rng, &[1, 2, 3, 4, 3u32.swap_bytes(), lie]);
            }
            _ => {
                let n = g.tensors.len();
                if n > 1 {
                    g.tensors.swap(rng.below(n), rng.below(n));
                }
            }
        }
    }
    g.encode()
}

/// Reads everything an opened file offers: every metadata key through every accessor, every
/// tensor's bytes (dequantized when the type is supported and the tensor small).
fn read_gguf(file: &GgufFile) {
    for key in file.metadata().keys() {
        let _ =
            (file.str(key), file.uint(key), file.float(key), file.bool(key), file.str_array(key), file.int_array(key));
    }
    let len = std::fs::metadata(file.path()).unwrap().len() as usize;
    for t in file.tensors() {
        let data = file.tensor_data(t);
        assert_eq!(data.len(), t.n_bytes(), "{}", t.name);
        assert!(t.n_bytes() <= len);
        assert_eq!(t.n_elements() / t.ty.block_len() * t.ty.block_bytes(), t.n_bytes(), "{}", t.name);
        if dequant::check_supported(t.ty).is_ok() && t.n_elements() <= 1 << 20 {
            let mut out = vec![0f32; t.n_elements()];
            dequant::dequantize(t.ty, data, &mut out).unwrap();
        }
    }
}

#[test]
fn fuzz_gguf_reader() {
    let base = gguf_reader_seed();
    let llama = importable("llama", 1);
    let mut target = Target::new("gguf_reader").seed(base.encode()).seed(llama.encode());
    target = target
        .generator(move |rng| if rng.below(2) == 0 { gguf_generated(&base, rng) } else { gguf_generated(&llama, rng) });
    target.run(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.gguf");
        move |input: &[u8]| {
            let _scratch = &dir;
            std::fs::write(&path, input).unwrap();
            let opened = GgufFile::open(&path);
            match &opened {
                Ok(file) => read_gguf(file),
                Err(e) => assert!(e.to_string().contains("fuzz.gguf"), "the error names the file: {e}"),
            }
            Outcome::of(&opened)
        }
    });
}

/// The keys `awq import gguf` reads, and metadata values that break their checks.
const IMPORT_KEYS: &[&str] = &[
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "attention.layer_norm_rms_epsilon",
];

fn import_generated(bases: &[Gguf], rng: &mut Rng) -> Vec<u8> {
    let mut g = pick(rng, bases).clone();
    let arch = match &g.kvs[0].1 {
        Val::Str(s, _) => String::from_utf8_lossy(s).into_owned(),
        _ => unreachable!("the first key is general.architecture"),
    };
    for _ in 0..1 + rng.below(2) {
        match rng.below(6) {
            0..=2 => {
                let key = format!("{arch}.{}", pick(rng, IMPORT_KEYS));
                let value = match rng.below(4) {
                    0 => random_val(rng, 0),
                    1 => Val::U64(lying(rng)),
                    2 => Val::U32(*pick(rng, &[0, 1, 2, 3, 5, 8, 16, 31, 33, 64, 1 << 20])),
                    _ => Val::str(*pick(rng, &["linear", "yarn", "none", ""])),
                };
                match g.kvs.iter_mut().find(|(k, _)| matches!(k, Val::Str(s, None) if s == key.as_bytes())) {
                    Some(kv) if rng.below(4) != 0 => kv.1 = value,
                    _ => {
                        g.kv(&key, value);
                    }
                }
            }
            3 => {
                let key = *pick(
                    rng,
                    &[
                        "tokenizer.ggml.bos_token_id",
                        "tokenizer.ggml.eos_token_id",
                        "tokenizer.ggml.pre",
                        "tokenizer.ggml.model",
                        "tokenizer.ggml.merges",
                        "tokenizer.ggml.token_type",
                        "tokenizer.ggml.add_bos_token",
                        "general.architecture",
                    ],
                );
                if let Some(kv) = g.kvs.iter_mut().find(|(k, _)| matches!(k, Val::Str(s, None) if s == key.as_bytes()))
                {
                    kv.1 = random_val(rng, 0);
                }
            }
            4 => {
                let i = rng.below(g.tensors.len());
                if rng.below(2) == 0 {
                    g.tensors.remove(i);
                } else {
                    let d = rng.below(g.tensors[i].dims.len());
                    g.tensors[i].dims[d] = *pick(rng, &[0, 1, 8, 16, 32, 64, 96, HIDDEN * 2]);
                }
            }
            _ => return gguf_generated(&g, rng),
        }
    }
    g.encode()
}

#[test]
fn fuzz_gguf_import() {
    let bases = vec![importable("llama", 1), importable("qwen2", 2)];
    let mut target = Target::new("gguf_import").input_timeout(std::time::Duration::from_secs(20));
    for b in &bases {
        target = target.seed(b.encode());
    }
    target = target.generator(move |rng| import_generated(&bases, rng));
    target.run(|| {
        let dir = tempfile::tempdir().unwrap();
        let (path, out) = (dir.path().join("fuzz.gguf"), dir.path().join("out"));
        let mut n = 0usize;
        move |input: &[u8]| {
            let _scratch = &dir;
            n += 1;
            std::fs::write(&path, input).unwrap();
            let dtype = [awq_kernels::DType::F16, awq_kernels::DType::F32, awq_kernels::DType::BF16][n % 3];
            let options = ImportOptions { dtype, max_shard_bytes: 1 << (10 + n % 8), overwrite: Overwrite::Replace };
            let imported = import(&path, &out, &options);
            match &imported {
                Ok(report) => {
                    // What was written opens as a checkpoint, with a tokenizer that works.
                    let checkpoint = Checkpoint::open(&out).expect("an imported checkpoint opens");
                    assert_eq!(checkpoint.n_blocks(), report.n_blocks);
                    let tokenizer = Tokenizer::from_dir(&out, checkpoint.config()).expect("its tokenizer loads");
                    let ids = tokenizer.encode("the fuzz").unwrap();
                    assert_eq!(tokenizer.decode(&ids).unwrap(), "the fuzz");
                    std::fs::remove_dir_all(&out).unwrap();
                }
                Err(e) => assert!(e.to_string().contains("fuzz.gguf"), "the error names the file: {e}"),
            }
            Outcome::of(&imported)
        }
    });
}

// ---- config.json ----------------------------------------------------------------------------------

const CONFIG_FIELDS: &[&str] = &[
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "partial_rotary_factor",
    "layer_types",
    "full_attention",
    "sliding_attention",
    "tie_word_embeddings",
    "torch_dtype",
    "dtype",
    "hidden_act",
    "hidden_activation",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "bos_token_id",
    "eos_token_id",
    "max_position_embeddings",
    "quantization_config",
    "rope_local_base_freq",
    "sliding_window_pattern",
    "query_pre_attn_scalar",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "use_bidirectional_attention",
];

/// The synthetic checkpoints the config target writes its config.json into: a llama, a qwen2 and a
/// gemma3_text (layer types, its own RoPE for sliding blocks, query_pre_attn_scalar).
fn config_seeds(dir: &Path) -> Vec<(PathBuf, Value)> {
    [
        ("llama", SyntheticSpec { n_blocks: 2, ..SyntheticSpec::tiny_llama() }),
        ("qwen2", SyntheticSpec::tiny_qwen2()),
        ("gemma3", SyntheticSpec { n_blocks: 2, ..SyntheticSpec::tiny_gemma3() }),
    ]
        .into_iter()
        .map(|(name, spec)| {
            let model = dir.join(name);
            write_checkpoint(&model, &spec).unwrap();
            let config: Value =
                serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
            (model, config)
        })
        .collect()
}

/// config.json forms a seed may take: as written, transformers 5's `rope_parameters` (flat and per
/// layer type), Llama 3.1's RoPE scaling, an AWQ `quantization_config`.
fn config_variants(config: &Value) -> Vec<Value> {
    let mut v5 = config.clone();
    let theta = v5.as_object_mut().unwrap().remove("rope_theta").unwrap();
    v5["rope_parameters"] = json!({"rope_type": "default", "rope_theta": theta});
    v5["dtype"] = v5.as_object_mut().unwrap().remove("torch_dtype").unwrap();
    let mut per_type = v5.clone();
    per_type["rope_parameters"] = json!({"full_attention": {"rope_type": "default", "rope_theta": theta}, "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}});
    per_type["layer_types"] = json!(["full_attention", "full_attention"]);
    let mut llama3 = config.clone();
    llama3["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    let mut awq = config.clone();
    awq["quantization_config"] =
        json!({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": true, "version": "gemm"});
    vec![config.clone(), v5, per_type, llama3, awq]
}

#[test]
fn fuzz_config_json() {
    let scratch = tempfile::tempdir().unwrap();
    let models = config_seeds(scratch.path());
    // Each input is one byte choosing the checkpoint, then config.json.
    let mut target = Target::new("config_json");
    let mut docs = Vec::new();
    for (i, (_, config)) in models.iter().enumerate() {
        for v in config_variants(config) {
            let mut input = vec![i as u8];
            input.extend(serde_json::to_vec_pretty(&v).unwrap());
            target = target.seed(input);
            docs.push((i as u8, v));
        }
    }
    target = target.generator(move |rng| {
        let (i, doc) = pick(rng, &docs);
        let mut input = vec![*i];
        input.extend(serde_json::to_vec(&json::mutate(doc, rng, CONFIG_FIELDS)).unwrap());
        input
    });
    let dirs: Vec<PathBuf> = models.into_iter().map(|(dir, _)| dir).collect();
    target.run(move || {
        move |input: &[u8]| {
            let _scratch = &scratch;
            let Some((&which, text)) = input.split_first() else { return Outcome::Refused };
            let dir = &dirs[which as usize % dirs.len()];
            std::fs::write(dir.join("config.json"), text).unwrap();
            // The parse alone, then what every loader does: the checkpoint checked against it.
            if let Ok(text) = std::str::from_utf8(text) {
                if let Ok(c) = ModelConfig::parse(Path::new("fuzz/config.json"), text) {
                    let _ = (c.rotary_dim(), c.q_dim(), c.kv_dim());
                }
            }
            let opened = Checkpoint::open(dir);
            match &opened {
                Ok(checkpoint) => {
                    let c = checkpoint.config();
                    assert_eq!(c.rope_inv_freq().len(), c.rotary_dim() / 2);
                    if c.n_blocks > 0 {
                        checkpoint.load_block(0).expect("a checked checkpoint's first block loads");
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    assert!(message.contains(&dir.display().to_string()), "the error names the file: {message}");
                }
            }
            Outcome::of(&opened)
        }
    });
}

// ---- tokenizer.json and tokenizer_config.json -------------------------------------------------

const TOKENIZER_FIELDS: &[&str] = &[
    "model",
    "type",
    "vocab",
    "merges",
    "added_tokens",
    "id",
    "content",
    "special",
    "normalized",
    "pre_tokenizer",
    "pretokenizers",
    "normalizer",
    "normalizers",
    "decoder",
    "decoders",
    "post_processor",
    "pattern",
    "Regex",
    "String",
    "behavior",
    "single",
    "pair",
    "special_tokens",
    "SpecialToken",
    "Sequence",
    "dropout",
    "unk_token",
    "byte_fallback",
    "continuing_subword_prefix",
    "end_of_word_suffix",
    "truncation",
    "padding",
    "max_length",
    "add_prefix_space",
    "use_regex",
    "individual_digits",
];

/// tokenizer.json seeds: the synthetic byte-level BPE, and what `awq import gguf` writes for the
/// llama and qwen2 vocabularies (merges, added tokens, a split regex, a template post-processor).
fn tokenizer_seeds(dir: &Path) -> Vec<Value> {
    let mut seeds = vec![serde_json::from_str(&byte_level_tokenizer_json()).unwrap()];
    for (arch, seed) in [("llama", 1), ("qwen2", 2)] {
        let mut g = importable(arch, seed);
        g.kv("tokenizer.ggml.add_bos_token", Val::Bool(1));
        let (path, out) = (dir.join(format!("{arch}.gguf")), dir.join(arch));
        std::fs::write(&path, g.encode()).unwrap();
        import(&path, &out, &ImportOptions::default()).unwrap();
        seeds.push(serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap()).unwrap());
    }
    seeds
}

/// What a loaded tokenizer must survive: texts of every kind, ids in and out of the vocabulary.
fn use_tokenizer(tokenizer: &Tokenizer) {
    for text in ["", "the fuzz", "  12345 ", "\u{1F600}\u{0}\u{FFFD}", &"ab ".repeat(300)] {
        if let Ok(ids) = tokenizer.encode(text) {
            let _ = tokenizer.decode(&ids);
        }
    }
    let n = tokenizer.vocab_size() as u32;
    let _ = tokenizer.decode(&[0, n.saturating_sub(1), n, n + 1, u32::MAX]);
}

#[test]
fn fuzz_tokenizer_json() {
    let scratch = tempfile::tempdir().unwrap();
    let seeds = tokenizer_seeds(scratch.path());
    let mut target = Target::new("tokenizer_json");
    for s in &seeds {
        target = target.seed(serde_json::to_vec(s).unwrap());
    }
    target = target
        .generator(move |rng| serde_json::to_vec(&json::mutate(pick(rng, &seeds), rng, TOKENIZER_FIELDS)).unwrap());
    target.run(move || {
        let dir = scratch.path().join("model");
        write_checkpoint(&dir, &SyntheticSpec::tiny_llama()).unwrap();
        let config = ModelConfig::from_dir(&dir).unwrap();
        move |input: &[u8]| {
            let _scratch = &scratch;
            std::fs::write(dir.join("tokenizer.json"), input).unwrap();
            let loaded = Tokenizer::from_dir(&dir, &config);
            match &loaded {
                Ok(tokenizer) => use_tokenizer(tokenizer),
                Err(e) => assert!(e.to_string().contains("tokenizer.json"), "the error names the file: {e}"),
            }
            Outcome::of(&loaded)
        }
    });
}

/// The tiny synthetic checkpoint, whose tokenizer the regressions below load with one edit each.
struct EditedTokenizer {
    dir: tempfile::TempDir,
    config: ModelConfig,
    seed: Value,
}

impl EditedTokenizer {
    fn new() -> EditedTokenizer {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
        let config = ModelConfig::from_dir(dir.path()).unwrap();
        let seed = serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap()).unwrap();
        EditedTokenizer { dir, config, seed }
    }

    /// Loads the checkpoint's tokenizer with `edit` made to its tokenizer.json.
    fn load(&self, edit: impl FnOnce(&mut Value)) -> awq_model::Result<Tokenizer> {
        let mut tokenizer = self.seed.clone();
        edit(&mut tokenizer);
        std::fs::write(self.dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        Tokenizer::from_dir(self.dir.path(), &self.config)
    }
}

/// Found by the long run (seed 0x18ef2864e415462b, input 54434): an added token of 32 KiB made
/// loading take minutes (the `tokenizers` crate builds its added-token matcher in time quadratic
/// in the longest token). Refused at once now, naming the field; one at the bound loads.
#[test]
fn regress_tokenizer_json_with_an_added_token_of_32_kib() {
    let fixture = EditedTokenizer::new();
    let n = fixture.seed["added_tokens"].as_array().map_or(0, Vec::len);
    let with_added = |content: String| {
        let token = json!({"id": 300 + n, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true});
        (n, fixture.load(|t| t["added_tokens"].as_array_mut().expect("added_tokens").push(token)))
    };
    let started = std::time::Instant::now();
    let (n, loaded) = with_added("x".repeat(32 << 10));
    let err = loaded.err().expect("refused").to_string();
    assert!(err.contains("tokenizer.json") && err.contains(&format!("added_tokens[{n}].content: 32768 bytes")), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "took {:?}", started.elapsed());
    let (_, loaded) = with_added("x".repeat(awq_model::MAX_ADDED_TOKEN_BYTES));
    assert!(loaded.is_ok(), "{:?}", loaded.err());
}

/// Found by the long run (seed 0x18ef2abf34815b31, input 11043): a `continuing_subword_prefix`
/// longer than a merge's second token made the `tokenizers` crate panic slicing it off. Refused,
/// naming the merge; merges that carry the prefix still load.
#[test]
fn regress_tokenizer_json_whose_merges_lack_the_subword_prefix() {
    let fixture = EditedTokenizer::new();
    let with_model = |prefix: &str, merges: Value, vocab: &[(&str, u32)]| {
        fixture.load(|t| {
            t["model"]["continuing_subword_prefix"] = json!(prefix);
            t["model"]["merges"] = merges;
            for (token, id) in vocab {
                t["model"]["vocab"][*token] = json!(id);
            }
        })
    };
    for merges in [json!([["h", "e"], ["a", "t"]]), json!(["h e"])] {
        let err = with_model("null", merges, &[]).err().expect("refused").to_string();
        assert!(err.contains("tokenizer.json") && err.contains("model.merges[0]") && err.contains("\"null\""), "{err}");
    }
    let loaded = with_model("##", json!([["h", "##e"]]), &[("##e", 300), ("he", 301)]);
    assert!(loaded.is_ok(), "{:?}", loaded.err());
}

/// Found by the long run (seed 0x18ef2adc8f822af0, input 435008): a pre-tokenizer sequence of 1080
/// ByteLevel steps (each pass doubles a text's non-ASCII bytes) hung the first encode. Refused at
/// load, naming the section; the sequences real tokenizers use still load.
#[test]
fn regress_tokenizer_json_whose_pre_tokenizer_repeats_byte_level() {
    let fixture = EditedTokenizer::new();
    let with = |section: &str, value: Value| fixture.load(|t| t[section] = value);
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let digits = json!({"type": "Digits", "individual_digits": true});
    let err = with("pre_tokenizer", json!({"type": "Sequence", "pretokenizers": [digits, byte_level, byte_level]}));
    let err = err.err().expect("refused").to_string();
    assert!(err.contains("tokenizer.json") && err.contains("pre_tokenizer: 2 ByteLevel steps"), "{err}");
    // Nested sequences count as one chain.
    let nested = json!({"type": "Sequence", "pretokenizers": [byte_level, {"type": "Sequence", "pretokenizers": [byte_level]}]});
    assert!(with("pre_tokenizer", nested).is_err());
    let many = json!({"type": "Sequence", "normalizers": vec![json!({"type": "NFC"}); 17]});
    let err = with("normalizer", many).err().expect("refused").to_string();
    assert!(err.contains("normalizer: 17 steps, more than 16"), "{err}");
    let loaded = with("pre_tokenizer", json!({"type": "Sequence", "pretokenizers": [digits, byte_level]}));
    assert!(loaded.is_ok(), "{:?}", loaded.err());
}

#[test]
fn fuzz_tokenizer_config_json() {
    let seeds = [
        json!({"add_bos_token": true, "bos_token": "<s>", "eos_token": {"content": "</s>", "special": true},
               "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}),
        json!({"add_bos_token": false, "eos_token": "<|endoftext|>",
               "chat_template": [{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "x"}]}),
        json!({}),
    ];
    let mut target = Target::new("tokenizer_config_json");
    for s in &seeds {
        target = target.seed(serde_json::to_vec(s).unwrap());
    }
    let fields = ["add_bos_token", "bos_token", "eos_token", "chat_template", "content", "name", "template"];
    target = target.generator(move |rng| serde_json::to_vec(&json::mutate(pick(rng, &seeds), rng, &fields)).unwrap());
    target.run(|| {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().to_path_buf();
        write_checkpoint(&dir, &SyntheticSpec::tiny_llama()).unwrap();
        let config = ModelConfig::from_dir(&dir).unwrap();
        move |input: &[u8]| {
            let _ = &scratch;
            std::fs::write(dir.join("tokenizer_config.json"), input).unwrap();
            let read = TokenizerConfig::from_dir(&dir);
            if let Err(e) = &read {
                assert!(e.to_string().contains("tokenizer_config.json"), "the error names the file: {e}");
            }
            // The same file decides whether sequences start with BOS.
            match Tokenizer::from_dir(&dir, &config) {
                Ok(tokenizer) => use_tokenizer(&tokenizer),
                Err(e) => assert!(
                    e.to_string().contains("tokenizer_config.json") || e.to_string().contains("bos_token_id"),
                    "{e}"
                ),
            }
            Outcome::of(&read)
        }
    });
}

// ---- findings, kept ------------------------------------------------------------------------------

#[test]
fn regress_safetensors_offsets_near_the_end_of_u64() {
    // Offsets that pass the dtype x shape check but end past u64::MAX once the header is added.
    let end = u64::MAX - 1;
    let header = format!(r#"{{"t":{{"dtype":"U8","shape":[{end}],"data_offsets":[0,{end}]}}}}"#);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let err = SafetensorsFile::from_bytes("far.safetensors", bytes).unwrap_err().to_string();
    assert!(
        err.contains("far.safetensors: truncated: tensor t: data ends at byte 18446744073709551713 but the file has 99 bytes"),
        "{err}"
    );
}

#[test]
fn regress_gguf_dims_overflowing_a_byte_count() {
    let mut g = Gguf::new();
    g.tensor("big.weight", &[1 << 62], GgmlType::F32, Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.gguf");
    std::fs::write(&path, g.encode()).unwrap();
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("big.gguf: tensor big.weight: dims [4611686018427387904] of F32 overflow a byte count"),
        "{err}"
    );
}

#[test]
fn regress_config_block_count_of_gigabytes() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["num_hidden_layers"] = json!(1u64 << 60);
    std::fs::write(&path, config.to_string()).unwrap();
    let started = std::time::Instant::now();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("config.json: field `num_hidden_layers`: 1152921504606846976 blocks, but the checkpoint holds"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
}

#[test]
fn regress_gguf_block_count_of_gigabytes() {
    let mut g = importable("llama", 1);
    let block_count =
        g.kvs.iter_mut().find(|(k, _)| matches!(k, Val::Str(s, None) if s == b"llama.block_count")).unwrap();
    block_count.1 = Val::U64(1 << 60);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lie.gguf");
    std::fs::write(&path, g.encode()).unwrap();
    let started = std::time::Instant::now();
    let err = import(&path, &dir.path().join("out"), &ImportOptions::default()).unwrap_err().to_string();
    assert!(
        err.contains("lie.gguf: metadata key `llama.block_count`: 1152921504606846976 blocks, but the file holds"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
}

#[test]
fn regress_tokenizer_json_whose_decoder_is_not_json() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SyntheticSpec::tiny_llama()).unwrap();
    let config = ModelConfig::from_dir(dir.path()).unwrap();
    // The `tokenizers` crate panics on this one ("Helper") when it parses the bytes itself.
    std::fs::write(dir.path().join("tokenizer.json"), r#"{"decoder": {"type": _end|>"}}"#).unwrap();
    let err = Tokenizer::from_dir(dir.path(), &config).err().expect("not a tokenizer").to_string();
    assert!(err.contains("tokenizer.json") && err.contains("not JSON"), "{err}");
}

#[test]
fn regress_config_head_dim_overflowing_the_query_width() {
    let text = r#"{"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 9223372036854775808, "vocab_size": 320}"#;
    let err = ModelConfig::parse(Path::new("m/config.json"), text).unwrap_err().to_string();
    assert_eq!(err, "m/config.json: field `head_dim`: 4 heads of 9223372036854775808 overflow the query width");
}

#[test]
fn regress_gguf_with_many_tensor_infos_opens_in_linear_time() {
    // 200k empty tensors (a 9 MB file): the duplicate-name check compared every pair (2 * 10^10
    // comparisons, minutes).
    let mut g = Gguf::new();
    for i in 0..200_000 {
        g.tensor(&format!("t{i}"), &[0], GgmlType::F32, Vec::new());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.gguf");
    std::fs::write(&path, g.encode()).unwrap();
    let started = std::time::Instant::now();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.tensors().len(), 200_000);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
}
