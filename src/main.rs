// glibc malloc was a quarter of a cached review's instructions under callgrind
// (many small, short-lived JSON strings across two worker threads);
// BENCHMARKS.md has the before and after.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    fn_image_resolver::cli::run()
}
