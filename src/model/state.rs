//! Recurrent states in per-layer device pools. A pool page holds `slots` states for every
//! layer; one slot of layer l is [att_shift (C) | ffn_shift (C) | wkv (H, N, N)] in f32,
//! wkv indexed [head, value, key] as in the official package. A `State` is a handle to a
//! slot; kernels read and write slots in place, so no state is copied per step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::config::Config;
use super::forward::Plans;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;

pub struct Page {
    /// One buffer per layer: (slots, slot_stride) f32.
    pub layers: Vec<wgpu::Buffer>,
    pub slots: usize,
    /// The forward programs recorded for this page (they bind its buffers, so they go
    /// when it goes).
    pub plans: Mutex<Plans>,
}

struct PoolInner {
    /// None where a page was given back (its index may be reused).
    pages: Vec<Option<Arc<Page>>>,
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
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pages[index].clone().expect("a live State keeps its page")
    }

    pub fn device_bytes(&self) -> u64 {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pages.iter().flatten().map(|p| (p.slots * self.n_layer * self.slot_stride * 4) as u64).sum()
    }

    /// A fresh, zeroed slot.
    pub fn allocate(self: &Arc<Self>, model_id: u64) -> Result<State> {
        Ok(self.allocate_many(model_id, 1)?.pop().expect("one state was asked for"))
    }

    /// `n` fresh, zeroed slots, on as few pages as possible (one when n fits a page), so
    /// that a call feeding them all reads the weights once per step.
    pub fn allocate_many(self: &Arc<Self>, model_id: u64, n: usize) -> Result<Vec<State>> {
        let mut states = Vec::new();
        states
            .try_reserve_exact(n)
            .map_err(|_| Error::OutOfMemory(format!("host memory: {n} states cannot even be listed")))?;
        while states.len() < n {
            let want = (n - states.len()).min(self.max_page_slots);
            let taken = self.take_slots(want)?;
            for (page, slot) in taken {
                let state = State(Arc::new(SlotHandle {
                    pool: Arc::downgrade(self),
                    page,
                    slot,
                    model_id,
                    busy: AtomicBool::new(false),
                }));
                state.zero(&self.ctx, self)?;
                states.push(state);
            }
        }
        Ok(states)
    }

    /// `n` (at most max_page_slots) free slots of one page: from the fullest page that has
    /// room, else from a new page.
    fn take_slots(&self, n: usize) -> Result<Vec<(usize, usize)>> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut free_per_page = vec![0usize; inner.pages.len()];
        for &(page, _) in &inner.free {
            free_per_page[page] += 1;
        }
        let page = match (0..inner.pages.len())
            .filter(|&p| free_per_page[p] >= n)
            .min_by_key(|&p| free_per_page[p])
        {
            Some(page) => page,
            None => {
                // Pages double in size (1, 2, 4, ... slots) so that a single-sequence user
                // holds exactly one state while batches still get few, large pages.
                let live = inner.pages.iter().flatten().count();
                let slots = (1usize << live.min(16)).max(n).min(self.max_page_slots);
                let size = (slots * self.slot_stride * 4) as u64;
                let usage =
                    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
                let layers = (0..self.n_layer)
                    .map(|l| self.ctx.create_buffer(&format!("state layer {l}"), size, usage))
                    .collect::<Result<Vec<_>>>()?;
                let page = Arc::new(Page { layers, slots, plans: Mutex::new(Plans::default()) });
                let page = match inner.pages.iter().position(Option::is_none) {
                    Some(i) => {
                        inner.pages[i] = Some(page);
                        i
                    }
                    None => {
                        inner.pages.push(Some(page));
                        inner.pages.len() - 1
                    }
                };
                inner.free.extend((0..slots).rev().map(|s| (page, s)));
                page
            }
        };
        // The page's lowest free slots, in order.
        let mut mine: Vec<usize> = inner.free.iter().filter(|f| f.0 == page).map(|f| f.1).collect();
        mine.sort_unstable();
        mine.truncate(n);
        inner.free.retain(|f| !(f.0 == page && mine.contains(&f.1)));
        Ok(mine.into_iter().map(|slot| (page, slot)).collect())
    }

    /// Frees a slot. A page of several slots whose every slot is free goes back to the
    /// device: a batch's states do not stay allocated after the batch is done.
    fn release(&self, page: usize, slot: usize) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.free.push((page, slot));
        let slots = inner.pages[page].as_ref().map_or(0, |p| p.slots);
        if slots > 1 && inner.free.iter().filter(|f| f.0 == page).count() == slots {
            inner.free.retain(|f| f.0 != page);
            inner.pages[page] = None;
        }
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
            return Err(Error::State(
                "this State is being used by another thread; give each thread its own State (state.clone())"
                    .into(),
            ));
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
