//! The SYN a listener saved (IP and TCP headers, options): a stamp is found
//! only where the exact option bytes are.
#![no_main]

use agent::caller::syn;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for found in [syn::stamp_in_syn(data), syn::stamp_in_options(data)]
        .into_iter()
        .flatten()
    {
        let option = found.to_option();
        assert!(data.windows(option.len()).any(|w| w == option));
    }
});
