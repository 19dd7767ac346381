//! `oci-image build --wasm FILE --out DIR [--tag TAG]`: writes the image layout and verifies it.
//! `oci-image verify --dir DIR [--wasm FILE]`: verifies a layout (exit 1 with the reason).

use oci_image::{layout, verify, DEFAULT_TAG, IMAGE_NAME};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: oci-image build --wasm FILE --out DIR [--tag TAG]\n       oci-image verify --dir DIR [--wasm FILE]";

struct Args {
    command: String,
    wasm: Option<PathBuf>,
    out: Option<PathBuf>,
    tag: String,
}

fn args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let command = it.next().ok_or("missing command")?;
    let mut a = Args { command, wasm: None, out: None, tag: DEFAULT_TAG.to_string() };
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--wasm" => a.wasm = Some(value.into()),
            "--out" | "--dir" => a.out = Some(value.into()),
            "--tag" => a.tag = value,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn read_wasm(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e} (run `make wasm`)", path.display()))
}

fn run(a: Args) -> Result<(), String> {
    let dir = a.out.clone().ok_or("--out/--dir is required")?;
    match a.command.as_str() {
        "build" => {
            let wasm_path = a.wasm.ok_or("--wasm is required")?;
            let wasm = read_wasm(&wasm_path)?;
            let image = layout::build(&wasm, &a.tag).map_err(|e| e.to_string())?;
            layout::write(&image, &dir).map_err(|e| e.to_string())?;
            let v = verify::verify(&dir, Some(&wasm)).map_err(|e| format!("the written layout does not verify: {e}"))?;
            let d = dir.display();
            println!("OCI image layout {d} (Wasm compat variant, plugin.wasm = {}, {} bytes)", wasm_path.display(), wasm.len());
            println!("  tag {}  manifest {}", v.tag, v.manifest_digest);
            println!("push it with one of (REGISTRY = your registry host/path):");
            println!("  skopeo copy oci:{d}:{t} docker://REGISTRY/{IMAGE_NAME}:{t}", t = v.tag);
            println!("  oras cp --from-oci-layout {d}:{t} REGISTRY/{IMAGE_NAME}:{t}", t = v.tag);
            println!("  crane push {d} REGISTRY/{IMAGE_NAME}:{t}", t = v.tag);
            println!(
                "then use oci://REGISTRY/{IMAGE_NAME}:{t} (pin with sha256: {})",
                v.manifest_digest.trim_start_matches("sha256:"),
                t = v.tag
            );
            Ok(())
        }
        "verify" => {
            let wasm = a.wasm.as_ref().map(read_wasm).transpose()?;
            let v = verify::verify(&dir, wasm.as_deref()).map_err(|e| e.to_string())?;
            println!("{}: ok (tag {}, manifest {}, plugin.wasm {} bytes)", dir.display(), v.tag, v.manifest_digest, v.plugin.len());
            Ok(())
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

fn main() -> ExitCode {
    match args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oci-image: {e}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}
