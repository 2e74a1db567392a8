//! The checkpoint schema: every tensor of an RWKV-7 model in one table, with its official
//! name, its shape in terms of the model's dimensions, what the loader does with it and
//! its name in flash-linear-attention's Hugging Face layout (`RWKV7ForCausalLM`, the
//! fla-hub models; mapping from fla's `utils/convert_from_rwkv7.py` as described in
//! the golden data's README). Loading, saving, the random model, the format report and
//! the fla renaming all iterate `ENTRIES`.
//!
//! `check` holds a checkpoint against the table before anything is allocated: every
//! name, exact shape and dtype, the layer indices, and bounds on the dimensions, with
//! every problem reported in one error.

use std::collections::{BTreeSet, HashSet};

use crate::error::{Error, Result};
use crate::loader::{Checkpoint, DType};
use crate::model::saved;
use crate::model::weights::Layout;
use crate::model::Config;

/// A dimension of the model; shapes in the table are written in these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    One,
    /// Layers (not in any tensor's shape; a config.json states it).
    L,
    /// n_embd.
    C,
    /// The channel-mix width (4 C in published models).
    F,
    /// Vocabulary size.
    V,
    /// Heads and head size (H N = C).
    H,
    N,
    /// Low-rank widths of the decay, in-context-rate, value-residual and gate paths.
    Dw,
    Da,
    Dv,
    Dg,
    /// DeepEmbed: the modulation rank r, and a table row's width r x r.
    Dr,
    De,
}

impl Dim {
    pub fn size(self, c: &Config) -> usize {
        match self {
            Dim::One => 1,
            Dim::L => c.n_layer,
            Dim::C => c.n_embd,
            Dim::F => c.ffn_size,
            Dim::V => c.vocab_size,
            Dim::H => c.n_head,
            Dim::N => c.head_size,
            Dim::Dw => c.lora_w,
            Dim::Da => c.lora_a,
            Dim::Dv => c.lora_v,
            Dim::Dg => c.lora_g,
            Dim::Dr => c.deep_embed_rank,
            Dim::De => c.deep_embed_width(),
        }
    }
}

/// Bounds on what a checkpoint may claim, far beyond any published model (the largest
/// RWKV-7 is 61 layers of 4096 with a 65536 vocabulary; the largest tokenizers in use have
/// about 256k tokens). A header beyond them is taken as corrupt or hostile rather than
/// sizing allocations.
pub const MAX_LAYERS: usize = 1024;
pub const MAX_EMBD: usize = 32768;
pub const MAX_VOCAB: usize = 1 << 22;
pub const MAX_FFN: usize = 8 * MAX_EMBD;
/// DeepEmbed's modulation rank (32 in the published models; `sh_ss` in deep_embed.wgsl).
pub const MAX_DEEP_EMBED_RANK: usize = 64;

/// The matrices of a layer, as the forward pass names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerMatrix {
    Receptance,
    Key,
    Value,
    Output,
    W1,
    W2,
    A1,
    A2,
    V1,
    V2,
    G1,
    G2,
    FfnKey,
    FfnValue,
}

impl LayerMatrix {
    /// The big projections, which `dtype` may quantize; the low-rank paths stay 16-bit.
    pub fn quantizable(self) -> bool {
        use LayerMatrix::*;
        matches!(self, Receptance | Key | Value | Output | FfnKey | FfnValue)
    }

    /// Low-rank matrices, which the official checkpoints store as [in, out] (the big
    /// projections are nn.Linear weights, [out, in]).
    pub fn low_rank(self) -> bool {
        !self.quantizable()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One tensor for the model; `name` is its whole name.
    Model,
    /// One per layer, named `blocks.{i}.{name}`.
    Layer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The embedding table, kept in host memory.
    Embedding,
    /// A vector packed into the model's (Scope::Model) or its layer's `consts` buffer at
    /// this slot (offsets in units of C: `model::weights::consts`).
    Vector(usize),
    Matrix(LayerMatrix),
    Head,
    /// The DeepEmbed tensors of a layer's channel mix (RWKV-7a).
    Deep(DeepPart),
}

/// RWKV-7a DeepEmbed's five tensors per layer (`rwkv7.md`, DeepEmbed section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeepPart {
    /// `s_emb` [V, r*r]: a second embedding table per layer, kept in host memory.
    Table,
    /// `s_emb_x` [r*r, C]: projects the normalised embedding into the table's space.
    EmbX,
    /// `s0` [1, 1, F]: the modulation's bias.
    S0,
    /// `s1` [C, r]: the ln2 output to the modulation's rank.
    S1,
    /// `s2` [r, F]: back to the channel-mix width.
    S2,
}

