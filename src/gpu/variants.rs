//! Kernel variants as typed keys: each names its kernel file, entry point and the
//! preprocessor defines it compiles with. The pipeline cache is keyed by them, and the
//! naga test below compiles every one, so a variant the runtime can ask for is one that
//! validates.

/// How a kernel turns NF4 codes into values: a 16-entry table in workgroup memory (one
/// load per weight: right where loads are cheap and arithmetic is the scarce resource,
/// on GPUs), or a four-level select tree on the code's bits (about 20 operations per
/// weight, no memory access: on CPU drivers, where every per-lane table load is a
/// scalar loop, it made the nf4 matvec 2.1x faster on lavapipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Nf4Lookup {
    #[default]
    Table,
    Select,
}

impl Nf4Lookup {
    /// The default for a device type (wgpu's `DeviceType::Cpu` is "cpu").
    pub fn for_device_type(device_type: &str) -> Nf4Lookup {
        if device_type == "cpu" {
            Nf4Lookup::Select
        } else {
            Nf4Lookup::Table
        }
    }

    pub fn parse(text: &str) -> Option<Nf4Lookup> {
        match text.trim() {
            "table" => Some(Nf4Lookup::Table),
            "select" => Some(Nf4Lookup::Select),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Nf4Lookup::Table => "table",
            Nf4Lookup::Select => "select",
        }
    }
}

/// The weight formats of the matrices one matrix-product dispatch multiplies, and how
/// its NF4 codes are decoded. A variant compiles code for the formats it lists (f16
/// always: bf16 shares its path) and, when it lists one alone, folds the per-group
/// format branch away (SINGLE_FORMAT): on CPU drivers, which run every side of a branch
/// under a lane mask, that branch cost the int8 matvec 1.14x its time on lavapipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Formats {
    pub f16: bool,
    pub bf16: bool,
    pub int8: bool,
    pub nf4: bool,
    pub nf4_lookup: Nf4Lookup,
}

impl Formats {
    pub const F16: Formats =
        Formats { f16: true, bf16: false, int8: false, nf4: false, nf4_lookup: Nf4Lookup::Table };

    pub fn union(self, other: Formats) -> Formats {
        let nf4 = self.nf4 | other.nf4;
        let select = self.nf4_lookup == Nf4Lookup::Select || other.nf4_lookup == Nf4Lookup::Select;
        Formats {
            f16: self.f16 | other.f16,
            bf16: self.bf16 | other.bf16,
            int8: self.int8 | other.int8,
            nf4,
            // Only NF4 variants differ by lookup, so that f16 ones share one key.
            nf4_lookup: if nf4 && select { Nf4Lookup::Select } else { Nf4Lookup::Table },
        }
    }

    /// The format constant (matmul_common.wgsl) of the one format listed, if one is.
    fn single(self) -> Option<&'static str> {
        match (self.f16, self.bf16, self.int8, self.nf4) {
            (_, false, false, false) => Some("FMT_F16"),
            (false, true, false, false) => Some("FMT_BF16"),
            (false, false, true, false) => Some("FMT_INT8"),
            (false, false, false, true) => Some("FMT_NF4"),
            _ => None,
        }
    }

    fn defines(self, out: &mut Vec<(String, String)>) {
        if let Some(format) = self.single() {
            out.push(("SINGLE_FORMAT".to_string(), format.to_string()));
        }
        for (on, name) in [(self.bf16, "HAS_BF16"), (self.int8, "HAS_INT8"), (self.nf4, "HAS_NF4")] {
            if on {
                out.push((name.to_string(), String::new()));
            }
        }
        if self.nf4 && self.nf4_lookup == Nf4Lookup::Select {
            out.push(("NF4_SELECT".to_string(), String::new()));
        }
    }

    fn label(self) -> String {
        let parts: Vec<&str> =
            [(self.f16, "f16"), (self.bf16, "bf16"), (self.int8, "int8"), (self.nf4, "nf4")]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
        let parts = if parts.is_empty() { "f16".to_string() } else { parts.join("+") };
        let select = if self.nf4 && self.nf4_lookup == Nf4Lookup::Select { " (nf4 by select)" } else { "" };
        format!("{parts}{select}")
    }

    /// Every combination, for the validation test.
    fn all() -> Vec<Formats> {
        let mut all = Vec::new();
        for b in 1..16u8 {
            let (f16, bf16, int8, nf4) = (b & 1 != 0, b & 2 != 0, b & 4 != 0, b & 8 != 0);
            all.push(Formats { f16, bf16, int8, nf4, nf4_lookup: Nf4Lookup::Table });
            if nf4 {
                all.push(Formats { f16, bf16, int8, nf4, nf4_lookup: Nf4Lookup::Select });
            }
        }
        all
    }
}

