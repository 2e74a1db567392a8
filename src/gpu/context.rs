//! Adapter discovery and selection, device creation with the adapter's real limits,
//! and the error plumbing that turns wgpu's panicking defaults into `Error`s.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use super::pipeline_cache::DiskCache;
use super::variants::{Loads, MatvecLanes, MatvecShape, Nf4Lookup, Reduction, MATVEC_DEPTHS, MATVEC_ROWS};
use crate::error::{Error, Result};

/// Which adapter to use: an index into [`list_adapters`], or a case-insensitive substring
/// of the adapter's name or backend ("vulkan", "gl", "nvidia", "llvmpipe").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterChoice {
    Index(usize),
    Name(String),
}

impl AdapterChoice {
    /// Digits are an index, anything else a name substring.
    pub fn parse(text: &str) -> AdapterChoice {
        match text.trim().parse::<usize>() {
            Ok(i) => AdapterChoice::Index(i),
            Err(_) => AdapterChoice::Name(text.trim().to_string()),
        }
    }
}

/// What `RWKV_GPU_TUNE` asks of the kernel tuning (`crate::model::tuning`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TuneMode {
    /// Time what may differ on this device (unset, `on` or `1`).
    #[default]
    Default,
    /// `off` or `0`: the device's defaults, untimed.
    Off,
    /// `all`: time every dimension, the ones CPU drivers have one answer for too.
    All,
}

impl TuneMode {
    pub fn parse(text: &str) -> Option<TuneMode> {
        match text.trim() {
            "" | "on" | "1" => Some(TuneMode::Default),
            "off" | "0" => Some(TuneMode::Off),
            "all" => Some(TuneMode::All),
            _ => None,
        }
    }
}

/// How to open the device. Every switch also has an environment variable so that
/// CI can force the fallback paths on a capable device.
#[derive(Debug, Clone, Default)]
pub struct DeviceOptions {
    /// `RWKV_GPU_ADAPTER`: index or name substring.
    pub adapter: Option<AdapterChoice>,
    /// `RWKV_GPU_NO_F16=1`: do not enable `shader-f16` even where supported.
    pub no_f16: bool,
    /// `RWKV_GPU_NO_SUBGROUPS=1`: do not enable subgroup operations.
    pub no_subgroups: bool,
    /// `RWKV_GPU_NO_COOP_MATRIX=1`: do not enable cooperative matrices (prefill then
    /// runs the SIMT matrix kernel even where the device has matrix units).
    pub no_coop_matrix: bool,
    /// `RWKV_GPU_COOP_EMULATE=1` (tests): run the cooperative-matrix kernel with its
    /// matrix operations emulated in plain WGSL, on a device with fixed-size subgroups
    /// and f16 but no matrix units.
    pub coop_emulate: bool,
    /// `RWKV_GPU_NO_SPARSE_FFN=1`: keep the channel mix's value projection in the dense
    /// layout, so that decode reads all of it (the comparison path for the sparse one).
    pub no_sparse_ffn: bool,
    /// `RWKV_GPU_MAX_BINDING=<bytes>`: plan as if no storage binding could exceed this,
    /// so that the tensor-splitting paths run on devices with large bindings.
    pub max_binding: Option<u64>,
    /// `RWKV_GPU_NF4_LOOKUP=table|select`: how kernels decode NF4 codes (default: by
    /// device type, `Nf4Lookup::for_device_type`).
    pub nf4_lookup: Option<Nf4Lookup>,
    /// `RWKV_GPU_GEMM_LOADS=staged|direct`: how the prefill matrix kernel gets its
    /// operands (default: by device type, `Loads::for_device_type`).
    pub gemm_loads: Option<Loads>,
    /// `RWKV_GPU_MATVEC_LANES=wide|narrow|widest`: threads per matrix-vector workgroup
    /// (default: timed per model on GPUs, by device type elsewhere; `crate::model::tuning`).
    pub matvec_lanes: Option<MatvecLanes>,
    /// `RWKV_GPU_MATVEC_ROWS=4|8`: rows per matrix-vector workgroup (default: timed per
    /// model on GPUs, 8 elsewhere).
    pub matvec_rows: Option<u32>,
    /// `RWKV_GPU_MATVEC_DEPTH=1|2`: steps a matrix-vector thread loads at once (default:
    /// timed per model on GPUs, 1 elsewhere).
    pub matvec_depth: Option<u32>,
    /// `RWKV_GPU_SPLIT_K=1|2|4|8`: parts the decode value projection is split into along
    /// K (default: timed per model on GPUs, 1 on CPU drivers; `crate::model::tuning`).
    pub split_k: Option<usize>,
    /// `RWKV_GPU_TUNE=off|on|all`: see `TuneMode`.
    pub tune: Option<TuneMode>,
    /// `RWKV_GPU_CHUNK_TOKENS=N` (64 to 1024, a multiple of 64): tokens per prefill chunk
    /// at most (default: by device type, `chunk_tokens_for_device_type`).
    pub chunk_tokens: Option<usize>,
    /// `RWKV_GPU_SAMPLE_ON=device|host`: where generation draws its tokens (default: by
    /// device type, `sample_on_device_for_device_type`; `Model::draws_on_device`).
    pub sample_on_device: Option<bool>,
}