/// How fla's layout stores a tensor, relative to the official one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlaForm {
    Same,
    /// [1, 1, C] vectors stored as [C].
    Flat,
    /// Low-rank matrices stored as nn.Linear weights, [out, in].
    Transposed,
}

#[derive(Debug)]
pub struct Entry {
    pub name: &'static str,
    pub scope: Scope,
    pub shape: &'static [Dim],
    pub role: Role,
    /// The name in fla's layout (layer entries: after `model.layers.{i}.`) and its form.
    pub fla: &'static str,
    pub fla_form: FlaForm,
    /// Layer 0 has no value residual: its v0/v1/v2 are never read, and fla drops them.
    pub unused_in_layer0: bool,
}

impl Entry {
    /// Present only in RWKV-7a DeepEmbed models.
    pub fn deep_embed(&self) -> bool {
        matches!(self.role, Role::Deep(_))
    }
}

impl Entry {
    pub fn quantizable(&self) -> bool {
        match self.role {
            Role::Matrix(m) => m.quantizable(),
            Role::Head => true,
            _ => false,
        }
    }

    /// The tensor's name in layer `layer` (ignored for model-level entries).
    pub fn name_in(&self, layer: usize) -> String {
        match self.scope {
            Scope::Model => self.name.to_string(),
            Scope::Layer => format!("blocks.{layer}.{}", self.name),
        }
    }

    pub fn fla_name_in(&self, layer: usize) -> String {
        match self.scope {
            Scope::Model => self.fla.to_string(),
            Scope::Layer => format!("model.layers.{layer}.{}", self.fla),
        }
    }

    pub fn shape_for(&self, config: &Config) -> Vec<usize> {
        self.shape.iter().map(|d| d.size(config)).collect()
    }
}

use Dim::*;
use FlaForm::{Flat, Same, Transposed};
use LayerMatrix as M;
use Role::{Matrix, Vector};

const ROW: &[Dim] = &[C];
const MIX: &[Dim] = &[One, One, C];

const fn entry(
    name: &'static str,
    scope: Scope,
    shape: &'static [Dim],
    role: Role,
    fla: &'static str,
    fla_form: FlaForm,
) -> Entry {
    Entry { name, scope, shape, role, fla, fla_form, unused_in_layer0: false }
}
const fn model(name: &'static str, shape: &'static [Dim], role: Role, fla: &'static str) -> Entry {
    entry(name, Scope::Model, shape, role, fla, Same)
}
const fn layer(
    name: &'static str,
    shape: &'static [Dim],
    role: Role,
    fla: &'static str,
    form: FlaForm,
) -> Entry {
    entry(name, Scope::Layer, shape, role, fla, form)
}
const fn layer0_unused(e: Entry) -> Entry {
    Entry { unused_in_layer0: true, ..e }
}

