//! Kernel choices timed once per adapter and model shape (`crate::model::tuning`), kept on
//! disk so that the next load of that shape on that adapter skips the timing.
//!
//! One text file, `tuning.txt`, in the pipeline cache's directory (`RWKV_GPU_CACHE_DIR`,
//! else `$XDG_CACHE_HOME/rwkv-gpu`, else `~/.cache/rwkv-gpu`; `off` turns it off): a
//! header line, then one `key<TAB>choice` line per adapter and shape. The key names the
//! adapter, backend, driver, driver version, wgpu version and shape, so that a driver
//! update times again. A file that is not one of ours, or a line that does not parse, is
//! ignored with a warning (never an error): the choice is timed again and the file
//! rewritten with the lines that did parse. Written atomically.

use std::path::PathBuf;

use super::context::AdapterSummary;
use super::pipeline_cache::cache_directory;
use super::variants::{
    MatvecLanes, MatvecShape, Nf4Lookup, Reduction, MATVEC_DEPTHS, MATVEC_ROWS, SPLIT_PARTS,
};
use crate::error::Saving;

const HEADER: &str = "rwkv-gpu kernel choices 1";
const FILE: &str = "tuning.txt";
/// A file bigger than this is not one of ours.
const MAX_BYTES: u64 = 1 << 20;
/// The wgpu the kernels are compiled through (Cargo.toml pins it; a test checks).
pub const WGPU_VERSION: &str = "30.0.1";

/// What the timing chose: the variants whose speed differs by device and whose results
/// do not beyond float rounding (`crate::model::tuning`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Choice {
    pub nf4_lookup: Nf4Lookup,
    /// Parts of the split decode value projection (1: not split).
    pub split_k: usize,
    pub matvec: MatvecShape,
}

/// What lines of versions before the matvec shape was tuned stand for (their keys,
/// which named fewer candidates, match no key of this one: they are kept, never used).
const OLD_MATVEC: MatvecShape =
    MatvecShape { lanes: MatvecLanes::Wide, rows: 8, depth: 1, reduction: Reduction::Subgroup };

impl Choice {
    /// "nf4=table split=2 lanes=wide rows=8 reduce=subgroup depth=1"
    pub fn to_text(self) -> String {
        format!("nf4={} split={} {}", self.nf4_lookup.name(), self.split_k, self.matvec.to_text())
    }

    /// The fields in `to_text`'s order; the older texts ("nf4=table", "nf4=table
    /// split=2", and the matvec shape without "depth", which was 1) parse too.
    fn parse(text: &str) -> Option<Choice> {
        let fields: Vec<&str> = text.split(' ').collect();
        if ![1, 2, 5, 6].contains(&fields.len()) {
            return None;
        }
        let value = |i: usize, name: &str| -> Option<Option<&str>> {
            match fields.get(i) {
                None => Some(None),
                Some(f) => Some(Some(f.strip_prefix(name)?.strip_prefix('=')?)),
            }
        };
        // Digits only: "+2" parses as a number.
        let number = |text: &str| -> Option<u32> {
            text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten()
        };
        let nf4_lookup = Nf4Lookup::parse(value(0, "nf4")??)?;
        let split_k = match value(1, "split")? {
            Some(parts) => number(parts)? as usize,
            None => 1,
        };
        let depth = match value(5, "depth")? {
            Some(depth) => number(depth).filter(|d| MATVEC_DEPTHS.contains(d))?,
            None => 1,
        };
        let matvec = match (value(2, "lanes")?, value(3, "rows")?, value(4, "reduce")?) {
            (Some(lanes), Some(rows), Some(reduce)) => MatvecShape {
                lanes: MatvecLanes::parse(lanes)?,
                rows: number(rows).filter(|r| MATVEC_ROWS.contains(r))?,
                depth,
                reduction: Reduction::parse(reduce)?,
            },
            _ => OLD_MATVEC,
        };
        SPLIT_PARTS.contains(&split_k).then_some(Choice { nf4_lookup, split_k, matvec })
    }
}

/// The cache key of a model shape on an adapter; tabs and line breaks in driver strings
/// become spaces, so a key is always one field of one line.
pub fn key(adapter: &AdapterSummary, shape: &str) -> String {
    let fields = [
        adapter.name.as_str(),
        adapter.backend.as_str(),
        adapter.driver.as_str(),
        adapter.driver_info.as_str(),
        WGPU_VERSION,
        shape,
    ];
    fields.map(|f| f.replace(['\t', '\n', '\r'], " ")).join(" | ")
}

pub struct TuningCache {
    path: PathBuf,
}

/// What a lookup found: the choice for the key, the lines that parsed (kept when the file
/// is rewritten) and a warning when part of the file was not ours.
pub struct Found {
    pub choice: Option<Choice>,
    entries: Vec<(String, Choice)>,
    pub warning: Option<String>,
}

