//! flash-linear-attention's Hugging Face layout (`RWKV7ForCausalLM`, the fla-hub models)
//! presented under the official names, so that the schema and the loader see one layout.
//! The name of each tensor in fla's layout is in the schema (`schema::ENTRIES`); here:
//!
//! - [1, 1, C] vectors that fla stores as [C] are presented as [1, 1, C] (same bytes);
//! - the low-rank matrices stay as fla stores them, [out, in] (`low_rank_out_in`);
//! - the older layout's fused `attn.x_x` [6, C] is presented as the six mixes, one row each;
//! - tensors with no official name keep their own, so that the schema reports them.
//!
//! A `config.json` beside the weights states the dimensions; they are cross-checked
//! against the tensors (`declared`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::{Checkpoint, TensorInfo};
use crate::error::{Error, Result};
use crate::schema::{self, Declared, Dim, FlaForm, Scope};

/// fla's layout is told by its names.
pub fn is_fla(names: &[String]) -> bool {
    names.iter().any(|n| n == "model.embeddings.weight" || n.starts_with("model.layers."))
}

/// Where an official tensor lives in the file: a whole tensor, or one row of one.
struct Source {
    file_name: String,
    row: Option<usize>,
    info: TensorInfo,
}

pub struct FlaView {
    inner: Box<dyn Checkpoint>,
    names: Vec<String>,
    sources: HashMap<String, Source>,
    declared: Vec<Declared>,
}

/// The layer index of `model.layers.{i}.…`.
fn fla_layer(name: &str) -> Option<&str> {
    name.strip_prefix("model.layers.")?.split('.').next()
}

impl FlaView {
    pub fn new(inner: Box<dyn Checkpoint>, config: Option<(PathBuf, serde_json::Value)>) -> Result<FlaView> {
        let file_names = inner.names();
        // Layer indices as the file writes them; the schema checks them (numbers, no gaps)
        // once they are official names.
        let mut layers: Vec<&str> = file_names.iter().filter_map(|n| fla_layer(n)).collect();
        layers.sort_unstable();
        layers.dedup();
        let mut sources: HashMap<String, Source> = HashMap::new();
        let mut names = Vec::new();
        let mut claimed: HashSet<String> = HashSet::new();
        // One source per official name: a file that gives a name twice (fla's tensor and
        // the official one, or the fused `x_x` and a mix's own) is refused, not resolved.
        let path = inner.path();
        let add = |official: String,
                   file_name: &str,
                   row: Option<usize>,
                   info: TensorInfo,
                   names: &mut Vec<String>,
                   sources: &mut HashMap<String, Source>|
         -> Result<()> {
            if let Some(first) = sources.get(&official) {
                let msg = format!("{} and {file_name} both give {official}", first.file_name);
                return Err(Error::load(path, msg));
            }
            names.push(official.clone());
            sources.insert(official, Source { file_name: file_name.to_string(), row, info });
            Ok(())
        };
        for entry in schema::ENTRIES.iter().filter(|e| !e.fla.is_empty()) {
            let instances: Vec<(String, String)> = match entry.scope {
                Scope::Model => vec![(entry.name.to_string(), entry.fla.to_string())],
                Scope::Layer => layers
                    .iter()
                    .map(|i| {
                        (format!("blocks.{i}.{}", entry.name), format!("model.layers.{i}.{}", entry.fla))
                    })
                    .collect(),
            };
            for (official, fla_name) in instances {
                let Some(mut info) = inner.info(&fla_name) else { continue };
                if entry.fla_form == FlaForm::Flat && info.shape.len() == 1 {
                    info.shape = vec![1, 1, info.shape[0]];
                }
                add(official, &fla_name, None, info, &mut names, &mut sources)?;
                claimed.insert(fla_name);
            }
        }
        // The older layout: the six time-mix vectors as rows of one `attn.x_x` [6, C].
        for i in &layers {
            let fused = format!("model.layers.{i}.attn.x_x");
            let Some(info) = inner.info(&fused) else { continue };
            let [6, c] = info.shape[..] else {
                return Err(Error::load(
                    inner.path(),
                    format!("{fused} has shape {:?}; expected [6, C] (r, w, k, v, a, g)", info.shape),
                ));
            };
            for (row, mix) in schema::FUSED_MIX.iter().enumerate() {
                let info = TensorInfo { dtype: info.dtype, shape: vec![1, 1, c] };
                add(format!("blocks.{i}.{mix}"), &fused, Some(row), info, &mut names, &mut sources)?;
            }
            claimed.insert(fused);
        }
        // Anything else keeps its name: the schema reports it as unexpected.
        for n in &file_names {
            if !claimed.contains(n) {
                let info = inner.info(n).expect("listed by the file");
                add(n.clone(), n, None, info, &mut names, &mut sources)?;
            }
        }
        let declared = match config {
            Some((path, json)) => declared(&path, &json)?,
            None => Vec::new(),
        };
        Ok(FlaView { inner, names, sources, declared })
    }
}

/// The dimensions a config.json states: fla's `RWKV7Config` keys.
fn declared(path: &Path, json: &serde_json::Value) -> Result<Vec<Declared>> {
    if let Some(kind) = json.get("model_type").and_then(|v| v.as_str()) {
        if kind != "rwkv7" {
            return Err(Error::load(
                path,
                format!("model_type is {kind:?}; an fla RWKV-7 model says \"rwkv7\""),
            ));
        }
    }
    let keys = [
        ("hidden_size", Dim::C),
        ("num_hidden_layers", Dim::L),
        ("vocab_size", Dim::V),
        ("intermediate_size", Dim::F),
        ("head_dim", Dim::N),
        ("decay_low_rank_dim", Dim::Dw),
        ("a_low_rank_dim", Dim::Da),
        ("v_low_rank_dim", Dim::Dv),
        ("gate_low_rank_dim", Dim::Dg),
    ];
    let mut out = Vec::new();
    for (key, dim) in keys {
        match json.get(key) {
            None | Some(serde_json::Value::Null) => {}
            Some(v) => {
                let value = v.as_u64().and_then(|v| usize::try_from(v).ok()).ok_or_else(|| {
                    Error::load(path, format!("{key} is {v}; expected a non-negative integer"))
                })?;
                out.push(Declared { dim, value, source: format!("config.json {key}") });
            }
        }
    }
    Ok(out)
}

impl Checkpoint for FlaView {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.sources.get(name).map(|s| s.info.clone())
    }
    fn read(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let s = self
            .sources
            .get(name)
            .ok_or_else(|| Error::load(self.inner.path(), format!("missing tensor {name:?}")))?;
        let bytes = self.inner.read(&s.file_name)?;
        let Some(row) = s.row else { return Ok(bytes) };
        let len = s.info.numel() * s.info.dtype.size();
        let range = row * len..(row + 1) * len;
        if bytes.len() < range.end {
            return Err(Error::load(
                self.inner.path(),
                format!("{} holds {} bytes; expected {}", s.file_name, bytes.len(), 6 * len),
            ));
        }
        Ok(match bytes {
            Cow::Borrowed(b) => Cow::Borrowed(&b[range]),
            Cow::Owned(b) => Cow::Owned(b[range].to_vec()),
        })
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn metadata(&self, key: &str) -> Option<String> {
        self.inner.metadata(key)
    }
    fn declared(&self) -> Vec<Declared> {
        self.declared.clone()
    }
    fn low_rank_out_in(&self) -> Option<bool> {
        Some(true)
    }
}
