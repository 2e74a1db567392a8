//! One function per kernel: it checks what the kernel assumes, picks the variant, lays
//! out the kernel's `Params` (each `#[repr(C)]` struct mirrors the WGSL struct of the
//! same kernel; `tests::params_match_the_wgsl_structs` checks them by naga reflection)
//! and records the dispatch. Buffers are passed by role, offsets in f32 elements.

use bytemuck::{Pod, Zeroable};

use super::coop_check::MatmulKernel;
use super::weights::{Chunk, Layout, Matrix, WeightFormat};
use super::Model;
use crate::error::{Error, Result};
use crate::gpu::variants::{
    Loads, MatvecLanes, Nf4Lookup, Reduction, MATVEC_LANES, MATVEC_NARROW_LANES, MATVEC_TOKEN_BLOCKS,
    MATVEC_WIDEST_LANES, SPLIT_PARTS,
};
use crate::gpu::{Binding, Formats, Recorder, Variant, WkvStage};

/// Up to this many tokens, matrices use the matrix-vector kernel, which reads the
/// weights once per 8 tokens: at most two passes, against a 64x64-token tile that would
/// be mostly padding (a batch of decode steps, the tail of a cached prompt).
pub const MATVEC_TOKENS: usize = 16;
/// Outputs of one sparse matvec workgroup (`OUTS` in shaders/matmul_sparse.wgsl).
const SPARSE_OUTS: usize = 32;
/// Output tile of matmul_tiled (rows and tokens).
const TILE: usize = 64;
/// Matrices one matmul dispatch computes at most (`groups` in matmul_common.wgsl).
pub const MAX_GROUPS: usize = 8;
/// The WKV kernel computes the low-rank second stages itself for chunks of up to this
/// many tokens: one dispatch fewer per layer, while each head's workgroup reads its rows
/// of those matrices once per token (a GEMM reads them once for all tokens).
pub const FUSED_LORA_TOKENS: usize = 4;
/// Low-rank hidden values the fused WKV kernel stages at most (`sh_mid` in wkv7.wgsl).
const FUSED_LORA_WIDTH: usize = 2048;
/// Chunks with at least this many tokens per sequence run the WKV in three passes
/// (prepare, recurrence, finish): the sequential recurrence then has no reductions and
/// two barriers per block of tokens, against ~25 barriers per token in the whole kernel,
/// for two more dispatches and one more round trip of the vectors through memory.
pub const WKV_STAGED_TOKENS: usize = 8;

// ---- layer_norm.wgsl ----

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct LayerNormParams {
    c: u32,
    rows: u32,
    in_row0: u32,
    w_off: u32,
    b_off: u32,
    eps: f32,
    out_row0: u32,
    _pad: u32,
}

/// `rows` rows of x from `in_row0`, normalised with the vectors at slots `weight` and
/// `bias` of `consts`, into y from `out_row0`.
pub struct LayerNorm<'a> {
    pub x: &'a wgpu::Buffer,
    pub in_row0: usize,
    pub rows: usize,
    pub consts: &'a wgpu::Buffer,
    pub weight: usize,
    pub bias: usize,
    pub y: &'a wgpu::Buffer,
    pub out_row0: usize,
}

pub fn layer_norm(model: &Model, rec: &mut Recorder, a: LayerNorm) -> Result<()> {
    let c = model.config.n_embd;
    let pipeline = model.pipelines.get(Variant::LayerNorm)?;
    let params = LayerNormParams {
        c: c as u32,
        rows: a.rows as u32,
        in_row0: a.in_row0 as u32,
        w_off: (a.weight * c) as u32,
        b_off: (a.bias * c) as u32,
        eps: 1e-5,
        out_row0: a.out_row0 as u32,
        _pad: 0,
    };
    let (gx, gy) = model.ctx.grid(a.rows as u32);
    rec.dispatch(
        &pipeline,
        &params,
        vec![Binding::whole(a.x), Binding::whole(a.consts), Binding::whole(a.y)],
        (gx, gy, 1),
    );
    Ok(())
}

// ---- ln_shift.wgsl ----

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct LnShiftParams {
    c: u32,
    t_total: u32,
    n_seq: u32,
    ln_w: u32,
    ln_b: u32,
    mix_off: u32,
    state_off: u32,
    slot_stride: u32,
    eps: f32,
    fold_parts: u32,
    fold_stride: u32,
    _pad: u32,
}

/// LayerNorm of every token of the chunk, then the token shift with `mixes` mix vectors
/// (from slot `first_mix` of `consts`) into `out` (mixes, T, C); the shift state is at
/// `state_off` in each sequence's slot of `state`.
pub struct LnShift<'a> {
    pub x: &'a wgpu::Buffer,
    pub consts: &'a wgpu::Buffer,
    pub weight: usize,
    pub bias: usize,
    pub first_mix: usize,
    pub mixes: usize,
    pub state: &'a wgpu::Buffer,
    pub state_off: usize,
    pub seqs: &'a wgpu::Buffer,
    pub out: &'a wgpu::Buffer,
    pub tokens: usize,
    pub n_seq: usize,
    /// Also write the LayerNorm output, as row `mixes` of `out`.
    pub keep_normalised: bool,
    /// The partial sums a split product left for x (`Split`), added to it first. Only
    /// where every token is its sequence's first (the kernel folds each token's own row
    /// and reads no other).
    pub fold: Option<Split<'a>>,
}

