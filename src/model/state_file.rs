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

use super::weights::to_f32;
use super::{Config, HostState, Model, State};
use crate::error::{Error, Result, Saving};
use crate::loader::{Checkpoint, DType};

fn metadata(c: &Config, fingerprint: u64) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), "rwkv-gpu state v1".to_string()),
        ("n_layer".to_string(), c.n_layer.to_string()),
        ("n_embd".to_string(), c.n_embd.to_string()),
        ("n_head".to_string(), c.n_head.to_string()),
        ("head_size".to_string(), c.head_size.to_string()),
        ("fingerprint".to_string(), format!("{fingerprint:016x}")),
    ])
}

pub fn save(model: &Model, state: &State, path: &Path) -> Result<()> {
    let host = model.state_to_host(state)?;
    let c = &model.config;
    let (l, e, h, n) = (c.n_layer, c.n_embd, c.n_head, c.head_size);
    fn view(data: &[f32], shape: Vec<usize>) -> Result<TensorView<'_>> {
        TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(data))
            .map_err(|e| Error::Invalid(format!("state tensor: {e}")))
    }
    let tensors = vec![
        ("att_shift", view(&host.att_shift, vec![l, e])?),
        ("wkv", view(&host.wkv, vec![l, h, n, n])?),
        ("ffn_shift", view(&host.ffn_shift, vec![l, e])?),
    ];
    let bytes = safetensors::serialize(tensors, Some(metadata(&model.config, model.weights.fingerprint)))
        .map_err(|e| Error::Invalid(format!("state tensors: {e}")))?;
    crate::atomic_file::write(path, Saving::State, |out| {
        out.write_all(&bytes).map_err(|e| crate::atomic_file::write_error(path, Saving::State, e))
    })
}

pub fn load(model: &Model, path: &Path, transpose: bool) -> Result<State> {
    let ck = crate::loader::open(path)?;
    let host = read(ck.as_ref(), &model.config, model.weights.fingerprint, transpose)?;
    // Shapes were checked by `read`; what is left to refuse is the values (NaN, infinity).
    model.state_from_host(&host).map_err(|e| match e {
        Error::Shape(m) => Error::Shape(format!("{}: {m}", path.display())),
        e => e,
    })
}

/// A state file's contents for a model of `config` and weights `fingerprint`: one of ours
/// (checked against both) or a state-tuning file; every shape checked before anything
/// sized by the file is allocated.
pub fn read(ck: &dyn Checkpoint, config: &Config, fingerprint: u64, transpose: bool) -> Result<HostState> {
    let path = ck.path();
    if ck.info("blocks.0.att.time_state").is_some() {
        return read_state_tuning(ck, config, transpose);
    }
    if transpose {
        return Err(Error::Invalid(format!(
            "{}: transpose applies to state-tuning files (blocks.N.att.time_state); this is not one",
            path.display()
        )));
    }
    let want = metadata(config, fingerprint);
    if ck.metadata("format").as_ref() != want.get("format") {
        return Err(Error::load(
            path,
            "not a state saved by rwkv-gpu (no 'rwkv-gpu state v1' format in its metadata)",
        ));
    }
    for key in ["n_layer", "n_embd", "n_head", "head_size", "fingerprint"] {
        if ck.metadata(key).as_ref() != want.get(key) {
            return Err(Error::State(format!(
                "{}: this state belongs to another model ({key} is {:?} in the file, {:?} in this model)",
                path.display(),
                ck.metadata(key).unwrap_or_else(|| "missing".into()),
                want[key]
            )));
        }
    }
    let (l, c, h, n) = (config.n_layer, config.n_embd, config.n_head, config.head_size);
    let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let info = ck.info(name).ok_or_else(|| Error::load(path, format!("missing tensor {name:?}")))?;
        if info.dtype != DType::F32 || info.shape != shape {
            return Err(Error::load(
                path,
                format!(
                    "tensor {name:?} is {:?} {:?}; this model's states are F32 {shape:?}",
                    info.dtype, info.shape
                ),
            ));
        }
        Ok(bytemuck::pod_collect_to_vec(&ck.read(name)?))
    };
    Ok(HostState {
        att_shift: tensor("att_shift", &[l, c])?,
        wkv: tensor("wkv", &[l, h, n, n])?,
        ffn_shift: tensor("ffn_shift", &[l, c])?,
    })
}

fn read_state_tuning(ck: &dyn Checkpoint, c: &Config, transpose: bool) -> Result<HostState> {
    let (h, n) = (c.n_head, c.head_size);
    let path = ck.path();
    let mut wkv = Vec::with_capacity(c.n_layer * h * n * n);
    for layer in 0..c.n_layer {
        let name = format!("blocks.{layer}.att.time_state");
        let info = ck.info(&name).ok_or_else(|| {
            Error::State(format!(
                "{}: state-tuning file has no {name}; this model has {} layers",
                path.display(),
                c.n_layer
            ))
        })?;
        // Some tools keep a leading batch dimension of 1 (and a one-head model's own
        // [1, N, N] keeps its 1).
        let mut dims = &info.shape[..];
        while dims.len() > 3 && dims[0] == 1 {
            dims = &dims[1..];
        }
        if dims != [h, n, n] {
            return Err(Error::State(format!(
                "{}: {name} has shape {:?}; this model needs [{h}, {n}, {n}] (heads, head size, head size)",
                path.display(),
                info.shape
            )));
        }
        if !matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::State(format!(
                "{}: {name} is {:?}; a state is floating point (F32, F16 or BF16)",
                path.display(),
                info.dtype
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
    // Anything else (a layer past this model's, a saved state's tensors beside these) says
    // the file is not this model's state-tuning file.
    let ours = |name: &str| {
        name.strip_prefix("blocks.").and_then(|rest| rest.strip_suffix(".att.time_state")).is_some_and(|i| {
            i.parse::<usize>().is_ok_and(|layer| layer < c.n_layer && layer.to_string() == i)
        })
    };
    let mut names = ck.names();
    names.sort();
    if let Some(other) = names.iter().find(|name| !ours(name)) {
        return Err(Error::State(format!(
            "{}: holds {other}; a state-tuning file for this model has only blocks.0..{}.att.time_state",
            path.display(),
            c.n_layer - 1
        )));
    }
    let zeros = vec![0.0; c.n_layer * c.n_embd];
    Ok(HostState { att_shift: zeros.clone(), wkv, ffn_shift: zeros })
}