/// Tokens per prefill chunk at most, by device type: 512 on GPUs, 256 on CPU drivers.
/// Each chunk's matrix products launch (rows / tile) x (tokens / 64) workgroups: at 256
/// tokens the 2.9B model's 2560-row products give 160 SIMT or 80 cooperative-matrix
/// workgroups, fewer than an H100 has cores (132) several times over; 512 doubles them,
/// and halves the chunks' fixed costs (dispatches, WKV passes), for 2x the scratch
/// (~85 MB at 2.9B, 1.5% of the fp16 weights). A CPU driver's few cores are busy at 256
/// already, and there a chunk is the unit an interrupt waits for.
pub fn chunk_tokens_for_device_type(device_type: &str) -> usize {
    if device_type == "cpu" {
        256
    } else {
        512
    }
}

/// Where generation draws its tokens by default: on the device everywhere but on CPU
/// drivers. A GPU then reads back 8 bytes per sequence instead of its logits and the host
/// does no per-token arithmetic; a CPU driver runs each sequence's draw (one workgroup)
/// on one core, as the host does, but in passes with workgroup barriers that it pays
/// dearly for (lavapipe, `benches/draw_place.py`: 1.32x the host's wall time at 16
/// sequences, 1.34x at one; README).
pub fn sample_on_device_for_device_type(device_type: &str) -> bool {
    device_type != "cpu"
}

