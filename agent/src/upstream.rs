//! The EKS Auth client: `AssumeRoleForPodIdentity` through `aws-sdk-eksauth`,
//! and its errors mapped to the reference agent's HTTP answers.
//!
//! Knows nothing of the HTTP server: it takes a token and returns
//! credentials or an [`UpstreamError`] carrying the status to answer with.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use aws_config::{BehaviorVersion, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_eksauth::{
    Client, error::ProvideErrorMetadata as _, error::SdkError, operation::RequestId as _,
    operation::assume_role_for_pod_identity::AssumeRoleForPodIdentityError,
};
use aws_smithy_http_client::{Builder as HttpClientBuilder, Connector, proxy::ProxyConfig, tls};
use aws_smithy_types::retry::ReconnectMode;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What EKS Auth returned for a token: the SDK's answer, encoded once, and
/// what the agent checks and audits.
#[derive(Clone, PartialEq, Eq)]
pub struct Assumed {
    /// The SDK's JSON (docs/architecture.md §6.1), encoded when EKS Auth
    /// answered: the only copy of the secrets the agent keeps, shared by
    /// every request the credentials serve.
    pub answer: Bytes,
    pub expiration: SystemTime,
    /// Shared with every audit event of the entry.
    pub association_id: Arc<str>,
    pub role_arn: Arc<str>,
    /// EKS Auth's subject, `namespace/service-account` (one allocation).
    pub subject: Box<str>,
}

/// Never the secrets.
impl std::fmt::Debug for Assumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assumed")
            .field("expiration", &self.expiration)
            .field("association_id", &self.association_id)
            .field("role_arn", &self.role_arn)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// The credentials as the SDKs read them (`AccessKeyId`, `SecretAccessKey`,
/// `Token`, `AccountId`, `Expiration`).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SdkAnswer<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    #[serde(rename = "Token")]
    pub session_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<&'a str>,
    #[serde(serialize_with = "rfc3339_seconds")]
    pub expiration: SystemTime,
}

impl SdkAnswer<'_> {
    /// The JSON; empty only if encoding failed, which strings and a time
    /// cannot (the handler refuses an empty answer all the same).
    pub fn encode(&self) -> Bytes {
        // Exactly its length: an entry keeps it for hours, and the
        // encoder's doubling would leave up to half of it unused.
        serde_json::to_vec(self)
            .map(|json| Bytes::from(json.into_boxed_slice()))
            .unwrap_or_default()
    }

    /// `answer` (an [`encode`](Self::encode)d one) saying `expiration`
    /// instead: the cache tells the SDKs when to ask again without keeping
    /// a second copy of the secrets. `None` if `answer` is not one.
    pub fn reissue(answer: &[u8], expiration: SystemTime) -> Option<Bytes> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Encoded<'a> {
            #[serde(borrow)]
            access_key_id: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            secret_access_key: std::borrow::Cow<'a, str>,
            #[serde(borrow, rename = "Token")]
            session_token: std::borrow::Cow<'a, str>,
            #[serde(borrow, default)]
            account_id: Option<std::borrow::Cow<'a, str>>,
        }
        let encoded: Encoded = serde_json::from_slice(answer).ok()?;
        let json = SdkAnswer {
            access_key_id: &encoded.access_key_id,
            secret_access_key: &encoded.secret_access_key,
            session_token: &encoded.session_token,
            account_id: encoded.account_id.as_deref(),
            expiration,
        }
        .encode();
        (!json.is_empty()).then_some(json)
    }
}

fn rfc3339_seconds<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*time))
}

/// An upstream failure, already in the shape the HTTP answer needs.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum UpstreamError {
    /// EKS Auth answered with an error: its status passes through.
    #[error("[{request_id}]: ({code}): {message}, fault: {fault}")]
    Service {
        status: http::StatusCode,
        code: String,
        message: String,
        request_id: String,
        fault: &'static str,
    },
    /// No usable answer; `why` says which kind (for metrics and retries),
    /// `message` says it in one sentence.
    #[error("{message}")]
    Unavailable { why: NoAnswer, message: String },
}

/// Why EKS Auth gave no usable answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoAnswer {
    /// No answer within the attempt timeout or the overall deadline.
    Timeout,
    /// The connection could not be made (refused, unreachable, TLS).
    Unreachable,
    /// An answer that is not AssumeRoleForPodIdentity's.
    Malformed,
    /// The client itself could not work (no CA bundle, no credentials to
    /// sign with, a task that died).
    Client,
}

