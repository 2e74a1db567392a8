//! Saved states: safetensors holding att_shift [L, C], wkv [L, H, N, N] and ffn_shift
//! [L, C] in f32, with the model's dimensions and weight fingerprint in the metadata so
//! that a state is never loaded into a model it does not belong to.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use super::{HostState, Model, State};
use crate::error::{Error, Result};
use crate::loader::safetensors_file::SafetensorsFile;
use crate::loader::{Checkpoint, DType};

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
    safetensors::serialize_to_file(tensors, Some(metadata(model)), path)
        .map_err(|e| Error::load(path, format!("could not write the state: {e}")))
}

pub fn load(model: &Model, path: &Path) -> Result<State> {
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
