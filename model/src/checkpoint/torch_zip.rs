//! The zip container of `torch.save` files: records are stored uncompressed (PyTorch's writer), so a
//! small central-directory reader is enough (zip64 included, for checkpoints over 4 GiB).

use std::collections::HashMap;
use std::ops::Range;

/// Record name → byte range of its data inside the archive.
#[derive(Debug, Default)]
pub struct ZipRecords {
    records: HashMap<String, Range<usize>>,
}

fn u16_at(b: &[u8], o: usize) -> Option<u64> {
    b.get(o..o + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
}

fn u32_at(b: &[u8], o: usize) -> Option<u64> {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as u64)
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    b.get(o..o + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

impl ZipRecords {
    /// Parses the central directory of `bytes`; errors say what is malformed.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        const EOCD: &[u8] = b"PK\x05\x06";
        let search_from = bytes.len().saturating_sub(22 + 65535);
        let eocd = (search_from..bytes.len().saturating_sub(21))
            .rev()
            .find(|&i| &bytes[i..i + 4] == EOCD)
            .ok_or("no end-of-central-directory record (truncated or not a zip)")?;
        let short = || "truncated zip directory".to_string();
        let mut entries = u16_at(bytes, eocd + 10).ok_or_else(short)?;
        let mut cd_offset = u32_at(bytes, eocd + 16).ok_or_else(short)?;
        if entries == 0xFFFF || cd_offset == 0xFFFF_FFFF {
            // zip64: the locator sits just before the EOCD and points at the zip64 EOCD record.
            let loc = eocd.checked_sub(20).ok_or_else(short)?;
            if u32_at(bytes, loc) != Some(0x0706_4b50) {
                return Err("zip64 locator missing".into());
            }
            let z64 = u64_at(bytes, loc + 8).ok_or_else(short)? as usize;
            if u32_at(bytes, z64) != Some(0x0606_4b50) {
                return Err("zip64 end-of-central-directory missing".into());
            }
            entries = u64_at(bytes, z64 + 32).ok_or_else(short)?;
            cd_offset = u64_at(bytes, z64 + 48).ok_or_else(short)?;
        }
        let mut records = HashMap::new();
        let mut p = cd_offset as usize;
        for _ in 0..entries {
            if u32_at(bytes, p) != Some(0x0201_4b50) {
                return Err(format!("bad central directory entry at byte {p}"));
            }
            let method = u16_at(bytes, p + 10).ok_or_else(short)?;
            let mut size = u32_at(bytes, p + 20).ok_or_else(short)?;
            let name_len = u16_at(bytes, p + 28).ok_or_else(short)? as usize;
            let extra_len = u16_at(bytes, p + 30).ok_or_else(short)? as usize;
            let comment_len = u16_at(bytes, p + 32).ok_or_else(short)? as usize;
            let uncompressed = u32_at(bytes, p + 24).ok_or_else(short)?;
            let mut local = u32_at(bytes, p + 42).ok_or_else(short)?;
            let name = bytes.get(p + 46..p + 46 + name_len).ok_or_else(short)?;
            let name = String::from_utf8_lossy(name).into_owned();
            // zip64 extra field: the 0xFFFFFFFF fields, in order uncompressed, compressed, offset.
            let extra = bytes
                .get(p + 46 + name_len..p + 46 + name_len + extra_len)
                .ok_or_else(short)?;
            let mut e = 0;
            while e + 4 <= extra.len() {
                let id = u16_at(extra, e).unwrap_or(0);
                let len = u16_at(extra, e + 2).unwrap_or(0) as usize;
                if id == 1 {
                    let mut q = e + 4;
                    if uncompressed == 0xFFFF_FFFF {
                        q += 8;
                    }
                    if size == 0xFFFF_FFFF {
                        size = u64_at(extra, q).ok_or_else(short)?;
                        q += 8;
                    }
                    if local == 0xFFFF_FFFF {
                        local = u64_at(extra, q).ok_or_else(short)?;
                    }
                }
                e += 4 + len;
            }
            if method != 0 {
                return Err(format!("record {name} is compressed (method {method}); torch.save stores records uncompressed"));
            }
            let l = local as usize;
            if u32_at(bytes, l) != Some(0x0403_4b50) {
                return Err(format!("bad local header for {name}"));
            }
            let ln = u16_at(bytes, l + 26).ok_or_else(short)? as usize;
            let le = u16_at(bytes, l + 28).ok_or_else(short)? as usize;
            let start = l + 30 + ln + le;
            let end = start + size as usize;
            if end > bytes.len() {
                return Err(format!("record {name} extends past the end of the file"));
            }
            records.insert(name, start..end);
            p += 46 + name_len + extra_len + comment_len;
        }
        Ok(ZipRecords { records })
    }

    /// The byte range of the record whose name ends with `suffix` (torch prefixes an archive folder).
    pub fn find(&self, suffix: &str) -> Option<(&str, Range<usize>)> {
        self.records
            .iter()
            .filter(|(n, _)| n.ends_with(suffix))
            .min_by_key(|(n, _)| n.len())
            .map(|(n, r)| (n.as_str(), r.clone()))
    }

    /// The byte range of the record called exactly `name`.
    pub fn get(&self, name: &str) -> Option<Range<usize>> {
        self.records.get(name).cloned()
    }
}
