//! `make oci`: the router's `filter.wasm` as a Wasm OCI image in the *compat* variant that Istio's
//! agent pulls (`oci://` URLs in WasmPlugin or in an ECDS `vm_config.code.remote`), written as an
//! OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`) for any registry tool to push.
//!
//! The image is one OCI manifest (annotated `module.wasm.image/variant: compat`) whose single
//! `application/vnd.oci.image.layer.v1.tar+gzip` layer is a tar holding exactly `plugin.wasm`. It is
//! reproducible: fixed timestamps, owners, modes and order, and a pinned deflate implementation, so
//! the same wasm gives the same digests.

pub mod layout;
pub mod media;
pub mod tar;
pub mod verify;

/// The repository name the image is documented under (`oci://REGISTRY/auto-ai-router:TAG`).
pub const IMAGE_NAME: &str = "auto-ai-router";

/// The default tag: the workspace version, so a release tag names the release's module.
pub const DEFAULT_TAG: &str = env!("CARGO_PKG_VERSION");
