//! The node's own AWS credentials on hybrid nodes (`--rotate-credentials`):
//! the shared credentials file that the node's tooling rewrites as it
//! rotates them, re-read whenever the SDK's identity cache asks — at least
//! every `--rotate-credentials-interval` (a minute), as the reference does.
//!
//! The file is parsed by the SDK's own profile-file loader; only the
//! `default` profile is read, as the reference reads it.

use std::{borrow::Cow, path::PathBuf, time::Duration};

use aws_credential_types::{
    Credentials,
    provider::{self, ProvideCredentials, error::CredentialsError, future},
};
use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
use aws_types::os_shim_internal::{Env, Fs};
use tracing::warn;

const PROFILE: &str = "default";
const SOURCE: &str = "RotatingSharedCredentials";

/// Re-reads the shared credentials file for every fetch; the credentials it
/// returns expire after `interval`, so the SDK fetches again by then.
#[derive(Clone, Debug)]
pub struct RotatingSharedCredentials {
    files: EnvConfigFiles,
    /// For messages: which file.
    describe: String,
    interval: Duration,
}

impl RotatingSharedCredentials {
    /// `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`.
    pub fn from_env(interval: Duration) -> RotatingSharedCredentials {
        let explicit = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE").map(PathBuf::from);
        let builder = EnvConfigFiles::builder().include_default_config_file(false);
        let (files, describe) = match explicit {
            Some(path) => (
                builder
                    .include_default_credentials_file(false)
                    .with_file(EnvConfigFileKind::Credentials, &path)
                    .build(),
                path.display().to_string(),
            ),
            None => (
                builder.include_default_credentials_file(true).build(),
                "~/.aws/credentials".to_owned(),
            ),
        };
        RotatingSharedCredentials {
            files,
            describe,
            interval,
        }
    }

    /// Which file this reads.
    pub fn file(&self) -> &str {
        &self.describe
    }

    /// Reads the file now.
    pub async fn load(&self) -> provider::Result {
        let fail = |why: String| {
            let message = format!(
                "reading the node's credentials from {} (profile {PROFILE}): {why}",
                self.describe
            );
            warn!(error = message, "node credentials unavailable");
            CredentialsError::provider_error(message)
        };
        let profiles = aws_config::profile::load(
            &Fs::real(),
            &Env::real(),
            &self.files,
            Some(Cow::Borrowed(PROFILE)),
        )
        .await
        .map_err(|e| fail(e.to_string()))?;
        let profile = profiles
            .get_profile(PROFILE)
            .ok_or_else(|| fail("no such profile".into()))?;
        let key = |name: &str| profile.get(name).filter(|v| !v.is_empty());
        let access_key_id =
            key("aws_access_key_id").ok_or_else(|| fail("no aws_access_key_id".into()))?;
        let secret =
            key("aws_secret_access_key").ok_or_else(|| fail("no aws_secret_access_key".into()))?;
        Ok(Credentials::new(
            access_key_id,
            secret,
            key("aws_session_token").map(str::to_owned),
            Some(std::time::SystemTime::now() + self.interval),
            SOURCE,
        ))
    }
}

impl ProvideCredentials for RotatingSharedCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.load())
    }
}
