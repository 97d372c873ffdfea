//! The prompts of `awq bench serve`: token ids of exactly `--input-len` tokens, sent as a token-id
//! prompt so that the server neither tokenizes nor can make them longer or shorter.
//!
//! `random` draws ids uniformly (seeded) from a pool: `0..--vocab-size`, or by default the distinct
//! ids the server's own tokenizer gives [`VOCAB_TEXT`] (POST /tokenize), which are surely in its
//! vocabulary and are no special tokens; random prompts share no prefix, so a prefix cache finds
//! nothing. `text` cuts consecutive windows out of a text file tokenized by the server (in pieces,
//! as far as the sweep needs), from a seeded start, wrapping around at its end.

use anyhow::{bail, Context, Result};
use awq_kernels::rng::SplitMix64;
use serde_json::{json, Value};

use super::client::Http;

/// Text whose tokens make the default pool of random ids: varied English (a few hundred distinct
/// tokens with a byte-level BPE), numbers and punctuation.
pub const VOCAB_TEXT: &str = "\
Measuring a server means asking it many questions at once and timing every answer. The first token \
arrives after the whole prompt has been read; the others follow one by one, as quickly as the machine \
can produce them. A scheduler decides which requests share each step; a paged cache keeps their keys \
and values in blocks of sixteen positions. When memory runs short, the newest request waits or is \
preempted, and its latency grows. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 128 1024 2048 65536 3.14159 \
-273.15 1e-6; dates like 1969-07-20 and 12:34:56; symbols # $ % & * + / < = > @ [ ] ^ _ { | } ~. \
Words from elsewhere: naïve café façade jalapeño über straße smörgåsbord. Quick brown foxes jump \
over lazy dogs; sphinxes of black quartz judge vows; pack my box with five dozen liquor jugs. \
Rivers, mountains, harbours, lanterns, engines, gardens, violins, telescopes, glaciers, volcanoes, \
orchards, libraries, bicycles, thunderstorms, cathedrals, submarines, algorithms, electrons.";

/// Where the ids of the random prompts come from.
pub enum Pool {
    /// Every id below this.
    Range(u32),
    /// These distinct ids.
    Ids(Vec<u32>),
}

/// The source of prompts, shared by every level of a sweep (each prompt is new: no two levels
/// send the same random prompt).
pub enum Prompts {
    Random { pool: Pool, rng: SplitMix64 },
    Text { tokens: Vec<u32>, next: usize },
}

impl Prompts {
    /// The next prompt of `len` tokens.
    pub fn next(&mut self, len: usize) -> Vec<u32> {
        match self {
            Prompts::Random { pool: Pool::Range(n), rng } => (0..len).map(|_| rng.below(*n as usize) as u32).collect(),
            Prompts::Random { pool: Pool::Ids(ids), rng } => (0..len).map(|_| ids[rng.below(ids.len())]).collect(),
            Prompts::Text { tokens, next } => {
                let out = (0..len).map(|i| tokens[(*next + i) % tokens.len()]).collect();
                *next = (*next + len) % tokens.len();
                out
            }
        }
    }
}

/// Token ids of `text` by the server's tokenizer (no BOS: the prompts are cut from the middle).
async fn tokenize(http: &Http, model: &str, text: &str) -> Result<Vec<u32>> {
    let v = http.post_json("/tokenize", &json!({"model": model, "prompt": text, "add_special_tokens": false})).await?;
    let tokens =
        v.get("tokens").and_then(Value::as_array).context("POST /tokenize answered without a `tokens` list")?;
    tokens
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect::<Option<Vec<u32>>>()
        .context("POST /tokenize answered a `tokens` list that holds something other than token ids")
}

/// The random prompts' source: ids below `vocab_size`, or those the server gives [`VOCAB_TEXT`].
pub async fn random(http: &Http, model: &str, vocab_size: Option<u32>, seed: u64) -> Result<Prompts> {
    let pool = match vocab_size {
        Some(0) => bail!("--vocab-size must be positive"),
        Some(n) => Pool::Range(n),
        None => {
            let mut ids = tokenize(http, model, VOCAB_TEXT).await.context("learning token ids for random prompts")?;
            ids.sort_unstable();
            ids.dedup();
            if ids.is_empty() {
                bail!("POST /tokenize gave no token for the built-in text; pass --vocab-size N");
            }
            Pool::Ids(ids)
        }
    };
    Ok(Prompts::Random { pool, rng: SplitMix64::new(seed) })
}

/// Bytes of text tokenized per /tokenize request: small enough for any server's body and length
/// limits (about a thousand tokens), large enough that a long file takes few requests.
const PIECE_BYTES: usize = 4096;

/// The text prompts' source: `text` tokenized until `needed` tokens (what the whole sweep sends)
/// or its end, starting at a seeded window. Warns (stderr) when the sweep will wrap around.
pub async fn text(http: &Http, model: &str, text: &str, needed: usize, input_len: usize, seed: u64) -> Result<Prompts> {
    let mut tokens = Vec::new();
    for piece in pieces(text, PIECE_BYTES) {
        if tokens.len() >= needed {
            break;
        }
        tokens.extend(tokenize(http, model, piece).await.context("tokenizing --text")?);
    }
    if tokens.len() < input_len {
        bail!("--text holds {} tokens, fewer than one prompt of --input-len {input_len}", tokens.len());
    }
    if tokens.len() < needed {
        eprintln!(
            "note: --text holds {} tokens and the sweep sends {needed}: prompts repeat, and a server with a prefix \
             cache may answer the repeats faster",
            tokens.len()
        );
    }
    let next = SplitMix64::new(seed).below(tokens.len());
    Ok(Prompts::Text { tokens, next })
}

/// `text` in consecutive pieces of at most `max` bytes, cut after a line break where there is one
/// (tokenizers merge across spaces, rarely across lines), else at a character boundary.
pub fn pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max.max(4));
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end < rest.len() {
            if let Some(nl) = rest[..end].rfind('\n') {
                end = nl + 1;
            }
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_text_at_line_and_char_boundaries() {
        let text = "one two\nthree\nfour five six seven\né€😀 tail";
        for max in 1..text.len() + 2 {
            let parts: Vec<&str> = pieces(text, max).collect();
            assert_eq!(parts.concat(), text, "max {max}");
            assert!(parts.iter().all(|p| !p.is_empty() && p.len() <= max.max(4)), "max {max}: {parts:?}");
        }
        assert_eq!(pieces("ab\ncd\nef", 7).collect::<Vec<_>>(), ["ab\ncd\n", "ef"]);
    }

    #[test]
    fn prompts_have_the_length_asked_and_come_from_the_pool() {
        let mut p = Prompts::Random { pool: Pool::Ids(vec![5, 9, 11]), rng: SplitMix64::new(1) };
        let a = p.next(64);
        assert_eq!(a.len(), 64);
        assert!(a.iter().all(|id| [5, 9, 11].contains(id)));
        assert_ne!(a, p.next(64), "each prompt is new");
        let mut p = Prompts::Random { pool: Pool::Range(100), rng: SplitMix64::new(1) };
        assert!(p.next(1000).iter().all(|&id| id < 100));
        let mut p = Prompts::Text { tokens: vec![1, 2, 3, 4, 5], next: 3 };
        assert_eq!((p.next(4), p.next(2)), (vec![4, 5, 1, 2], vec![3, 4]));
    }
}
