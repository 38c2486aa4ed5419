// Spliced into src/main.rs of a scratch worktree by scripts/alloc-accounting.sh
// (the crate itself forbids unsafe code). Wraps mimalloc and counts, for the
// live heap: bytes asked for, bytes mimalloc handed out (its size class), and
// allocations by both sizes; written to $FNIR_ALLOC_REPORT every 2 s.
mod accounting {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

    const BUCKETS: usize = 130; // 8-byte steps up to 1 KiB, then one bucket
    static ASKED: AtomicIsize = AtomicIsize::new(0);
    static GIVEN: AtomicIsize = AtomicIsize::new(0);
    static LIVE: AtomicIsize = AtomicIsize::new(0);
    static BY_ASKED: [AtomicIsize; BUCKETS] = [const { AtomicIsize::new(0) }; BUCKETS];
    static BY_GIVEN: [AtomicIsize; BUCKETS] = [const { AtomicIsize::new(0) }; BUCKETS];
    static MI: mimalloc::MiMalloc = mimalloc::MiMalloc;

    fn bucket(n: usize) -> usize {
        n.div_ceil(8).min(BUCKETS - 1)
    }

    fn count(asked: usize, given: usize, sign: isize) {
        ASKED.fetch_add(sign * asked as isize, Relaxed);
        GIVEN.fetch_add(sign * given as isize, Relaxed);
        BY_ASKED[bucket(asked)].fetch_add(sign, Relaxed);
        BY_GIVEN[bucket(given)].fetch_add(sign, Relaxed);
    }

    pub struct Counting;

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { MI.alloc(layout) };
            if !p.is_null() {
                count(layout.size(), unsafe { MI.usable_size(p) }, 1);
                LIVE.fetch_add(1, Relaxed);
            }
            p
        }

        unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
            count(layout.size(), unsafe { MI.usable_size(p) }, -1);
            LIVE.fetch_sub(1, Relaxed);
            unsafe { MI.dealloc(p, layout) }
        }

        unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let before = unsafe { MI.usable_size(p) };
            let q = unsafe { MI.realloc(p, layout, new_size) };
            if !q.is_null() {
                count(layout.size(), before, -1);
                count(new_size, unsafe { MI.usable_size(q) }, 1);
            }
            q
        }
    }

    pub fn report_in_background() {
        let Some(path) = std::env::var_os("FNIR_ALLOC_REPORT") else { return };
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(2));
            let mut out = format!(
                "live allocations {}\nbytes asked for {}\nbytes handed out {}\n",
                LIVE.load(Relaxed),
                ASKED.load(Relaxed),
                GIVEN.load(Relaxed)
            );
            for (title, table) in [("by size asked", &BY_ASKED), ("by size handed out", &BY_GIVEN)] {
                out.push_str(title);
                out.push('\n');
                for (i, n) in table.iter().enumerate() {
                    let n = n.load(Relaxed);
                    if n >= 1000 {
                        let label = if i == BUCKETS - 1 { "> 1024".to_string() } else { format!("{:>4}", i * 8) };
                        out.push_str(&format!("  {label} B: {n}\n"));
                    }
                }
            }
            let _ = std::fs::write(&path, out);
        });
    }
}

#[global_allocator]
static ALLOCATOR: accounting::Counting = accounting::Counting;