impl TuningCache {
    /// The cache file, or None where caching is off or no home is known.
    pub fn open() -> Option<TuningCache> {
        Some(TuningCache { path: cache_directory()?.join(FILE) })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn lookup(&self, key: &str) -> Found {
        let mut found = Found { choice: None, entries: Vec::new(), warning: None };
        let Ok(meta) = std::fs::metadata(&self.path) else { return found };
        let not_ours =
            |why: &str| Some(format!("ignored the kernel choices in {}: {why}", self.path.display()));
        if !meta.is_file() {
            found.warning = not_ours("not a regular file"); // a FIFO would block the read
            return found;
        }
        if meta.len() > MAX_BYTES {
            found.warning = not_ours("larger than any this library writes");
            return found;
        }
        let text = match std::fs::read(&self.path).map(String::from_utf8) {
            Ok(Ok(text)) => text,
            Ok(Err(_)) => {
                found.warning = not_ours("not UTF-8 text");
                return found;
            }
            Err(_) => return found,
        };
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            found.warning = not_ours("no header this library writes");
            return found;
        }
        for (i, line) in lines.enumerate() {
            match line.split_once('\t').and_then(|(k, c)| Some((k, Choice::parse(c)?))) {
                Some((k, choice)) => {
                    if k == key {
                        found.choice = Some(choice);
                    }
                    found.entries.push((k.to_string(), choice));
                }
                None if found.warning.is_none() => {
                    found.warning = not_ours(&format!("line {} does not parse", i + 2))
                }
                None => {}
            }
        }
        found
    }

    /// Writes `choice` for `key` beside the other entries `found` kept. A cache that
    /// cannot be written is not an error: the next load times again.
    pub fn store(&self, found: Found, key: &str, choice: Choice) {
        let mut text = format!("{HEADER}\n");
        for (k, c) in found.entries.iter().filter(|(k, _)| k != key) {
            text += &format!("{k}\t{}\n", c.to_text());
        }
        text += &format!("{key}\t{}\n", choice.to_text());
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = crate::atomic_file::write_own(&self.path, Saving::Cache, |out| {
            out.write_all(text.as_bytes())
                .map_err(|e| crate::atomic_file::write_error(&self.path, Saving::Cache, e))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wgpu_version_is_the_pinned_one() {
        let manifest = include_str!("../../Cargo.toml");
        assert!(
            manifest.contains(&format!("wgpu = {{ version = \"={WGPU_VERSION}\"")),
            "update WGPU_VERSION"
        );
    }

    #[test]
    fn choices_round_trip_and_refuse_strangers() {
        for nf4_lookup in [Nf4Lookup::Table, Nf4Lookup::Select] {
            for split_k in SPLIT_PARTS {
                for lanes in [MatvecLanes::Wide, MatvecLanes::Narrow, MatvecLanes::Widest] {
                    for rows in MATVEC_ROWS {
                        for depth in MATVEC_DEPTHS {
                            for reduction in [Reduction::Subgroup, Reduction::Tree] {
                                let c = Choice {
                                    nf4_lookup,
                                    split_k,
                                    matvec: MatvecShape { lanes, rows, depth, reduction },
                                };
                                assert_eq!(Choice::parse(&c.to_text()), Some(c));
                            }
                        }
                    }
                }
            }
        }
        let full = "nf4=table split=2 lanes=wide rows=8 reduce=tree depth=2";
        assert_eq!(Choice::parse(full).map(|c| c.matvec.depth), Some(2));
        // Written before the depth was a choice: the one depth there was.
        let before_depth = Choice::parse("nf4=table split=2 lanes=widest rows=4 reduce=tree");
        let matvec =
            MatvecShape { lanes: MatvecLanes::Widest, rows: 4, depth: 1, reduction: Reduction::Tree };
        assert_eq!(before_depth.map(|c| c.matvec), Some(matvec));
        for bad in [
            "",
            "nf4=",
            "nf4=fast",
            "lookup=table",
            "nf4=table extra",
            "nf4=table split=3",
            "nf4=table split=+2",
            "nf4=table split=2 more",
            "split=2 nf4=table",
            "nf4=table split=2 lanes=wide rows=8",
            "nf4=table split=2 lanes=wide rows=6 reduce=tree",
            "nf4=table split=2 lanes=wide rows=+8 reduce=tree",
            "nf4=table split=2 lanes=many rows=8 reduce=tree",
            "nf4=table split=2 lanes=wide rows=8 reduce=sum",
            "nf4=table split=2 rows=8 lanes=wide reduce=tree",
            "nf4=table split=2 lanes=wide rows=8 reduce=tree more",
            "nf4=table split=2 lanes=wide rows=8 reduce=tree depth=3",
            "nf4=table split=2 lanes=wide rows=8 reduce=tree depth=",
            "nf4=table split=2 lanes=wide rows=8 reduce=tree depth=+2",
            "nf4=table split=2 lanes=wide rows=8 depth=2 reduce=tree",
            "nf4=table split=2 lanes=wide rows=8 reduce=tree depth=2 more",
            "nf4=table split=2 lanes=wide rows=8  reduce=tree",
        ] {
            assert_eq!(Choice::parse(bad), None, "{bad:?}");
        }
        let old = Choice::parse("nf4=select");
        assert_eq!(old, Some(Choice { nf4_lookup: Nf4Lookup::Select, split_k: 1, matvec: OLD_MATVEC }));
        let old = Choice::parse("nf4=table split=4");
        assert_eq!(old, Some(Choice { nf4_lookup: Nf4Lookup::Table, split_k: 4, matvec: OLD_MATVEC }));
    }
}
