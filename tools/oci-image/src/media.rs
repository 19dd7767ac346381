//! Media types and annotations of the image. Istio's agent (pkg/wasm/imagefetcher.go) takes an OCI
//! manifest as the compat variant when its last layer is `LAYER` (gzip, checked with
//! `gzip.NewReader`) holding a file whose base name is `plugin.wasm`.

pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The Wasm image spec (solo-io/wasm spec-compat.md) requires this annotation on a compat image
/// whose layer has the OCI (not the Docker) media type.
pub const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";
pub const VARIANT_COMPAT: &str = "compat";

/// The tag a layout reference (`oci:target/oci:TAG`, `--from-oci-layout target/oci:TAG`) names.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The file the compat layer must hold.
pub const PLUGIN_FILE: &str = "plugin.wasm";

pub const LAYOUT_VERSION: &str = "1.0.0";

/// The image config's platform: a Wasm module runs on any host, so it is not a Linux image
/// (GOOS/GOARCH names of WASI preview 1). Istio pulls a single manifest and ignores the platform.
pub const OS: &str = "wasip1";
pub const ARCHITECTURE: &str = "wasm";
