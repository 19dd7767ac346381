//! `make oci` on the real filter.wasm (`make wasm` first; OCI_WASM names it, `make test-oci` sets
//! it). The layout the binary writes is checked here without the crate's own reader: JSON as
//! untyped values, digests with sha2, the layer with flate2's decoder and Python's tarfile (a
//! second tar implementation), media types as literals. Corrupting any blob must make both this
//! check and `oci-image verify` fail.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_oci-image");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn wasm_path() -> PathBuf {
    let p = std::env::var_os("OCI_WASM").map(PathBuf::from).unwrap_or_else(|| repo().join("target/wasm32-wasip1/release/filter.wasm"));
    assert!(p.is_file(), "{} is missing: run `make wasm` (or `make test-oci`)", p.display());
    p
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("oci-image-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn build(wasm: &Path, out: &Path, tag: Option<&str>) -> String {
    let mut args = vec!["build", "--wasm", wasm.to_str().unwrap(), "--out", out.to_str().unwrap()];
    if let Some(t) = tag {
        args.extend(["--tag", t]);
    }
    let o = run(&args);
    assert!(o.status.success(), "oci-image build: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn verify_cli(dir: &Path, wasm: &Path) -> Result<(), String> {
    let o = run(&["verify", "--dir", dir.to_str().unwrap(), "--wasm", wasm.to_str().unwrap()]);
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn json(bytes: &[u8], what: &str) -> Result<Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("{what}: {e}"))
}

/// The blob a descriptor names, if its size and sha256 match.
fn blob(dir: &Path, desc: &Value, what: &str) -> Result<Vec<u8>, String> {
    let digest = desc["digest"].as_str().ok_or(format!("{what}: no digest"))?;
    let hex = digest.strip_prefix("sha256:").ok_or(format!("{what}: {digest} is not sha256"))?;
    let bytes = std::fs::read(dir.join("blobs/sha256").join(hex)).map_err(|e| format!("{what}: {e}"))?;
    if desc["size"].as_u64() != Some(bytes.len() as u64) {
        return Err(format!("{what}: size {} != descriptor {}", bytes.len(), desc["size"]));
    }
    if sha256(&bytes) != hex {
        return Err(format!("{what}: sha256 {} != digest {hex}", sha256(&bytes)));
    }
    Ok(bytes)
}

fn field(v: &Value, ptr: &str, want: &str, what: &str) -> Result<(), String> {
    match v.pointer(ptr).and_then(Value::as_str) {
        Some(s) if s == want => Ok(()),
        other => Err(format!("{what}{ptr} is {other:?}, expected {want:?}")),
    }
}

/// The tar's members as Python's tarfile sees them, and plugin.wasm's bytes.
fn python_tar(tar: &[u8]) -> Result<(Vec<String>, Vec<u8>), String> {
    let dir = TempDir::new(&format!("py-{}", sha256(tar)));
    let path = dir.0.join("layer.tar");
    std::fs::write(&path, tar).unwrap();
    let script = "import sys,tarfile\n\
        t=tarfile.open(sys.argv[1],'r:')\n\
        ms=t.getmembers()\n\
        print(' '.join(m.name+(':file' if m.isreg() else ':other') for m in ms),file=sys.stderr)\n\
        f=[m for m in ms if m.name=='plugin.wasm' and m.isreg()]\n\
        sys.stdout.buffer.write(t.extractfile(f[0]).read() if f else b'')";
    let o = Command::new("python3").arg("-c").arg(script).arg(&path).output().map_err(|e| format!("python3: {e}"))?;
    if !o.status.success() {
        return Err(format!("python tarfile: {}", String::from_utf8_lossy(&o.stderr)));
    }
    let members = String::from_utf8_lossy(&o.stderr).split_whitespace().map(str::to_string).collect();
    Ok((members, o.stdout))
}