/// How the matrix-matrix kernel gets its operands: staged through workgroup memory
/// (matmul_tiled: each weight read from memory once per tile, right for GPUs), or each
/// thread loading its own (matmul_direct: on CPU drivers, where workgroup memory is no
/// faster than the buffers and staging only adds loads; fp16 0.67x the time on
/// lavapipe; the host uses it for all but nf4 weights). Both do the same arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Loads {
    #[default]
    Staged,
    Direct,
}

impl Loads {
    /// The default for a device type (wgpu's `DeviceType::Cpu` is "cpu").
    pub fn for_device_type(device_type: &str) -> Loads {
        if device_type == "cpu" {
            Loads::Direct
        } else {
            Loads::Staged
        }
    }

    pub fn parse(text: &str) -> Option<Loads> {
        match text.trim() {
            "staged" => Some(Loads::Staged),
            "direct" => Some(Loads::Direct),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Loads::Staged => "staged",
            Loads::Direct => "direct",
        }
    }
}

/// Codes the quantize kernel writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codes {
    Int8,
    Nf4,
}

/// Parts a product split along K may have (`crate::model::ops::Split`; 1: not split).
pub const SPLIT_PARTS: [usize; 4] = [1, 2, 4, 8];

/// Tokens one matvec pass over the weights serves (a compile-time loop bound).
pub const MATVEC_TOKEN_BLOCKS: [u32; 4] = [1, 2, 4, 8];
/// Threads of a matvec workgroup, all striding along K: on GPUs the count of these that
/// divides the rows most evenly (MatvecLanes::Wide).
pub const MATVEC_LANES: [u32; 2] = [32, 64];
/// On CPU drivers one subgroup of lavapipe's width (MatvecLanes::Narrow).
pub const MATVEC_NARROW_LANES: u32 = 8;
/// Four warps (MatvecLanes::Widest).
pub const MATVEC_WIDEST_LANES: u32 = 128;
/// Rows of a matvec workgroup (MatvecShape::rows), the default first.
pub const MATVEC_ROWS: [u32; 2] = [8, 4];
/// Steps (one vec4<u32> of each row) a matvec thread loads before it adds any
/// (MatvecShape::depth), the default first.
pub const MATVEC_DEPTHS: [u32; 2] = [1, 2];

/// How wide a matvec workgroup is: 8 threads on CPU drivers, which run a workgroup's
/// subgroups as coroutines switched at every barrier (there 8 lanes took 0.57-0.59x the
/// time of 32: fp16 3072 x 768, one token, lavapipe, interleaved); on GPUs 32 or 64, the
/// count that divides the matrices' rows evenly (enough warps or wavefronts in flight
/// per row block), or 128: twice the bytes in flight per row block, for devices whose
/// bandwidth needs more than the others keep in flight (Little's law: an H100 needs
/// ~3.5 MB, gpu-notes.md), at the cost of threads idle on the last step of short rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MatvecLanes {
    #[default]
    Wide,
    Narrow,
    Widest,
}

impl MatvecLanes {
    /// The default for a device type (wgpu's `DeviceType::Cpu` is "cpu").
    pub fn for_device_type(device_type: &str) -> MatvecLanes {
        if device_type == "cpu" {
            MatvecLanes::Narrow
        } else {
            MatvecLanes::Wide
        }
    }