pub fn ln_shift(model: &Model, rec: &mut Recorder, a: LnShift) -> Result<()> {
    let c = model.config.n_embd;
    if a.fold.is_some() && a.tokens != a.n_seq {
        return Err(Error::Invalid(
            "ln_shift folds partial sums only when every token starts its sequence".into(),
        ));
    }
    let pipeline = model.pipelines.get(Variant::LnShift {
        mixes: a.mixes as u32,
        keep_normalised: a.keep_normalised,
        fold: a.fold.is_some(),
    })?;
    let params = LnShiftParams {
        c: c as u32,
        t_total: a.tokens as u32,
        n_seq: a.n_seq as u32,
        ln_w: (a.weight * c) as u32,
        ln_b: (a.bias * c) as u32,
        mix_off: (a.first_mix * c) as u32,
        state_off: a.state_off as u32,
        slot_stride: model.pool.slot_stride as u32,
        eps: 1e-5,
        fold_parts: a.fold.map_or(0, |f| f.parts as u32),
        fold_stride: (a.tokens * c) as u32,
        _pad: 0,
    };
    let (gx, gy) = model.ctx.grid(a.tokens as u32);
    let mut bindings = vec![
        Binding::whole(a.x),
        Binding::whole(a.consts),
        Binding::whole(a.seqs),
        Binding::whole(a.state),
        Binding::whole(a.out),
    ];
    if let Some(fold) = a.fold {
        bindings.push(Binding::whole(fold.partials));
    }
    rec.dispatch(&pipeline, &params, bindings, (gx, gy, 1));
    Ok(())
}

// ---- deep_embed.wgsl ----

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct DeepEmbedParams {
    t: u32,
    f: u32,
    r: u32,
    se_off: u32,
    h_off: u32,
    s2_off: u32,
    _pad: [u32; 2],
}

/// Threads of a deep_embed workgroup, one output row each.
const DEEP_EMBED_ROWS: usize = 256;

/// Scales `kf`'s (T, F) key activations by DeepEmbed's per-token modulation, from the
/// layer's complete table rows at `se_off` of `se` and h = xf @ s1 at `h_off` of `kf`.
pub struct DeepEmbed<'a> {
    pub se: &'a wgpu::Buffer,
    pub se_off: usize,
    pub consts: &'a wgpu::Buffer,
    pub kf: &'a wgpu::Buffer,
    pub h_off: usize,
    pub tokens: usize,
}

pub fn deep_embed(model: &Model, rec: &mut Recorder, a: DeepEmbed) -> Result<()> {
    let cfg = &model.config;
    let (f, r) = (cfg.ffn_size, cfg.deep_embed_rank);
    let pipeline = model.pipelines.get(Variant::DeepEmbed)?;
    let params = DeepEmbedParams {
        t: a.tokens as u32,
        f: f as u32,
        r: r as u32,
        se_off: a.se_off as u32,
        h_off: a.h_off as u32,
        s2_off: super::weights::deep_consts::s2(f) as u32,
        _pad: [0; 2],
    };
    let bindings = vec![Binding::whole(a.se), Binding::whole(a.consts), Binding::whole(a.kf)];
    rec.dispatch(&pipeline, &params, bindings, (f.div_ceil(DEEP_EMBED_ROWS) as u32, a.tokens as u32, 1));
    Ok(())
}

// ---- matmul_vec.wgsl / matmul_mat.wgsl ----

/// One matrix of a matmul dispatch (matmul_common.wgsl `Group`).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MatGroup {
    m: u32,
    k: u32,
    w_off: u32,
    s_off: u32,
    x_off: u32,
    x_stride: u32,
    y_off: u32,
    y_stride: u32,
    flags: u32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MatParams {
    t: u32,
    count_at: u32,
    n_groups: u32,
    _pad: u32,
    groups: [MatGroup; MAX_GROUPS],
}

const ADD: u32 = 16;
const INPUT_MAJOR: u32 = 32;

/// The activation applied to a product's outputs (matmul_common.wgsl flags bits 0-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None = 0,
    Tanh = 1,
    Sigmoid = 2,
    ReluSquared = 3,
}

/// One matrix product y (+)= act(W x) of a dispatch: where it reads x and writes y
/// (offsets in elements of the dispatch's x and y buffers; `y_stride` elements between
/// tokens), and whether it adds to y (the residual stream).
pub struct Product<'a> {
    pub w: &'a Matrix,
    pub x_off: usize,
    pub y_off: usize,
    pub y_stride: usize,
    pub act: Act,
    pub add: bool,
}