/// Everything Istio's agent and a registry tool rely on, checked from the files alone. Returns the
/// manifest digest and the tag.
fn check(dir: &Path, wasm: &[u8]) -> Result<(String, String), String> {
    let layout = json(&std::fs::read(dir.join("oci-layout")).map_err(|e| e.to_string())?, "oci-layout")?;
    field(&layout, "/imageLayoutVersion", "1.0.0", "oci-layout")?;
    let index = json(&std::fs::read(dir.join("index.json")).map_err(|e| e.to_string())?, "index.json")?;
    let manifests = index["manifests"].as_array().ok_or("index.json: no manifests")?;
    if manifests.len() != 1 {
        return Err(format!("index.json lists {} manifests", manifests.len()));
    }
    let mdesc = &manifests[0];
    field(mdesc, "/mediaType", "application/vnd.oci.image.manifest.v1+json", "index.json manifests[0]")?;
    let tag = mdesc.pointer("/annotations/org.opencontainers.image.ref.name").and_then(Value::as_str).ok_or("no ref.name")?.to_string();

    let manifest = json(&blob(dir, mdesc, "manifest")?, "manifest")?;
    if manifest["schemaVersion"] != 2 {
        return Err("manifest schemaVersion".into());
    }
    field(&manifest, "/mediaType", "application/vnd.oci.image.manifest.v1+json", "manifest")?;
    field(&manifest, "/config/mediaType", "application/vnd.oci.image.config.v1+json", "manifest")?;
    field(&manifest, "/annotations/module.wasm.image~1variant", "compat", "manifest")?;
    let layers = manifest["layers"].as_array().ok_or("manifest: no layers")?;
    if layers.len() != 1 {
        return Err(format!("manifest has {} layers", layers.len()));
    }
    field(&layers[0], "/mediaType", "application/vnd.oci.image.layer.v1.tar+gzip", "layer")?;

    let config = json(&blob(dir, &manifest["config"], "config")?, "config")?;
    let layer = blob(dir, &layers[0], "layer")?;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&layer[..]).read_to_end(&mut tar).map_err(|e| format!("layer is not gzip: {e}"))?;
    field(&config, "/rootfs/type", "layers", "config")?;
    if config["rootfs"]["diff_ids"] != serde_json::json!([format!("sha256:{}", sha256(&tar))]) {
        return Err(format!("config diff_ids {} != sha256 of the uncompressed layer", config["rootfs"]["diff_ids"]));
    }
    let (members, plugin) = python_tar(&tar)?;
    if members != ["plugin.wasm:file"] {
        return Err(format!("layer tar members {members:?}"));
    }
    if plugin != wasm {
        return Err(format!("plugin.wasm ({} bytes) != filter.wasm ({} bytes)", plugin.len(), wasm.len()));
    }
    Ok((mdesc["digest"].as_str().unwrap().to_string(), tag))
}

#[test]
fn image_of_the_real_filter_wasm_holds_it_byte_for_byte() {
    let wasm_path = wasm_path();
    let wasm = std::fs::read(&wasm_path).unwrap();
    let dir = TempDir::new("real");
    let out = dir.0.join("oci");
    let printed = build(&wasm_path, &out, None);
    let (digest, tag) = check(&out, &wasm).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tag, oci_image::DEFAULT_TAG);
    verify_cli(&out, &wasm_path).unwrap();
    // The push commands `make oci` prints name the layout's tag and the documented image name.
    let o = out.display();
    for line in [
        format!("skopeo copy oci:{o}:{tag} docker://REGISTRY/auto-ai-router:{tag}"),
        format!("oras cp --from-oci-layout {o}:{tag} REGISTRY/auto-ai-router:{tag}"),
        format!("crane push {o} REGISTRY/auto-ai-router:{tag}"),
    ] {
        assert!(printed.contains(&line), "missing {line:?} in:\n{printed}");
    }
    assert!(printed.contains(&digest), "the manifest digest to pin is printed");
}

#[test]
fn same_wasm_gives_the_same_digests_and_the_tag_only_changes_the_index() {
    let wasm_path = wasm_path();
    let (a, b, c) = (TempDir::new("repro-a"), TempDir::new("repro-b"), TempDir::new("repro-c"));
    build(&wasm_path, &a.0.join("oci"), None);
    build(&wasm_path, &b.0.join("oci"), None);
    build(&wasm_path, &c.0.join("oci"), Some("other-tag"));
    let files = |d: &Path| {
        let mut v: Vec<(String, Vec<u8>)> =
            ["oci-layout", "index.json"].iter().map(|f| (f.to_string(), std::fs::read(d.join(f)).unwrap())).collect();
        let mut blobs: Vec<_> = std::fs::read_dir(d.join("blobs/sha256")).unwrap().map(|e| e.unwrap().path()).collect();
        blobs.sort();
        v.extend(blobs.iter().map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(p).unwrap())));
        v
    };
    let (fa, fb, fc) = (files(&a.0.join("oci")), files(&b.0.join("oci")), files(&c.0.join("oci")));
    assert_eq!(fa.len(), 5, "oci-layout, index.json and three blobs");
    assert!(fa == fb, "two builds of the same filter.wasm differ");
    assert_ne!(fa[1], fc[1], "the index names the tag");
    assert!(fa[2..] == fc[2..], "blobs (so the manifest digest) do not depend on the tag");
}

