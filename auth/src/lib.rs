//! Who may call what (issue 20, "Security"): the bearer tokens of the gRPC APIs and the API keys of
//! the HTTP API, checked once at the edge, compared in constant time, never shown.
//!
//! - [`Secret`]: a token or a key, read once where the command line is parsed (a flag, its
//!   environment variable, or a file's trimmed content: Kubernetes mounts Secrets as files) and
//!   carried typed from there. Its `Debug` and `Display` print `[redacted]`; [`Secret::matches`]
//!   compares in constant time. [`ApiKeys`]: the HTTP API's keys, several (a file holds one per
//!   line).
//! - [`RequireToken`] (`grpc`): a tonic service wrapped so that each call must carry
//!   `authorization: Bearer TOKEN` with the token of one [`TokenKind`]: the admin token on the
//!   coordinator's job and deployment APIs, the worker token on its worker API and on the workers'
//!   own ports. A call without it, or with another, is refused with UNAUTHENTICATED and logged
//!   with the peer's address, the call and the kind of token, never the token.
//! - [`AttachToken`]: the client side, an interceptor that adds the header to every call of a
//!   client; [`Authed`]: a channel with it.
//! - [`TlsConfig`] (`tls`): the PEM files of `--tls-cert`, `--tls-key` and `--tls-ca`, checked once
//!   (each error names its file; the key must be the certificate's), as tonic's rustls server and
//!   client configurations; [`endpoint`] dials `https://` with TLS and `http://` without;
//!   [`explain`] says what to change when one side speaks TLS and the other does not.
//!
//! Without a token, every call passes, and without TLS files every link is plain TCP (the defaults,
//! meant for loopback). What this crate never
//! does: read an environment variable (the binary's flags do, through clap), or decide which API
//! needs which token (each server wraps its services itself).

mod grpc;
mod secret;
mod tls;

pub use grpc::{AttachToken, Authed, RequireToken, TokenKind};
pub use secret::{bearer, constant_time_eq, ApiKeys, Secret, SecretError};
pub use tls::{
    client_certificate_missing, endpoint, explain, peer_url, plaintext_to_tls, TlsConfig, TlsError, HANDSHAKE_TIMEOUT,
};