/// Where a sparse product counts the rows it reads: four u32 counters from `at` of
/// `buffer` (groups of four inputs read, groups, non-zero inputs, inputs).
#[derive(Clone, Copy)]
pub struct ReadCounts<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub at: usize,
}

fn format_bits(format: WeightFormat) -> u32 {
    match format {
        WeightFormat::F16 => 0,
        WeightFormat::Bf16 => 1,
        WeightFormat::Int8 => 2,
        WeightFormat::Nf4 => 3,
    }
}

/// The formats a variant compiles for `format`, NF4 decoded as the device prefers.
fn formats_of(model: &Model, format: WeightFormat) -> Formats {
    Formats {
        f16: format == WeightFormat::F16,
        bf16: format == WeightFormat::Bf16,
        int8: format == WeightFormat::Int8,
        nf4: format == WeightFormat::Nf4,
        nf4_lookup: if format == WeightFormat::Nf4 { model.nf4_lookup() } else { Nf4Lookup::Table },
    }
}

impl Product<'_> {
    /// The kernel's view of one chunk of this product: rows of the output (nn.Linear
    /// layout) or, input-major, a run of the inputs whose partial products add up in y.
    fn group(&self, chunk: &Chunk) -> Result<MatGroup> {
        let (w, rows) = (self.w, chunk.rows);
        let format = format_bits(w.format) << 8;
        let g = match w.layout {
            Layout::OutputMajor => MatGroup {
                m: rows as u32,
                k: w.k as u32,
                w_off: chunk.word_off as u32,
                s_off: (chunk.word_off + w.format.scales_offset(rows, w.k)) as u32,
                x_off: self.x_off as u32,
                x_stride: w.k as u32,
                y_off: (self.y_off + chunk.row0) as u32,
                y_stride: self.y_stride as u32,
                flags: self.act as u32 | if self.add { ADD } else { 0 } | format,
                _pad: [0; 3],
            },
            Layout::InputMajor => {
                if w.chunks.len() > 1 && self.act != Act::None {
                    return Err(Error::Invalid(
                        "an input-major matrix split into chunks cannot take an activation".into(),
                    ));
                }
                // Every chunk after the first adds its part to what the ones before wrote.
                let add = self.add || chunk.row0 > 0;
                MatGroup {
                    m: w.m as u32,
                    k: rows as u32,
                    w_off: chunk.word_off as u32,
                    s_off: (chunk.word_off + w.format.scales_offset(rows, w.m)) as u32,
                    x_off: (self.x_off + chunk.row0) as u32,
                    x_stride: w.k as u32,
                    y_off: self.y_off as u32,
                    y_stride: self.y_stride as u32,
                    flags: self.act as u32 | if add { ADD } else { 0 } | INPUT_MAJOR | format,
                    _pad: [0; 3],
                }
            }
        };
        // The kernels read rows and inputs as vec4s (input-major rows 8 outputs at a time).
        let m_aligned = w.layout == Layout::OutputMajor || g.m.is_multiple_of(8);
        if !g.k.is_multiple_of(8)
            || !m_aligned
            || !g.w_off.is_multiple_of(4)
            || !g.x_off.is_multiple_of(4)
            || !g.x_stride.is_multiple_of(4)
        {
            return Err(Error::Invalid(format!(
                "matrix product with M = {}, K = {}, weight word {}, input offset {}: K must be a multiple of 8 (M too when input-major), the offsets of 4",
                g.m, g.k, g.w_off, g.x_off)));
        }
        Ok(g)
    }
}

/// The matvec variant's tokens per pass for `t` tokens: the smallest block that holds
/// them, else the largest (several passes).
fn token_block(t: usize) -> u32 {
    MATVEC_TOKEN_BLOCKS.into_iter().find(|&b| b as usize >= t).unwrap_or(8)
}

/// The matvec variant's threads per workgroup: the most whose stride divides every
/// group's row of vec4s (fp16: K / 8, int8: K / 16, nf4: K / 32) evenly, else the
/// fewest, so that no thread idles through a step its neighbours work.
fn matvec_lanes(groups: &[MatGroup]) -> u32 {
    let per = |g: &MatGroup| match g.flags >> 8 & 3 {
        2 => 16,
        3 => 32,
        _ => 8,
    };
    let even = |lanes: u32| groups.iter().all(|g| (g.k / per(g)).is_multiple_of(lanes));
    MATVEC_LANES.into_iter().rev().find(|&l| even(l)).unwrap_or(MATVEC_LANES[0])
}

/// One matmul dispatch: up to MAX_GROUPS matrices of one weight buffer (all in one
/// layout), all reading `x` and writing `y`, over `t` tokens.
struct MatDispatch<'a> {
    weights: &'a wgpu::Buffer,
    formats: Formats,
    groups: &'a [MatGroup],
    x: &'a wgpu::Buffer,
    y: &'a wgpu::Buffer,
    t: usize,
    /// Sparse products only: count the rows read.
    counts: Option<ReadCounts<'a>>,
}

