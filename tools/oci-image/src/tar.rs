//! A ustar archive of one regular file with fixed metadata (mtime 0, uid/gid 0, mode 0644, no user
//! names), so the bytes depend only on the file's name and content.

const BLOCK: usize = 512;

#[derive(Debug, PartialEq, Eq)]
pub enum TarError {
    NameTooLong(String),
}

impl std::fmt::Display for TarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TarError::NameTooLong(n) => write!(f, "tar entry name {n:?} is longer than 100 bytes"),
        }
    }
}

/// `name` with `data` as the archive's only entry, followed by the two zero blocks that end it.
pub fn single_file(name: &str, data: &[u8]) -> Result<Vec<u8>, TarError> {
    if name.len() > 100 {
        return Err(TarError::NameTooLong(name.to_string()));
    }
    let mut header = [0u8; BLOCK];
    header[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut header[100..108], 0o644);
    octal(&mut header[108..116], 0); // uid
    octal(&mut header[116..124], 0); // gid
    octal(&mut header[124..136], data.len() as u64);
    octal(&mut header[136..148], 0); // mtime
    header[156] = b'0'; // regular file
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces, then stored as 6 octal digits, NUL, space.
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..154].copy_from_slice(format!("{sum:06o}").as_bytes());
    header[154] = 0;
    header[155] = b' ';

    let padded = data.len().div_ceil(BLOCK) * BLOCK;
    let mut out = Vec::with_capacity(BLOCK + padded + 2 * BLOCK);
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(BLOCK + padded + 2 * BLOCK, 0);
    Ok(out)
}

/// Zero-padded octal digits filling the field but its last byte, which is NUL.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    assert!(s.len() == digits, "{value} does not fit a {digits}-digit tar field");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_header_data_padding_and_end_blocks() {
        let t = single_file("plugin.wasm", b"\0asm\x01\0\0\0").unwrap();
        assert_eq!(t.len(), 4 * BLOCK);
        assert_eq!(&t[..11], b"plugin.wasm");
        assert_eq!(&t[124..136], b"00000000010\0");
        assert_eq!(&t[BLOCK..BLOCK + 8], b"\0asm\x01\0\0\0");
        assert!(t[BLOCK + 8..].iter().all(|&b| b == 0));
        let stored = u32::from_str_radix(std::str::from_utf8(&t[148..154]).unwrap(), 8).unwrap();
        let mut h = t[..BLOCK].to_vec();
        h[148..156].fill(b' ');
        assert_eq!(stored, h.iter().map(|&b| u32::from(b)).sum::<u32>());
    }

    #[test]
    fn long_names_are_refused() {
        assert!(single_file(&"a".repeat(101), b"").is_err());
    }
}
