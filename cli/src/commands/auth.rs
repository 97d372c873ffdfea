//! Tokens and API keys as flags (README, "Security"): each read once, where the command line is
//! parsed, into `awq_auth`'s types, and passed down as values (no library reads an environment
//! variable). A token comes from its flag, its environment variable or a file (trimmed: how
//! Kubernetes mounts a Secret); giving it twice is an error, and so is an empty one: a token that
//! is silently empty would leave an API open. TLS's PEM files are read and checked here too, into
//! `awq_auth::TlsConfig`; so are the `--coordinator` URLs, whose scheme says whether a link is TLS.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use awq_auth::{ApiKeys, Secret, TlsConfig};
use clap::Args;

/// The token given as `--NAME` (or `env`) or as `--NAME-file`; `None` when neither is.
fn token(value: Option<&str>, file: Option<&Path>, flag: &str, env: &str) -> Result<Option<Secret>> {
    match (value, file) {
        (Some(_), Some(_)) => bail!("--{flag} (or {env}) and --{flag}-file both give the {flag}: give one"),
        (Some(value), None) => Ok(Some(Secret::new(value, &format!("--{flag} (or {env})"))?)),
        (None, Some(file)) => Ok(Some(Secret::from_file(file).map_err(|e| anyhow::anyhow!("--{flag}-file: {e}"))?)),
        (None, None) => Ok(None),
    }
}

/// `--admin-token`: what the coordinator requires of every call of its job and deployment APIs.
#[derive(Args)]
pub struct AdminTokenArgs {
    /// Require `authorization: Bearer TOKEN` on every call of the job and deployment APIs (`awq
    /// submit`, `cancel`, `deploy`, `undeploy`, and the reads: `status`, `jobs`, `workers`,
    /// `deployments`, `watch`; clients send it with --token). Unset: open to whoever reaches
    /// --listen.
    #[arg(long, value_name = "TOKEN", env = "AWQ_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// --admin-token from a file (its content, trimmed; how Kubernetes mounts a Secret).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
}

impl AdminTokenArgs {
    pub fn secret(&self) -> Result<Option<Secret>> {
        token(self.admin_token.as_deref(), self.admin_token_file.as_deref(), "admin-token", "AWQ_ADMIN_TOKEN")
    }
}

/// `--worker-token`: required by the coordinator of every worker, and by every worker of the
/// coordinator's gateway and of the other workers.
#[derive(Args)]
pub struct WorkerTokenArgs {
    /// The token workers join with: the coordinator requires it on its worker API, each worker
    /// sends it there and to the other workers, and requires it on its own port (activations
    /// between stages, the replicas the coordinator's gateway calls). The same on the coordinator
    /// and every worker. Unset: none is sent or required.
    #[arg(long, value_name = "TOKEN", env = "AWQ_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// --worker-token from a file (its content, trimmed; how Kubernetes mounts a Secret).
    #[arg(long, value_name = "FILE")]
    worker_token_file: Option<PathBuf>,
}

impl WorkerTokenArgs {
    pub fn secret(&self) -> Result<Option<Secret>> {
        token(self.worker_token.as_deref(), self.worker_token_file.as_deref(), "worker-token", "AWQ_WORKER_TOKEN")
    }
}

/// `--token` of the client commands: the coordinator's admin token.
#[derive(Args, Clone)]
pub struct ClientTokenArgs {
    /// The coordinator's admin token (its --admin-token), sent as `authorization: Bearer TOKEN`.
    #[arg(long, value_name = "TOKEN", env = "AWQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// --token from a file (its content, trimmed).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl ClientTokenArgs {
    pub fn secret(&self) -> Result<Option<Secret>> {
        token(self.token.as_deref(), self.token_file.as_deref(), "token", "AWQ_TOKEN")
    }
}