/// Records one matmul dispatch: for a few tokens the matrix-vector kernel (input-major
/// matrices: the sparse one), else the tiled one.
fn matmul_dispatch(model: &Model, rec: &mut Recorder, d: MatDispatch) -> Result<()> {
    let (groups, t) = (d.groups, d.t);
    // Workgroups: every group's blocks back to back in one flat grid (`locate` in
    // matmul_common.wgsl), blocks of `rows` outputs by `token_tiles` tiles of tokens.
    let blocks = |rows: usize, token_tiles: usize| -> usize {
        groups.iter().map(|g| (g.m as usize).div_ceil(rows) * token_tiles).sum()
    };
    let input_major = groups.iter().any(|g| g.flags & INPUT_MAJOR != 0);
    debug_assert!(
        groups.iter().all(|g| (g.flags & INPUT_MAJOR != 0) == input_major),
        "one layout per dispatch"
    );
    let (variant, workgroups) = if t <= MATVEC_TOKENS && input_major {
        let count = d.counts.is_some();
        (Variant::MatVecSparse { tokens: token_block(t), formats: d.formats, count }, blocks(SPARSE_OUTS, 1))
    } else if t <= MATVEC_TOKENS {
        let shape = model.matvec_shape();
        let lanes = match shape.lanes {
            MatvecLanes::Wide => matvec_lanes(groups),
            MatvecLanes::Narrow => MATVEC_NARROW_LANES,
            MatvecLanes::Widest => MATVEC_WIDEST_LANES,
        };
        (
            Variant::MatVec {
                tokens: token_block(t),
                lanes,
                rows: shape.rows,
                depth: shape.depth,
                formats: d.formats,
                subgroups: shape.reduction == Reduction::Subgroup,
            },
            blocks(shape.rows as usize, 1),
        )
    } else if let (MatmulKernel::CoopMatrix, Ok(coop), false) =
        (model.matmul_kernel(), &model.ctx.coop_matrix, d.formats.bf16)
    {
        let (min_subgroup, emulated) = (coop.min_subgroup, coop.emulated);
        (
            Variant::MatMulCoop { formats: d.formats, input_major, min_subgroup, emulated },
            blocks(coop.fewest_tile_rows(), t.div_ceil(TILE)),
        )
    } else {
        // Direct loads pay off for 16-bit and int8 weights, not nf4: each of the 8
        // threads that read a weight decodes it again, and an NF4 code costs about 20
        // operations (measured on lavapipe, 768 x 768 over 64 tokens, direct / staged:
        // fp16 0.67x, int8 0.70x, nf4 2.7x).
        let loads = if d.formats.nf4 { Loads::Staged } else { model.ctx.gemm_loads };
        (Variant::MatMul { formats: d.formats, input_major, loads }, blocks(TILE, t.div_ceil(TILE)))
    };
    let pipeline = model.pipelines.get(variant)?;
    let count_at = d.counts.map_or(0, |c| c.at as u32);
    let mut params = MatParams {
        t: t as u32,
        count_at,
        n_groups: groups.len() as u32,
        _pad: 0,
        groups: [MatGroup::zeroed(); MAX_GROUPS],
    };
    params.groups[..groups.len()].copy_from_slice(groups);
    let (gx, gy) = model.ctx.grid(workgroups as u32);
    // The weights twice: as vec4 rows of codes and as words of scales.
    let mut bindings =
        vec![Binding::whole(d.weights), Binding::whole(d.weights), Binding::whole(d.x), Binding::whole(d.y)];
    if let (true, Some(c)) = (variant.kernel() == crate::gpu::Kernel::MatmulSparse, d.counts) {
        bindings.push(Binding::whole(c.buffer));
    }
    let moves = groups.iter().map(|g| group_bytes(g, t)).sum();
    rec.dispatch_moving(&pipeline, &params, bindings, (gx, gy, 1), moves);
    Ok(())
}

/// What one group's product must move at least: its weights (codes and block scales),
/// its inputs once and its outputs (read too when accumulated), for the profile's GB/s.
/// A sparse product is counted dense: what it reads depends on the inputs.
fn group_bytes(g: &MatGroup, t: usize) -> u64 {
    let format = [WeightFormat::F16, WeightFormat::Bf16, WeightFormat::Int8, WeightFormat::Nf4]
        .into_iter()
        .find(|&f| format_bits(f) == g.flags >> 8 & 3)
        .expect("two bits name one of the four");
    let (m, k) = (g.m as usize, g.k as usize);
    let (rows, width) = if g.flags & INPUT_MAJOR != 0 { (k, m) } else { (m, k) };
    let outputs = if g.flags & ADD != 0 { 2 } else { 1 };
    (rows * format.row_bytes(width) + 4 * t * k + 4 * t * m * outputs) as u64
}

/// Records `products` over `t` tokens, all reading `x` and writing `y`: one dispatch for
/// each run of up to MAX_GROUPS single-chunk matrices of one layout that share a buffer
/// (the loader puts those a layer computes together in one), one per chunk for the
/// others (for input-major ones, one after another, each adding its inputs' part).
pub fn products(
    model: &Model,
    rec: &mut Recorder,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    t: usize,
    products: &[Product],
) -> Result<()> {
    counted_products(model, rec, x, y, t, products, None)
}

