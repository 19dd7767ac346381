//! Builds the image in memory (blobs keyed by digest, plus `index.json`) and writes it as an OCI
//! image layout. JSON documents are serialised from structs, so field order is fixed.

use crate::{media, tar};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    pub rootfs: RootFs,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct OciLayout {
    pub image_layout_version: String,
}

#[derive(Debug)]
pub enum BuildError {
    NotWasm,
    BadTag(String),
    Tar(tar::TarError),
    /// The output directory holds something that is not an image layout: not overwritten.
    NotALayout(PathBuf),
    Io {
        path: PathBuf,
        err: std::io::Error,
    },
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::NotWasm => {
                write!(f, "the input is not a WebAssembly module (no \\0asm header): pass the filter.wasm `make wasm` builds")
            }
            BuildError::BadTag(t) => write!(f, "tag {t:?} is not a valid OCI tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})"),
            BuildError::Tar(e) => write!(f, "{e}"),
            BuildError::NotALayout(p) => {
                write!(f, "{} exists, is not empty and has no oci-layout file: refusing to overwrite it, pick another --out", p.display())
            }
            BuildError::Io { path, err } => write!(f, "{}: {err}", path.display()),
        }
    }
}

impl std::error::Error for BuildError {}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub struct Image {
    pub tag: String,
    /// The manifest's descriptor, as `index.json` lists it.
    pub manifest: Descriptor,
    /// Manifest, config and layer, keyed by digest.
    pub blobs: BTreeMap<String, Vec<u8>>,
    pub index_json: Vec<u8>,
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn descriptor(media_type: &str, bytes: &[u8], annotations: BTreeMap<String, String>) -> Descriptor {
    Descriptor { media_type: media_type.into(), digest: sha256_digest(bytes), size: bytes.len() as u64, annotations }
}

fn json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("image documents serialise")
}

/// The compat-variant image of `wasm`, tagged `tag` in the layout's index.
pub fn build(wasm: &[u8], tag: &str) -> Result<Image, BuildError> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(BuildError::NotWasm);
    }
    if !valid_tag(tag) {
        return Err(BuildError::BadTag(tag.to_string()));
    }
    let layer_tar = tar::single_file(media::PLUGIN_FILE, wasm).map_err(BuildError::Tar)?;
    // gzip with mtime 0 and a fixed OS byte; the deflate stream comes from flate2's pure-Rust
    // backend (miniz_oxide, pinned by Cargo.lock), so it does not vary with the system's zlib.
    let mut gz = flate2::GzBuilder::new().mtime(0).operating_system(255).write(Vec::new(), flate2::Compression::best());
    gz.write_all(&layer_tar).expect("writing to a Vec");
    let layer = gz.finish().expect("writing to a Vec");

    let config = json(&ImageConfig {
        architecture: media::ARCHITECTURE.into(),
        os: media::OS.into(),
        rootfs: RootFs { kind: "layers".into(), diff_ids: vec![sha256_digest(&layer_tar)] },
    });
    let manifest = json(&Manifest {
        schema_version: 2,
        media_type: Some(media::MANIFEST.into()),
        config: descriptor(media::CONFIG, &config, BTreeMap::new()),
        layers: vec![descriptor(media::LAYER, &layer, BTreeMap::new())],
        annotations: BTreeMap::from([(media::VARIANT_ANNOTATION.into(), media::VARIANT_COMPAT.into())]),
    });
    let manifest_desc = descriptor(media::MANIFEST, &manifest, BTreeMap::from([(media::REF_NAME_ANNOTATION.into(), tag.into())]));
    let index_json = json(&Index { schema_version: 2, media_type: Some(media::INDEX.into()), manifests: vec![manifest_desc.clone()] });
    let blobs = [config, layer, manifest].into_iter().map(|b| (sha256_digest(&b), b)).collect();
    Ok(Image { tag: tag.into(), manifest: manifest_desc, blobs, index_json })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |err| BuildError::Io { path: path.to_path_buf(), err }
}

/// Writes `image` as an OCI image layout at `dir`, replacing a layout already there (so no stale
/// blobs remain) but never a directory that is something else.
pub fn write(image: &Image, dir: &Path) -> Result<(), BuildError> {
    if dir.exists() {
        if dir.join("oci-layout").is_file() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        } else if std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
            return Err(BuildError::NotALayout(dir.to_path_buf()));
        }
    }
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    for (digest, bytes) in &image.blobs {
        let path = blobs.join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    let index = dir.join("index.json");
    std::fs::write(&index, &image.index_json).map_err(io(&index))?;
    let layout = dir.join("oci-layout");
    std::fs::write(&layout, json(&OciLayout { image_layout_version: media::LAYOUT_VERSION.into() })).map_err(io(&layout))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WASM: &[u8] = b"\0asm\x01\0\0\0 module bytes";

    #[test]
    fn same_module_same_digests() {
        let (a, b) = (build(WASM, "1.0").unwrap(), build(WASM, "1.0").unwrap());
        assert_eq!(a.index_json, b.index_json);
        assert_eq!(a.blobs, b.blobs);
        let c = build(b"\0asm\x01\0\0\0 other bytes", "1.0").unwrap();
        assert_ne!(a.manifest.digest, c.manifest.digest);
    }

    #[test]
    fn refuses_non_wasm_and_bad_tags() {
        assert!(matches!(build(b"MZ not wasm", "1"), Err(BuildError::NotWasm)));
        for tag in ["", "-x", "a/b", "a:b", &"x".repeat(129)] {
            assert!(matches!(build(WASM, tag), Err(BuildError::BadTag(_))), "{tag:?}");
        }
    }

    #[test]
    fn digest_is_sha256_hex() {
        assert_eq!(sha256_digest(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