/// Every tensor of an RWKV-7 checkpoint, in the order of the official files.
pub const ENTRIES: &[Entry] = {
    use crate::model::weights::consts::*;
    &[
        model("emb.weight", &[V, C], Role::Embedding, "model.embeddings.weight"),
        model("blocks.0.ln0.weight", ROW, Vector(LN0_W), "model.layers.0.pre_norm.weight"),
        model("blocks.0.ln0.bias", ROW, Vector(LN0_B), "model.layers.0.pre_norm.bias"),
        layer("ln1.weight", ROW, Vector(LN1_W), "attn_norm.weight", Same),
        layer("ln1.bias", ROW, Vector(LN1_B), "attn_norm.bias", Same),
        layer("ln2.weight", ROW, Vector(LN2_W), "ffn_norm.weight", Same),
        layer("ln2.bias", ROW, Vector(LN2_B), "ffn_norm.bias", Same),
        layer("att.x_r", MIX, Vector(ATT_MIX), "attn.x_r", Same),
        layer("att.x_w", MIX, Vector(ATT_MIX + 1), "attn.x_w", Same),
        layer("att.x_k", MIX, Vector(ATT_MIX + 2), "attn.x_k", Same),
        layer("att.x_v", MIX, Vector(ATT_MIX + 3), "attn.x_v", Same),
        layer("att.x_a", MIX, Vector(ATT_MIX + 4), "attn.x_a", Same),
        layer("att.x_g", MIX, Vector(ATT_MIX + 5), "attn.x_g", Same),
        layer("att.w0", MIX, Vector(W0), "attn.w_lora.lora.2.bias", Flat),
        layer("att.r_k", &[H, N], Vector(R_K), "attn.r_k", Same),
        layer("att.w1", &[C, Dw], Matrix(M::W1), "attn.w_lora.lora.0.weight", Transposed),
        layer("att.w2", &[Dw, C], Matrix(M::W2), "attn.w_lora.lora.2.weight", Transposed),
        layer("att.a1", &[C, Da], Matrix(M::A1), "attn.a_lora.lora.0.weight", Transposed),
        layer("att.a2", &[Da, C], Matrix(M::A2), "attn.a_lora.lora.2.weight", Transposed),
        layer("att.a0", MIX, Vector(A0), "attn.a_lora.lora.2.bias", Flat),
        layer0_unused(layer("att.v0", MIX, Vector(V0), "attn.v_lora.lora.2.bias", Flat)),
        layer0_unused(layer("att.v1", &[C, Dv], Matrix(M::V1), "attn.v_lora.lora.0.weight", Transposed)),
        layer0_unused(layer("att.v2", &[Dv, C], Matrix(M::V2), "attn.v_lora.lora.2.weight", Transposed)),
        layer("att.g1", &[C, Dg], Matrix(M::G1), "attn.g_lora.lora.0.weight", Transposed),
        layer("att.g2", &[Dg, C], Matrix(M::G2), "attn.g_lora.lora.2.weight", Transposed),
        layer("att.k_k", MIX, Vector(K_K), "attn.k_k", Flat),
        layer("att.k_a", MIX, Vector(K_A), "attn.k_a", Flat),
        layer("att.receptance.weight", &[C, C], Matrix(M::Receptance), "attn.r_proj.weight", Same),
        layer("att.key.weight", &[C, C], Matrix(M::Key), "attn.k_proj.weight", Same),
        layer("att.value.weight", &[C, C], Matrix(M::Value), "attn.v_proj.weight", Same),
        layer("att.output.weight", &[C, C], Matrix(M::Output), "attn.o_proj.weight", Same),
        layer("att.ln_x.weight", ROW, Vector(LNX_W), "attn.g_norm.weight", Same),
        layer("att.ln_x.bias", ROW, Vector(LNX_B), "attn.g_norm.bias", Same),
        layer("ffn.x_k", MIX, Vector(FFN_MIX), "ffn.x_k", Flat),
        layer("ffn.key.weight", &[F, C], Matrix(M::FfnKey), "ffn.key.weight", Same),
        layer("ffn.value.weight", &[C, F], Matrix(M::FfnValue), "ffn.value.weight", Same),
        // RWKV-7a DeepEmbed only (no fla layout exists for it).
        layer("ffn.s_emb.weight", &[V, De], Role::Deep(DeepPart::Table), "", Same),
        layer("ffn.s_emb_x.weight", &[De, C], Role::Deep(DeepPart::EmbX), "", Same),
        layer("ffn.s0", &[One, One, F], Role::Deep(DeepPart::S0), "", Same),
        layer("ffn.s1", &[C, Dr], Role::Deep(DeepPart::S1), "", Same),
        layer("ffn.s2", &[Dr, F], Role::Deep(DeepPart::S2), "", Same),
        model("ln_out.weight", ROW, Vector(LNOUT_W), "model.norm.weight"),
        model("ln_out.bias", ROW, Vector(LNOUT_B), "model.norm.bias"),
        model("head.weight", &[V, C], Role::Head, "lm_head.weight"),
    ]
};

/// The six token-shift mixes of the time mix in the order of the older fla layout's fused
/// `attn.x_x` [6, C] (r, w, k, v, a, g), which is also their slot order.
pub const FUSED_MIX: [&str; 6] = ["att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g"];

pub fn entry_named(name: &str) -> Option<&'static Entry> {
    ENTRIES.iter().find(|e| e.name == name)
}