impl NoAnswer {
    /// The `code` label of `pod_identity_upstream_errors_total`.
    pub fn code(self) -> &'static str {
        match self {
            NoAnswer::Timeout => "Timeout",
            NoAnswer::Unreachable => "Unreachable",
            NoAnswer::Malformed => "MalformedResponse",
            NoAnswer::Client => "ClientError",
        }
    }
}

impl UpstreamError {
    /// A no-answer error of kind `why`.
    pub fn no_answer(why: NoAnswer, message: impl Into<String>) -> UpstreamError {
        UpstreamError::Unavailable {
            why,
            message: message.into(),
        }
    }
}

impl UpstreamError {
    /// The HTTP status the agent answers with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            UpstreamError::Service { status, .. } => *status,
            UpstreamError::Unavailable { .. } => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error code for metrics (`pod_identity_cache_errors{code}`).
    pub fn code(&self) -> &str {
        match self {
            UpstreamError::Service { code, .. } => code,
            UpstreamError::Unavailable { why, .. } => why.code(),
        }
    }

    /// The error code as the reference labels `pod_identity_cache_errors`:
    /// EKS Auth's, or `Unknown` when there was no service answer.
    pub fn reference_code(&self) -> &str {
        match self {
            UpstreamError::Service { code, .. } => code,
            UpstreamError::Unavailable { .. } => "Unknown",
        }
    }

    /// Whether keeping previously fetched credentials is right. As the
    /// reference: only EKS Auth's verdicts on the token or association
    /// (access denied, invalid or expired token, no association) are final;
    /// throttling, server faults, other client errors and no answer at all
    /// keep the old credentials until they expire.
    pub fn is_recoverable(&self) -> bool {
        match self {
            UpstreamError::Service { code, .. } => !IRRECOVERABLE.contains(&code.as_str()),
            UpstreamError::Unavailable { .. } => true,
        }
    }
}

/// EKS Auth error codes after which cached credentials are dropped.
const IRRECOVERABLE: [&str; 4] = [
    "AccessDeniedException",
    "InvalidTokenException",
    "ExpiredTokenException",
    "ResourceNotFoundException",
];

pub type UpstreamFuture = Pin<Box<dyn Future<Output = Result<Assumed, UpstreamError>> + Send>>;

/// The credential source, as the cache sees it (a fake in unit tests).
pub trait Upstream: Send + Sync + 'static {
    fn assume(&self, token: String) -> UpstreamFuture;
}

/// Timeouts and retries of the reference agent (docs/architecture.md §7).
#[derive(Debug)]
pub struct UpstreamOptions {
    pub cluster_name: String,
    pub endpoint: Option<String>,
    pub node_name: Option<String>,
    pub connect_timeout: Duration,
    pub attempt_timeout: Duration,
    pub max_attempts: u32,
    /// The whole call, retries and backoff included.
    pub deadline: Duration,
    /// Sign with these instead of the SDK's default chain (hybrid nodes).
    pub node_credentials: Option<crate::node_credentials::RotatingSharedCredentials>,
}

pub struct EksAuth {
    client: Client,
    cluster_name: String,
    node_name: Option<String>,
    /// The timeouts in force, as a timed-out answer states them.
    timeouts: String,
}

impl EksAuth {
    /// Region and signing credentials come from the SDK's default chains;
    /// `AWS_ENDPOINT_URL_EKS_AUTH` is honoured by the SDK, `endpoint` wins.
    pub async fn new(options: &UpstreamOptions) -> Result<EksAuth, UpstreamError> {
        // Without a single root certificate (an image without a CA bundle)
        // the SDK's TLS client would fail every call; say it now instead.
        if !has_ca_certificates() {
            return Err(UpstreamError::no_answer(
                NoAnswer::Client,
                "no CA certificates found (the system bundle, or SSL_CERT_FILE / SSL_CERT_DIR): \
                 EKS Auth's TLS certificate could not be verified",
            ));
        }
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client())
            .load()
            .await;
        let mut config = aws_sdk_eksauth::config::Builder::from(&shared)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(options.connect_timeout)
                    .operation_attempt_timeout(options.attempt_timeout)
                    .operation_timeout(options.deadline)
                    .build(),
            )
            .retry_config(
                // Standard mode: exponential backoff with full jitter on
                // throttling, 5xx and transient I/O errors.
                RetryConfig::standard()
                    .with_max_attempts(options.max_attempts)
                    .with_initial_backoff(Duration::from_millis(50))
                    .with_max_backoff(Duration::from_millis(500))
                    .with_reconnect_mode(ReconnectMode::ReconnectOnTransientError),
            );
        if let Some(endpoint) = &options.endpoint {
            config = config.endpoint_url(endpoint);
        }
        if let Some(node) = &options.node_credentials {
            config = config.credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(node.clone()),
            );
        }
        Ok(EksAuth {
            client: Client::from_conf(config.build()),
            cluster_name: options.cluster_name.clone(),
            node_name: options.node_name.clone(),
            timeouts: format!(
                "at most {} per attempt, {} attempts, {} in all",
                humantime::format_duration(options.attempt_timeout),
                options.max_attempts,
                humantime::format_duration(options.deadline)
            ),
        })
    }
}

