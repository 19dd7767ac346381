//! Reads an image layout back from disk and checks it the way a registry tool and Istio's agent
//! would consume it: every descriptor's digest and size against its blob, the media types and
//! annotation of the compat variant, the config's diff_id against the uncompressed layer, and the
//! layer as a gzip'd tar holding exactly `plugin.wasm` (optionally equal to a given module).

use crate::layout::{sha256_digest, Descriptor, ImageConfig, Index, Manifest, OciLayout};
use crate::media;
use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};

#[derive(Debug, PartialEq, Eq)]
pub enum VerifyError {
    Read {
        path: PathBuf,
        err: String,
    },
    Json {
        what: String,
        err: String,
    },
    /// A field that must have one value has another.
    Field {
        what: String,
        expected: String,
        found: String,
    },
    BadDigest {
        what: String,
        digest: String,
    },
    Size {
        what: String,
        digest: String,
        expected: u64,
        actual: u64,
    },
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    DiffId {
        expected: String,
        actual: String,
    },
    Gzip(String),
    Tar(String),
    Entries(Vec<String>),
    NotWasm,
    WasmMismatch {
        expected_len: usize,
        actual_len: usize,
        first_difference: usize,
    },
    StrayBlob(String),
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use VerifyError::*;
        match self {
            Read { path, err } => write!(f, "cannot read {}: {err} (run `make oci`)", path.display()),
            Json { what, err } => write!(f, "{what} is not valid JSON for its schema: {err}"),
            Field { what, expected, found } => write!(f, "{what} is {found}, expected {expected}"),
            BadDigest { what, digest } => write!(f, "{what} digest {digest:?} is not sha256:<64 hex digits>"),
            Size { what, digest, expected, actual } => {
                write!(f, "{what} blob {digest} has {actual} bytes, its descriptor says {expected}: the blob is truncated or replaced")
            }
            Digest { what, expected, actual } => {
                write!(f, "{what} blob named {expected} hashes to {actual}: the blob is corrupt, rebuild with `make oci`")
            }
            DiffId { expected, actual } => write!(f, "config diff_id {expected} but the uncompressed layer is {actual}"),
            Gzip(e) => write!(f, "layer is not a valid gzip stream: {e}"),
            Tar(e) => write!(f, "layer is not a valid tar archive: {e}"),
            Entries(names) => write!(f, "layer tar holds {names:?}, expected exactly [{:?}]", media::PLUGIN_FILE),
            NotWasm => write!(f, "{} is not a WebAssembly module (Istio's agent rejects it)", media::PLUGIN_FILE),
            WasmMismatch { expected_len, actual_len, first_difference } => write!(
                f,
                "{} ({actual_len} bytes) differs from the given module ({expected_len} bytes) at byte {first_difference}: rebuild with `make oci`",
                media::PLUGIN_FILE
            ),
            StrayBlob(name) => write!(f, "blobs/sha256/{name} is not referenced by the image"),
        }
    }
}

impl std::error::Error for VerifyError {}

/// What a verified layout holds.
#[derive(Debug)]
pub struct Verified {
    pub tag: String,
    pub manifest_digest: String,
    pub plugin: Vec<u8>,
}

fn read(path: &Path) -> Result<Vec<u8>, VerifyError> {
    std::fs::read(path).map_err(|e| VerifyError::Read { path: path.to_path_buf(), err: e.to_string() })
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, VerifyError> {
    serde_json::from_slice(bytes).map_err(|e| VerifyError::Json { what: what.into(), err: e.to_string() })
}

fn expect(what: &str, expected: &str, found: &str) -> Result<(), VerifyError> {
    if expected == found {
        Ok(())
    } else {
        Err(VerifyError::Field { what: what.into(), expected: expected.into(), found: found.into() })
    }
}

fn hex_of(what: &str, digest: &str) -> Result<String, VerifyError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) => Ok(h.to_string()),
        _ => Err(VerifyError::BadDigest { what: what.into(), digest: digest.into() }),
    }
}