/// The entries of one scope and role kind, in table order.
pub fn layer_entries() -> impl Iterator<Item = &'static Entry> {
    ENTRIES.iter().filter(|e| e.scope == Scope::Layer)
}

pub fn model_entries() -> impl Iterator<Item = &'static Entry> {
    ENTRIES.iter().filter(|e| e.scope == Scope::Model)
}

/// A layer's matrix entries, in table order.
pub fn layer_matrices() -> impl Iterator<Item = (&'static Entry, LayerMatrix)> {
    layer_entries().filter_map(|e| match e.role {
        Role::Matrix(m) => Some((e, m)),
        _ => None,
    })
}

/// One tensor a checkpoint of a given config holds: its official name and shape.
#[derive(Debug, Clone)]
pub struct Expected {
    pub entry: &'static Entry,
    pub layer: usize,
    pub name: String,
    pub shape: Vec<usize>,
}

/// Every tensor of a model with these dimensions, in table order, layer by layer.
pub fn expected(config: &Config) -> Vec<Expected> {
    let mut out = Vec::new();
    let one = |e: &'static Entry, layer: usize| Expected {
        entry: e,
        layer,
        name: e.name_in(layer),
        shape: e.shape_for(config),
    };
    let (before, after): (Vec<_>, Vec<_>) =
        model_entries().partition(|e| e.name == "emb.weight" || e.name.starts_with("blocks.0."));
    out.extend(before.into_iter().map(|e| one(e, 0)));
    for i in 0..config.n_layer {
        out.extend(layer_entries().filter(|e| config.deep_embed() || !e.deep_embed()).map(|e| one(e, i)));
    }
    out.extend(after.into_iter().map(|e| one(e, 0)));
    out
}

/// What `check` found a checkpoint to be.
#[derive(Debug, Clone)]
pub struct Checked {
    pub config: Config,
    /// Low-rank matrices are stored [out, in] (web-rwkv's conversion, fla's layout) rather
    /// than the official [in, out].
    pub low_rank_out_in: bool,
    /// Official names of layer-0 tensors that are never read and that the file leaves out
    /// (fla drops layer 0's value residual): the loader fills them with zeros.
    pub absent: HashSet<String>,
}

/// Tensors of official checkpoints that the model never reads: none today beyond the
/// `unused_in_layer0` entries, which are checked like the rest when present.
fn ignorable(_name: &str) -> bool {
    false
}

/// Says what a file that is not an RWKV-7 checkpoint looks like, and what would load.
pub fn describe_foreign(names: &[String]) -> Option<String> {
    let has = |suffix: &str| names.iter().any(|n| n.ends_with(suffix) || n.contains(&format!("{suffix}.")));
    let kind = if has("att.qkv") || names.iter().any(|n| n.contains(".qkv.")) {
        "an RWKV-7b (DEA) checkpoint (it has qkv attention tensors): a different model family whose cache grows with the context; load an RWKV-7 (x070) release"
    } else if has("att.time_faaaa") || has("att.time_maa_x") {
        "an RWKV-6 checkpoint (it has att.time_maa_x / time_faaaa); this library runs RWKV-7 (x070) models"
    } else if has("att.time_first") && has("att.ln_x.weight") {
        "an RWKV-5 checkpoint (it has att.time_first and ln_x); this library runs RWKV-7 (x070) models"
    } else if has("att.time_first") || has("att.time_decay") {
        "an RWKV-4 checkpoint (it has att.time_first); this library runs RWKV-7 (x070) models"
    } else if names.iter().any(|n| n.contains("lora_A") || n.contains("lora_B")) {
        "a LoRA adapter (it has lora_A / lora_B tensors), not a model: merge it into its base model and load that"
    } else if has("embed_tokens.weight")
        || has("self_attn.q_proj.weight")
        || has("attn.c_attn.weight")
        || has("wte.weight")
    {
        "a transformer checkpoint (names such as embed_tokens / q_proj); this library runs RWKV-7 models"
    } else if names.is_empty() {
        "an empty checkpoint (no tensors)"
    } else {
        return None;
    };
    Some(kind.to_string())
}

/// The layer index of `blocks.{i}.…`, or the part after `blocks.` when it is not a number.
fn layer_index(name: &str) -> Option<std::result::Result<u64, String>> {
    let rest = name.strip_prefix("blocks.")?;
    let index = rest.split('.').next().unwrap_or("");
    Some(index.parse::<u64>().map_err(|_| index.to_string()))
}

