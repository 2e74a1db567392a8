//! Recurrent states in per-layer device pools. A pool page holds `slots` states for every
//! layer; one slot of layer l is [att_shift (C) | ffn_shift (C) | wkv (H, N, N)] in f32,
//! wkv indexed [head, value, key] as in the official package. A `State` is a handle to a
//! slot; kernels read and write slots in place, so no state is copied per step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::config::Config;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;

pub struct Page {
    /// One buffer per layer: (slots, slot_stride) f32.
    pub layers: Vec<wgpu::Buffer>,
    pub slots: usize,
}

struct PoolInner {
    pages: Vec<Arc<Page>>,
    free: Vec<(usize, usize)>,
}

pub struct StatePool {
    ctx: Arc<GpuContext>,
    pub slot_stride: usize,
    /// The most slots one page may hold (bounded by the largest storage binding).
    pub max_page_slots: usize,
    n_layer: usize,
    inner: Mutex<PoolInner>,
}

impl StatePool {
    pub fn new(ctx: Arc<GpuContext>, config: &Config) -> Result<Arc<StatePool>> {
        let c = config.n_embd;
        let slot_stride = 2 * c + c * config.head_size;
        let slot_bytes = (slot_stride * 4) as u64;
        if slot_bytes > ctx.max_binding {
            return Err(Error::Device(format!(
                "one layer's state ({slot_bytes} bytes) exceeds the largest storage binding ({} bytes)",
                ctx.max_binding
            )));
        }
        let max_page_slots = ((ctx.max_binding / slot_bytes) as usize).clamp(1, 64);
        Ok(Arc::new(StatePool {
            ctx,
            slot_stride,
            max_page_slots,
            n_layer: config.n_layer,
            inner: Mutex::new(PoolInner { pages: Vec::new(), free: Vec::new() }),
        }))
    }

    pub fn page(&self, index: usize) -> Arc<Page> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).pages[index].clone()
    }

    pub fn device_bytes(&self) -> u64 {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pages.iter().map(|p| (p.slots * self.n_layer * self.slot_stride * 4) as u64).sum()
    }

    /// A fresh, zeroed slot.
    pub fn allocate(self: &Arc<Self>, model_id: u64) -> Result<State> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.free.is_empty() {
            // Pages double in size (1, 2, 4, ... slots) so that a single-sequence user
            // holds exactly one state while batches still get few, large pages.
            let slots = (1usize << inner.pages.len().min(16)).min(self.max_page_slots);
            let size = (slots * self.slot_stride * 4) as u64;
            let device = &self.ctx.device;
            let layers = self.ctx.scoped("allocating a state page", || {
                (0..self.n_layer)
                    .map(|l| {
                        device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some(&format!("state layer {l}")),
                            size,
                            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                            mapped_at_creation: false,
                        })
                    })
                    .collect::<Vec<_>>()
            })?;
            let page = inner.pages.len();
            inner.pages.push(Arc::new(Page { layers, slots }));
            inner.free.extend((0..slots).rev().map(|s| (page, s)));
        }
        let (page, slot) = inner.free.pop().expect("a free slot was just made");
        drop(inner);
        let state = State(Arc::new(SlotHandle {
            pool: Arc::downgrade(self),
            page,
            slot,
            model_id,
            busy: AtomicBool::new(false),
        }));
        state.zero(&self.ctx, self)?;
        Ok(state)
    }

    fn release(&self, page: usize, slot: usize) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).free.push((page, slot));
    }
}

pub struct SlotHandle {
    pool: Weak<StatePool>,
    pub page: usize,
    pub slot: usize,
    pub model_id: u64,
    busy: AtomicBool,
}

impl Drop for SlotHandle {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.release(self.page, self.slot);
        }
    }
}

/// A handle to one state slot. Cheap to clone the handle (`State::clone` shares the
/// slot); `Model::clone_state` copies the contents into a new slot.
#[derive(Clone)]
pub struct State(pub Arc<SlotHandle>);

/// Held while a call uses a state; a second user gets `Error::State`.
pub struct StateLease<'a>(&'a SlotHandle);

impl Drop for StateLease<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

impl State {
    pub fn lease(&self) -> Result<StateLease<'_>> {
        if self.0.busy.swap(true, Ordering::Acquire) {
            return Err(Error::State("this State is being used by another thread; give each thread its own State (state.clone())".into()));
        }
        Ok(StateLease(&self.0))
    }

    pub fn byte_offset(&self, pool: &StatePool) -> u64 {
        (self.0.slot * pool.slot_stride * 4) as u64
    }

    fn zero(&self, ctx: &GpuContext, pool: &StatePool) -> Result<()> {
        let zeros = vec![0u8; pool.slot_stride * 4];
        let page = pool.page(self.0.page);
        for buffer in &page.layers {
            ctx.queue.write_buffer(buffer, self.byte_offset(pool), &zeros);
        }
        Ok(())
    }
}