/// `--api-key` and `--api-key-file`: the HTTP API's keys (`awq serve`, `awq coordinator
/// --http-listen`).
#[derive(Args)]
pub struct ApiKeyArgs {
    /// Require `Authorization: Bearer KEY` with this key on /v1/*, /tokenize and /detokenize.
    /// Several keys: repeat the flag, or separate them with commas (AWQ_API_KEY too); any of them
    /// is accepted.
    #[arg(long = "api-key", value_name = "KEY", env = "AWQ_API_KEY", hide_env_values = true, value_delimiter = ',')]
    api_keys: Vec<String>,
    /// More keys, one per line of FILE (blank lines and lines starting with # are skipped).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
}

impl ApiKeyArgs {
    pub fn keys(&self) -> Result<ApiKeys> {
        let from_file = match &self.api_key_file {
            Some(file) => ApiKeys::from_file(file).map_err(|e| anyhow::anyhow!("--api-key-file: {e}"))?,
            None => ApiKeys::none(),
        };
        let given = self.api_keys.iter().filter(|k| !k.trim().is_empty());
        let flags = given.map(|k| Secret::new(k, "--api-key (or AWQ_API_KEY)")).collect::<Result<Vec<_>, _>>()?;
        Ok(from_file.with(flags))
    }
}

/// `--tls-cert`, `--tls-key` and `--tls-ca` of the coordinator and the workers (README, "Security").
#[derive(Args)]
pub struct TlsArgs {
    /// Serve TLS with this certificate chain (PEM; with --tls-key): the gRPC port, and the HTTP API
    /// of --http-listen. A cluster is all-TLS or all-plain: with it on the coordinator, workers
    /// need one too (and connect to an `https://` coordinator URL).
    #[arg(long, value_name = "FILE", env = "AWQ_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", env = "AWQ_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) (PEM) that servers this process calls must be signed by: the
    /// coordinator (an `https://` URL) and the other workers. Without it: the system's roots.
    #[arg(long, value_name = "FILE", env = "AWQ_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: accept on the gRPC port only clients (workers, the coordinator's gateway,
    /// client commands) whose certificate the CA(s) in this PEM file signed; they present theirs
    /// with --tls-cert and --tls-key. Needs --tls-cert and --tls-key here.
    #[arg(long, value_name = "FILE", env = "AWQ_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files read and checked (`None`: no TLS file given).
    pub fn config(&self) -> Result<Option<TlsConfig>> {
        let config =
            TlsConfig::from_pem_files(self.tls_cert.as_deref(), self.tls_key.as_deref(), self.tls_ca.as_deref())?;
        Ok(match (config, self.tls_client_ca.as_deref()) {
            (Some(config), Some(client_ca)) => Some(config.require_client_certificates(client_ca)?),
            (None, Some(_)) => bail!("--tls-client-ca is given without --tls-cert and --tls-key: mutual TLS is TLS"),
            (config, None) => config,
        })
    }
}