impl DeviceOptions {
    /// Fills every unset field from the environment.
    pub fn with_env(mut self) -> Result<Self> {
        let flag = |name: &str| std::env::var(name).map(|v| !v.is_empty() && v != "0").unwrap_or(false);
        if self.adapter.is_none() {
            if let Ok(v) = std::env::var("RWKV_GPU_ADAPTER") {
                if !v.trim().is_empty() {
                    self.adapter = Some(AdapterChoice::parse(&v));
                }
            }
        }
        self.no_f16 |= flag("RWKV_GPU_NO_F16");
        self.no_subgroups |= flag("RWKV_GPU_NO_SUBGROUPS");
        self.no_coop_matrix |= flag("RWKV_GPU_NO_COOP_MATRIX");
        self.coop_emulate |= flag("RWKV_GPU_COOP_EMULATE");
        self.no_sparse_ffn |= flag("RWKV_GPU_NO_SPARSE_FFN");
        if self.max_binding.is_none() {
            if let Ok(v) = std::env::var("RWKV_GPU_MAX_BINDING") {
                let bytes = v.trim().parse::<u64>().map_err(|_| {
                    Error::Invalid(format!("RWKV_GPU_MAX_BINDING must be a byte count, got {v:?}"))
                })?;
                self.max_binding = Some(bytes);
            }
        }
        // Variables that choose a kernel variant: a typo must not silently mean the default.
        fn chosen<T>(
            field: &mut Option<T>,
            name: &str,
            parse: impl Fn(&str) -> Option<T>,
            expected: &str,
        ) -> Result<()> {
            if field.is_none() {
                if let Ok(v) = std::env::var(name) {
                    let value = parse(&v)
                        .ok_or_else(|| Error::Invalid(format!("{name} must be {expected}, got {v:?}")))?;
                    *field = Some(value);
                }
            }
            Ok(())
        }
        chosen(&mut self.gemm_loads, "RWKV_GPU_GEMM_LOADS", Loads::parse, "\"staged\" or \"direct\"")?;
        chosen(
            &mut self.matvec_lanes,
            "RWKV_GPU_MATVEC_LANES",
            MatvecLanes::parse,
            "\"wide\", \"narrow\" or \"widest\"",
        )?;
        let rows = |v: &str| v.trim().parse().ok().filter(|r| MATVEC_ROWS.contains(r));
        chosen(&mut self.matvec_rows, "RWKV_GPU_MATVEC_ROWS", rows, "4 or 8")?;
        let depth = |v: &str| v.trim().parse().ok().filter(|d| MATVEC_DEPTHS.contains(d));
        chosen(&mut self.matvec_depth, "RWKV_GPU_MATVEC_DEPTH", depth, "1 or 2")?;
        let parts = |v: &str| v.trim().parse().ok().filter(|p| super::variants::SPLIT_PARTS.contains(p));
        chosen(&mut self.split_k, "RWKV_GPU_SPLIT_K", parts, "1, 2, 4 or 8")?;
        chosen(&mut self.tune, "RWKV_GPU_TUNE", TuneMode::parse, "\"off\", \"on\" or \"all\"")?;
        let tokens =
            |v: &str| v.trim().parse().ok().filter(|&t: &usize| (64..=1024).contains(&t) && t % 64 == 0);
        chosen(&mut self.chunk_tokens, "RWKV_GPU_CHUNK_TOKENS", tokens, "a multiple of 64 from 64 to 1024")?;
        let place = |v: &str| match v.trim() {
            "device" => Some(true),
            "host" => Some(false),
            _ => None,
        };
        chosen(&mut self.sample_on_device, "RWKV_GPU_SAMPLE_ON", place, "\"device\" or \"host\"")?;
        chosen(&mut self.nf4_lookup, "RWKV_GPU_NF4_LOOKUP", Nf4Lookup::parse, "\"table\" or \"select\"")?;
        Ok(self)
    }
}

/// What users see of an adapter (`rwkv_gpu.adapters()`).
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub shader_f16: bool,
    pub subgroups: bool,
    /// The narrowest and widest subgroups the driver may run (0 without subgroups).
    pub subgroup_sizes: (u32, u32),
    /// The adapter offers cooperative matrices in the one shape our kernel uses:
    /// 16 x 16 x 16, f16 operands, f32 sums, subgroup scope.
    pub coop_matrix_f16: bool,
    pub max_storage_binding: u64,
    pub max_buffer_size: u64,
    pub max_workgroups_per_dimension: u32,
    pub max_workgroup_invocations: u32,
}

/// Mesa's device-select Vulkan layer (installed with Mesa's drivers, loaded into every
/// Vulkan instance) asks Wayland for the session's display and, with no desktop session
/// (no XDG_RUNTIME_DIR: a server, a container, CI), prints an error line twice per
/// instance. It only reorders devices for the display; we choose the adapter ourselves,
/// so it is turned off there with its documented switch, once, before the first instance.
fn quiet_device_select() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let headless =
            std::env::var_os("XDG_RUNTIME_DIR").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none();
        if cfg!(target_os = "linux") && headless && std::env::var_os("NODEVICE_SELECT").is_none() {
            std::env::set_var("NODEVICE_SELECT", "1");
        }
    });
}

fn instance() -> wgpu::Instance {
    quiet_device_select();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    // GL is listed so that users can ask for it, never chosen by default.
    desc.backends =
        wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12 | wgpu::Backends::GL;
    wgpu::Instance::new(desc)
}