/// Problems found so far; reported together.
struct Problems {
    list: Vec<String>,
}

impl Problems {
    fn push(&mut self, p: String) {
        self.list.push(p);
    }

    fn into_result(self, ck: &dyn Checkpoint) -> Result<()> {
        if self.list.is_empty() {
            return Ok(());
        }
        const SHOWN: usize = 12;
        let n = self.list.len();
        let mut msg = format!(
            "does not match the RWKV-7 checkpoint schema ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        );
        for p in self.list.iter().take(SHOWN) {
            msg.push_str("\n  - ");
            msg.push_str(p);
        }
        if n > SHOWN {
            msg.push_str(&format!("\n  ... and {} more", n - SHOWN));
        }
        Err(Error::load(ck.path(), msg))
    }
}

fn shape_of(ck: &dyn Checkpoint, name: &str) -> Result<Vec<usize>> {
    saved::matrix_shape(ck, name)?.ok_or_else(|| Error::load(ck.path(), format!("missing tensor {name:?}")))
}

/// The model's dimensions, from the shapes of a few tensors (never from a file name).
fn dimensions(ck: &dyn Checkpoint, names: &[String]) -> Result<(Config, bool)> {
    let load = |m: String| Error::load(ck.path(), m);
    // Layers: the indices must be numbers, 0..n without gaps, n within bounds; checked on
    // the set of indices present, so a stray `blocks.99999999999` costs nothing.
    let mut indices = BTreeSet::new();
    for n in names {
        match layer_index(n) {
            Some(Ok(i)) => {
                indices.insert(i);
            }
            Some(Err(part)) => {
                return Err(load(format!("tensor {n:?}: layer index {part:?} is not a number")))
            }
            None => {}
        }
    }
    let n_layer = indices.len();
    if n_layer == 0 {
        return Err(load("no layers: the checkpoint has no blocks.N tensors".into()));
    }
    let last = *indices.iter().next_back().expect("not empty");
    if last >= MAX_LAYERS as u64 {
        return Err(load(format!(
            "a tensor names layer {last}, beyond the {MAX_LAYERS} layers this library accepts"
        )));
    }
    if last as usize + 1 != n_layer {
        let missing: Vec<String> =
            (0..=last).filter(|i| !indices.contains(i)).take(8).map(|i| i.to_string()).collect();
        return Err(load(format!(
            "layers {} are missing (the file has tensors of layers up to {last})",
            missing.join(", ")
        )));
    }

    let emb = shape_of(ck, "emb.weight")?;
    let r_k = shape_of(ck, "blocks.0.att.r_k")?;
    let [vocab_size, n_embd] = emb[..] else {
        return Err(load(format!("emb.weight has shape {emb:?}; expected [vocab, n_embd]")));
    };
    let [n_head, head_size] = r_k[..] else {
        return Err(load(format!("blocks.0.att.r_k has shape {r_k:?}; expected [heads, head_size]")));
    };
    if !(1..=MAX_EMBD).contains(&n_embd) || !(1..=MAX_VOCAB).contains(&vocab_size) {
        return Err(load(format!("emb.weight is [{vocab_size}, {n_embd}]: beyond the bounds this library accepts (vocabulary up to {MAX_VOCAB}, n_embd up to {MAX_EMBD})")));
    }
    if n_head.checked_mul(head_size) != Some(n_embd) {
        return Err(load(format!("blocks.0.att.r_k is [{n_head}, {head_size}] but n_embd is {n_embd}")));
    }
    if !head_size.is_power_of_two() || !(4..=256).contains(&head_size) {
        return Err(load(format!("head size {head_size} is not supported (a power of two from 4 to 256)")));
    }
    let ffn = shape_of(ck, "blocks.0.ffn.key.weight")?;
    let ffn_size = match ffn[..] {
        [f, c] if c == n_embd && (1..=MAX_FFN).contains(&f) => f,
        _ => {
            return Err(load(format!(
                "blocks.0.ffn.key.weight has shape {ffn:?}; expected [F, {n_embd}] with F up to {MAX_FFN}"
            )))
        }
    };
    // The orientation of the low-rank matrices, from the first one: [C, D] officially,
    // [D, C] when converted (a square one is taken as official).
    let w1 = shape_of(ck, "blocks.0.att.w1")?;
    let low_rank_out_in = match w1[..] {
        _ if ck.low_rank_out_in().is_some() => ck.low_rank_out_in().unwrap_or_default(),
        [a, _] if a == n_embd => false,
        [_, b] if b == n_embd => true,
        _ => {
            return Err(load(format!(
                "blocks.0.att.w1 has shape {w1:?}; expected [{n_embd}, D] or [D, {n_embd}]"
            )))
        }
    };
    let in_range = |what: &str, d: usize| -> Result<usize> {
        if d == 0 || d > n_embd {
            return Err(load(format!("{what} has low-rank width {d}; expected 1 to n_embd ({n_embd})")));
        }
        Ok(d)
    };
    let width = |name: &str| -> Result<usize> {
        let s = shape_of(ck, name)?;
        let d = match (&s[..], low_rank_out_in) {
            (&[a, b], false) if a == n_embd => b,
            (&[a, b], true) if b == n_embd => a,
            _ => {
                let want = if low_rank_out_in { format!("[D, {n_embd}]") } else { format!("[{n_embd}, D]") };
                return Err(load(format!("{name} has shape {s:?}; expected {want} like blocks.0.att.w1")));
            }
        };
        in_range(name, d)
    };
    // Layer 0 never reads v1 (fla leaves it out), so its width comes from layer 1, or
    // from what config.json declares for a one-layer model.
    let lora_v = if n_layer > 1 {
        width("blocks.1.att.v1")?
    } else if ck.info("blocks.0.att.v1").is_some() {
        width("blocks.0.att.v1")?
    } else {
        match ck.declared().iter().find(|d| d.dim == Dv) {
            Some(d) => in_range(&d.source, d.value)?,
            None => 32.min(n_embd),
        }
    };
    let config = Config {
        n_layer,
        n_embd,
        n_head,
        head_size,
        vocab_size,
        ffn_size,
        lora_w: width("blocks.0.att.w1")?,
        lora_a: width("blocks.0.att.a1")?,
        lora_v,
        lora_g: width("blocks.0.att.g1")?,
        deep_embed_rank: deep_embed_rank(ck, n_embd)?,
    };
    for (what, d) in [
        ("n_embd", n_embd),
        ("ffn", ffn_size),
        ("w1", config.lora_w),
        ("a1", config.lora_a),
        ("v1", config.lora_v),
        ("g1", config.lora_g),
    ] {
        if d % 8 != 0 {
            return Err(load(format!("{what} width {d} is not a multiple of 8; the kernels read matrix rows 8 values at a time (every published RWKV-7 model qualifies)")));
        }
    }
    Ok((config, low_rank_out_in))
}

/// The DeepEmbed rank, from `blocks.0.ffn.s1` [C, r]; 0 when the model has no DeepEmbed.
fn deep_embed_rank(ck: &dyn Checkpoint, n_embd: usize) -> Result<usize> {
    let Some(info) = ck.info("blocks.0.ffn.s1") else { return Ok(0) };
    match info.shape[..] {
        [c, r] if c == n_embd && (1..=MAX_DEEP_EMBED_RANK).contains(&r) => Ok(r),
        _ => Err(Error::load(ck.path(), format!(
            "blocks.0.ffn.s1 has shape {:?}; a DeepEmbed model's is [{n_embd}, r] with r from 1 to {MAX_DEEP_EMBED_RANK}", info.shape))),
    }
}

/// Checks `ck` against the schema: its kind, its dimensions, then every tensor's name,
/// shape and dtype, with all problems in one error. Nothing is allocated from a size the
/// file claims until this has passed.
pub fn check(ck: &dyn Checkpoint) -> Result<Checked> {
    let names = ck.names();
    if let Some(kind) = describe_foreign(&names) {
        return Err(Error::load(ck.path(), format!("not an RWKV-7 checkpoint: this looks like {kind}")));
    }
    if !names.iter().any(|n| n == "blocks.0.att.r_k") || !names.iter().any(|n| n == "emb.weight") {
        let first: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
        return Err(Error::load(
            ck.path(),
            format!(
                "not an RWKV-7 checkpoint: it has no emb.weight and blocks.0.att.r_k (first tensors: {})",
                first.join(", ")
            ),
        ));
    }
    let (config, low_rank_out_in) = dimensions(ck, &names)?;
    let mut problems = Problems { list: Vec::new() };

    for d in ck.declared() {
        let found = d.dim.size(&config);
        if found != d.value {
            problems.push(format!("{} says {}, but the tensors give {found}", d.source, d.value));
        }
    }

    let mut known: HashSet<String> = HashSet::new();
    let mut absent = HashSet::new();
    for x in expected(&config) {
        let shape = match (x.entry.role, low_rank_out_in) {
            (Role::Matrix(m), true) if m.low_rank() => vec![x.shape[1], x.shape[0]],
            _ => x.shape.clone(),
        };
        if let Some(format) = saved::stored_format(ck, &x.name)? {
            if !x.entry.quantizable() {
                problems.push(format!(
                    "{} is saved as {}, but only the big projections and the head are ever quantized",
                    x.name,
                    format.name()
                ));
                continue;
            }
            // Codes and scales are of the matrix as stored: transposed when input-major,
            // which only the ffn value projection (read by sparse decode) ever is.
            let (rows, width) = match saved::stored_layout(ck, &x.name)? {
                Some(Layout::InputMajor) if x.entry.role != Role::Matrix(LayerMatrix::FfnValue) => {
                    problems.push(format!(
                        "{} is saved input-major, but only ffn.value.weight (read by sparse decode) ever is",
                        x.name
                    ));
                    continue;
                }
                Some(Layout::InputMajor) => (shape[1], shape[0]),
                _ => (shape[0], shape[1]),
            };
            for (tensor, dtype, want) in saved::quantized_tensors(&x.name, format, rows, width) {
                match ck.info(&tensor) {
                    None => problems.push(format!(
                        "missing tensor {tensor:?} of the {} matrix {}",
                        format.name(),
                        x.name
                    )),
                    Some(info) if info.dtype != dtype || info.shape != want => problems.push(format!(
                        "{tensor} is {:?} {:?}; expected {dtype:?} {want:?}",
                        info.dtype, info.shape
                    )),
                    Some(_) => {}
                }
                known.insert(tensor);
            }
            continue;
        }
        known.insert(x.name.clone());
        match ck.info(&x.name) {
            None if x.entry.unused_in_layer0 && x.layer == 0 => {
                absent.insert(x.name);
            }
            None => problems.push(format!("missing tensor {}", x.name)),
            Some(info) => {
                // A [1, 1, n] vector may be stored as [n]: the same values.
                let flat = matches!(shape[..], [1, 1, n] if info.shape == [n]);
                if info.shape != shape && !flat {
                    problems.push(format!("{} has shape {:?}; expected {shape:?}", x.name, info.shape));
                }
                if !matches!(info.dtype, DType::F16 | DType::BF16 | DType::F32) {
                    problems
                        .push(format!("{} has dtype {:?}; weights are F16, BF16 or F32", x.name, info.dtype));
                }
            }
        }
    }
    let unexpected: Vec<&String> = names.iter().filter(|n| !known.contains(*n) && !ignorable(n)).collect();
    for n in unexpected.iter().take(8) {
        problems.push(format!("unexpected tensor {n} (not part of an RWKV-7 model)"));
    }
    if unexpected.len() > 8 {
        problems.push(format!("{} more unexpected tensors", unexpected.len() - 8));
    }
    problems.into_result(ck)?;
    Ok(Checked { config, low_rank_out_in, absent })
}

/// A dimension a file states outside its tensors (a Hugging Face config.json), to be
/// cross-checked against the tensors.
#[derive(Debug, Clone)]
pub struct Declared {
    pub dim: Dim,
    pub value: usize,
    /// Where it was stated, e.g. `config.json hidden_size`.
    pub source: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_official_name_is_unique_and_every_fla_name_too() {
        let mut official = HashSet::new();
        let mut fla = HashSet::new();
        for e in ENTRIES {
            assert!(official.insert(e.name), "{} twice", e.name);
            assert!(e.fla.is_empty() || fla.insert(e.fla), "{} twice", e.fla);
        }
        for name in FUSED_MIX {
            assert!(entry_named(name).is_some(), "{name}");
        }
    }

    #[test]
    fn fourteen_matrices_a_layer_six_quantizable() {
        assert_eq!(layer_matrices().count(), 14);
        assert_eq!(layer_matrices().filter(|(_, m)| m.quantizable()).count(), 6);
    }
}