/// As `products`; sparse products count their reads into `counts` (profiles).
pub fn counted_products(
    model: &Model,
    rec: &mut Recorder,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    t: usize,
    products: &[Product],
    counts: Option<ReadCounts>,
) -> Result<()> {
    let mut i = 0;
    while i < products.len() {
        let Some(c0) = products[i].w.single() else {
            let p = &products[i];
            for chunk in &p.w.chunks {
                let groups = [p.group(chunk)?];
                matmul_dispatch(
                    model,
                    rec,
                    MatDispatch {
                        weights: &chunk.buffer,
                        formats: formats_of(model, p.w.format),
                        groups: &groups,
                        x,
                        y,
                        t,
                        counts,
                    },
                )?;
            }
            i += 1;
            continue;
        };
        let layout = products[i].w.layout;
        let mut n = 1;
        while i + n < products.len()
            && n < MAX_GROUPS
            && products[i + n].w.layout == layout
            && products[i + n].w.single().is_some_and(|c| c.buffer == c0.buffer)
        {
            n += 1;
        }
        let run = &products[i..i + n];
        let groups = run.iter().map(|p| p.group(&p.w.chunks[0])).collect::<Result<Vec<_>>>()?;
        let formats = run.iter().fold(Formats::default(), |f, p| f.union(formats_of(model, p.w.format)));
        matmul_dispatch(
            model,
            rec,
            MatDispatch { weights: &c0.buffer, formats, groups: &groups, x, y, t, counts },
        )?;
        i += n;
    }
    Ok(())
}

/// A product split along K across workgroups: `parts` groups, each over a run of the
/// inputs, write their partial sums into slabs of `partials` ((parts, T, C), T x C
/// floats apart) instead of adding them to y, and the next `ln_shift` folds them into
/// the residual stream in part order (deterministic). For matrices with few outputs and
/// long K in decode, the channel mix's value projection: one sparse workgroup per 32
/// outputs leaves most of a big GPU's cores idle (80 workgroups for C = 2560), and each
/// part multiplies the workgroups that keep weight bytes in flight.
#[derive(Clone, Copy)]
pub struct Split<'a> {
    pub partials: &'a wgpu::Buffer,
    pub parts: usize,
}

/// Parts a product may be split into at most (the partials buffer's slabs).
pub const MAX_SPLIT: usize = SPLIT_PARTS[SPLIT_PARTS.len() - 1];

/// Whether `w` can be split into `parts` (`split_product`): input-major (each part reads
/// a run of stored rows), one chunk, and K a multiple of 8 per part.
pub fn can_split(w: &Matrix, parts: usize) -> bool {
    (2..=MAX_SPLIT).contains(&parts)
        && w.layout == Layout::InputMajor
        && w.single().is_some()
        && w.k.is_multiple_of(8 * parts)
}

/// Records `p` split as `split` says (see `Split`) over `t` tokens reading `x`. `p` must
/// add, without activation, into rows of y that start at 0 and are `y_stride` apart, as
/// the fold adds the parts to x.
pub fn split_product(
    model: &Model,
    rec: &mut Recorder,
    x: &wgpu::Buffer,
    t: usize,
    p: &Product,
    split: Split,
    counts: Option<ReadCounts>,
) -> Result<()> {
    let (w, parts) = (p.w, split.parts);
    let Some(chunk) = w.single().filter(|_| can_split(w, parts)) else {
        return Err(Error::Invalid(format!(
            "a {} x {} matrix cannot be split into {parts} parts along K",
            w.m, w.k
        )));
    };
    if !p.add || p.act != Act::None || p.y_off != 0 || t > MATVEC_TOKENS {
        return Err(Error::Invalid("only a plain accumulating decode product can be split".into()));
    }
    let whole = p.group(chunk)?;
    let k = w.k / parts;
    let code_words = w.format.code_words(w.m);
    let scale_words = w.format.row_bytes(w.m) / 4 - code_words;
    let groups: Vec<MatGroup> = (0..parts)
        .map(|j| MatGroup {
            k: k as u32,
            w_off: whole.w_off + (j * k * code_words) as u32,
            s_off: whole.s_off + (j * k * scale_words) as u32,
            x_off: whole.x_off + (j * k) as u32,
            y_off: (j * t * p.y_stride) as u32,
            flags: whole.flags & !ADD,
            ..whole
        })
        .collect();
    matmul_dispatch(
        model,
        rec,
        MatDispatch {
            weights: &chunk.buffer,
            formats: formats_of(model, w.format),
            groups: &groups,
            x,
            y: split.partials,
            t,
            counts,
        },
    )
}

