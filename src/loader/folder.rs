//! Hugging Face model folders: `config.json` beside `model.safetensors`, or beside
//! shards `model-0000N-of-0000M.safetensors` listed in `model.safetensors.index.json`
//! (its `weight_map`: tensor name -> shard file). The shards are read as one checkpoint.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::safetensors_file::SafetensorsFile;
use super::{Checkpoint, TensorInfo};
use crate::error::{Error, Result};

/// JSON side files are small; a bigger one is refused before it is read.
const MAX_JSON_BYTES: u64 = 64 << 20;

pub const INDEX: &str = "model.safetensors.index.json";
pub const SINGLE: &str = "model.safetensors";

pub fn open(dir: &Path) -> Result<Box<dyn Checkpoint>> {
    // `exists`, not `is_file`: a FIFO or folder by these names is then refused by the
    // reader as "not a regular file", naming it, instead of looking absent.
    let index = dir.join(INDEX);
    if index.exists() {
        return Ok(Box::new(Sharded::open(dir, &index)?));
    }
    let single = dir.join(SINGLE);
    if single.exists() {
        return super::open_file(&single);
    }
    Err(Error::load(
        dir,
        format!("a folder, but not a Hugging Face model folder: it holds neither {SINGLE} nor {INDEX}"),
    ))
}

/// Reads a small JSON file, refusing one too big to be what it claims.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = super::bytes::read_small(path, MAX_JSON_BYTES, "a JSON side file")?;
    serde_json::from_slice(&text).map_err(|e| Error::load(path, format!("not valid JSON: {e}")))
}

/// The `config.json` of a Hugging Face checkpoint at `path` (a folder, or a file inside
/// one), if there is one.
pub fn config_json_for(path: &Path) -> Result<Option<(PathBuf, serde_json::Value)>> {
    let dir = if path.is_dir() { Some(path) } else { path.parent() };
    let Some(file) = dir.map(|d| d.join("config.json")).filter(|f| f.exists()) else { return Ok(None) };
    let value = read_json(&file)?;
    Ok(Some((file, value)))
}

/// Several safetensors files read as one checkpoint.
struct Sharded {
    path: PathBuf,
    shards: Vec<SafetensorsFile>,
    /// name -> shard index, and the names in index order.
    index: HashMap<String, usize>,
    names: Vec<String>,
}

impl Sharded {
    fn open(dir: &Path, index_path: &Path) -> Result<Sharded> {
        let json = read_json(index_path)?;
        let bad = |m: String| Error::load(index_path, m);
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
        let mut files: Vec<String> = Vec::new();
        let mut shard_of_file: HashMap<&str, usize> = HashMap::new();
        let mut wanted: Vec<(String, usize)> = Vec::new();
        for (name, file) in map {
            let file =
                file.as_str().ok_or_else(|| bad(format!("weight_map[{name:?}] is not a file name")))?;
            // A shard is a file in this folder: no paths (nor a Windows drive, `C:name`), so
            // an index cannot point elsewhere.
            if file.is_empty() || file.contains(['/', '\\', ':']) || file == "." || file == ".." {
                return Err(bad(format!(
                    "weight_map[{name:?}] = {file:?} is not a file name in the model folder"
                )));
            }
            let shard = *shard_of_file.entry(file).or_insert_with(|| {
                files.push(file.to_string());
                files.len() - 1
            });
            wanted.push((name.clone(), shard));
        }
        let shards = files.iter().map(|f| SafetensorsFile::open(&dir.join(f))).collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (name, shard) in &wanted {
            if shards[*shard].info(name).is_none() {
                return Err(bad(format!("{name} is listed in {}, which does not hold it", files[*shard])));
            }
            index.insert(name.clone(), *shard);
        }
        for (i, (shard, file)) in shards.iter().zip(&files).enumerate() {
            if let Some(extra) = shard.names().into_iter().find(|n| index.get(n) != Some(&i)) {
                return Err(bad(format!("{file} holds {extra}, which the index does not list there")));
            }
        }
        let mut names: Vec<String> = Vec::with_capacity(wanted.len());
        for shard in &shards {
            names.extend(shard.names());
        }
        Ok(Sharded { path: dir.to_path_buf(), shards, index, names })
    }
}

impl Checkpoint for Sharded {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.index.get(name).and_then(|&i| self.shards[i].info(name))
    }
    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| Error::load(&self.path, format!("missing tensor {name:?}")))?;
        self.shards[i].read(name)
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn metadata(&self, key: &str) -> Option<String> {
        self.shards.first().and_then(|s| s.metadata(key))
    }
}