/// HTTPS for `awq serve`'s HTTP API: its certificate and key (its embedded cluster stays on
/// loopback, plain).
#[derive(Args)]
pub struct HttpsArgs {
    /// Serve the HTTP API over HTTPS only, with this certificate chain (PEM; with --tls-key):
    /// clients call https:// and verify it (the API keys then travel encrypted).
    #[arg(long, value_name = "FILE", env = "AWQ_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", env = "AWQ_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

impl HttpsArgs {
    /// The files read and checked (`None`: plain HTTP).
    pub fn config(&self) -> Result<Option<TlsConfig>> {
        Ok(TlsConfig::from_pem_files(self.tls_cert.as_deref(), self.tls_key.as_deref(), None)?)
    }
}

/// The TLS flags of the client commands: what an `https://` coordinator's certificate is checked
/// against, and the client's own certificate for a coordinator that asks for one (mutual TLS).
#[derive(Args, Clone)]
pub struct ClientTlsArgs {
    /// The CA certificate(s) (PEM) that signed the coordinator's certificate, for an `https://`
    /// --coordinator URL (without it: the system's roots).
    #[arg(long, value_name = "FILE", env = "AWQ_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM; with --tls-key), for a coordinator started with
    /// --tls-client-ca (mutual TLS).
    #[arg(long, value_name = "FILE", env = "AWQ_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long, value_name = "FILE", env = "AWQ_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    pub fn config(&self) -> Result<Option<TlsConfig>> {
        Ok(TlsConfig::from_pem_files(self.tls_cert.as_deref(), self.tls_key.as_deref(), self.tls_ca.as_deref())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_comes_from_one_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-token");
        std::fs::write(&file, "from-the-file\n").unwrap();
        let t = |value: Option<&str>, file: Option<&Path>| token(value, file, "admin-token", "AWQ_ADMIN_TOKEN");
        assert_eq!(t(None, None).unwrap(), None);
        assert_eq!(t(Some(" given "), None).unwrap().unwrap().expose(), "given");
        assert_eq!(t(None, Some(&file)).unwrap().unwrap().expose(), "from-the-file");
        let both = t(Some("given"), Some(&file)).unwrap_err().to_string();
        assert!(both.contains("--admin-token (or AWQ_ADMIN_TOKEN) and --admin-token-file"), "{both}");
        let empty = t(Some(""), None).unwrap_err().to_string();
        assert_eq!(empty, "--admin-token (or AWQ_ADMIN_TOKEN) is empty");
        std::fs::write(&file, "\n").unwrap();
        let empty = t(None, Some(&file)).unwrap_err().to_string();
        assert_eq!(empty, format!("--admin-token-file: token file {} is empty", file.display()));
    }

    #[derive(clap::Parser)]
    struct Keys {
        #[command(flatten)]
        keys: ApiKeyArgs,
    }

    /// The keys of a command line of `--api-key`/`--api-key-file` flags, as seen by "key-N" probes.
    fn accepted(args: &[&str]) -> Result<Vec<&'static str>> {
        use clap::Parser;
        let keys = Keys::try_parse_from(std::iter::once("awq").chain(args.iter().copied()))?.keys.keys()?;
        Ok(["key-a", "key-b", "key-c", "key-d"].into_iter().filter(|k| keys.accepts(k.as_bytes())).collect())
    }

    #[test]
    fn api_keys_from_repeated_flags_commas_the_environment_and_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# ops\nkey-d\n").unwrap();
        let file_arg = file.to_string_lossy().into_owned();
        // The only test of this binary that reads AWQ_API_KEY.
        std::env::remove_var("AWQ_API_KEY");
        assert_eq!(accepted(&[]).unwrap(), Vec::<&str>::new());
        assert_eq!(accepted(&["--api-key", "key-a", "--api-key", "key-b,key-c"]).unwrap(), ["key-a", "key-b", "key-c"]);
        assert_eq!(accepted(&["--api-key", "key-a", "--api-key-file", &file_arg]).unwrap(), ["key-a", "key-d"]);
        std::env::set_var("AWQ_API_KEY", "key-b,key-c");
        let from_env = accepted(&[]);
        std::env::remove_var("AWQ_API_KEY");
        assert_eq!(from_env.unwrap(), ["key-b", "key-c"]);
        let err = accepted(&["--api-key", "key a"]).unwrap_err().to_string();
        assert!(err.starts_with("--api-key (or AWQ_API_KEY): character 4"), "{err}");
        std::fs::write(&file, "# nothing\n").unwrap();
        let err = accepted(&["--api-key-file", &file_arg]).unwrap_err().to_string();
        assert!(err.starts_with("--api-key-file: ") && err.contains("holds no key"), "{err}");
    }
}

/// One URL of a `--coordinator` list, checked where the command line is parsed: `http://` or
/// `https://` (which decides whether the link is TLS) and a host, so an empty entry (`a,,b`) or a
/// bare `host:port` is refused by clap naming the flag, not found later as a connection error.
pub fn coordinator_url(value: &str) -> std::result::Result<String, String> {
    let url = value.trim();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("`{value}`: expected http://HOST:PORT or https://HOST:PORT"))?;
    if rest.trim_end_matches('/').is_empty() {
        return Err(format!("`{value}`: no host"));
    }
    Ok(url.to_string())
}
