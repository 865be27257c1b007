//! A test cluster's service-account issuer: an RSA key generated at start
//! (aws-lc-rs) and projected-token-shaped JWTs (docs/architecture.md §6.3) signed RS256.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use aws_lc_rs::{
    encoding::AsDer as _,
    rsa::{KeyPair, KeySize},
    signature::KeyPair as _,
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::Serialize;

pub const AUDIENCE: &str = "pods.eks.amazonaws.com";
pub const ISSUER: &str = "https://oidc.eks.us-west-2.amazonaws.com/id/TESTCLUSTER";

pub struct Issuer {
    kid: String,
    encoding: EncodingKey,
    /// PKCS#1 DER of the public key: what the fake EKS Auth verifies with.
    public_der: Vec<u8>,
}

impl Issuer {
    pub fn generate() -> Result<Issuer> {
        let pair = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
        let pkcs8 = pair
            .as_der()
            .map_err(|_| anyhow::anyhow!("RSA key export failed"))?;
        let encoding = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes())
            .context("loading the generated key")?;
        Ok(Issuer {
            kid: format!("test-{}", crate::names::unique_id()),
            encoding,
            public_der: pair.public_key().as_ref().to_vec(),
        })
    }

    pub fn decoding_key(&self) -> DecodingKey {
        DecodingKey::from_rsa_der(&self.public_der)
    }

    /// A signed token for `spec`.
    pub fn mint(&self, spec: &TokenSpec) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
        let iat = now + spec.issued_offset_secs;
        let claims = ProjectedClaims {
            aud: spec.audience.clone(),
            exp: iat + spec.lifetime.as_secs() as i64,
            iat,
            nbf: iat,
            iss: ISSUER.to_owned(),
            sub: spec.subject_override.clone().unwrap_or_else(|| {
                format!(
                    "system:serviceaccount:{}:{}",
                    spec.namespace, spec.service_account
                )
            }),
            jti: format!("jti-{}-{}", crate::names::unique_id(), now),
            kubernetes: KubeClaims {
                namespace: spec.namespace.clone(),
                pod: spec.pod_uid.as_ref().map(|uid| ObjectRef {
                    name: spec.pod_name.clone(),
                    uid: uid.clone(),
                }),
                serviceaccount: ObjectRef {
                    name: spec.service_account.clone(),
                    uid: "5e8b9b6a-0000-4000-8000-000000000001".to_owned(),
                },
                node: spec.node_name.as_ref().map(|name| ObjectRef {
                    name: name.clone(),
                    uid: "6e8b9b6a-0000-4000-8000-000000000002".to_owned(),
                }),
            },
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).context("signing the token")
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// What to put in a token.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    /// `None`: a token not bound to a pod.
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
    pub audience: Vec<String>,
    pub lifetime: Duration,
    /// Shifts iat/nbf/exp (negative: issued in the past).
    pub issued_offset_secs: i64,
    pub subject_override: Option<String>,
}

impl TokenSpec {
    pub fn new(namespace: &str, service_account: &str) -> TokenSpec {
        TokenSpec {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod_name: format!("{service_account}-pod"),
            pod_uid: None,
            node_name: None,
            audience: vec![AUDIENCE.to_owned()],
            lifetime: Duration::from_secs(86_400),
            issued_offset_secs: 0,
            subject_override: None,
        }
    }

    pub fn pod(mut self, name: &str, uid: &str) -> TokenSpec {
        self.pod_name = name.to_owned();
        self.pod_uid = Some(uid.to_owned());
        self
    }

    pub fn node(mut self, node: &str) -> TokenSpec {
        self.node_name = Some(node.to_owned());
        self
    }

    /// Already expired: issued two days ago for a day.
    pub fn expired(mut self) -> TokenSpec {
        self.issued_offset_secs = -2 * 86_400;
        self
    }
}

#[derive(Serialize)]
struct ProjectedClaims {
    aud: Vec<String>,
    exp: i64,
    iat: i64,
    nbf: i64,
    iss: String,
    sub: String,
    jti: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubeClaims,
}

#[derive(Serialize)]
struct KubeClaims {
    namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<ObjectRef>,
    serviceaccount: ObjectRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<ObjectRef>,
}

#[derive(Serialize)]
struct ObjectRef {
    name: String,
    uid: String,
}