fn enumerate(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

fn summarize(index: usize, adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let features = adapter.features();
    AdapterSummary {
        index,
        name: info.name,
        backend: backend_name(info.backend).to_string(),
        device_type: device_type_name(info.device_type).to_string(),
        driver: info.driver,
        driver_info: info.driver_info,
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        subgroups: features.contains(wgpu::Features::SUBGROUP),
        subgroup_sizes: if features.contains(wgpu::Features::SUBGROUP) {
            (info.subgroup_min_size, info.subgroup_max_size)
        } else {
            (0, 0)
        },
        coop_matrix_f16: features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            && adapter.cooperative_matrix_properties().iter().any(|c| {
                (c.m_size, c.n_size, c.k_size) == (16, 16, 16)
                    && c.ab_type == wgpu::CooperativeScalarType::F16
                    && c.cr_type == wgpu::CooperativeScalarType::F32
            }),
        max_storage_binding: limits.max_storage_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
        max_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
        max_workgroup_invocations: limits.max_compute_invocations_per_workgroup,
    }
}

/// How the prefill kernel on cooperative matrices (shaders/matmul_coop.wgsl) runs here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoopMatrix {
    /// The narrowest and widest subgroups the driver may run: the kernel's workgroup is
    /// four of the narrowest, each subgroup owning 32 rows of the tile.
    pub min_subgroup: u32,
    pub max_subgroup: u32,
    /// Matrix operations emulated in plain WGSL (`DeviceOptions::coop_emulate`).
    pub emulated: bool,
}

impl CoopMatrix {
    /// Rows of a workgroup's tile when its subgroups are the widest (the fewest rows:
    /// the host sizes the grid by it).
    pub fn fewest_tile_rows(self) -> usize {
        (32 * 4 * self.min_subgroup / self.max_subgroup) as usize
    }
}

/// Whether the prefill kernel on cooperative matrices can run: the adapter offers the
/// 16 x 16 x 16 f16 shape with f32 sums (unless emulated), f16 and subgroups are on, and
/// a workgroup of four of the narrowest subgroups holds at least one of the widest.
/// Gives how, or why not.
fn coop_matrix_support(
    a: &AdapterSummary,
    shader_f16: bool,
    subgroups: bool,
    options: &DeviceOptions,
) -> std::result::Result<CoopMatrix, String> {
    if options.no_coop_matrix {
        return Err("turned off (RWKV_GPU_NO_COOP_MATRIX)".into());
    }
    if !a.coop_matrix_f16 && !options.coop_emulate {
        return Err("not offered by this adapter (16x16x16, f16 operands, f32 sums)".into());
    }
    if !shader_f16 || !subgroups {
        return Err("needs shader-f16 and subgroups enabled".into());
    }
    let (min, max) = a.subgroup_sizes;
    let sizes_fit = crate::gpu::variants::COOP_SUBGROUP_SIZES.contains(&min)
        && max.is_power_of_two()
        && (min..=4 * min).contains(&max)
        && 4 * min <= a.max_workgroup_invocations;
    if !sizes_fit {
        return Err(format!("no kernel for subgroups of {min} to {max} lanes"));
    }
    Ok(CoopMatrix { min_subgroup: min, max_subgroup: max, emulated: options.coop_emulate })
}

/// Every adapter wgpu can see, on every native backend, in a stable order.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let instance = instance();
    enumerate(&instance).iter().enumerate().map(|(i, a)| summarize(i, a)).collect()
}

pub fn backend_name(b: wgpu::Backend) -> &'static str {
    match b {
        wgpu::Backend::Vulkan => "vulkan",
        wgpu::Backend::Metal => "metal",
        wgpu::Backend::Dx12 => "dx12",
        wgpu::Backend::Gl => "gl",
        wgpu::Backend::BrowserWebGpu => "webgpu",
        _ => "other",
    }
}

fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

/// Lower is better: discrete, integrated, virtual, other, then software; GL after all
/// native backends.
fn preference(s: &AdapterSummary) -> (u8, u8) {
    let kind = match s.device_type.as_str() {
        "discrete" => 0,
        "integrated" => 1,
        "virtual" => 2,
        "other" => 3,
        _ => 4,
    };
    (u8::from(s.backend == "gl"), kind)
}