/// Records row chunk `i` of `p.w` alone, its rows landing from `p.y_off` of y rather
/// than at the chunk's place in the matrix: the head writes each chunk into a logits
/// buffer of its own.
pub fn chunk_product(
    model: &Model,
    rec: &mut Recorder,
    p: &Product,
    i: usize,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    t: usize,
) -> Result<()> {
    let chunk = &p.w.chunks[i];
    if p.w.layout == Layout::InputMajor {
        return Err(Error::Invalid("chunk_product takes row chunks of an nn.Linear-layout matrix".into()));
    }
    let groups = [MatGroup { y_off: p.y_off as u32, ..p.group(chunk)? }];
    matmul_dispatch(
        model,
        rec,
        MatDispatch {
            weights: &chunk.buffer,
            formats: formats_of(model, p.w.format),
            groups: &groups,
            x,
            y,
            t,
            counts: None,
        },
    )
}

// ---- wkv7.wgsl ----

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct WkvParams {
    c: u32,
    t_total: u32,
    n_seq: u32,
    first_layer: u32,
    slot_stride: u32,
    wkv_off: u32,
    w0: u32,
    a0: u32,
    v0: u32,
    k_k: u32,
    k_a: u32,
    r_k: u32,
    lnx_w: u32,
    lnx_b: u32,
    eps: f32,
    mid_off: u32,
    _pad: [u32; 4],
    lora_k: [u32; 4],
    lora_mid: [u32; 4],
    lora_w: [u32; 4],
}

/// Where the WKV kernel gets the low-rank second stages from.
pub enum LoraInput<'a> {
    /// Computed before, into `lora` (4, T, C): w, a, v, g. The three-pass kernel
    /// rewrites lora's w, a, v rows and proj's k and v rows in place.
    Computed(&'a wgpu::Buffer),
    /// Computed by the kernel from the hidden values in `proj` (from `mid_off`; the four
    /// blocks at `mid` relative to it, (T, width) each) and the four matrices (w2, a2,
    /// v2, g2; `None` for v2 in block 0), which share `buffer`.
    Fused { buffer: &'a wgpu::Buffer, mid_off: usize, mid: [usize; 4], matrices: [Option<&'a Matrix>; 4] },
}

/// The time-mix core of one layer (see wkv7.wgsl): reads r, k, v from `proj` (3, T, C),
/// the layer's vectors from its `consts`, updates the WKV state at
/// `wkv_off` of each sequence's slot and writes the gated output into `out`.
pub struct Wkv<'a> {
    pub proj: &'a wgpu::Buffer,
    pub lora: LoraInput<'a>,
    pub consts: &'a wgpu::Buffer,
    pub seqs: &'a wgpu::Buffer,
    pub v_first: &'a wgpu::Buffer,
    pub first_layer: bool,
    pub state: &'a wgpu::Buffer,
    pub wkv_off: usize,
    pub out: &'a wgpu::Buffer,
    pub tokens: usize,
    pub n_seq: usize,
}

/// Whether the WKV kernel can compute these second-stage matrices itself for a chunk of
/// `tokens` tokens: few tokens, f16 matrices in one buffer, hidden values that fit.
pub fn can_fuse_lora(tokens: usize, matrices: &[&Matrix], width: usize) -> bool {
    let buffer = matrices[0].single().map(|c| &c.buffer);
    tokens <= FUSED_LORA_TOKENS
        && width <= FUSED_LORA_WIDTH
        && matrices.iter().all(|m| {
            m.format == WeightFormat::F16 && m.single().map(|c| &c.buffer) == buffer && buffer.is_some()
        })
}

