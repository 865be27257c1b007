//! The projected service-account token, read without verifying its
//! signature: EKS Auth verifies it against the cluster's issuer. The agent
//! only needs the claims to reject obvious garbage early (the reference
//! agent's 400s), to key its cache, and to cross-check the caller.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use thiserror::Error;

/// Why a token was rejected before reaching EKS Auth (both are HTTP 400).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("Service account token cannot be parsed: {0}")]
    Unparseable(String),
    #[error("Service account token failed basic claim validations: {0}")]
    Claims(String),
}

/// The claims this agent reads (DESIGN §2.4); absent ones are `None`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: Option<String>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
    #[serde(rename = "kubernetes.io", default)]
    pub kubernetes: Option<KubernetesClaims>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct KubernetesClaims {
    pub namespace: Option<String>,
    pub pod: Option<ObjectRef>,
    pub serviceaccount: Option<ObjectRef>,
    pub node: Option<ObjectRef>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ObjectRef {
    pub name: Option<String>,
    pub uid: Option<String>,
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

/// Decodes the payload of a compact JWS (`header.payload.signature`).
pub fn parse(token: &str) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Unparseable(
            "token contains an invalid number of segments".into(),
        ));
    };
    decode_json::<serde_json::Value>(header, "header")?;
    decode_json(payload, "claims")
}

fn decode_json<T: for<'de> Deserialize<'de>>(segment: &str, what: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|e| TokenError::Unparseable(format!("could not base64 decode {what}: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TokenError::Unparseable(format!("could not JSON decode {what}: {e}")))
}

/// `exp` and `nbf` against `now` (what the reference validates before
/// calling EKS Auth; issuer, audience and signature are EKS Auth's job).
pub fn validate_times(claims: &Claims, now: SystemTime) -> Result<(), TokenError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if let Some(exp) = claims.exp
        && now >= exp
    {
        return Err(TokenError::Claims(
            "token has invalid claims: token is expired".into(),
        ));
    }
    if let Some(nbf) = claims.nbf
        && now < nbf
    {
        return Err(TokenError::Claims(
            "token has invalid claims: token is not valid yet".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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

    #[test]
    fn rejections_match_the_reference_wording() {
        let cases: [(&str, &str); 4] = [
            (
                "not-a-jwt",
                "Service account token cannot be parsed: token contains an invalid number of segments",
            ),
            (
                "a.b.c.d",
                "Service account token cannot be parsed: token contains an invalid number of segments",
            ),
            (
                "e30.!!!.c2ln",
                "Service account token cannot be parsed: could not base64 decode claims",
            ),
            (
                "e30.bm90IGpzb24.c2ln",
                "Service account token cannot be parsed: could not JSON decode claims",
            ),
        ];
        for (token, prefix) in cases {
            let err = parse(token).unwrap_err().to_string();
            assert!(err.starts_with(prefix), "{token}: {err}");
        }
    }

    #[test]
    fn time_claims_are_checked() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        let claims = Claims {
            exp: Some(2000),
            nbf: Some(1000),
            ..Claims::default()
        };
        assert!(validate_times(&claims, at(1500)).is_ok());
        assert!(
            validate_times(&claims, at(2000))
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
        assert!(
            validate_times(&claims, at(999))
                .unwrap_err()
                .to_string()
                .contains("not valid yet")
        );
        assert!(validate_times(&Claims::default(), at(5)).is_ok());
    }
}