/// The blob a descriptor names, after checking its size and digest.
fn blob(dir: &Path, what: &str, d: &Descriptor, seen: &mut BTreeSet<String>) -> Result<Vec<u8>, VerifyError> {
    let hex = hex_of(what, &d.digest)?;
    let bytes = read(&dir.join("blobs").join("sha256").join(&hex))?;
    if bytes.len() as u64 != d.size {
        return Err(VerifyError::Size { what: what.into(), digest: d.digest.clone(), expected: d.size, actual: bytes.len() as u64 });
    }
    let actual = sha256_digest(&bytes);
    if actual != d.digest {
        return Err(VerifyError::Digest { what: what.into(), expected: d.digest.clone(), actual });
    }
    seen.insert(hex);
    Ok(bytes)
}

pub fn verify(dir: &Path, expected_wasm: Option<&[u8]>) -> Result<Verified, VerifyError> {
    let layout: OciLayout = parse("oci-layout", &read(&dir.join("oci-layout"))?)?;
    expect("oci-layout imageLayoutVersion", media::LAYOUT_VERSION, &layout.image_layout_version)?;

    let index: Index = parse("index.json", &read(&dir.join("index.json"))?)?;
    expect("index.json schemaVersion", "2", &index.schema_version.to_string())?;
    // The index's mediaType is a SHOULD in the image spec (skopeo writes none when it pulls).
    if let Some(mt) = &index.media_type {
        expect("index.json mediaType", media::INDEX, mt)?;
    }
    // One image, not a platform index: Istio's agent resolves a tag to an image manifest, and
    // `crane push` / `skopeo copy oci:…:TAG` push that manifest as is.
    expect("index.json manifest count", "1", &index.manifests.len().to_string())?;
    let m = &index.manifests[0];
    expect("index.json manifests[0].mediaType", media::MANIFEST, &m.media_type)?;
    let tag = m.annotations.get(media::REF_NAME_ANNOTATION).cloned().unwrap_or_default();
    if tag.is_empty() {
        return Err(VerifyError::Field {
            what: format!("index.json manifests[0] annotation {}", media::REF_NAME_ANNOTATION),
            expected: "the tag".into(),
            found: "(absent)".into(),
        });
    }

    let mut seen = BTreeSet::new();
    let manifest: Manifest = parse("manifest", &blob(dir, "manifest", m, &mut seen)?)?;
    expect("manifest schemaVersion", "2", &manifest.schema_version.to_string())?;
    expect("manifest mediaType", media::MANIFEST, manifest.media_type.as_deref().unwrap_or("(absent)"))?;
    expect(
        &format!("manifest annotation {}", media::VARIANT_ANNOTATION),
        media::VARIANT_COMPAT,
        manifest.annotations.get(media::VARIANT_ANNOTATION).map_or("(absent)", String::as_str),
    )?;
    expect("manifest config.mediaType", media::CONFIG, &manifest.config.media_type)?;
    expect("manifest layer count", "1", &manifest.layers.len().to_string())?;
    let layer_desc = &manifest.layers[0];
    expect("manifest layers[0].mediaType", media::LAYER, &layer_desc.media_type)?;

    let config: ImageConfig = parse("config", &blob(dir, "config", &manifest.config, &mut seen)?)?;
    expect("config rootfs.type", "layers", &config.rootfs.kind)?;
    expect("config rootfs.diff_ids count", "1", &config.rootfs.diff_ids.len().to_string())?;

    let layer = blob(dir, "layer", layer_desc, &mut seen)?;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&layer[..]).read_to_end(&mut tar).map_err(|e| VerifyError::Gzip(e.to_string()))?;
    let diff_id = sha256_digest(&tar);
    if config.rootfs.diff_ids[0] != diff_id {
        return Err(VerifyError::DiffId { expected: config.rootfs.diff_ids[0].clone(), actual: diff_id });
    }
    let entries = tar_entries(&tar)?;
    let names: Vec<String> = entries.iter().map(|(n, _)| n.clone()).collect();
    let [(name, _)] = &entries[..] else { return Err(VerifyError::Entries(names)) };
    if name != media::PLUGIN_FILE {
        return Err(VerifyError::Entries(names));
    }
    let plugin = entries.into_iter().next().unwrap().1;
    if plugin.len() < 8 || &plugin[..4] != b"\0asm" {
        return Err(VerifyError::NotWasm);
    }
    if let Some(want) = expected_wasm {
        if want != plugin.as_slice() {
            let first_difference = want.iter().zip(&plugin).position(|(a, b)| a != b).unwrap_or(want.len().min(plugin.len()));
            return Err(VerifyError::WasmMismatch { expected_len: want.len(), actual_len: plugin.len(), first_difference });
        }
    }

    let blobs_dir = dir.join("blobs").join("sha256");
    let listing = std::fs::read_dir(&blobs_dir).map_err(|e| VerifyError::Read { path: blobs_dir.clone(), err: e.to_string() })?;
    for e in listing {
        let name = e.map_err(|e| VerifyError::Read { path: blobs_dir.clone(), err: e.to_string() })?.file_name();
        let name = name.to_string_lossy();
        if !seen.contains(name.as_ref()) {
            return Err(VerifyError::StrayBlob(name.into_owned()));
        }
    }
    Ok(Verified { tag, manifest_digest: m.digest.clone(), plugin })
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn octal(what: &str, field: &[u8]) -> Result<u64, VerifyError> {
    let s = cstr(field);
    u64::from_str_radix(s.trim_matches(' '), 8).map_err(|_| VerifyError::Tar(format!("{what} field {s:?} is not octal")))
}

