//! Zip: just enough of the format to find stored entries, zip64 included.

use std::collections::HashMap;
use std::ops::Range;

use super::Msg;

pub(super) const EOCD: u32 = 0x0605_4b50;
pub(super) const ZIP64_LOCATOR: u32 = 0x0706_4b50;
pub(super) const ZIP64_EOCD: u32 = 0x0606_4b50;
pub(super) const CENTRAL: u32 = 0x0201_4b50;
pub(super) const LOCAL: u32 = 0x0403_4b50;

/// Little-endian field of `N` bytes at `at`, or an error if it runs past the end.
fn le<const N: usize>(b: &[u8], at: u64) -> Msg<u64> {
    let bytes = usize::try_from(at)
        .ok()
        .and_then(|at| b.get(at..at.checked_add(N)?))
        .ok_or_else(|| format!("truncated or corrupt zip archive (field at byte {at} is past the end)"))?;
    Ok(bytes.iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
}

struct Entry {
    method: u64,
    flags: u64,
    compressed: u64,
    size: u64,
    header: u64,
}

pub(super) struct Zip {
    entries: HashMap<String, Entry>,
}

impl Zip {
    pub(super) fn parse(b: &[u8]) -> Msg<Zip> {
        // The end-of-central-directory record is 22 bytes plus a comment of up to 64 KiB.
        let last = b.len().checked_sub(22).ok_or("file too short to be a zip archive")?;
        let eocd = (last.saturating_sub(0xFFFF)..=last)
            .rev()
            .find(|&i| {
                le::<4>(b, i as u64) == Ok(u64::from(EOCD))
                    && le::<2>(b, i as u64 + 20).is_ok_and(|c| i as u64 + 22 + c <= b.len() as u64)
            })
            .ok_or("not a zip archive (no end-of-central-directory record): truncated or not a .pth")?
            as u64;
        let (mut count, mut cd_offset) = (le::<2>(b, eocd + 10)?, le::<4>(b, eocd + 16)?);
        // torch always writes the zip64 records; they are mandatory past 4 GiB or 65535 entries.
        if eocd >= 20 && le::<4>(b, eocd - 20)? == u64::from(ZIP64_LOCATOR) {
            let rec = le::<8>(b, eocd - 12)?;
            if le::<4>(b, rec)? != u64::from(ZIP64_EOCD) {
                return Err("corrupt zip64 end-of-central-directory record".into());
            }
            (count, cd_offset) = (le::<8>(b, rec + 32)?, le::<8>(b, rec + 48)?);
        } else if count == 0xFFFF || cd_offset == 0xFFFF_FFFF {
            return Err("zip64 archive without its zip64 locator: truncated or corrupt".into());
        }

        // No capacity from `count`: it is untrusted. Each entry is at least 46 bytes, so a
        // bogus count fails on the first read past the end.
        let mut entries = HashMap::new();
        let mut at = cd_offset;
        for _ in 0..count {
            if le::<4>(b, at)? != u64::from(CENTRAL) {
                return Err(format!("corrupt zip central directory at byte {at}"));
            }
            let (name_len, extra_len, comment_len) =
                (le::<2>(b, at + 28)?, le::<2>(b, at + 30)?, le::<2>(b, at + 32)?);
            let name_at = at + 46;
            let name = b
                .get(name_at as usize..(name_at + name_len) as usize)
                .ok_or("truncated zip central directory")?;
            let mut e = Entry {
                method: le::<2>(b, at + 10)?,
                flags: le::<2>(b, at + 8)?,
                compressed: le::<4>(b, at + 20)?,
                size: le::<4>(b, at + 24)?,
                header: le::<4>(b, at + 42)?,
            };
            read_zip64_extra(b, name_at + name_len, extra_len, &mut e)?;
            entries.insert(String::from_utf8_lossy(name).into_owned(), e);
            at = name_at + name_len + extra_len + comment_len;
        }
        Ok(Zip { entries })
    }

    /// The top folder holding `data.pkl`: "archive/" by default, but torch names it after
    /// the file it saved to, so it can be anything.
    pub(super) fn prefix(&self) -> Msg<String> {
        let mut found = self
            .entries
            .keys()
            .filter_map(|n| n.strip_suffix("data.pkl"))
            .filter(|p| p.ends_with('/') && p.matches('/').count() == 1);
        match (found.next(), found.next()) {
            (Some(p), None) => Ok(p.to_string()),
            (None, _) => Err("zip archive without `<folder>/data.pkl`: not a PyTorch checkpoint".into()),
            (Some(_), Some(_)) => Err("zip archive holds several `<folder>/data.pkl`".into()),
        }
    }

    /// Where the bytes of entry `name` lie, if it exists: after its local header, whose
    /// name and extra field (torch pads it to align the data) may differ from the central copy.
    pub(super) fn find(&self, b: &[u8], name: &str) -> Msg<Option<Range<usize>>> {
        let Some(e) = self.entries.get(name) else { return Ok(None) };
        if e.method != 0 {
            return Err(format!(
                "zip entry `{name}` is compressed (method {}); only stored entries are supported (torch.save stores)",
                e.method
            ));
        }
        if e.flags & 1 != 0 {
            return Err(format!("zip entry `{name}` is encrypted"));
        }
        if e.compressed != e.size {
            return Err(format!("corrupt zip entry `{name}`: stored sizes disagree"));
        }
        if le::<4>(b, e.header)? != u64::from(LOCAL) {
            return Err(format!("corrupt zip local header for `{name}` at byte {}", e.header));
        }
        let start = e.header + 30 + le::<2>(b, e.header + 26)? + le::<2>(b, e.header + 28)?;
        match start.checked_add(e.size).filter(|&end| end <= b.len() as u64) {
            Some(end) => Ok(Some(start as usize..end as usize)),
            None => Err(format!("zip entry `{name}` runs past the end of the file: truncated")),
        }
    }
}

/// Fields saturated at 0xFFFFFFFF in the central directory are stored, in this order,
/// in the zip64 extra field (id 1).
fn read_zip64_extra(b: &[u8], mut at: u64, len: u64, e: &mut Entry) -> Msg<()> {
    let end = at + len;
    while at + 4 <= end {
        let (id, size) = (le::<2>(b, at)?, le::<2>(b, at + 2)?);
        if id == 1 {
            let mut field = at + 4;
            for value in [&mut e.size, &mut e.compressed, &mut e.header] {
                if *value == 0xFFFF_FFFF {
                    if field + 8 > at + 4 + size {
                        return Err("corrupt zip64 extra field".into());
                    }
                    *value = le::<8>(b, field)?;
                    field += 8;
                }
            }
        }
        at += 4 + size;
    }
    Ok(())
}