pub fn wkv(model: &Model, rec: &mut Recorder, a: Wkv) -> Result<()> {
    let cfg = &model.config;
    let c = cfg.n_embd;
    let k = |slot: usize| (slot * c) as u32;
    use super::weights::consts as s;
    let mut params = WkvParams {
        c: c as u32,
        t_total: a.tokens as u32,
        n_seq: a.n_seq as u32,
        first_layer: u32::from(a.first_layer),
        slot_stride: model.pool.slot_stride as u32,
        wkv_off: a.wkv_off as u32,
        w0: k(s::W0),
        a0: k(s::A0),
        v0: k(s::V0),
        k_k: k(s::K_K),
        k_a: k(s::K_A),
        r_k: k(s::R_K),
        lnx_w: k(s::LNX_W),
        lnx_b: k(s::LNX_B),
        eps: 64e-5,
        mid_off: 0,
        _pad: [0; 4],
        lora_k: [0; 4],
        lora_mid: [0; 4],
        lora_w: [0; 4],
    };
    let head_size = cfg.head_size as u32;
    let wkv = |stage| model.pipelines.get(Variant::Wkv7 { head_size, stage });
    let per_head_token = (cfg.n_head as u32, a.tokens as u32, 1);
    let per_head_seq = (cfg.n_head as u32, a.n_seq as u32, 1);
    match a.lora {
        LoraInput::Computed(lora) if a.tokens >= WKV_STAGED_TOKENS * a.n_seq => {
            debug_assert!(a.tokens <= 65535, "chunks are at most 256 tokens (scratch.rs)");
            let prepare = [a.proj, lora, a.consts, a.v_first].map(Binding::whole);
            rec.dispatch(&wkv(WkvStage::Prepare)?, &params, prepare.into(), per_head_token);
            let recurrence = [a.proj, lora, a.seqs, a.state, a.out].map(Binding::whole);
            rec.dispatch(&wkv(WkvStage::Recurrence)?, &params, recurrence.into(), per_head_seq);
            let finish = [a.proj, lora, a.consts, a.out].map(Binding::whole);
            rec.dispatch(&wkv(WkvStage::Finish)?, &params, finish.into(), per_head_token);
        }
        LoraInput::Computed(lora) => {
            let bindings = [a.proj, lora, a.consts, a.seqs, a.v_first, a.state, a.out].map(Binding::whole);
            rec.dispatch(
                &wkv(WkvStage::Whole { fused_lora: false })?,
                &params,
                bindings.into(),
                per_head_seq,
            );
        }
        LoraInput::Fused { buffer, mid_off, mid, matrices } => {
            params.mid_off = mid_off as u32;
            for (i, m) in matrices.iter().enumerate() {
                params.lora_mid[i] = mid[i] as u32;
                if let Some(m) = m {
                    let chunk = &m.chunks[0];
                    if !m.k.is_multiple_of(8) || !chunk.word_off.is_multiple_of(4) {
                        return Err(Error::Invalid(format!(
                            "a fused low-rank matrix of width {} at word {} is not vec4-aligned",
                            m.k, chunk.word_off
                        )));
                    }
                    params.lora_k[i] = m.k as u32;
                    params.lora_w[i] = chunk.word_off as u32;
                }
            }
            let bindings = [a.proj, buffer, a.consts, a.seqs, a.v_first, a.state, a.out].map(Binding::whole);
            rec.dispatch(&wkv(WkvStage::Whole { fused_lora: true })?, &params, bindings.into(), per_head_seq);
        }
    }
    Ok(())
}

// ---- argmax.wgsl ----

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ArgmaxParams {
    rows: u32,
    row0: u32,
    first: u32,
    out0: u32,
}

/// Folds `tokens` rows of `logits` (one head row chunk: `rows` logits from vocabulary
/// index `row0`) into `best` rows `out0..`; the first chunk (`first`) starts them.
pub struct Argmax<'a> {
    pub logits: &'a wgpu::Buffer,
    pub rows: usize,
    pub row0: usize,
    pub first: bool,
    pub best: &'a wgpu::Buffer,
    pub out0: usize,
    pub tokens: usize,
}

pub fn argmax(model: &Model, rec: &mut Recorder, a: Argmax) -> Result<()> {
    let pipeline = model.pipelines.get(Variant::Argmax)?;
    let params = ArgmaxParams {
        rows: a.rows as u32,
        row0: a.row0 as u32,
        first: u32::from(a.first),
        out0: a.out0 as u32,
    };
    rec.dispatch(
        &pipeline,
        &params,
        vec![Binding::whole(a.logits), Binding::whole(a.best)],
        (1, a.tokens as u32, 1),
    );
    Ok(())
}

// ---- sample.wgsl ----

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SampleParams {
    vocab: u32,
    row0: u32,
    _pad: [u32; 2],
}

/// One row of the draws table (`Draw` in sample.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct DrawRow {
    pub u: f32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub fallback: u32,
    pub first_entry: u32,
    pub entries: u32,
    pub skip: u32,
}

impl DrawRow {
    /// A row that draws nothing.
    pub const SKIP: DrawRow = DrawRow {
        u: 0.0,
        temperature: 0.0,
        top_p: 0.0,
        top_k: 0,
        fallback: 0,
        first_entry: 0,
        entries: 0,
        skip: 1,
    };
}

/// Draws a token for each of `rows` rows of `logits` (a full vocabulary each, rewritten
/// on the way) with rows `row0..` of the `draws` table, into those rows of `best`.
pub struct Sample<'a> {
    pub logits: &'a wgpu::Buffer,
    pub draws: &'a wgpu::Buffer,
    pub entries: &'a wgpu::Buffer,
    pub best: &'a wgpu::Buffer,
    pub row0: usize,
    pub rows: usize,
}