    pub fn parse(text: &str) -> Option<MatvecLanes> {
        match text.trim() {
            "wide" => Some(MatvecLanes::Wide),
            "narrow" => Some(MatvecLanes::Narrow),
            "widest" => Some(MatvecLanes::Widest),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MatvecLanes::Wide => "wide",
            MatvecLanes::Narrow => "narrow",
            MatvecLanes::Widest => "widest",
        }
    }
}

/// How a matvec workgroup adds up its threads' sums: `subgroupAdd`, then one row of
/// sums per subgroup (where the device has subgroups), or a tree in workgroup memory.
/// Both are deterministic; they add in different orders, so their sums differ in the
/// last bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    #[default]
    Subgroup,
    Tree,
}

impl Reduction {
    pub fn parse(text: &str) -> Option<Reduction> {
        match text.trim() {
            "subgroup" => Some(Reduction::Subgroup),
            "tree" => Some(Reduction::Tree),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Reduction::Subgroup => "subgroup",
            Reduction::Tree => "tree",
        }
    }
}

/// The matrix-vector kernel's workgroups: their threads, their rows (4 or 8, one of
/// MATVEC_ROWS: four launch twice the workgroups, for narrow models on GPUs with more
/// cores than 8-row blocks), how many steps each thread loads at once (1 or 2, one of
/// MATVEC_DEPTHS: two double the bytes in flight, for GPUs whose bandwidth needs more,
/// at the cost of registers) and their reduction. Devices differ in which is fastest,
/// so models time the candidates (`crate::model::tuning`); the device type gives the
/// default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatvecShape {
    pub lanes: MatvecLanes,
    pub rows: u32,
    pub depth: u32,
    pub reduction: Reduction,
}

impl MatvecShape {
    /// "lanes=wide rows=8 reduce=subgroup depth=1" (depth last: the cache's older lines
    /// end at reduce).
    pub fn to_text(self) -> String {
        format!(
            "lanes={} rows={} reduce={} depth={}",
            self.lanes.name(),
            self.rows,
            self.reduction.name(),
            self.depth
        )
    }
}

/// Narrowest subgroup sizes the cooperative-matrix kernel compiles for (its workgroup is
/// four of them).
pub const COOP_SUBGROUP_SIZES: [u32; 4] = [8, 16, 32, 64];

/// The parts of the WKV kernel (shaders/wkv7.wgsl): one kernel token after token, or
/// three passes for long chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WkvStage {
    /// Everything in one dispatch; `fused_lora`: the low-rank second stages computed in
    /// the kernel (decode).
    Whole { fused_lora: bool },
    /// The per-token vectors, all tokens in parallel.
    Prepare,
    /// The state recurrence alone, blocks of tokens staged at a time.
    Recurrence,
    /// GroupNorm, bonus and gate, all tokens in parallel.
    Finish,
}

impl WkvStage {
    pub const ALL: [WkvStage; 5] = [
        WkvStage::Whole { fused_lora: false },
        WkvStage::Whole { fused_lora: true },
        WkvStage::Prepare,
        WkvStage::Recurrence,
        WkvStage::Finish,
    ];
}

