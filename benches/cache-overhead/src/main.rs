//! Live heap per cache entry, moka against quick_cache, 100k `u64 → Arc<u64>`
//! entries (capacity 101k). The key and value are 8 + 24 bytes of the
//! figure; the rest is the cache's own bookkeeping.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Counts live heap bytes; allocation itself is the system's.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - layout.size() as isize, Relaxed);
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const N: u64 = 100_000;

/// The expiry our cache used with moka: one lifetime per entry.
struct Lifetime;

impl moka::Expiry<u64, Arc<u64>> for Lifetime {
    fn expire_after_create(&self, _: &u64, _: &Arc<u64>, _: Instant) -> Option<Duration> {
        Some(Duration::from_secs(3600))
    }
}

fn per_entry(before: isize) -> isize {
    (LIVE.load(Relaxed) - before) / N as isize
}

#[tokio::main]
async fn main() {
    let before = LIVE.load(Relaxed);
    let cache: moka::future::Cache<u64, Arc<u64>> = moka::future::Cache::builder()
        .max_capacity(N + 1000)
        .expire_after(Lifetime)
        .support_invalidation_closures()
        .build();
    for i in 0..N {
        cache.insert(i, Arc::new(i)).await;
    }
    cache.run_pending_tasks().await;
    println!(
        "moka::future (per-entry expiry, invalidation closures): {} B/entry",
        per_entry(before)
    );
    drop(cache);

    let before = LIVE.load(Relaxed);
    let cache: moka::sync::Cache<u64, Arc<u64>> = moka::sync::Cache::new(N + 1000);
    for i in 0..N {
        cache.insert(i, Arc::new(i));
    }
    cache.run_pending_tasks();
    println!("moka::sync (plain): {} B/entry", per_entry(before));
    drop(cache);

    let before = LIVE.load(Relaxed);
    let cache: quick_cache::sync::Cache<u64, Arc<u64>> =
        quick_cache::sync::Cache::new((N + 1000) as usize);
    for i in 0..N {
        cache.insert(i, Arc::new(i));
    }
    println!(
        "quick_cache::sync: {} B/entry ({} entries kept)",
        per_entry(before),
        cache.len()
    );
}