/// Whether the CA bundle the SDK will load holds a certificate: where
/// rustls-native-certs (the SDK's loader) looks — `SSL_CERT_FILE` and
/// `SSL_CERT_DIR` if either is set, else what openssl-probe finds — read
/// up to the first certificate. Loading the whole bundle, as the SDK then
/// does (and keeps), takes milliseconds; a second, freed copy among the
/// SDK's allocations stayed resident for the agent's life (0.4 MiB,
/// measured).
fn has_ca_certificates() -> bool {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let (file, dirs) = match (
        std::env::var_os("SSL_CERT_FILE"),
        std::env::var_os("SSL_CERT_DIR"),
    ) {
        (None, None) => {
            let probed = openssl_probe::probe();
            (probed.cert_file, probed.cert_dir)
        }
        (file, dirs) => (
            file.map(PathBuf::from),
            dirs.map(|d| std::env::split_paths(&d).collect())
                .unwrap_or_default(),
        ),
    };
    // Regular files only (after symlinks), as the loader reads them.
    let holds_one = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file())
            && CertificateDer::pem_file_iter(path).is_ok_and(|mut certs| certs.any(|c| c.is_ok()))
    };
    file.as_deref().is_some_and(holds_one)
        || dirs.iter().any(|dir| {
            std::fs::read_dir(dir)
                .is_ok_and(|entries| entries.flatten().any(|entry| holds_one(&entry.path())))
        })
}

/// The SDK's HTTPS client (rustls, aws-lc) with the proxy environment
/// (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`) honoured, which the default
/// client does not do.
fn http_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    HttpClientBuilder::new().build_with_connector_fn(|settings, components| {
        let mut builder = Connector::builder();
        if let Some(settings) = settings {
            builder = builder.connector_settings(settings.clone());
        }
        builder.set_sleep_impl(components.and_then(|c| c.sleep_impl()));
        builder
            .proxy_config(ProxyConfig::from_env())
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .build()
    })
}

impl Upstream for EksAuth {
    fn assume(&self, token: String) -> UpstreamFuture {
        let request = self
            .client
            .assume_role_for_pod_identity()
            .cluster_name(&self.cluster_name)
            .token(token)
            .set_eks_node_name(self.node_name.clone());
        let timeouts = self.timeouts.clone();
        Box::pin(async move {
            let output = request.send().await.map_err(|e| map_error(e, &timeouts))?;
            let missing = |what: &str| {
                UpstreamError::no_answer(
                    NoAnswer::Malformed,
                    format!("EKS Auth response without {what}"),
                )
            };
            let credentials = output.credentials().ok_or_else(|| missing("credentials"))?;
            let role = output
                .assumed_role_user()
                .ok_or_else(|| missing("assumedRoleUser"))?;
            let association = output
                .pod_identity_association()
                .ok_or_else(|| missing("podIdentityAssociation"))?;
            let subject = output.subject().ok_or_else(|| missing("subject"))?;
            // Also within what RFC 3339 (and the SDKs) can write: 1970–9999.
            let expiration = SystemTime::try_from(*credentials.expiration())
                .ok()
                .filter(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .is_ok_and(|d| d.as_secs() < 253_402_300_800)
                })
                .ok_or_else(|| missing("a valid credentials expiration"))?;
            let answer = SdkAnswer {
                access_key_id: credentials.access_key_id(),
                secret_access_key: credentials.secret_access_key(),
                session_token: credentials.session_token(),
                account_id: account_of_arn(role.arn()),
                expiration,
            };
            Ok(Assumed {
                answer: answer.encode(),
                expiration,
                association_id: association.association_id().into(),
                role_arn: role.arn().into(),
                subject: format!("{}/{}", subject.namespace(), subject.service_account())
                    .into_boxed_str(),
            })
        })
    }
}