/// Tokens whose vectors the WKV recurrence stages at once for head size `n`: six
/// vectors each, 12 KiB of workgroup memory (under WebGPU's 16 KiB minimum), at most 16.
pub fn wkv_token_block(n: u32) -> u32 {
    (512 / n).clamp(1, 16)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    LayerNorm,
    /// LayerNorm and the token shift after it; `mixes`: 6 (time mix) or 1 (channel mix);
    /// `keep_normalised`: also write the LayerNorm output (DeepEmbed's channel mix);
    /// `fold`: first add the partial sums a split product left (`ops::Split`) to x.
    LnShift {
        mixes: u32,
        keep_normalised: bool,
        fold: bool,
    },
    /// RWKV-7a DeepEmbed's scaling of the channel-mix activations.
    DeepEmbed,
    /// `tokens`: one of MATVEC_TOKEN_BLOCKS; `lanes`: threads per workgroup (one of
    /// MATVEC_LANES, MATVEC_NARROW_LANES, MATVEC_WIDEST_LANES); `rows`: per workgroup,
    /// one of MATVEC_ROWS; `depth`: steps loaded at once, one of MATVEC_DEPTHS;
    /// `subgroups`: reduce with subgroupAdd.
    MatVec {
        tokens: u32,
        lanes: u32,
        rows: u32,
        depth: u32,
        formats: Formats,
        subgroups: bool,
    },
    /// Input-major matrices for a few tokens, skipping zero inputs; `tokens`: one of
    /// MATVEC_TOKEN_BLOCKS; `count`: count the rows read (profiles).
    MatVecSparse {
        tokens: u32,
        formats: Formats,
        count: bool,
    },
    /// The tiled matrix-matrix product; `input_major`: every group stored input-major;
    /// `loads`: staged (matmul_tiled) or direct (matmul_direct).
    MatMul {
        formats: Formats,
        input_major: bool,
        loads: Loads,
    },
    /// The same on cooperative matrices (f16 operands, f32 sums), in workgroups of four
    /// of the device's narrowest subgroups (`min_subgroup`: one of COOP_SUBGROUP_SIZES);
    /// never with bf16 matrices. `emulated`: the matrix operations done in plain WGSL by
    /// the subgroup's lanes (tests, on devices without matrix units).
    MatMulCoop {
        formats: Formats,
        input_major: bool,
        min_subgroup: u32,
        emulated: bool,
    },
    Wkv7 {
        head_size: u32,
        stage: WkvStage,
    },
    Quantize {
        codes: Codes,
    },
    Argmax,
    Sample,
    Copy,
}

use super::shaders::Kernel;

impl Variant {
    pub fn kernel(self) -> Kernel {
        match self {
            Variant::LayerNorm => Kernel::LayerNorm,
            Variant::LnShift { .. } => Kernel::LnShift,
            Variant::DeepEmbed => Kernel::DeepEmbed,
            Variant::MatVec { .. } => Kernel::MatmulVec,
            Variant::MatVecSparse { .. } => Kernel::MatmulSparse,
            Variant::MatMul { .. } => Kernel::MatmulMat,
            Variant::MatMulCoop { .. } => Kernel::MatmulCoop,
            Variant::Wkv7 { .. } => Kernel::Wkv7,
            Variant::Quantize { .. } => Kernel::Quantize,
            Variant::Argmax => Kernel::Argmax,
            Variant::Sample => Kernel::Sample,
            Variant::Copy => Kernel::Copy,
        }
    }

