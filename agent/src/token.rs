//! The projected service-account token, read without verifying its
//! signature: EKS Auth verifies it against the cluster's issuer. The agent
//! only needs the claims to reject obvious garbage early (the reference
//! agent's 400s, with golang-jwt's texts), to key its cache, and to
//! cross-check the caller.

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// Why a token was rejected before reaching EKS Auth (both are HTTP 400).
/// The texts are the reference agent's, which are golang-jwt v5's.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("Service account token cannot be parsed: {0}")]
    Unparseable(String),
    #[error("Service account token failed basic claim validations: {0}")]
    Claims(String),
}

/// The claims this agent reads; absent ones are `None`. The registered
/// claims are typed as golang-jwt types them (a token the reference could
/// not decode is refused here too); the `kubernetes.io` claims are read
/// leniently, as the reference does not read them at all.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Claims {
    pub sub: Option<String>,
    pub iss: Option<String>,
    pub jti: Option<String>,
    #[serde(default)]
    pub aud: Option<Audience>,
    pub exp: Option<f64>,
    pub nbf: Option<f64>,
    pub iat: Option<f64>,
    #[serde(rename = "kubernetes.io", default, deserialize_with = "lenient")]
    pub kubernetes: Option<KubernetesClaims>,
}

/// `aud`: one string or several.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct KubernetesClaims {
    #[serde(default, deserialize_with = "lenient")]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub pod: Option<ObjectRef>,
    #[serde(default, deserialize_with = "lenient")]
    pub serviceaccount: Option<ObjectRef>,
    #[serde(default, deserialize_with = "lenient")]
    pub node: Option<ObjectRef>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ObjectRef {
    #[serde(default, deserialize_with = "lenient")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub uid: Option<String>,
}

/// A value of the wrong shape is absent, not an error.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: for<'a> Deserialize<'a>,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).ok())
}

impl Claims {
    pub fn pod_uid(&self) -> Option<&str> {
        self.kubernetes.as_ref()?.pod.as_ref()?.uid.as_deref()
    }

    pub fn pod_name(&self) -> Option<&str> {
        self.kubernetes.as_ref()?.pod.as_ref()?.name.as_deref()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.kubernetes.as_ref()?.namespace.as_deref()
    }

    pub fn service_account(&self) -> Option<&str> {
        self.kubernetes
            .as_ref()?
            .serviceaccount
            .as_ref()?
            .name
            .as_deref()
    }

    pub fn node_name(&self) -> Option<&str> {
        self.kubernetes.as_ref()?.node.as_ref()?.name.as_deref()
    }
}

/// The signing methods golang-jwt v5 knows (`alg`), `none` included.
const KNOWN_ALGORITHMS: [&str; 14] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256",
    "PS384", "PS512", "EdDSA", "none",
];

/// golang-jwt's prefixes.
const MALFORMED: &str = "token is malformed";
const UNVERIFIABLE: &str = "token is unverifiable";

