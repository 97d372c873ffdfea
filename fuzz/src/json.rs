//! JSON documents mutated as trees: a random node is replaced, removed, duplicated or nested, or a
//! field the target knows by name is set to a value that breaks range checks. What byte mutations
//! rarely reach (a well-formed document with one field wrong) is what these produce.

use serde_json::{json, Map, Value};

use crate::{Rng, INTERESTING};

/// Documents grow by at most this much (a change that makes one larger is undone).
const MAX_BYTES: usize = 1 << 20;

/// `doc` with 1 to 3 random changes; `fields` are names worth setting (the target's own fields).
pub fn mutate(doc: &Value, rng: &mut Rng, fields: &[&str]) -> Value {
    let mut doc = doc.clone();
    for _ in 0..1 + rng.below(3) {
        let before = doc.clone();
        mutate_once(&mut doc, rng, fields);
        if serde_json::to_vec(&doc).map_or(true, |text| text.len() > MAX_BYTES) {
            doc = before;
        }
    }
    doc
}

/// A value of a random JSON type, chosen to break checks: huge and negative numbers, fractions,
/// empty, long and odd strings, empty, long and nested arrays and objects.
pub fn interesting(rng: &mut Rng, fields: &[&str], depth: usize) -> Value {
    match rng.below(if depth > 3 { 6 } else { 9 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => json!(INTERESTING[rng.below(INTERESTING.len())]),
        3 => json!(-(INTERESTING[rng.below(INTERESTING.len())] as i64).max(i64::MIN + 1)),
        4 => json!([0.0, 0.5, -0.5, 1.5, 1e-300, 1e300, -1e300, 2.5e9, 1.0000001][rng.below(9)]),
        5 => Value::String(match rng.below(6) {
            0 => String::new(),
            1 => "\u{0}".into(),
            2 => "x".repeat(1 << (4 + rng.below(13))),
            3 => "\u{1F600}\u{FFFD}\u{202E}".into(),
            4 => fields.get(rng.below(fields.len().max(1))).map_or_else(|| "a".to_string(), |f| f.to_string()),
            _ => "{{ raise_exception('x') }}{% for x in range(99999999) %}".into(),
        }),
        6 => Value::Array((0..rng.below(4)).map(|_| interesting(rng, fields, depth + 1)).collect()),
        7 => {
            let mut o = Map::new();
            for _ in 0..rng.below(4) {
                let key = fields.get(rng.below(fields.len().max(1))).map_or_else(|| "k".to_string(), |f| f.to_string());
                o.insert(key, interesting(rng, fields, depth + 1));
            }
            Value::Object(o)
        }
        _ => match rng.below(3) {
            0 => Value::Array(vec![json!(1); 1 << (4 + rng.below(12))]),
            1 => (0..64 + rng.below(200)).fold(Value::Null, |inner, _| json!([inner])),
            _ => json!(rng.next_u64() % 100_000),
        },
    }
}

/// The number of nodes of `v` (itself included).
fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(items) => items.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// The `n`-th node of `v` in pre-order (`None` past the last).
fn nth<'a>(v: &'a mut Value, n: &mut usize) -> Option<&'a mut Value> {
    if *n == 0 {
        return Some(v);
    }
    *n -= 1;
    match v {
        Value::Array(items) => items.iter_mut().find_map(|c| nth(c, n)),
        Value::Object(o) => o.values_mut().find_map(|c| nth(c, n)),
        _ => None,
    }
}

fn mutate_once(doc: &mut Value, rng: &mut Rng, fields: &[&str]) {
    let mut target = rng.below(count(doc));
    let node = nth(doc, &mut target).expect("the target is below the node count");
    match rng.below(8) {
        0 | 1 => *node = interesting(rng, fields, 0),
        2 => match node {
            Value::Object(o) if !o.is_empty() => {
                let key = o.keys().nth(rng.below(o.len())).expect("in range").clone();
                o.remove(&key);
            }
            Value::Array(items) if !items.is_empty() => {
                items.remove(rng.below(items.len()));
            }
            other => *other = Value::Null,
        },
        3 | 4 => {
            if let Value::Object(o) = node {
                let key = match fields.get(rng.below(fields.len() + 1)) {
                    Some(f) => f.to_string(),
                    None => format!("unknown_{}", rng.below(100)),
                };
                o.insert(key, interesting(rng, fields, 0));
            } else {
                *node = interesting(rng, fields, 0);
            }
        }
        5 => match node {
            Value::Array(items) if !items.is_empty() => {
                let item = items[rng.below(items.len())].clone();
                let most = if rng.below(8) == 0 { 2000 } else { 4 };
                let times = 1 + rng.below(most);
                items.extend(std::iter::repeat_n(item, times));
            }
            other => *other = json!([other.clone()]),
        },
        6 => {
            // A number nudged to its neighbours and limits.
            if let Some(x) = node.as_f64() {
                *node = match rng.below(5) {
                    0 => json!(x + 1.0),
                    1 => json!(x - 1.0),
                    2 => json!(-x),
                    3 => json!(x * 1e9),
                    _ => json!(0),
                };
            } else {
                *node = interesting(rng, fields, 0);
            }
        }
        _ => {
            let inner = node.clone();
            *node = match rng.below(3) {
                0 => json!([inner]),
                1 => json!({ "content": inner }),
                _ => Value::String(inner.to_string()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_change_documents_and_stay_json() {
        let doc = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8});
        let mut rng = Rng::new(1);
        let mut changed = 0;
        for _ in 0..2000 {
            let m = mutate(&doc, &mut rng, &["max_tokens", "temperature"]);
            let text = serde_json::to_string(&m).unwrap();
            changed += usize::from(m != doc);
            assert!(text.len() < 1 << 22);
        }
        assert!(changed > 1800, "{changed}");
    }
}