    pub fn entry(self) -> &'static str {
        match self {
            Variant::LayerNorm => "layer_norm",
            Variant::LnShift { .. } => "ln_shift",
            Variant::DeepEmbed => "deep_embed",
            Variant::MatVec { .. } => "matvec",
            Variant::MatVecSparse { .. } => "matvec_sparse",
            Variant::MatMul { loads: Loads::Staged, .. } => "matmul_tiled",
            Variant::MatMul { loads: Loads::Direct, .. } => "matmul_direct",
            Variant::MatMulCoop { .. } => "matmul_coop",
            Variant::Wkv7 { stage, .. } => match stage {
                WkvStage::Whole { .. } => "wkv7",
                WkvStage::Prepare => "wkv7_prepare",
                WkvStage::Recurrence => "wkv7_recurrence",
                WkvStage::Finish => "wkv7_finish",
            },
            Variant::Quantize { .. } => "quantize",
            Variant::Argmax => "argmax",
            Variant::Sample => "sample",
            Variant::Copy => "copy",
        }
    }

    /// The preprocessor defines: flags have an empty value.
    pub fn defines(self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut valued = |name: &str, v: u32| out.push((name.to_string(), format!("{v}u")));
        match self {
            Variant::LnShift { mixes, keep_normalised, fold } => {
                valued("N_MIX", mixes);
                if keep_normalised {
                    out.push(("KEEP_NORMALISED".into(), String::new()));
                }
                if fold {
                    out.push(("FOLD".into(), String::new()));
                }
            }
            Variant::MatVec { tokens, lanes, rows, depth, formats, subgroups } => {
                valued("TOKEN_BLOCK", tokens);
                valued("LANES", lanes);
                valued("MATVEC_ROWS", rows);
                valued("MATVEC_DEPTH", depth);
                formats.defines(&mut out);
                if subgroups {
                    out.push(("SUBGROUPS".into(), String::new()));
                }
            }
            Variant::MatVecSparse { tokens, formats, count } => {
                valued("TOKEN_BLOCK", tokens);
                formats.defines(&mut out);
                if count {
                    out.push(("COUNT_READS".into(), String::new()));
                }
            }
            Variant::MatMul { formats, input_major, .. } => {
                formats.defines(&mut out);
                if input_major {
                    out.push(("INPUT_MAJOR_W".into(), String::new()));
                }
            }
            Variant::MatMulCoop { formats, input_major, min_subgroup, emulated } => {
                valued("SG_MIN", min_subgroup);
                formats.defines(&mut out);
                if input_major {
                    out.push(("INPUT_MAJOR_W".into(), String::new()));
                }
                if emulated {
                    out.push(("COOP_EMULATED".into(), String::new()));
                }
            }
            Variant::Wkv7 { head_size, stage } => {
                valued("HEAD_SIZE", head_size);
                let flag = match stage {
                    WkvStage::Whole { .. } => "STAGE_WHOLE",
                    WkvStage::Prepare => "STAGE_PREPARE",
                    WkvStage::Recurrence => {
                        valued("TOKEN_BLOCK", wkv_token_block(head_size));
                        "STAGE_RECURRENCE"
                    }
                    WkvStage::Finish => "STAGE_FINISH",
                };
                out.push((flag.into(), String::new()));
                if stage == (WkvStage::Whole { fused_lora: true }) {
                    out.push(("FUSED_LORA".into(), String::new()));
                }
            }
            Variant::Quantize { codes } => {
                out.push((if codes == Codes::Int8 { "INT8" } else { "NF4" }.into(), String::new()))
            }
            Variant::LayerNorm | Variant::Argmax | Variant::Sample | Variant::Copy | Variant::DeepEmbed => {}
        }
        out
    }

    /// What profiles report GPU time under: "matvec t4 l64 r8 d1 f16+int8 sg".
    pub fn label(self) -> String {
        match self {
            Variant::LnShift { mixes, keep_normalised, fold } => {
                format!(
                    "ln_shift x{mixes}{}{}",
                    if keep_normalised { " +n" } else { "" },
                    if fold { " fold" } else { "" }
                )
            }
            Variant::MatVec { tokens, lanes, rows, depth, formats, subgroups } => {
                format!(
                    "matvec t{tokens} l{lanes} r{rows} d{depth} {}{}",
                    formats.label(),
                    if subgroups { " sg" } else { "" }
                )
            }
            Variant::MatVecSparse { tokens, formats, count } => {
                format!("matvec_sparse t{tokens} {}{}", formats.label(), if count { " counted" } else { "" })
            }
            Variant::MatMul { formats, input_major, .. } => {
                format!(
                    "{} {}{}",
                    self.entry(),
                    formats.label(),
                    if input_major { " input-major" } else { "" }
                )
            }
            Variant::MatMulCoop { formats, input_major, min_subgroup, emulated } => format!(
                "matmul_coop s{min_subgroup} {}{}{}",
                formats.label(),
                if input_major { " input-major" } else { "" },
                if emulated { " emulated" } else { "" }
            ),
            Variant::Wkv7 { head_size, stage } => match stage {
                WkvStage::Whole { fused_lora } => {
                    format!("wkv7 n{head_size}{}", if fused_lora { " lora" } else { "" })
                }
                _ => format!("{} n{head_size}", self.entry()),
            },
            Variant::Quantize { codes } => format!("quantize {codes:?}").to_lowercase(),
            other => other.entry().to_string(),
        }
    }

    /// Whether the device must have subgroup operations enabled.
    pub fn needs_subgroups(self) -> bool {
        matches!(self, Variant::MatVec { subgroups: true, .. } | Variant::MatMulCoop { .. })
    }

    /// Whether the device must have cooperative matrices (and f16 in shaders) enabled.
    pub fn needs_cooperative_matrices(self) -> bool {
        matches!(self, Variant::MatMulCoop { emulated: false, .. })
    }

    /// Every variant the runtime can ask for.
    pub fn all() -> Vec<Variant> {
        let mut all =
            vec![Variant::LayerNorm, Variant::Argmax, Variant::Sample, Variant::Copy, Variant::DeepEmbed];
        all.extend([1, 6].map(|mixes| Variant::LnShift { mixes, keep_normalised: false, fold: false }));
        all.push(Variant::LnShift { mixes: 1, keep_normalised: true, fold: false });
        // Only the time mix's folds: the channel mix follows the (unsplit) output projection.
        all.push(Variant::LnShift { mixes: 6, keep_normalised: false, fold: true });
        for formats in Formats::all() {
            for loads in [Loads::Staged, Loads::Direct] {
                all.extend([false, true].map(|input_major| Variant::MatMul { formats, input_major, loads }));
            }
            if !formats.bf16 {
                for min_subgroup in COOP_SUBGROUP_SIZES {
                    for emulated in [false, true] {
                        all.extend([false, true].map(|input_major| Variant::MatMulCoop {
                            formats,
                            input_major,
                            min_subgroup,
                            emulated,
                        }));
                    }
                }
            }
            for tokens in MATVEC_TOKEN_BLOCKS {
                for lanes in MATVEC_LANES.into_iter().chain([MATVEC_NARROW_LANES, MATVEC_WIDEST_LANES]) {
                    for rows in MATVEC_ROWS {
                        for depth in MATVEC_DEPTHS {
                            for subgroups in [false, true] {
                                all.push(Variant::MatVec { tokens, lanes, rows, depth, formats, subgroups });
                            }
                        }
                    }
                }
                for count in [false, true] {
                    all.push(Variant::MatVecSparse { tokens, formats, count });
                }
            }
        }
        for head_size in [4, 32, 64, 256] {
            all.extend(WkvStage::ALL.map(|stage| Variant::Wkv7 { head_size, stage }));
        }
        all.extend([Codes::Int8, Codes::Nf4].map(|codes| Variant::Quantize { codes }));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::shaders::preprocess;

    /// A dispatch of one format compiles that format as a constant; one that mixes
    /// formats (quantized r/k/v beside the f16 low-rank matrices) keeps the branch.
    #[test]
    fn one_format_alone_is_a_constant() {
        let of = |f16, int8, nf4| Formats { f16, int8, nf4, ..Formats::default() };
        let single = |f: Formats| {
            let mut out = Vec::new();
            f.defines(&mut out);
            out.into_iter().find(|(k, _)| k == "SINGLE_FORMAT").map(|(_, v)| v)
        };
        assert_eq!(single(Formats::F16).as_deref(), Some("FMT_F16"));
        assert_eq!(single(of(false, true, false)).as_deref(), Some("FMT_INT8"));
        assert_eq!(single(of(false, false, true)).as_deref(), Some("FMT_NF4"));
        assert_eq!(single(Formats::default().union(of(false, true, false))).as_deref(), Some("FMT_INT8"));
        assert_eq!(single(Formats::F16.union(of(false, true, false))), None);
        assert_eq!(single(of(false, true, true)), None);
        assert_eq!(Formats::F16.union(of(false, true, false)).label(), "f16+int8");
        assert_eq!(of(false, true, false).label(), "int8");
    }

    /// Every variant of every kernel parses and validates with naga, no GPU needed.
    #[test]
    fn every_variant_validates_with_naga() {
        for variant in Variant::all() {
            let kernel = variant.kernel();
            let code = preprocess(kernel.name(), kernel.source(), &variant.defines()).unwrap();
            let module = naga::front::wgsl::parse_str(&code)
                .unwrap_or_else(|e| panic!("{variant:?}: {}", e.emit_to_string(&code)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{variant:?}: {e:?}"));
        }
    }

    #[test]
    fn every_kernel_has_a_variant() {
        for kernel in Kernel::ALL {
            assert!(Variant::all().iter().any(|v| v.kernel() == kernel), "{kernel:?}");
        }
    }
}
