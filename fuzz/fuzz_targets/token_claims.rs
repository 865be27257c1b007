//! The projected token as a caller sends it in `Authorization`: claims
//! parsing and the time checks must answer every input, never panic.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use agent::token;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(claims) = token::parse(text) {
        let _ = token::validate_times(&claims, UNIX_EPOCH + Duration::from_secs(1_764_403_200));
        let _ = (
            claims.pod_uid(),
            claims.namespace(),
            claims.service_account(),
            claims.node_name(),
            claims.pod_name(),
        );
    }
});