/// Picks an adapter index for `choice`; returns it with warnings worth showing.
pub fn select(summaries: &[AdapterSummary], choice: Option<&AdapterChoice>) -> Result<(usize, Vec<String>)> {
    let listing = || {
        if summaries.is_empty() {
            "no adapters found (is a Vulkan driver installed? on Debian/Ubuntu: apt-get install mesa-vulkan-drivers libvulkan1)".to_string()
        } else {
            let rows: Vec<String> = summaries
                .iter()
                .map(|s| format!("  {}: {} ({}, {})", s.index, s.name, s.backend, s.device_type))
                .collect();
            format!("available adapters:\n{}", rows.join("\n"))
        }
    };
    let mut warnings = Vec::new();
    let chosen = match choice {
        Some(AdapterChoice::Index(i)) => {
            if *i >= summaries.len() {
                return Err(Error::Device(format!("adapter index {i} is out of range; {}", listing())));
            }
            *i
        }
        Some(AdapterChoice::Name(name)) => {
            let needle = name.to_lowercase();
            let best = summaries
                .iter()
                .filter(|s| s.name.to_lowercase().contains(&needle) || s.backend == needle)
                .min_by_key(|s| (preference(s), s.index));
            match best {
                Some(s) => s.index,
                None => return Err(Error::Device(format!("no adapter matches {name:?}; {}", listing()))),
            }
        }
        None => {
            let best =
                summaries.iter().filter(|s| s.backend != "gl").min_by_key(|s| (preference(s), s.index));
            match best {
                Some(s) => {
                    if s.device_type == "cpu" {
                        warnings.push(format!(
                            "using the software adapter {:?}: no hardware GPU adapter was found, so everything runs on the CPU and is slow",
                            s.name
                        ));
                    }
                    s.index
                }
                None => {
                    return Err(Error::Device(format!(
                        "no Vulkan, Metal or DX12 adapter found (OpenGL adapters are used only when asked for by name, e.g. adapter=\"gl\"); {}",
                        listing()
                    )))
                }
            }
        }
    };
    Ok((chosen, warnings))
}

/// Device objects created so far.
#[derive(Debug, Default)]
pub struct Created {
    pub buffers: AtomicUsize,
    pub bind_groups: AtomicUsize,
}

/// The opened device and the facts about it that planning needs.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    /// Largest storage binding that plans may use: the device's, or the forced cap.
    pub max_binding: u64,
    pub max_buffer: u64,
    pub max_workgroups: u32,
    pub storage_offset_alignment: u32,
    pub uniform_offset_alignment: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
    /// Cooperative matrices enabled, for the prefill kernel on matrix units, or why not.
    pub coop_matrix: std::result::Result<CoopMatrix, String>,
    /// How matrix kernels decode NF4 codes on this device by default (models may time
    /// the other: `crate::model::tuning`), and whether the caller fixed it.
    pub nf4_lookup: Nf4Lookup,
    pub nf4_forced: bool,
    /// The parts of a split decode value projection, where the caller fixed them.
    pub split_k_forced: Option<usize>,
    /// How the prefill matrix kernel (SIMT) gets its operands on this device.
    pub gemm_loads: Loads,
    /// The matrix-vector kernel's workgroups on this device by default (models may time
    /// others: `crate::model::tuning`), and which parts of it the caller fixed (the
    /// reduction is fixed where the device has no subgroups: the tree is all there is).
    pub matvec: MatvecShape,
    pub matvec_lanes_forced: bool,
    pub matvec_rows_forced: bool,
    pub matvec_depth_forced: bool,
    pub tune: TuneMode,
    /// Tokens per prefill chunk at most (fewer where a binding cannot hold them).
    pub chunk_tokens: usize,
    /// Loads may store the channel mix's value projection input-major, for sparse decode.
    pub sparse_ffn: bool,
    /// Generation draws its tokens on the device where it can (`Model::draws_on_device`).
    pub sample_on_device: bool,
    /// Timestamp queries are available: profiles report GPU time per dispatch.
    pub timestamps: bool,
    pub warnings: Vec<String>,
    /// Buffers and bind groups created through this context so far (tests check that a
    /// steady decode step creates none).
    pub created: Created,
    uncaptured: Arc<Mutex<Option<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    /// The driver's compiled pipelines on disk, where the backend keeps them.
    pub pipeline_cache: Option<DiskCache>,
}

