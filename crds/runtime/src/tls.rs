//! The process-wide TLS crypto provider. kube's client links rustls with `ring` and aws-sdk-s3
//! links it with `aws-lc-rs`; in a binary (or a workspace test build) that has both, rustls
//! refuses to pick a default and the first kube client panics. Every entry point that builds a
//! kube client calls `install_crypto_provider` first.

/// Selects rustls' ring provider for the whole process. Calling it again is harmless.
pub fn install_crypto_provider() {
    // Err only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