/// Regular-file entries (name, data) of a ustar archive; any other entry type is an error, since
/// the compat layer holds only files.
fn tar_entries(tar: &[u8]) -> Result<Vec<(String, Vec<u8>)>, VerifyError> {
    const BLOCK: usize = 512;
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = tar.get(at..at + BLOCK) else {
            return Err(VerifyError::Tar("archive ends without its two zero end blocks".into()));
        };
        if header.iter().all(|&b| b == 0) {
            if !tar[at..].iter().all(|&b| b == 0) || tar.len() - at < 2 * BLOCK {
                return Err(VerifyError::Tar("data after the end-of-archive block, or a single end block".into()));
            }
            return Ok(entries);
        }
        let stored = octal("checksum", &header[148..156])?;
        let sum: u64 = header.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
        if stored != sum {
            return Err(VerifyError::Tar(format!("header at byte {at} has checksum {stored}, computed {sum}")));
        }
        let mut name = cstr(&header[..100]);
        if &header[257..262] == b"ustar" {
            let prefix = cstr(&header[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let kind = header[156];
        if kind != b'0' && kind != 0 {
            return Err(VerifyError::Tar(format!("entry {name:?} has type {:?}, only regular files belong in the layer", kind as char)));
        }
        let size = octal("size", &header[124..136])? as usize;
        let data = tar
            .get(at + BLOCK..at + BLOCK + size)
            .ok_or_else(|| VerifyError::Tar(format!("entry {name:?} of {size} bytes runs past the archive's end")))?;
        entries.push((name, data.to_vec()));
        at += BLOCK + size.div_ceil(BLOCK) * BLOCK;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_reader_reads_what_the_writer_wrote() {
        let t = crate::tar::single_file("plugin.wasm", b"\0asm\x01\0\0\0xyz").unwrap();
        assert_eq!(tar_entries(&t).unwrap(), vec![("plugin.wasm".to_string(), b"\0asm\x01\0\0\0xyz".to_vec())]);
        let mut bad = t.clone();
        bad[0] = b'q';
        assert!(matches!(tar_entries(&bad), Err(VerifyError::Tar(_))), "checksum must catch a changed name");
        assert!(matches!(tar_entries(&t[..t.len() - 512]), Err(VerifyError::Tar(_))), "one end block is not an end");
    }
}