impl GpuContext {
    pub fn new(options: &DeviceOptions) -> Result<Arc<GpuContext>> {
        let instance = instance();
        let adapters = enumerate(&instance);
        let summaries: Vec<AdapterSummary> =
            adapters.iter().enumerate().map(|(i, a)| summarize(i, a)).collect();
        let (index, warnings) = select(&summaries, options.adapter.as_ref())?;
        let adapter = &adapters[index];
        let summary = summaries[index].clone();

        let available = adapter.features();
        let mut features = wgpu::Features::empty();
        let shader_f16 = !options.no_f16 && available.contains(wgpu::Features::SHADER_F16);
        let subgroups = !options.no_subgroups && available.contains(wgpu::Features::SUBGROUP);
        if shader_f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        if subgroups {
            features |= wgpu::Features::SUBGROUP;
        }
        let coop_matrix = coop_matrix_support(&summary, shader_f16, subgroups, options);
        if coop_matrix.as_ref().is_ok_and(|c| !c.emulated) {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        // Compiled pipelines kept on disk between runs (pipeline_cache.rs), where offered.
        if available.contains(wgpu::Features::PIPELINE_CACHE) {
            features |= wgpu::Features::PIPELINE_CACHE;
        }
        // Only for profiling (`Recorder::profile`); nothing else depends on it.
        let timestamps = available.contains(wgpu::Features::TIMESTAMP_QUERY);
        if timestamps {
            features |= wgpu::Features::TIMESTAMP_QUERY;
        }
        // The real limits, not the WebGPU defaults: big models need big bindings.
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("rwkv-gpu"),
            required_features: features,
            required_limits: limits.clone(),
            // Weights are allocated once, at load. With small allocator blocks, every
            // buffer above 4 MiB (all big matrices) gets memory of exactly its size,
            // instead of leaving the tail of a shared 128-256 MiB block unused; the
            // small ones share 4 MiB blocks.
            memory_hints: wgpu::MemoryHints::Manual {
                suballocated_device_memory_block_size: (4 << 20)..(4 << 20),
            },
            // SAFETY: wgpu asks for this token before it enables an experimental
            // feature, whose implementation may still have bugs. The only one we ask
            // for, cooperative matrices, serves one kernel, which a model uses only once
            // its own matrices gave the same products through it as through the SIMT
            // kernel (model/coop_check.rs); RWKV_GPU_NO_COOP_MATRIX=1 keeps it off.
            experimental_features: if coop_matrix.as_ref().is_ok_and(|c| !c.emulated) {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            ..Default::default()
        };
        let (device, queue) = block_on(adapter.request_device(&desc)).map_err(|e| {
            Error::Device(format!("failed to open {} ({}): {e}", summary.name, summary.backend))
        })?;

        let uncaptured = Arc::new(Mutex::new(None::<String>));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));
        let lost = Arc::new(Mutex::new(None::<String>));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            let mut slot = lost_sink.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some(format!("{reason:?}: {message}"));
        });

        let pipeline_cache = if features.contains(wgpu::Features::PIPELINE_CACHE) {
            DiskCache::open(&device, &adapter.get_info())
        } else {
            None
        };
        let device_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let max_binding = match options.max_binding {
            Some(cap) => cap.min(device_binding),
            None => device_binding,
        };
        let nf4_lookup = options.nf4_lookup.unwrap_or(Nf4Lookup::for_device_type(&summary.device_type));
        let gemm_loads = options.gemm_loads.unwrap_or(Loads::for_device_type(&summary.device_type));
        let chunk_tokens = options.chunk_tokens.unwrap_or(chunk_tokens_for_device_type(&summary.device_type));
        let sample_on_device =
            options.sample_on_device.unwrap_or(sample_on_device_for_device_type(&summary.device_type));
        let matvec = MatvecShape {
            lanes: options.matvec_lanes.unwrap_or(MatvecLanes::for_device_type(&summary.device_type)),
            rows: options.matvec_rows.unwrap_or(MATVEC_ROWS[0]),
            depth: options.matvec_depth.unwrap_or(MATVEC_DEPTHS[0]),
            reduction: if subgroups { Reduction::Subgroup } else { Reduction::Tree },
        };
        Ok(Arc::new(GpuContext {
            device,
            queue,
            adapter: summary,
            max_binding,
            max_buffer: limits.max_buffer_size,
            max_workgroups: limits.max_compute_workgroups_per_dimension,
            storage_offset_alignment: limits.min_storage_buffer_offset_alignment,
            uniform_offset_alignment: limits.min_uniform_buffer_offset_alignment,
            shader_f16,
            subgroups,
            coop_matrix,
            nf4_lookup,
            nf4_forced: options.nf4_lookup.is_some(),
            split_k_forced: options.split_k,
            gemm_loads,
            matvec,
            matvec_lanes_forced: options.matvec_lanes.is_some(),
            matvec_rows_forced: options.matvec_rows.is_some(),
            matvec_depth_forced: options.matvec_depth.is_some(),
            tune: options.tune.unwrap_or_default(),
            chunk_tokens,
            sparse_ffn: !options.no_sparse_ffn,
            sample_on_device,
            timestamps,
            warnings,
            created: Created::default(),
            uncaptured,
            lost,
            pipeline_cache,
        }))
    }

    /// Runs `f` inside out-of-memory and validation error scopes; an error caught there
    /// becomes `Error::OutOfMemory` or `Error::Device` naming `what`.
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        self.check_alive()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let validation_error = block_on(validation.pop());
        let oom_error = block_on(oom.pop());
        if let Some(e) = oom_error {
            return Err(Error::OutOfMemory(format!("{what}: {e}")));
        }
        if let Some(e) = validation_error {
            return Err(Error::Device(format!("{what}: {e}")));
        }
        Ok(value)
    }

    /// A buffer of `size` bytes (at least 4, a multiple of 4), created inside error
    /// scopes so that running out of memory is an `Error::OutOfMemory` naming `label`.
    pub fn create_buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let size = size.max(4).next_multiple_of(4);
        let buffer = self.scoped(&format!("allocating {label} ({size} bytes)"), || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        })?;
        self.created.buffers.fetch_add(1, Ordering::Relaxed);
        Ok(buffer)
    }

    pub(crate) fn count_bind_group(&self) {
        self.created.bind_groups.fetch_add(1, Ordering::Relaxed);
    }

    /// Destroys the device as a driver reset or a removed GPU would: the device-lost
    /// callback fires and every later call fails with `Error::DeviceLost`. For tests.
    pub fn lose_device(&self) {
        self.device.destroy();
        let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
    }

    /// Fails once the device is lost or an error escaped every scope.
    pub fn check_alive(&self) -> Result<()> {
        if let Some(m) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(Error::DeviceLost(format!("the GPU device was lost ({m}); open the model again")));
        }
        if let Some(m) = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(Error::Device(format!("GPU error: {m}")));
        }
        Ok(())
    }

    /// Blocks until the queue is idle.
    /// Blocks until `submission` (and everything submitted before it) has run.
    pub fn wait_for(&self, submission: wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: Some(submission), timeout: None })
            .map_err(|e| Error::Device(format!("waiting for the GPU failed: {e}")))?;
        self.check_alive()
    }

    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Device(format!("waiting for the GPU failed: {e}")))?;
        self.check_alive()
    }

    /// Splits `n` workgroups into a grid whose dimensions respect the device maximum.
    /// Kernels rebuild the linear index from `workgroup_id` and `num_workgroups`.
    pub fn grid(&self, n: u32) -> (u32, u32) {
        let max = self.max_workgroups.max(1);
        if n <= max {
            (n.max(1), 1)
        } else {
            (max, n.div_ceil(max))
        }
    }
}