/// Decodes a compact JWS (`header.payload.signature`) without verifying
/// it, as golang-jwt's `ParseUnverified` does, with its error texts.
pub fn parse(token: &str) -> Result<Claims, TokenError> {
    let malformed = |what: String| TokenError::Unparseable(format!("{MALFORMED}: {what}"));
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed(
            "token contains an invalid number of segments".into(),
        ));
    };
    let header = decode_segment(header)
        .map_err(|e| malformed(format!("could not base64 decode header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| malformed(format!("could not JSON decode header: {e}")))?;
    let claims = decode_segment(payload)
        .map_err(|e| malformed(format!("could not base64 decode claim: {e}")))?;
    let claims: Claims = serde_json::from_slice(&claims)
        .map_err(|e| malformed(format!("could not JSON decode claim: {e}")))?;
    match header.get("alg").and_then(serde_json::Value::as_str) {
        Some(alg) if KNOWN_ALGORITHMS.contains(&alg) => Ok(claims),
        Some(_) => Err(TokenError::Unparseable(format!(
            "{UNVERIFIABLE}: signing method (alg) is unavailable"
        ))),
        None => Err(TokenError::Unparseable(format!(
            "{UNVERIFIABLE}: signing method (alg) is unspecified"
        ))),
    }
}

/// base64url without padding, as Go's `RawURLEncoding` (trailing bits
/// allowed), with Go's error text.
fn decode_segment(segment: &str) -> Result<Vec<u8>, String> {
    use base64::{
        alphabet,
        engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
    };
    const RAW_URL: GeneralPurpose = GeneralPurpose::new(
        &alphabet::URL_SAFE,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::RequireNone),
    );
    RAW_URL.decode(segment).map_err(|e| {
        let at = match e {
            base64::DecodeError::InvalidByte(at, _)
            | base64::DecodeError::InvalidLastSymbol(at, _) => at,
            base64::DecodeError::InvalidLength(len) => len.saturating_sub(1),
            base64::DecodeError::InvalidPadding => segment.find('=').unwrap_or(segment.len()),
        };
        format!("illegal base64 data at input byte {at}")
    })
}

/// SHA-256 of a raw token: what the cache keys entries by and compares
/// presented tokens with, so the token itself is never a key.
pub type Digest = [u8; 32];

pub fn digest(token: &str) -> Digest {
    Sha256::digest(token.as_bytes()).into()
}

/// A token read once: its exact text, claims and digest.
pub struct Parsed {
    pub raw: Box<str>,
    pub claims: Claims,
    pub digest: Digest,
}

/// Never the token itself (a bearer credential).
impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed")
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

/// One parsed token, kept for the next time the same bytes come.
#[derive(Default)]
struct Slot(Mutex<Option<Arc<Parsed>>>);

impl Slot {
    /// `token` parsed: the one held if it is the same bytes, else what
    /// `parse` makes of it (then held, if it parsed). A poisoned slot is
    /// only a cache: it is skipped, not trusted or fatal.
    fn get_or_parse(
        &self,
        token: &str,
        parse: impl FnOnce() -> Result<Arc<Parsed>, TokenError>,
    ) -> Result<Arc<Parsed>, TokenError> {
        if let Ok(held) = self.0.lock()
            && let Some(parsed) = held.as_ref().filter(|p| *p.raw == *token)
        {
            return Ok(parsed.clone());
        }
        let parsed = parse()?;
        if let Ok(mut held) = self.0.lock() {
            *held = Some(parsed.clone());
        }
        Ok(parsed)
    }
}

/// The last token a connection presented, parsed. A keep-alive client
/// (every SDK) sends the same token on every request, so its claims and
/// digest are worked out once per connection, not once per request. Only
/// the exact same bytes match, a token that did not parse is never kept,
/// and the caller still checks `exp`/`nbf` on every request. Per
/// connection, so nothing is shared between clients. In front of
/// [`Recent`]: no keyed hash over the token and no shared lock per
/// request, and a displaced slot there costs this connection nothing.
#[derive(Default)]
pub struct Memo(Slot);

impl Memo {
    /// `token` parsed: from the memo if it is the last one seen, else from
    /// `recent`.
    pub fn parse(&self, token: &str, recent: &Recent) -> Result<Arc<Parsed>, TokenError> {
        self.0.get_or_parse(token, || recent.parse(token))
    }
}

/// Tokens parsed lately, node-wide: a client that opens a connection per
/// request sends the same token on each. A fixed table (bounded memory),
/// one token per slot, the slot chosen by a keyed hash of the token's tail
/// (a client cannot aim at another's slot, only displace at random), and a
/// hit only on the exact same bytes. Only tokens that parsed are kept.
pub struct Recent {
    slots: Box<[Slot]>,
    hasher: std::hash::RandomState,
}

/// How much of a token picks its [`Recent`] slot: its last bytes, which
/// are its signature (342 characters for RS256 with a 2048-bit key, 86 for
/// ES256; different for every token the cluster issues). Hashing the whole
/// token (~1 KB) was most of the cost of a hit, once per new connection.
/// Tokens that share a tail share a slot and displace each other; one is
/// never taken for another. The tail, not the head: a client that keeps a
/// slot by repeating a tail compares its token with the one held there, so
/// the bytes that choose the slot are the bytes that comparison can never
/// probe (those 64 alone are 384 bits of the signature). Not shorter.
const KEYED_TAIL: usize = 64;

impl Recent {
    pub fn new(slots: usize) -> Recent {
        Recent {
            slots: (0..slots.max(1)).map(|_| Slot::default()).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// `token` parsed: from its slot if it is the token there, else parsed
    /// now.
    pub fn parse(&self, token: &str) -> Result<Arc<Parsed>, TokenError> {
        use std::hash::BuildHasher as _;
        let tail = &token.as_bytes()[token.len().saturating_sub(KEYED_TAIL)..];
        let index = self.hasher.hash_one(tail) as usize % self.slots.len();
        self.slots[index].get_or_parse(token, || {
            Ok(Arc::new(Parsed {
                claims: parse(token)?,
                digest: digest(token),
                raw: token.into(),
            }))
        })
    }
}

/// `exp` and `nbf` against `now`, as golang-jwt's validator (what the
/// reference checks before calling EKS Auth; issuer, audience and signature
/// are EKS Auth's job).
pub fn validate_times(claims: &Claims, now: SystemTime) -> Result<(), TokenError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut failed = Vec::new();
    if claims.exp.is_some_and(|exp| now >= exp) {
        failed.push("token is expired");
    }
    if claims.nbf.is_some_and(|nbf| now < nbf) {
        failed.push("token is not valid yet");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(TokenError::Claims(failed.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    #[test]
    fn a_connections_memo_answers_only_the_exact_token_it_parsed() {
        let memo = Memo::default();
        let recent = Recent::new(1);
        let (a, b) = (jwt(r#"{"sub":"a"}"#), jwt(r#"{"sub":"b"}"#));
        let first = memo.parse(&a, &recent).unwrap();
        assert!(
            Arc::ptr_eq(&first, &memo.parse(&a, &recent).unwrap()),
            "parsed twice"
        );
        let other = memo.parse(&b, &recent).unwrap();
        assert_eq!(other.claims.sub.as_deref(), Some("b"));
        assert_eq!(other.digest, digest(&b));
        assert!(memo.parse("garbage", &recent).is_err());
        // Failures are not remembered; the last good token still is.
        assert!(Arc::ptr_eq(&other, &memo.parse(&b, &recent).unwrap()));
        // A token one byte longer is another token (and another digest).
        let longer = memo.parse(&format!("{b}x"), &recent).unwrap();
        assert!(!Arc::ptr_eq(&other, &longer));
        assert_ne!(longer.digest, other.digest);
        assert!(!Arc::ptr_eq(&first, &memo.parse(&a, &recent).unwrap()));
    }

    #[test]
    fn recent_tokens_are_shared_across_connections_and_only_for_the_same_bytes() {
        let recent = Recent::new(8);
        let (a, b) = (jwt(r#"{"sub":"a"}"#), jwt(r#"{"sub":"b"}"#));
        let (one, two) = (Memo::default(), Memo::default());
        let first = one.parse(&a, &recent).unwrap();
        assert!(
            Arc::ptr_eq(&first, &two.parse(&a, &recent).unwrap()),
            "parsed again"
        );
        let other = two.parse(&b, &recent).unwrap();
        assert_eq!(other.claims.sub.as_deref(), Some("b"));
        assert!(recent.parse("a.b").is_err());
        // One slot: each new token displaces the last.
        let tiny = Recent::new(1);
        let first = tiny.parse(&a).unwrap();
        tiny.parse(&b).unwrap();
        assert!(!Arc::ptr_eq(&first, &tiny.parse(&a).unwrap()));
    }

    #[test]
    fn tokens_that_share_a_tail_share_a_slot_and_are_never_confused() {
        let tail = "s".repeat(2 * KEYED_TAIL);
        let signed = |sub: &str| {
            let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
            let claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"{sub}"}}"#));
            format!("{header}.{claims}.{tail}")
        };
        let (a, b) = (signed("a"), signed("b"));
        let recent = Recent::new(64);
        for _ in 0..3 {
            assert_eq!(recent.parse(&a).unwrap().claims.sub.as_deref(), Some("a"));
            assert_eq!(recent.parse(&b).unwrap().claims.sub.as_deref(), Some("b"));
        }
        // Same slot: each displaced the other.
        let b_held = recent.parse(&b).unwrap();
        assert!(Arc::ptr_eq(&b_held, &recent.parse(&b).unwrap()));
        recent.parse(&a).unwrap();
        assert!(!Arc::ptr_eq(&b_held, &recent.parse(&b).unwrap()));
    }

    fn jwt(payload: &str) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"k"}"#);
        format!("{header}.{}.c2ln", URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn reads_the_projected_token_claims() {
        let token = jwt(
            r#"{"aud":["pods.eks.amazonaws.com"],"exp":2000,"nbf":1000,"sub":"system:serviceaccount:default:my-sa",
            "kubernetes.io":{"namespace":"default","pod":{"name":"my-pod","uid":"0cc175b9-c0f1-b6a8-31c3-99e269772661"},
            "serviceaccount":{"name":"my-sa","uid":"x"},"node":{"name":"ip-10-0-1-23","uid":"y"}}}"#,
        );
        let claims = parse(&token).unwrap();
        assert_eq!(
            claims.pod_uid(),
            Some("0cc175b9-c0f1-b6a8-31c3-99e269772661")
        );
        assert_eq!(claims.namespace(), Some("default"));
        assert_eq!(claims.service_account(), Some("my-sa"));
        assert_eq!(claims.node_name(), Some("ip-10-0-1-23"));
        assert_eq!(claims.pod_name(), Some("my-pod"));
    }

    /// golang-jwt v5.2.2's texts, as the reference answers them.
    #[test]
    fn rejections_match_the_reference_wording() {
        let alg = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#);
        let cases: Vec<(String, &str)> = vec![
            (
                "not-a-jwt".into(),
                "Service account token cannot be parsed: token is malformed: token contains an invalid number of segments",
            ),
            (
                "a.b.c.d".into(),
                "Service account token cannot be parsed: token is malformed: token contains an invalid number of segments",
            ),
            (
                "!!.e30.c2ln".into(),
                "Service account token cannot be parsed: token is malformed: could not base64 decode header: illegal base64 data at input byte 0",
            ),
            (
                "bm90IGpzb24.e30.c2ln".into(),
                "Service account token cannot be parsed: token is malformed: could not JSON decode header: ",
            ),
            (
                format!("{alg}.e30!.c2ln"),
                "Service account token cannot be parsed: token is malformed: could not base64 decode claim: illegal base64 data at input byte 3",
            ),
            (
                format!("{alg}.e30=.c2ln"),
                "Service account token cannot be parsed: token is malformed: could not base64 decode claim: illegal base64 data at input byte 3",
            ),
            (
                format!("{alg}.bm90IGpzb24.c2ln"),
                "Service account token cannot be parsed: token is malformed: could not JSON decode claim: ",
            ),
            (
                format!(
                    "{alg}.{}.c2ln",
                    URL_SAFE_NO_PAD.encode(br#"{"exp":"soon"}"#)
                ),
                "Service account token cannot be parsed: token is malformed: could not JSON decode claim: ",
            ),
            (
                "e30.e30.c2ln".into(),
                "Service account token cannot be parsed: token is unverifiable: signing method (alg) is unspecified",
            ),
            (
                format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode(br#"{"alg":"XX1"}"#)),
                "Service account token cannot be parsed: token is unverifiable: signing method (alg) is unavailable",
            ),
        ];
        for (token, prefix) in cases {
            let err = parse(&token).unwrap_err().to_string();
            assert!(err.starts_with(prefix), "{token}: {err}");
        }
        // What the reference accepts, this accepts: `alg: none`, claims of
        // the wrong shape where the reference reads none.
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let odd =
            URL_SAFE_NO_PAD.encode(br#"{"kubernetes.io":{"namespace":5,"pod":"x"},"aud":"a"}"#);
        assert!(parse(&format!("{none}.{odd}.")).is_ok());
    }

    #[test]
    fn time_claims_are_checked() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        let claims = Claims {
            exp: Some(2000.0),
            nbf: Some(1000.0),
            ..Claims::default()
        };
        assert!(validate_times(&claims, at(1500)).is_ok());
        assert_eq!(
            validate_times(&claims, at(2000)).unwrap_err().to_string(),
            "Service account token failed basic claim validations: token is expired"
        );
        assert_eq!(
            validate_times(&claims, at(999)).unwrap_err().to_string(),
            "Service account token failed basic claim validations: token is not valid yet"
        );
        let both = Claims {
            exp: Some(10.0),
            nbf: Some(20.0),
            ..Claims::default()
        };
        assert_eq!(
            validate_times(&both, at(15)).unwrap_err().to_string(),
            "Service account token failed basic claim validations: token is expired, token is not valid yet"
        );
        assert!(validate_times(&Claims::default(), at(5)).is_ok());
    }
}
