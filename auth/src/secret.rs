//! [`Secret`] (one token or key, checked once, never shown), [`ApiKeys`] (several), the
//! constant-time comparison and the parsing of an `Authorization: Bearer` value.

use std::fmt;
use std::path::{Path, PathBuf};

/// What `Debug` and `Display` print instead of a secret.
const REDACTED: &str = "[redacted]";

/// Why a token or key was refused where it was given. `origin` says where it came from (a flag, a
/// file, a line of a file); no variant holds the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{origin} is empty")]
    Empty { origin: String },
    /// A byte that an HTTP header cannot carry, or whitespace inside the secret.
    #[error(
        "{origin}: character {position} is not printable ASCII (a token travels in an HTTP header: \
         letters, digits and punctuation, no spaces)"
    )]
    NotPrintable { origin: String, position: usize },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// A file of API keys with no key in it (only blank lines and comments).
    #[error("{} holds no key (one per line; blank lines and lines starting with # are skipped)", path.display())]
    NoKey { path: PathBuf },
}

/// A bearer token or an API key: 1 or more printable ASCII characters (`!` to `~`), so that it
/// fits an HTTP header as it is. Surrounding whitespace is trimmed where it is made (a file's
/// final newline, a value pasted with a space). `Debug` and `Display` print `[redacted]`; only
/// [`Secret::expose`] gives the characters, to the one place that sends them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// `value`, trimmed and checked; `origin` names where it was given, for the error (`--token`,
    /// `AWQ_TOKEN`).
    pub fn new(value: &str, origin: &str) -> Result<Secret, SecretError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(SecretError::Empty { origin: origin.to_string() });
        }
        if let Some(position) = value.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(SecretError::NotPrintable { origin: origin.to_string(), position: position + 1 });
        }
        Ok(Secret(value.to_string()))
    }

    /// The trimmed content of the file at `path` (how Kubernetes mounts a Secret). An empty file is
    /// refused, naming it: a token that is silently empty would leave an API open.
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read { path: path.into(), source })?;
        Secret::new(&text, &format!("token file {}", path.display()))
    }

    /// The secret's characters: only for the header that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this secret, in a time that depends on this secret's length only, not on
    /// where `given` differs (see [`constant_time_eq`]).
    pub fn matches(&self, given: &[u8]) -> bool {
        constant_time_eq(given, self.0.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Equality of `given` and `secret` whose time depends only on `secret`'s length: every byte of
/// the secret is compared whatever was given, with no early exit at the first difference (which
/// would let a client find the secret byte by byte by timing its refusals). `given`'s own length
/// is the caller's to know.
pub fn constant_time_eq(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != secret.len());
    for (i, s) in secret.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        // black_box: the optimiser may not turn the fold into a search for the first difference.
        diff = std::hint::black_box(diff | (g ^ s));
    }
    diff == 0
}

/// The credentials of an `Authorization` value `Bearer CREDENTIALS` (the scheme in any case, as
/// RFC 7235 has it; spaces around the credentials ignored), or `None` for another scheme.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    Some(value[SCHEME.len()..].trim_ascii())
}

/// The HTTP API's keys: a request is let in when it carries any of them. Empty: no key is needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiKeys(Vec<Secret>);

impl ApiKeys {
    /// No key: the API is open.
    pub fn none() -> ApiKeys {
        ApiKeys(Vec::new())
    }

    /// The keys of a file: one per line, trimmed; blank lines and lines starting with `#` are
    /// skipped. A file without any key is refused (it would leave the API open), as is a line that
    /// is not a key (its line number named).
    pub fn from_file(path: &Path) -> Result<ApiKeys, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read { path: path.into(), source })?;
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(Secret::new(line, &format!("{} line {}", path.display(), i + 1))?);
        }
        if keys.is_empty() {
            return Err(SecretError::NoKey { path: path.into() });
        }
        Ok(ApiKeys::from_iter(keys))
    }

    /// These keys and `more` (a key given twice counts once).
    pub fn with(mut self, more: impl IntoIterator<Item = Secret>) -> ApiKeys {
        for key in more {
            if !self.0.contains(&key) {
                self.0.push(key);
            }
        }
        self
    }

    /// Whether no key is needed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `given` is one of the keys: each key is compared in constant time, and all of them
    /// are, so the time says neither which key nor how much of one matched.
    pub fn accepts(&self, given: &[u8]) -> bool {
        self.0.iter().fold(false, |found, key| found | key.matches(given))
    }
}