/// Drives a future to completion on this thread. wgpu's native futures are ready once
/// the device has been polled, so a no-op waker and a spin with yield suffice.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = TaskContext::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = future.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(index: usize, name: &str, backend: &str, kind: &str) -> AdapterSummary {
        AdapterSummary {
            index,
            name: name.into(),
            backend: backend.into(),
            device_type: kind.into(),
            driver: String::new(),
            driver_info: String::new(),
            shader_f16: false,
            subgroups: false,
            subgroup_sizes: (0, 0),
            coop_matrix_f16: false,
            max_storage_binding: 1 << 27,
            max_buffer_size: 1 << 28,
            max_workgroups_per_dimension: 65535,
            max_workgroup_invocations: 256,
        }
    }

    #[test]
    fn default_prefers_discrete_over_integrated_and_never_gl() {
        let list = vec![
            fake(0, "llvmpipe", "gl", "cpu"),
            fake(1, "Intel Iris", "vulkan", "integrated"),
            fake(2, "RTX 4090", "vulkan", "discrete"),
        ];
        assert_eq!(select(&list, None).unwrap(), (2, vec![]));
    }

    #[test]
    fn software_only_warns_and_gl_needs_asking() {
        let list = vec![fake(0, "llvmpipe", "gl", "cpu"), fake(1, "llvmpipe (LLVM)", "vulkan", "cpu")];
        let (i, warnings) = select(&list, None).unwrap();
        assert_eq!(i, 1);
        assert!(warnings[0].contains("software adapter"));
        assert_eq!(select(&list, Some(&AdapterChoice::parse("gl"))).unwrap().0, 0);
        // A name shared by both picks the native backend.
        assert_eq!(select(&list, Some(&AdapterChoice::parse("LLVMPIPE"))).unwrap().0, 1);
    }

    #[test]
    fn cooperative_matrices_need_the_shape_f16_subgroups_and_one_subgroup_size() {
        let nvidia = AdapterSummary {
            shader_f16: true,
            subgroups: true,
            subgroup_sizes: (32, 32),
            coop_matrix_f16: true,
            ..fake(0, "RTX", "vulkan", "discrete")
        };
        let plain = DeviceOptions::default();
        let real = CoopMatrix { min_subgroup: 32, max_subgroup: 32, emulated: false };
        assert_eq!(coop_matrix_support(&nvidia, true, true, &plain), Ok(real));
        let why = |a: &AdapterSummary, f16: bool, sg: bool, o: &DeviceOptions| {
            coop_matrix_support(a, f16, sg, o).unwrap_err()
        };
        let off = DeviceOptions { no_coop_matrix: true, ..Default::default() };
        assert!(why(&nvidia, true, true, &off).contains("RWKV_GPU_NO_COOP_MATRIX"));
        assert!(why(&nvidia, false, true, &plain).contains("shader-f16"));
        assert!(why(&nvidia, true, false, &plain).contains("subgroups"));
        let radeon = AdapterSummary { subgroup_sizes: (32, 64), ..nvidia.clone() };
        let wave = coop_matrix_support(&radeon, true, true, &plain).unwrap();
        assert_eq!((wave.min_subgroup, wave.max_subgroup, wave.fewest_tile_rows()), (32, 64, 64));
        assert_eq!(real.fewest_tile_rows(), 128);
        let narrow = AdapterSummary { subgroup_sizes: (4, 4), ..nvidia.clone() };
        assert!(why(&narrow, true, true, &plain).contains("4 to 4 lanes"));
        let spread = AdapterSummary { subgroup_sizes: (8, 64), ..nvidia.clone() };
        assert!(why(&spread, true, true, &plain).contains("8 to 64 lanes"));
        let lavapipe = AdapterSummary { coop_matrix_f16: false, subgroup_sizes: (8, 8), ..nvidia };
        assert!(why(&lavapipe, true, true, &plain).contains("not offered"));
        let emulate = DeviceOptions { coop_emulate: true, ..Default::default() };
        let emulated = CoopMatrix { min_subgroup: 8, max_subgroup: 8, emulated: true };
        assert_eq!(coop_matrix_support(&lavapipe, true, true, &emulate), Ok(emulated));
    }

    #[test]
    fn bad_choices_list_what_exists() {
        let list = vec![fake(0, "RTX", "vulkan", "discrete")];
        let e = select(&list, Some(&AdapterChoice::parse("7"))).unwrap_err().to_string();
        assert!(e.contains("out of range") && e.contains("0: RTX"), "{e}");
        let e = select(&list, Some(&AdapterChoice::parse("radeon"))).unwrap_err().to_string();
        assert!(e.contains("\"radeon\"") && e.contains("RTX"), "{e}");
        let e = select(&[], None).unwrap_err().to_string();
        assert!(e.contains("mesa-vulkan-drivers"), "{e}");
    }
}