fn map_error(err: SdkError<AssumeRoleForPodIdentityError>, timeouts: &str) -> UpstreamError {
    match &err {
        // An "error" with a success status: the body did not parse.
        SdkError::ServiceError(service) if service.raw().status().as_u16() < 400 => {
            UpstreamError::no_answer(
                NoAnswer::Malformed,
                format!(
                    "malformed EKS Auth response: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&err)
                ),
            )
        }
        SdkError::ServiceError(service) => {
            // Smithy checked it is a status (100..=999), as `http` does.
            let status = http::StatusCode::from_u16(service.raw().status().as_u16())
                .unwrap_or(http::StatusCode::BAD_GATEWAY);
            let inner = service.err();
            let code = inner.code().unwrap_or("UnknownError").to_owned();
            let message = inner.message().unwrap_or_default().to_owned();
            let request_id = inner.request_id().unwrap_or_default().to_owned();
            UpstreamError::Service {
                status,
                code,
                message,
                request_id,
                fault: if status.is_server_error() {
                    "server"
                } else {
                    "client"
                },
            }
        }
        SdkError::TimeoutError(_) => UpstreamError::no_answer(
            NoAnswer::Timeout,
            format!("EKS Auth did not answer in time ({timeouts})"),
        ),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => UpstreamError::no_answer(
            NoAnswer::Timeout,
            format!("EKS Auth did not accept the connection in time ({timeouts})"),
        ),
        SdkError::DispatchFailure(_) => UpstreamError::no_answer(
            NoAnswer::Unreachable,
            format!("could not reach EKS Auth: {}", root_cause(&err)),
        ),
        SdkError::ResponseError(_) => UpstreamError::no_answer(
            NoAnswer::Malformed,
            format!("malformed EKS Auth response: {}", root_cause(&err)),
        ),
        _ => UpstreamError::no_answer(
            NoAnswer::Client,
            format!("the EKS Auth request failed: {}", root_cause(&err)),
        ),
    }
}

/// The innermost error's own words (e.g. `Connection refused (os error
/// 111)`), not the SDK's nested debug dump.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

/// `arn:aws:sts::111122223333:assumed-role/…` → `111122223333`.
pub fn account_of_arn(arn: &str) -> Option<&str> {
    let account = arn.split(':').nth(4)?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_answer_is_the_reference_json() {
        let expiration = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let answer = |account_id| SdkAnswer {
            access_key_id: "ASIA1",
            secret_access_key: "s/\"k",
            session_token: "t",
            account_id,
            expiration,
        };
        assert_eq!(
            &answer(Some("111122223333")).encode()[..],
            br#"{"AccessKeyId":"ASIA1","SecretAccessKey":"s/\"k","Token":"t","AccountId":"111122223333","Expiration":"2026-11-18T11:06:40Z"}"#
        );
        assert_eq!(
            &answer(None).encode()[..],
            br#"{"AccessKeyId":"ASIA1","SecretAccessKey":"s/\"k","Token":"t","Expiration":"2026-11-18T11:06:40Z"}"#
        );
    }

    #[test]
    fn account_id_comes_from_the_role_arn() {
        let cases = [
            (
                "arn:aws:sts::111122223333:assumed-role/my-role/eks-test-clust-my-pod-0a1b2c3d",
                Some("111122223333"),
            ),
            (
                "arn:aws-cn:sts::444455556666:assumed-role/r/s",
                Some("444455556666"),
            ),
            ("arn:aws:sts::notanumber:assumed-role/r/s", None),
            ("garbage", None),
        ];
        for (arn, expected) in cases {
            assert_eq!(account_of_arn(arn), expected, "{arn}");
        }
    }

    #[test]
    fn only_verdicts_on_the_token_or_association_drop_old_credentials() {
        let service = |status: u16, code: &str| UpstreamError::Service {
            status: http::StatusCode::from_u16(status).expect("a status"),
            code: code.into(),
            message: "m".into(),
            request_id: "r".into(),
            fault: "client",
        };
        let cases = [
            (service(400, "AccessDeniedException"), false),
            (service(400, "InvalidTokenException"), false),
            (service(400, "ExpiredTokenException"), false),
            (service(404, "ResourceNotFoundException"), false),
            (service(400, "InvalidParameterException"), true),
            (service(429, "ThrottlingException"), true),
            (service(500, "InternalServerException"), true),
            (service(503, "ServiceUnavailableException"), true),
            (UpstreamError::no_answer(NoAnswer::Timeout, "timeout"), true),
        ];
        for (err, recoverable) in cases {
            assert_eq!(err.is_recoverable(), recoverable, "{err:?}");
        }
    }
}