impl FromIterator<Secret> for ApiKeys {
    fn from_iter<I: IntoIterator<Item = Secret>>(keys: I) -> ApiKeys {
        ApiKeys::none().with(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn token_files_are_trimmed_and_an_empty_one_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let token = Secret::from_file(&file(&dir, "token", "  s3cr3t-T0ken_/+=\n\n")).unwrap();
        assert_eq!(token.expose(), "s3cr3t-T0ken_/+=");
        for (name, content) in [("empty", ""), ("blank", " \n\t\n")] {
            let path = file(&dir, name, content);
            let err = Secret::from_file(&path).unwrap_err();
            assert!(matches!(err, SecretError::Empty { .. }), "{err:?}");
            assert_eq!(err.to_string(), format!("token file {} is empty", path.display()));
        }
        let missing = dir.path().join("missing");
        let err = Secret::from_file(&missing).unwrap_err();
        assert!(matches!(err, SecretError::Read { .. }) && err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn a_secret_is_printable_ascii_and_never_shown() {
        let err = Secret::new("two words", "--token").unwrap_err();
        assert!(matches!(err, SecretError::NotPrintable { position: 4, .. }), "{err:?}");
        assert!(err.to_string().starts_with("--token: character 4"), "{err}");
        assert!(!err.to_string().contains("words"), "the error shows the secret: {err}");
        assert!(matches!(Secret::new("tökén", "--token"), Err(SecretError::NotPrintable { position: 2, .. })));
        assert!(matches!(Secret::new("  ", "AWQ_TOKEN"), Err(SecretError::Empty { .. })));
        let s = Secret::new(" hunter2 ", "--token").unwrap();
        assert_eq!(
            (format!("{s}"), format!("{s:?}"), format!("{:?}", Some(&s))),
            ("[redacted]".to_string(), "[redacted]".to_string(), "Some([redacted])".to_string())
        );
        assert!(s.matches(b"hunter2"));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        let cases: &[(&[u8], &[u8], bool)] = &[
            (b"abc", b"abc", true),
            (b"abd", b"abc", false),
            (b"xbc", b"abc", false),
            (b"ab", b"abc", false),
            (b"abcd", b"abc", false),
            (b"", b"abc", false),
            (b"abc\0", b"abc", false),
            (b"ab\0", b"ab\0", true),
            (b"", b"", true),
        ];
        for &(given, secret, want) in cases {
            assert_eq!(constant_time_eq(given, secret), want, "{given:?} vs {secret:?}");
        }
        // Every single-bit change of every byte is a difference.
        let secret = b"0123456789abcdefghij";
        for i in 0..secret.len() {
            for bit in 0..8 {
                let mut given = *secret;
                given[i] ^= 1 << bit;
                assert!(!constant_time_eq(&given, secret), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer "), Some(&b""[..]));
        assert_eq!(bearer(b"Basic YWxhZGRpbjpvcGVuc2VzYW1l"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b"abc"), None);
    }

    #[test]
    fn api_key_files_skip_comments_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(&dir, "keys", "# team a\nkey-a\n\n  key-b  \n#key-c\nkey-a\n");
        let keys = ApiKeys::from_file(&path).unwrap();
        assert_eq!(keys.len(), 2, "a key given twice counts once: {keys:?}");
        assert!(keys.accepts(b"key-a") && keys.accepts(b"key-b"));
        assert!(!keys.accepts(b"#key-c") && !keys.accepts(b"key-c") && !keys.accepts(b"") && !keys.accepts(b"key"));
        let keys = keys.with([Secret::new("key-d", "--api-key").unwrap(), Secret::new("key-b", "--api-key").unwrap()]);
        assert_eq!(keys.len(), 3);
        assert!(keys.accepts(b"key-d"));
        assert!(!format!("{keys:?}").contains("key-"), "{keys:?}");

        let only_comments = file(&dir, "comments", "# none yet\n\n");
        let err = ApiKeys::from_file(&only_comments).unwrap_err();
        assert!(matches!(err, SecretError::NoKey { .. }) && err.to_string().contains("comments"), "{err}");
        let bad = file(&dir, "bad", "good-key\nbad key\n");
        let err = ApiKeys::from_file(&bad).unwrap_err();
        assert!(err.to_string().starts_with(&format!("{} line 2: character 4", bad.display())), "{err}");
        assert!(ApiKeys::none().is_empty() && !ApiKeys::none().accepts(b""));
    }
}