pub fn sample(model: &Model, rec: &mut Recorder, a: Sample) -> Result<()> {
    let pipeline = model.pipelines.get(Variant::Sample)?;
    let params = SampleParams { vocab: model.config.vocab_size as u32, row0: a.row0 as u32, _pad: [0; 2] };
    let bindings = [a.logits, a.draws, a.entries, a.best].map(Binding::whole);
    rec.dispatch(&pipeline, &params, bindings.into(), (1, a.rows as u32, 1));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::shaders::preprocess;

    /// Byte size and the byte offset of each member of the WGSL struct `name` of the
    /// variant's kernel.
    fn wgsl_struct(variant: Variant, name: &str) -> (u32, Vec<(String, u32)>) {
        let kernel = variant.kernel();
        let code = preprocess(kernel.name(), kernel.source(), &variant.defines()).unwrap();
        let module = naga::front::wgsl::parse_str(&code).unwrap();
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).unwrap();
        let ty = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{variant:?}: no struct {name}"))
            .1;
        match &ty.inner {
            naga::TypeInner::Struct { members, span } => {
                (*span, members.iter().map(|m| (m.name.clone().unwrap_or_default(), m.offset)).collect())
            }
            _ => panic!("{name} is not a struct"),
        }
    }

    fn check_struct<P>(variant: Variant, name: &str, offsets: &[(&str, usize)]) {
        let (size, members) = wgsl_struct(variant, name);
        assert_eq!(size as usize, std::mem::size_of::<P>(), "{variant:?}: size of {name}");
        for (member, offset) in offsets {
            let found = members
                .iter()
                .find(|(n, _)| n == member)
                .unwrap_or_else(|| panic!("{variant:?}: no member {member} in {name}"));
            assert_eq!(found.1 as usize, *offset, "{variant:?}: offset of {name}.{member}");
        }
    }

    fn check<P>(variant: Variant, offsets: &[(&str, usize)]) {
        check_struct::<P>(variant, "Params", offsets)
    }

    #[test]
    fn params_match_the_wgsl_structs() {
        use std::mem::offset_of;
        check::<LayerNormParams>(
            Variant::LayerNorm,
            &[("eps", offset_of!(LayerNormParams, eps)), ("out_row0", offset_of!(LayerNormParams, out_row0))],
        );
        check::<DeepEmbedParams>(Variant::DeepEmbed, &[("s2_off", offset_of!(DeepEmbedParams, s2_off))]);
        check::<LnShiftParams>(
            Variant::LnShift { mixes: 6, keep_normalised: false, fold: true },
            &[
                ("eps", offset_of!(LnShiftParams, eps)),
                ("slot_stride", offset_of!(LnShiftParams, slot_stride)),
                ("fold_parts", offset_of!(LnShiftParams, fold_parts)),
                ("fold_stride", offset_of!(LnShiftParams, fold_stride)),
            ],
        );
        let mv = Variant::MatVec {
            tokens: 1,
            lanes: 64,
            rows: 8,
            depth: 1,
            formats: Formats::F16,
            subgroups: false,
        };
        check::<MatParams>(
            mv,
            &[
                ("t", 0),
                ("n_groups", offset_of!(MatParams, n_groups)),
                ("groups", offset_of!(MatParams, groups)),
            ],
        );
        let sparse = Variant::MatVecSparse { tokens: 1, formats: Formats::F16, count: true };
        check::<MatParams>(
            sparse,
            &[("count_at", offset_of!(MatParams, count_at)), ("groups", offset_of!(MatParams, groups))],
        );
        check::<MatParams>(
            Variant::MatMul { formats: Formats::F16, input_major: false, loads: Default::default() },
            &[("groups", offset_of!(MatParams, groups))],
        );
        check::<WkvParams>(
            Variant::Wkv7 { head_size: 64, stage: WkvStage::Whole { fused_lora: true } },
            &[
                ("eps", offset_of!(WkvParams, eps)),
                ("mid_off", offset_of!(WkvParams, mid_off)),
                ("lora_k", offset_of!(WkvParams, lora_k)),
                ("lora_mid", offset_of!(WkvParams, lora_mid)),
                ("lora_w", offset_of!(WkvParams, lora_w)),
            ],
        );
        check::<ArgmaxParams>(Variant::Argmax, &[("out0", offset_of!(ArgmaxParams, out0))]);
        check::<SampleParams>(Variant::Sample, &[("row0", offset_of!(SampleParams, row0))]);
        check_struct::<DrawRow>(
            Variant::Sample,
            "Draw",
            &[
                ("top_k", offset_of!(DrawRow, top_k)),
                ("first_entry", offset_of!(DrawRow, first_entry)),
                ("skip", offset_of!(DrawRow, skip)),
            ],
        );
    }

    #[test]
    fn matvec_lanes_divide_rows_evenly() {
        let group = |k: u32, format: u32| MatGroup {
            m: 8,
            k,
            w_off: 0,
            s_off: 0,
            x_off: 0,
            x_stride: k,
            y_off: 0,
            y_stride: 8,
            flags: format << 8,
            _pad: [0; 3],
        };
        assert_eq!(matvec_lanes(&[group(2560, 0)]), 64); // 320 vec4s
        assert_eq!(matvec_lanes(&[group(768, 0)]), 32); // 96
        assert_eq!(matvec_lanes(&[group(2560, 2)]), 32); // int8: 160
        assert_eq!(matvec_lanes(&[group(4096, 3), group(4096, 0)]), 64); // nf4 128, fp16 512
        assert_eq!(matvec_lanes(&[group(2560, 3)]), 32); // nf4: 80, neither divides
    }

    #[test]
    fn matvec_token_blocks_cover_every_count() {
        assert_eq!((1..=10).map(token_block).collect::<Vec<_>>(), [1, 2, 4, 4, 8, 8, 8, 8, 8, 8]);
    }
}
