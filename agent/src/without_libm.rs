//! The agent's process runs without libm. Its one import from libm was
//! `pow`, for the AWS SDK's adaptive retry mode (a client-side rate
//! limiter's cube root; the agent retries in standard mode, so it is never
//! called). Loading libm for it cost half a MiB of resident memory on every
//! node: the loader binds each of the binary's imports against libm's
//! tables and runs its IFUNC resolvers, and the kernel maps the pages
//! around each page touched. The same function from the `libm` crate
//! (rust-lang's port of musl's) is linked in instead, and the linker,
//! recording only the libraries that are used (`--as-needed`, rustc's
//! default), leaves libm out.

/// C's `pow`, for the code that imports it.
// SAFETY: the signature is C's `double pow(double, double)`. The binary does
// not export its symbols dynamically, so this stands in for the code linked
// into it only; a shared library the process loads keeps its own binding.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pow_is_cs_pow() {
        for (x, y, want) in [
            (2.0, 10.0, 1024.0),
            (27.0, 1.0 / 3.0, 3.0),
            (0.5, -1.0, 2.0),
            (-8.0, 3.0, -512.0),
            (0.0, 0.0, 1.0),
        ] {
            let got = super::pow(x, y);
            assert!(
                (got - want).abs() <= want.abs() * 1e-15,
                "pow({x}, {y}) = {got}"
            );
        }
        assert!(super::pow(-8.0, 0.5).is_nan());
    }
}