/// A copy of the layout at `src`, to damage.
fn copy_layout(src: &Path, name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let out = dir.0.join("oci");
    std::fs::create_dir_all(out.join("blobs/sha256")).unwrap();
    for f in ["oci-layout", "index.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    for e in std::fs::read_dir(src.join("blobs/sha256")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, out.join("blobs/sha256").join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn edit_blob(layout: &Path, digest: &str, edit: impl Fn(&mut Vec<u8>)) {
    let p = layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let mut b = std::fs::read(&p).unwrap();
    edit(&mut b);
    std::fs::write(&p, b).unwrap();
}

#[test]
fn a_corrupt_or_foreign_blob_fails_verification() {
    let wasm_path = wasm_path();
    let wasm = std::fs::read(&wasm_path).unwrap();
    let good = TempDir::new("good");
    let src = good.0.join("oci");
    build(&wasm_path, &src, None);
    let index: Value = serde_json::from_slice(&std::fs::read(src.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(src.join("blobs/sha256").join(mdigest.trim_start_matches("sha256:"))).unwrap()).unwrap();
    let targets = [
        ("manifest", mdigest.clone()),
        ("config", manifest["config"]["digest"].as_str().unwrap().to_string()),
        ("layer", manifest["layers"][0]["digest"].as_str().unwrap().to_string()),
    ];
    for (what, digest) in &targets {
        // One flipped bit in the middle of the blob: same size, different hash.
        let flipped = copy_layout(&src, &format!("flip-{what}"));
        let out = flipped.0.join("oci");
        edit_blob(&out, digest, |b| {
            let mid = b.len() / 2;
            b[mid] ^= 0x01;
        });
        let err = verify_cli(&out, &wasm_path).expect_err(&format!("a flipped bit in the {what} blob verified"));
        assert!(err.contains(what) && err.contains("corrupt"), "{what}: {err}");
        assert!(check(&out, &wasm).is_err(), "the independent check missed a flipped bit in the {what} blob");

        let truncated = copy_layout(&src, &format!("cut-{what}"));
        let out = truncated.0.join("oci");
        edit_blob(&out, digest, |b| b.truncate(b.len() - 1));
        let err = verify_cli(&out, &wasm_path).expect_err(&format!("a truncated {what} blob verified"));
        assert!(err.contains(what) && err.contains("truncated"), "{what}: {err}");
        assert!(check(&out, &wasm).is_err());
    }

    // Sound digests, but not the module we shipped: verification against filter.wasm fails.
    let other = TempDir::new("other-wasm");
    let mut changed = wasm.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0xff;
    let changed_path = other.0.join("changed.wasm");
    std::fs::write(&changed_path, &changed).unwrap();
    build(&changed_path, &other.0.join("oci"), None);
    let err = verify_cli(&other.0.join("oci"), &wasm_path).expect_err("a layout of another module verified against filter.wasm");
    assert!(err.contains("differs"), "{err}");
    assert!(check(&other.0.join("oci"), &wasm).is_err());

    // A stray blob (a leftover of an older build) is reported.
    let stray = copy_layout(&src, "stray");
    std::fs::write(stray.0.join("oci/blobs/sha256").join("0".repeat(64)), b"old").unwrap();
    let err = verify_cli(&stray.0.join("oci"), &wasm_path).expect_err("a stray blob verified");
    assert!(err.contains("not referenced"), "{err}");

    // The untouched layout still passes both.
    check(&src, &wasm).unwrap();
    verify_cli(&src, &wasm_path).unwrap();
}

#[test]
fn the_istio_manifest_pulls_the_image_make_oci_documents() {
    let text = std::fs::read_to_string(repo().join("envoy/istio/oci/envoyfilter.yaml")).unwrap();
    let url = format!("oci://registry.example.com/{}:{}", oci_image::IMAGE_NAME, oci_image::DEFAULT_TAG);
    assert!(text.contains(&format!("uri: {url}")), "envoy/istio/oci/envoyfilter.yaml does not pull {url}");
    let readme = std::fs::read_to_string(repo().join("envoy/README.md")).unwrap();
    assert!(
        readme.contains(&format!("skopeo copy oci:target/oci:{t} docker://", t = oci_image::DEFAULT_TAG)),
        "envoy/README.md push command"
    );
}

#[test]
fn build_refuses_to_overwrite_a_directory_that_is_not_a_layout() {
    let dir = TempDir::new("not-layout");
    std::fs::write(dir.0.join("precious.txt"), b"keep me").unwrap();
    let o = run(&["build", "--wasm", wasm_path().to_str().unwrap(), "--out", dir.0.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(dir.0.join("precious.txt")).unwrap(), b"keep me");
}
