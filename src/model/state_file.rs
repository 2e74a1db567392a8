//! Saved states: safetensors holding att_shift [L, C], wkv [L, H, N, N] and ffn_shift
//! [L, C] in f32, with the model's dimensions and weight fingerprint in the metadata so
//! that a state is never loaded into a model it does not belong to. Written atomically
//! (`atomic_file`): a failed save leaves an existing file as it was.
//!
//! Also read: state-tuning files (`.pth` or `.safetensors` with one
//! `blocks.{i}.att.time_state` [H, N, N] per layer, shift states zero). The tools that
//! use them (the official package, web-rwkv) copy the tensor as-is into the WKV state,
//! whose layout is [head, value, key]; `transpose` is for files saved [head, key, value].

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::{HostState, Model, State};
use crate::error::{Error, Result, Saving};
use crate::loader::safetensors_file::SafetensorsFile;
use crate::loader::{Checkpoint, DType};
use super::weights::to_f32;

fn metadata(model: &Model) -> HashMap<String, String> {
    let c = &model.config;
    HashMap::from([
        ("format".to_string(), "rwkv-gpu state v1".to_string()),
        ("n_layer".to_string(), c.n_layer.to_string()),
        ("n_embd".to_string(), c.n_embd.to_string()),
        ("n_head".to_string(), c.n_head.to_string()),
        ("head_size".to_string(), c.head_size.to_string()),
        ("fingerprint".to_string(), format!("{:016x}", model.weights.fingerprint)),
    ])
}

pub fn save(model: &Model, state: &State, path: &Path) -> Result<()> {
    let host = model.state_to_host(state)?;
    let c = &model.config;
    let (l, e, h, n) = (c.n_layer, c.n_embd, c.n_head, c.head_size);
    fn view(data: &[f32], shape: Vec<usize>) -> Result<TensorView<'_>> {
        TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(data)).map_err(|e| Error::Invalid(format!("state tensor: {e}")))
    }
    let tensors = vec![
        ("att_shift", view(&host.att_shift, vec![l, e])?),
        ("wkv", view(&host.wkv, vec![l, h, n, n])?),
        ("ffn_shift", view(&host.ffn_shift, vec![l, e])?),
    ];
    let bytes = safetensors::serialize(tensors, Some(metadata(model))).map_err(|e| Error::Invalid(format!("state tensors: {e}")))?;
    crate::atomic_file::write(path, Saving::State, |out| {
        out.write_all(&bytes).map_err(|e| crate::atomic_file::write_error(path, Saving::State, e))
    })
}

pub fn load(model: &Model, path: &Path, transpose: bool) -> Result<State> {
    let ck = crate::loader::open(path)?;
    if ck.info("blocks.0.att.time_state").is_some() {
        return load_state_tuning(model, ck.as_ref(), transpose);
    }
    if transpose {
        return Err(Error::Invalid(format!(
            "{}: transpose applies to state-tuning files (blocks.N.att.time_state); this is not one",
            path.display()
        )));
    }
    drop(ck);
    let file = SafetensorsFile::open(path)?;
    let want = metadata(model);
    if file.metadata.get("format") != want.get("format") {
        return Err(Error::load(path, "not a state saved by rwkv-gpu (no 'rwkv-gpu state v1' format in its metadata)"));
    }
    for key in ["n_layer", "n_embd", "n_head", "head_size", "fingerprint"] {
        if file.metadata.get(key) != want.get(key) {
            return Err(Error::State(format!(
                "{}: this state belongs to another model ({key} is {:?} in the file, {:?} in this model)",
                path.display(),
                file.metadata.get(key).map(String::as_str).unwrap_or("missing"),
                want[key]
            )));
        }
    }
    let read = |name: &str| -> Result<Vec<f32>> {
        let info = file.info(name).ok_or_else(|| Error::load(path, format!("missing tensor {name:?}")))?;
        if info.dtype != DType::F32 {
            return Err(Error::load(path, format!("tensor {name:?} is {:?}; states are F32", info.dtype)));
        }
        Ok(bytemuck::pod_collect_to_vec(&file.read(name)?))
    };
    model.state_from_host(&HostState { att_shift: read("att_shift")?, wkv: read("wkv")?, ffn_shift: read("ffn_shift")? })
}

fn load_state_tuning(model: &Model, ck: &dyn Checkpoint, transpose: bool) -> Result<State> {
    let c = &model.config;
    let (h, n) = (c.n_head, c.head_size);
    let path = ck.path();
    let mut wkv = Vec::with_capacity(c.n_layer * h * n * n);
    for layer in 0..c.n_layer {
        let name = format!("blocks.{layer}.att.time_state");
        let info = ck.info(&name).ok_or_else(|| {
            Error::State(format!("{}: state-tuning file has no {name}; this model has {} layers", path.display(), c.n_layer))
        })?;
        // Some tools keep a leading batch dimension of 1.
        let dims: Vec<usize> = info.shape.iter().copied().skip_while(|&d| d == 1).collect();
        if dims != [h, n, n] {
            return Err(Error::State(format!(
                "{}: {name} has shape {:?}; this model needs [{h}, {n}, {n}] (heads, head size, head size)",
                path.display(),
                info.shape
            )));
        }
        let values = to_f32(&ck.read(&name)?, info.dtype);
        if transpose {
            for head in values.chunks_exact(n * n) {
                wkv.extend((0..n * n).map(|i| head[(i % n) * n + i / n]));
            }
        } else {
            wkv.extend(values);
        }
    }
    if ck.info(&format!("blocks.{}.att.time_state", c.n_layer)).is_some() {
        return Err(Error::State(format!("{}: state-tuning file has more layers than this model's {}", path.display(), c.n_layer)));
    }
    let zeros = vec![0.0; c.n_layer * c.n_embd];
    model.state_from_host(&HostState { att_shift: zeros.clone(), wkv, ffn_shift: zeros })
}
